"""A shard's part files, as the shard stage writes them and later stages read them: their names, columns and
metadata, and :class:`Shard`, a shard's parts read back as one table (the embed and spot-check stages).

A part ``part_NNNNN`` is ``.parquet`` (columns ``id record sequence key``, and for nucleotide input
``parent_id window_start window_end frame``; its manifest under the ``virnucpro_part`` metadata key), ``.json``,
``.ids.parquet``, ``.skipped.tsv`` and ``.keys.npy`` (:data:`PART_FILES`).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .files import sha256

# what the shard step writes for a part, beside each other: rows, counts, valid ids, skipped records, and the
# rows' sequence keys (sorted, each with its first row) for the de-duplication of later shards
PART_FILES = {"rows": ".parquet", "manifest": ".json", "ids": ".ids.parquet", "skipped": ".skipped.tsv", "keys": ".keys.npy"}
SKIPPED_COLUMNS = ["id", "reason", "file", "record"]
PART_SKIPPED_COLUMNS = ["id", "reason", "record", "first_seen", "offset"]  # record numbers local to the part
NUCLEOTIDE_COLUMNS = {"parent_id": pa.string(), "window_start": pa.int64(), "window_end": pa.int64(), "frame": pa.int8()}
PART_KEY = b"virnucpro_part"


def sequence_lengths(table: pa.Table) -> np.ndarray:
    return pc.utf8_length(table["sequence"]).to_numpy(zero_copy_only=False).astype(np.int64)


def part_paths(out_dir: str | Path, name: str) -> dict[str, Path]:
    return {what: Path(out_dir) / f"{name}{suffix}" for what, suffix in PART_FILES.items()}


class Shard:
    """The rows of a shard's parts, in order, with where each part's rows start."""

    def __init__(self, parts: list[str | Path]) -> None:
        self.paths = [Path(p) for p in parts]
        tables = [pq.read_table(p) for p in self.paths]
        self.info = [json.loads(pq.read_metadata(p).metadata[PART_KEY]) for p in self.paths]
        self.rows = [t.num_rows for t in tables]
        self.table = pa.concat_tables(tables) if tables else pa.table({})
        self.sha256 = [sha256(p, cache=False) for p in self.paths]

    @property
    def part_of_row(self) -> np.ndarray:
        return np.repeat([i["index"] for i in self.info], self.rows).astype(np.int64)

    @property
    def row_in_part(self) -> np.ndarray:
        return np.concatenate([np.arange(n) for n in self.rows] or [np.zeros(0, np.int64)]).astype(np.int64)

    def describe(self) -> list[dict]:
        return [{"name": i["name"], "rows": n, "sha256": s} for i, n, s in zip(self.info, self.rows, self.sha256)]

"""Identical sequences embedded once: each row's ``key`` (a 128-bit hash of the residues the model sees,
written by the shard step) is looked up among the rows before it, in this shard and in every earlier part
of the input. A row whose key came earlier is a duplicate: it is not embedded (its embedding columns hold
zeros), the embed job lists it with its first row (``(part, row)``) beside its output, and the merge fills
it from there, so every record keeps its own row, in input order, equal to what the model would have given it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import numpy as np

DUPS_DTYPE = np.dtype([("row", "<i8"), ("part", "<i4"), ("part_row", "<i8")])  # a duplicate row -> its first row


def dups_path(embeddings: str | Path) -> Path:
    """The duplicates table the embed job writes beside a shard's embeddings (``shard_0000.dups.npy``)."""
    p = Path(embeddings)
    return p.with_name(p.name.removesuffix(".parquet") + ".dups.npy")


def read_dups(embeddings: str | Path) -> np.ndarray:
    """The duplicates of a shard's embeddings (none if the embed job wrote no table)."""
    p = dups_path(embeddings)
    return np.load(p) if p.is_file() else np.zeros(0, DUPS_DTYPE)


def find_duplicates(keys: np.ndarray, part: np.ndarray, part_row: np.ndarray,
                    earlier: Iterable[tuple[int, np.ndarray]] = ()) -> tuple[np.ndarray, np.ndarray]:
    """``keys`` (16-byte values) of a shard's rows, with the part and the row within it of each; ``earlier``:
    (part, keys) of the parts before the shard, in input order. Returns the rows to embed (a mask) and the
    duplicates (``DUPS_DTYPE``: row in the shard, part and row of the first row with the same key)."""
    unique, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
    src_part = np.full(len(unique), -1, np.int64)
    src_row = np.zeros(len(unique), np.int64)
    for p, k in earlier:  # the earliest part holding a key is its first occurrence
        todo = np.flatnonzero(src_part < 0)
        if not len(todo) or not len(k):
            continue
        ku, kfirst = np.unique(k, return_index=True)
        pos = np.minimum(np.searchsorted(ku, unique[todo]), len(ku) - 1)
        hit = ku[pos] == unique[todo]
        src_part[todo[hit]], src_row[todo[hit]] = p, kfirst[pos[hit]]
    here = src_part < 0  # first seen in this shard: at its first row
    src_part[here], src_row[here] = part[first[here]], part_row[first[here]]
    rows = np.arange(len(keys))
    own = (src_part[inverse] == part) & (src_row[inverse] == part_row)
    dup_rows = rows[~own]
    dups = np.zeros(len(dup_rows), DUPS_DTYPE)
    dups["row"], dups["part"], dups["part_row"] = dup_rows, src_part[inverse[dup_rows]], src_row[inverse[dup_rows]]
    return own, dups

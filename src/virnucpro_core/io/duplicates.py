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
import pyarrow as pa

DUPS_DTYPE = np.dtype([("row", "<i8"), ("part", "<i4"), ("part_row", "<i8")])  # a duplicate row -> its first row
KEYS_DTYPE = np.dtype([("key", "V16"), ("row", "<i8")])  # a part's distinct keys, sorted, each with its first row


def distinct_keys(keys: np.ndarray) -> np.ndarray:
    """A part's keys as :data:`KEYS_DTYPE`: each distinct key once, sorted, with the first row that has it."""
    unique, first = np.unique(keys, return_index=True)
    out = np.zeros(len(unique), KEYS_DTYPE)
    out["key"], out["row"] = unique, first
    return out


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
    (part, :func:`distinct_keys` of its rows) for the parts before the shard, in input order. Returns the rows
    to embed (a mask) and the duplicates (``DUPS_DTYPE``: row in the shard, part and row of the first row with
    the same key)."""
    unique, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
    src_part = np.full(len(unique), -1, np.int64)
    src_row = np.zeros(len(unique), np.int64)
    for p, k in earlier:  # the earliest part holding a key is its first occurrence
        todo = np.flatnonzero(src_part < 0)
        if not len(todo) or not len(k):
            continue
        pos = np.minimum(np.searchsorted(k["key"], unique[todo]), len(k) - 1)
        hit = k["key"][pos] == unique[todo]
        src_part[todo[hit]], src_row[todo[hit]] = p, k["row"][pos[hit]]
    here = src_part < 0  # first seen in this shard: at its first row
    src_part[here], src_row[here] = part[first[here]], part_row[first[here]]
    rows = np.arange(len(keys))
    own = (src_part[inverse] == part) & (src_row[inverse] == part_row)
    dup_rows = rows[~own]
    dups = np.zeros(len(dup_rows), DUPS_DTYPE)
    dups["row"], dups["part"], dups["part_row"] = dup_rows, src_part[inverse[dup_rows]], src_row[inverse[dup_rows]]
    return own, dups


def embedding_columns(schema: pa.Schema) -> list[str]:
    """The columns that hold embeddings (fixed-size lists, or lists of them): what a duplicate's row gets filled with."""
    return [f.name for f in schema if pa.types.is_fixed_size_list(f.type) or pa.types.is_list(f.type)]


def fill_rows(table: pa.Table, rows: np.ndarray, fills: pa.Table) -> pa.Table:
    """``table`` with the embedding columns of its rows ``rows`` replaced by the rows of ``fills``, in order (a
    copy of each pooled column as numpy, then the rows assigned: memory speed)."""
    rows = np.asarray(rows, np.int64)
    for name in fills.column_names:
        col, new = _array(table[name]), _array(fills[name])
        if pa.types.is_fixed_size_list(col.type):
            d = col.type.list_size
            values = col.flatten().to_numpy(zero_copy_only=False).reshape(-1, d).copy()
            values[rows] = new.flatten().to_numpy(zero_copy_only=False).reshape(-1, d)
            arr = pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), type=col.type)
        else:  # per-residue states: lists of vectors
            index = np.arange(len(col))
            index[rows] = len(col) + np.arange(len(rows))
            arr = pa.concat_arrays([col, new]).take(pa.array(index))
        table = table.set_column(table.schema.get_field_index(name), table.schema.field(name), arr)
    return table


def _array(column: pa.ChunkedArray) -> pa.Array:
    """One array of a column (combine_chunks copies even a single chunk: seconds for a GB of embeddings)."""
    return column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()


class LocalFill:
    """The duplicates whose first row is in the same shard, filled as the shard's chunks are written (in order),
    in the chunk's own arrays before its table is made (no copy of the chunk): a chunk's rows that later
    chunks copy are kept until then (memory: those rows only)."""

    def __init__(self, dups: np.ndarray, first_row: np.ndarray) -> None:
        order = np.argsort(dups["row"], kind="stable")
        self.dst, self.src = dups["row"][order].astype(np.int64), first_row[order].astype(np.int64)
        self.kept: dict[str, dict[int, np.ndarray]] = {}  # column -> shard row -> its value, for later chunks

    def __call__(self, columns: dict[str, np.ndarray | list[np.ndarray]], lo: int, n: int) -> None:
        """Fill, in place, chunk ``columns`` (shard rows ``lo`` to ``lo + n``: pooled (n, D) arrays, or per-residue
        lists of arrays) where a row is a duplicate of an earlier row of the shard."""
        a, b = np.searchsorted(self.dst, [lo, lo + n])
        dst, src = self.dst[a:b] - lo, self.src[a:b]
        here = src >= lo
        for name, values in columns.items():
            if isinstance(values, np.ndarray):
                values[dst[here]] = values[src[here] - lo]
                if (~here).any():
                    values[dst[~here]] = np.stack([self.kept[name][r] for r in src[~here].tolist()])
            else:
                for d, r in zip(dst.tolist(), src.tolist()):
                    values[d] = values[r - lo] if r >= lo else self.kept[name][r]
        self.keep(columns, lo, n)

    def keep(self, columns: dict[str, np.ndarray | list[np.ndarray]], lo: int, n: int) -> None:
        """Keep the rows of this chunk that later chunks copy (also for a chunk read back on a resume)."""
        later = np.unique(self.src[(self.dst >= lo + n) & (self.src >= lo) & (self.src < lo + n)])
        for name, values in columns.items():
            kept = self.kept.setdefault(name, {})
            for r in later.tolist():
                kept[r] = np.array(values[r - lo])

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


def embedding_columns(schema: pa.Schema) -> list[str]:
    """The columns that hold embeddings (fixed-size lists, or lists of them): what a duplicate's row gets filled with."""
    return [f.name for f in schema if pa.types.is_fixed_size_list(f.type) or pa.types.is_list(f.type)]


def fill_rows(table: pa.Table, rows: np.ndarray, fills: pa.Table) -> pa.Table:
    """``table`` with the embedding columns of its rows ``rows`` replaced by the rows of ``fills``, in order (a
    copy of each pooled column as numpy, then the rows assigned: memory speed)."""
    rows = np.asarray(rows, np.int64)
    for name in fills.column_names:
        col, new = table[name].combine_chunks(), fills[name].combine_chunks()
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


class LocalFill:
    """The duplicates whose first row is in the same shard, filled as the shard's chunks are written (in order):
    a chunk's rows that later chunks copy are kept until then (memory: those rows only)."""

    def __init__(self, dups: np.ndarray, first_row: np.ndarray) -> None:
        order = np.argsort(dups["row"], kind="stable")
        self.dst, self.src = dups["row"][order].astype(np.int64), first_row[order].astype(np.int64)
        self.kept: pa.Table | None = None  # rows of earlier chunks that later chunks copy, with their shard row
        self.kept_rows = np.zeros(0, np.int64)

    def __call__(self, table: pa.Table, lo: int) -> pa.Table:
        """Chunk ``table`` (shard rows ``lo`` on) with its duplicates of earlier rows of the shard filled."""
        hi = lo + table.num_rows
        cols = embedding_columns(table.schema)
        a, b = np.searchsorted(self.dst, [lo, hi])
        dst, src = self.dst[a:b], self.src[a:b]
        if len(dst):
            here = src >= lo
            parts = []
            if (~here).any():  # first rows in earlier chunks, kept for this
                parts.append((np.flatnonzero(~here), self.kept.select(cols).take(pa.array(np.searchsorted(self.kept_rows, src[~here])))))
            if here.any():
                parts.append((np.flatnonzero(here), table.select(cols).take(pa.array(src[here] - lo))))
            order = np.argsort(np.concatenate([i for i, _ in parts]), kind="stable")
            fills = pa.concat_tables([t for _, t in parts]).take(pa.array(order))
            table = fill_rows(table, dst - lo, fills)
        later = np.unique(self.src[(self.dst >= hi) & (self.src >= lo) & (self.src < hi)])
        if len(later):  # this chunk's rows that later chunks copy
            kept = table.select(cols).take(pa.array(later - lo))
            self.kept = kept if self.kept is None else pa.concat_tables([self.kept, kept])
            self.kept_rows = np.concatenate([self.kept_rows, later])
        return table

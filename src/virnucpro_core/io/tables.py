"""Embeddings tables: fixed-size list columns, provenance in the schema metadata."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def fixed_size_list(array: np.ndarray) -> pa.FixedSizeListArray:
    """(N, D) float32/float16 array -> fixed_size_list<float>[D] column."""
    array = np.ascontiguousarray(array)
    return pa.FixedSizeListArray.from_arrays(pa.array(array.reshape(-1)), array.shape[1])


def ragged_list(arrays: list[np.ndarray]) -> pa.ListArray:
    """Per-residue (L_i, D) arrays -> list<fixed_size_list<float>[D]> column."""
    dim = arrays[0].shape[1] if arrays else 0
    flat = np.concatenate(arrays) if arrays else np.zeros((0, dim), np.float32)
    offsets = np.concatenate([[0], np.cumsum([len(a) for a in arrays])]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), fixed_size_list(flat))


def embeddings_table(
    ids: list[str],
    lengths: np.ndarray,
    columns: dict[str, np.ndarray | list[np.ndarray]],
    metadata: dict,
) -> pa.Table:
    """Table with ``id`` string, ``length`` int32 and one column per embedding."""
    data = {"id": pa.array(ids, pa.string()), "length": pa.array(np.asarray(lengths), pa.int32())}
    for name, values in columns.items():
        data[name] = ragged_list(values) if isinstance(values, list) else fixed_size_list(values)
    table = pa.table(data)
    return table.replace_schema_metadata({"virnucpro": json.dumps(metadata, sort_keys=True)})


RUN_KEY = b"virnucpro.run"  # a file written as it goes: its run statistics, added to the footer at the end
PARTS_KEY = b"virnucpro.parts"  # the parts a shard's embeddings were computed from: name, rows, SHA-256 of the part file


def writer_options(schema: pa.Schema) -> dict:
    """ParquetWriter options for an embeddings table: zstd, dictionaries and statistics for ids and the small
    columns; the embeddings (floats: little to gain) plain, uncompressed and without statistics, so they are
    written and copied at about disk speed."""
    small = [f.name for f in schema if not (pa.types.is_list(f.type) or pa.types.is_fixed_size_list(f.type))]
    return {"compression": {f.name: "zstd" if f.name in small else "none" for f in schema}, "use_dictionary": small,
            "write_statistics": small}


def provenance_of(kv: dict | None) -> dict:
    """The ``virnucpro`` provenance in Parquet key-value (or Arrow schema) metadata."""
    return json.loads((kv or {}).get(b"virnucpro", b"{}"))


def read_metadata(path: str | Path) -> dict:
    """The ``virnucpro`` provenance of an embeddings file (or of a dataset folder's first part), with
    its ``run`` statistics."""
    path = Path(path)
    if path.is_dir():
        path = min(path.glob("*.parquet"))
    kv = pq.read_metadata(path).metadata or {}
    meta = provenance_of(kv)
    if RUN_KEY in kv:
        meta["run"] = json.loads(kv[RUN_KEY])
    return meta


def keys(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A fixed_size_binary(16) column as a numpy array of 16-byte values (sortable, searchable)."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    return np.frombuffer(arr.buffers()[1], dtype="V16", count=len(arr), offset=arr.offset * 16)


def column_array(table: pa.Table, name: str) -> np.ndarray:
    """A fixed_size_list column as an (N, D) numpy array."""
    col = table[name].combine_chunks()
    dim = col.type.list_size
    return col.values.to_numpy(zero_copy_only=False).reshape(-1, dim)


def take_rows(path: str | Path, column: str, rows: list[int]) -> np.ndarray:
    """Rows (sorted, distinct) of a fixed_size_list column, read a row group at a time."""
    f = pq.ParquetFile(path, pre_buffer=False)
    rows_a, out, first = np.asarray(rows, dtype=np.int64), [], 0
    for g in range(f.num_row_groups):
        n = f.metadata.row_group(g).num_rows
        mine = rows_a[(rows_a >= first) & (rows_a < first + n)] - first
        if len(mine):
            out.append(column_array(f.read_row_group(g, columns=[column]), column)[mine])
        first += n
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)

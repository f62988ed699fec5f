"""Stage 1: validate the FASTA inputs and cut the kept records into residue-balanced shards.

A shard is a Parquet table with columns ``order id file record sequence`` (and, for nucleotide
input, ``parent_id window_start window_end frame``), one row per record to embed, in input order:
``order`` numbers the rows of the whole run 0, 1, 2..., ``file`` and ``record`` name the input record.
Records stream from the FASTA files to the shard files, cut every ``residues_per_shard`` residues;
with ``shards: N`` instead a first pass totals the residues, so N shards come out balanced.
"""

from __future__ import annotations

import csv
import logging
import os
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..fasta import Record, Skipped, read_fasta
from ..files import atomic_path, sha256, write_json
from ..layout import shard_name
from ..nucleotide import translate_record
from ..options import Options

log = logging.getLogger(__name__)

SKIPPED_COLUMNS = ["id", "reason", "file", "record"]
NUCLEOTIDE_COLUMNS = {"parent_id": pa.string(), "window_start": pa.int64(), "window_end": pa.int64(), "frame": pa.int8()}
BOOKKEEPING = ["order", "file", "record"]  # shard columns carried to the merge, not into the output
ROW_GROUP_RESIDUES = 32 << 20  # a shard's row group: about this many residues, or
ROW_GROUP_ROWS = 1 << 17  # this many rows, whichever comes first


def sequence_lengths(table: pa.Table) -> np.ndarray:
    return pc.utf8_length(table["sequence"]).to_numpy(zero_copy_only=False).astype(np.int64)


def unique_inputs(inputs: list[str]) -> list[str]:
    """Each input file once (the same file listed twice would count its records twice)."""
    seen: dict[str, str] = {}
    for p in inputs:
        real = os.path.realpath(p)
        if real in seen:
            log.warning("%s is listed more than once (as %s): read once", p, seen[real])
        else:
            seen[real] = p
    return list(seen.values())


def _items(inputs: list[str], options: Options) -> Iterator[tuple[Record | Skipped, list]]:
    """Each input record with the rows it gives: a protein record one row, a nucleotide record
    its translated proteins (``(Record, Translated | None)`` pairs), a skipped record none."""
    nucleotide = options.nucleotide if options.input_type == "nucleotide" else None
    for item in read_fasta(inputs, options.on_invalid, options.input_type):
        if isinstance(item, Skipped):
            yield item, []
        elif nucleotide is None:
            yield item, [(item, None)]
        else:
            proteins = translate_record(item.id, item.sequence, nucleotide)
            if proteins:
                yield item, [(item, t) for t in proteins]
            else:
                yield Skipped(item.file, item.number, item.id, f"no translated protein of >= {nucleotide.min_protein_length} residues"), []


class _ShardWriter:
    """Rows to ``shard_0000.parquet``, ``shard_0001.parquet``... as they come, a row group at a time:
    memory holds one row group, never a shard or the input. A record goes to the shard its
    residues' midpoint falls in; no shard is empty, except the one shard of an input with no
    record to embed."""

    def __init__(self, outdir: Path, residues: int, per: int, max_shards: int | None, nucleotide: bool) -> None:
        # shard k holds residues [k * residues / per, (k + 1) * residues / per): integers, exact
        self.outdir, self.total, self.per, self.max_shards = outdir, residues, per, max_shards
        cols = {"order": pa.int64(), "id": pa.string(), "file": pa.string(), "record": pa.int32(), "sequence": pa.large_string()}
        self.schema = pa.schema({**cols, **(NUCLEOTIDE_COLUMNS if nucleotide else {})})
        self.rows: dict[str, list] = {n: [] for n in self.schema.names}
        self.buffered = 0  # residues in self.rows
        self.residues = 0  # all rows so far
        self.boundary = 1  # the next shard starts where the residues pass boundary * residues / per
        self.counts: list[int] = []
        self.writer: pq.ParquetWriter | None = None
        self.tmp: Path | None = None

    def add(self, order: int, rec: Record, t) -> None:
        seq = t.protein if t is not None else rec.sequence
        n = len(seq)
        new_shard = self.writer is None
        while (self.max_shards is None or self.boundary < self.max_shards) and \
                (2 * self.residues + n) * self.per > 2 * self.boundary * self.total:
            self.boundary += 1
            new_shard = True
        if new_shard:
            self._open()
        row = {"order": order, "id": t.id if t is not None else rec.id, "file": rec.file, "record": rec.number, "sequence": seq}
        if t is not None:
            row.update({c: getattr(t, c) for c in NUCLEOTIDE_COLUMNS})
        for k, v in row.items():
            self.rows[k].append(v)
        self.counts[-1] += 1
        self.residues += n
        self.buffered += n
        if self.buffered >= ROW_GROUP_RESIDUES or len(self.rows["id"]) >= ROW_GROUP_ROWS:
            self._flush()

    def _flush(self) -> None:
        if self.rows["id"]:
            self.writer.write_table(pa.table(self.rows, schema=self.schema))
            self.rows = {n: [] for n in self.schema.names}
            self.buffered = 0

    def _open(self) -> None:
        self._close()
        name = self.outdir / f"{shard_name(len(self.counts))}.parquet"
        self.tmp = name.with_name(f".{name.name}.tmp")
        self.writer = pq.ParquetWriter(self.tmp, self.schema, compression="zstd")
        self.counts.append(0)

    def _close(self) -> None:
        if self.writer is not None:
            self._flush()
            self.writer.close()
            self.tmp.replace(self.tmp.with_name(self.tmp.name[1:].removesuffix(".tmp")))
            self.writer = None

    def abort(self) -> None:
        """After a failure: no partial shard left behind."""
        if self.writer is not None:
            self.writer.close()
            self.tmp.unlink(missing_ok=True)
            self.writer = None

    def finish(self) -> list[int]:
        if not self.counts:
            self._open()  # nothing to embed: one empty shard, so the later stages still run
        self._close()
        return self.counts


def _total_residues(inputs: list[str], options: Options) -> int:
    """A first pass, only when a shard count (not a shard size) is asked for: the residues to embed."""
    return sum(len(t.protein if t is not None else r.sequence) for _, rows in _items(inputs, options) for r, t in rows)


def run(inputs: list[str], outdir: str | Path, options: Options) -> dict:
    """Write ``shard_0000.parquet``..., ``skipped.tsv`` and ``manifest.json`` (per-file counts and
    checksums) into ``outdir``, streaming: memory holds a row group, not the input."""
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    inputs = unique_inputs(inputs)
    if options.shards is None:
        writer = _ShardWriter(outdir, options.residues_per_shard, 1, None, options.input_type == "nucleotide")
    else:
        total = _total_residues(inputs, options)
        writer = _ShardWriter(outdir, total, options.shards, options.shards, options.input_type == "nucleotide")
    per_file = {str(Path(p)): {"records": 0, "kept": 0, "skipped": 0} for p in inputs}
    order = 0
    try:
        with atomic_path(outdir / "skipped.tsv") as skipped_path, open(skipped_path, "w", newline="") as fh:
            skipped = csv.writer(fh, delimiter="\t", lineterminator="\n")
            skipped.writerow(SKIPPED_COLUMNS)
            for item, rows in _items(inputs, options):
                counts = per_file[item.file]
                counts["records"] += 1
                if isinstance(item, Skipped):
                    counts["skipped"] += 1
                    skipped.writerow([item.id, item.reason, item.file, item.number])
                    continue
                counts["kept"] += 1
                for rec, t in rows:  # a nucleotide record's proteins have unique ids by construction
                    writer.add(order, rec, t)
                    order += 1
            shard_records = writer.finish()
    except BaseException:
        writer.abort()
        raise
    manifest = {
        "inputs": [{"file": f, "sha256": sha256(f, cache=False), **c} for f, c in per_file.items()],
        "records": order,
        "skipped": sum(c["skipped"] for c in per_file.values()),
        "residues": writer.residues,
        "shards": len(shard_records),
        "shard_records": shard_records,
        "on_invalid": options.on_invalid,
    }
    write_json(outdir / "manifest.json", manifest)
    log.info("%d records kept, %d skipped, %d residues in %d shards", order, manifest["skipped"], writer.residues, len(shard_records))
    return manifest

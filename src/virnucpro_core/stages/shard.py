"""Stage 1: validate the FASTA inputs and cut the kept records into residue-balanced shards.

A shard is a Parquet table with columns ``order id file record sequence`` (and, for nucleotide
input, ``parent_id window_start window_end frame``), one row per record to embed, in input order.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..fasta import Record, Skipped, balance_shards, read_fasta
from ..files import sha256, write_json, write_table, write_tsv
from ..layout import shard_name
from ..nucleotide import translate_record
from ..options import Options

log = logging.getLogger(__name__)

SKIPPED_COLUMNS = ["id", "reason", "file", "record"]
NUCLEOTIDE_COLUMNS = {"parent_id": pa.string(), "window_start": pa.int64(), "window_end": pa.int64(), "frame": pa.int8()}
BOOKKEEPING = ["order", "file", "record"]  # shard columns carried to the merge, not into the output


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


def run(inputs: list[str], outdir: str | Path, options: Options) -> dict:
    """Write ``shard_0000.parquet``..., ``skipped.tsv`` and ``manifest.json`` (per-file counts and
    checksums) into ``outdir``."""
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    inputs = unique_inputs(inputs)
    nucleotide = options.nucleotide if options.input_type == "nucleotide" else None
    records: list[Record] = []
    skipped: list[Skipped] = []
    extra: dict[str, list] = {c: [] for c in NUCLEOTIDE_COLUMNS} if nucleotide else {}
    per_file = {str(Path(p)): {"records": 0, "kept": 0, "skipped": 0} for p in inputs}
    for item in read_fasta(inputs, options.on_invalid, options.input_type):
        counts = per_file[item.file]
        counts["records"] += 1
        if isinstance(item, Record) and nucleotide:
            proteins = translate_record(item.id, item.sequence, nucleotide)
            if not proteins:
                item = Skipped(item.file, item.number, item.id, f"no translated protein of >= {nucleotide.min_protein_length} residues")
            for t in proteins:
                records.append(Record(len(records), item.file, item.number, t.id, t.protein))
                for c in NUCLEOTIDE_COLUMNS:
                    extra[c].append(getattr(t, c))
        elif isinstance(item, Record):
            records.append(item)
        if isinstance(item, Record):
            counts["kept"] += 1
        else:
            skipped.append(item)
            counts["skipped"] += 1
    if nucleotide and len({r.id for r in records}) != len(records):  # unique by construction; checked before any GPU job
        dup = next(i for i, n in Counter(r.id for r in records).items() if n > 1)
        raise RuntimeError(f"derived protein id {dup!r} occurs twice")
    lengths = [len(r.sequence) for r in records]
    n_shards = options.shards
    if options.residues_per_shard:
        n_shards = -(-sum(lengths) // options.residues_per_shard)
    n_shards = max(1, min(n_shards, len(records)))  # no empty shard: each would cost three jobs for nothing
    spec = balance_shards(lengths, n_shards)
    for i, (a, b) in enumerate(zip(spec.starts[:-1], spec.starts[1:])):
        part = records[a:b]
        table = pa.table(
            {
                "order": pa.array([r.order for r in part], pa.int64()),
                "id": pa.array([r.id for r in part], pa.string()),
                "file": pa.array([r.file for r in part], pa.string()),
                "record": pa.array([r.number for r in part], pa.int32()),
                "sequence": pa.array([r.sequence for r in part], pa.large_string()),
                **{c: pa.array(v[a:b], NUCLEOTIDE_COLUMNS[c]) for c, v in extra.items()},
            }
        )
        write_table(table, outdir / f"{shard_name(i)}.parquet")
    write_tsv(outdir / "skipped.tsv", SKIPPED_COLUMNS, [[s.id, s.reason, s.file, s.number] for s in skipped])
    manifest = {
        "inputs": [{"file": f, "sha256": sha256(f, cache=False), **c} for f, c in per_file.items()],
        "records": len(records),
        "skipped": len(skipped),
        "residues": int(sum(lengths)),
        "shards": spec.n_shards,
        "shard_records": [b - a for a, b in zip(spec.starts[:-1], spec.starts[1:])],
        "on_invalid": options.on_invalid,
    }
    write_json(outdir / "manifest.json", manifest)
    log.info("%d records kept, %d skipped, %d residues in %d shards", len(records), len(skipped), sum(lengths), spec.n_shards)
    return manifest

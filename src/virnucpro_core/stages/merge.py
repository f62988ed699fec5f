"""Stage 5: every kept record once, in input order, in one Parquet file (or a dataset folder of part
files); skipped.tsv, spot_check.tsv and summary.json.

Streams: rows go from the shard files to the output one batch (~32 MiB) at a time, so memory is
bounded by a batch, never by the run. The accounting is streamed too: the shard step numbered every embedded
row (``order`` 0, 1, 2, ...), so a contiguous run of numbers proves that no row is missing,
duplicated or out of order, and per input file, records in = records embedded + records skipped.
Any failure stops the merge before the output is renamed into place.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
import subprocess
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .. import claim
from ..files import atomic_path, remove_stale, sha256, umask, write_json, write_tsv
from ..layout import Layout
from ..options import Options
from ..parquet import read_metadata
from .shard import BOOKKEEPING, SKIPPED_COLUMNS

log = logging.getLogger(__name__)

BATCH_BYTES = 32 << 20  # rows read and written at a time: about this many bytes


def _batches(path: str) -> tuple[pq.ParquetFile, int]:
    f = pq.ParquetFile(path, pre_buffer=False)  # pre-buffering reads ahead the whole file
    rows = max(1, f.metadata.num_rows)
    per_row = max(1, sum(f.metadata.row_group(i).total_byte_size for i in range(f.num_row_groups)) // rows)
    return f, max(1, BATCH_BYTES // per_row)


class _Check:
    """The streamed accounting: contiguous row numbers, distinct input records per file."""

    def __init__(self) -> None:
        self.next_order = 0
        self.last: tuple[str, int] | None = None
        self.records = Counter()  # input file -> input records with at least one embedded row
        self.truncated = 0  # rows embedded on fewer residues than they have
        self.not_embedded = 0  # residues beyond the truncation

    def add(self, batch: pa.RecordBatch, where: str) -> None:
        order = batch.column("order").to_numpy()
        expected = np.arange(self.next_order, self.next_order + len(order))
        if not np.array_equal(order, expected):
            bad = int(np.flatnonzero(order != expected)[0])
            raise RuntimeError(f"merge check failed: {where} holds row {int(order[bad])} where row {int(expected[bad])} was "
                               "expected: records are missing, duplicated or out of input order")
        self.next_order += len(order)
        if "embedded_residues" in batch.schema.names:
            short = batch.column("length").to_numpy() - batch.column("embedded_residues").to_numpy()
            self.truncated += int((short > 0).sum())
            self.not_embedded += int(short.sum())
        files, numbers = batch.column("file").to_pylist(), batch.column("record").to_numpy()
        new = np.ones(len(numbers), dtype=bool)  # a row of a record that the previous row did not belong to
        if len(numbers):
            new[1:] = (numbers[1:] != numbers[:-1]) | (np.array(files[1:], dtype=object) != np.array(files[:-1], dtype=object))
            new[0] = self.last != (files[0], int(numbers[0]))
            self.last = (files[-1], int(numbers[-1]))
        self.records.update(f for f, n in zip(files, new) if n)


def run(manifest: str | Path, skipped: str | Path, embeddings: list[str], spot_checks: list[str], outdir: str | Path,
        options: Options) -> dict:
    """Write ``embeddings.parquet`` (a file, or with ``merge.output: dataset`` a folder of part
    files), ``skipped.tsv``, ``spot_check.tsv`` and ``summary.json`` into ``outdir``."""
    out = Layout(str(outdir))
    man = json.loads(Path(manifest).read_text())
    for f in man["inputs"]:  # an input changed in place since it was sharded (its mtime kept) is caught here
        if not Path(f["file"]).is_file() or sha256(f["file"], cache=False) != f["sha256"]:
            raise RuntimeError(f"{f['file']} is not the file that was sharded (SHA-256 {f['sha256'][:16]}... then); "
                               "rerun the shard step: snakemake --forcerun shard_fasta")
    if len(embeddings) != man["shards"]:
        raise ValueError(f"expected {man['shards']} shard embeddings, got {len(embeddings)}")
    meta = read_metadata(embeddings[0]) if embeddings else {}
    meta.pop("run", None)
    meta["inputs"] = man["inputs"]
    check = _Check()
    dataset = options.merge.output == "dataset"
    final = Path(out.embeddings)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(final)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        writer = None
        for i, path in enumerate(embeddings):
            f, rows = _batches(path)
            schema = f.schema_arrow.remove_metadata()
            keep = [n for n in schema.names if n not in BOOKKEEPING]
            schema = pa.schema([schema.field(n) for n in keep], metadata={"virnucpro": json.dumps(meta, sort_keys=True)})
            if writer is None or dataset:
                if writer is not None:
                    writer.close()
                writer = pq.ParquetWriter(tmp_dir / (f"part-{i:05d}.parquet" if dataset else "embeddings.parquet"), schema,
                                          compression="zstd")
            for batch in f.iter_batches(batch_size=rows, use_threads=False):
                check.add(batch, path)
                writer.write_batch(pa.RecordBatch.from_arrays([batch.column(n) for n in keep], schema=schema))
        if writer is None:
            raise ValueError("no shard embeddings to merge")
        writer.close()
        problems = []
        if check.next_order != man["records"]:
            problems.append(f"{check.next_order} embedded rows, {man['records']} kept by the shard step")
        skipped_per_file, reasons = Counter(), Counter()
        with open(skipped, newline="") as src, atomic_path(out.skipped) as dst_path, open(dst_path, "w", newline="") as dst:
            w = csv.writer(dst, delimiter="\t", lineterminator="\n")
            w.writerow(SKIPPED_COLUMNS)
            for r in csv.DictReader(src, delimiter="\t"):
                skipped_per_file[r["file"]] += 1
                reasons[r["reason"]] += 1
                w.writerow([r[c] for c in SKIPPED_COLUMNS])
        per_file = {}
        for f in man["inputs"]:
            n_out, n_skip = check.records[f["file"]], skipped_per_file[f["file"]]
            per_file[f["file"]] = {"records_in": f["records"], "embedded": n_out, "skipped": n_skip}
            if f["records"] != n_out + n_skip:
                problems.append(f"{f['file']}: {f['records']} records in, {n_out} embedded + {n_skip} skipped")
        if problems:
            raise RuntimeError("merge check failed: " + "; ".join(problems))
        if final.is_dir():
            shutil.rmtree(final)
        elif final.exists():
            final.unlink()
        if dataset:
            os.chmod(tmp_dir, 0o777 & ~umask())  # a folder from mkdtemp is 0700: give it what mkdir would
        (tmp_dir if dataset else tmp_dir / "embeddings.parquet").rename(final)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    spot = _concat_spot_checks(spot_checks, out.spot_checks)
    summary = {
        "records_in": sum(f["records"] for f in man["inputs"]),
        "embedded": check.next_order,
        "embedded_input_records": sum(check.records.values()),
        "skipped": sum(skipped_per_file.values()),
        "skipped_by_reason": dict(reasons.most_common()),
        "truncated": {"records": check.truncated, "residues_not_embedded": check.not_embedded},
        "per_file": per_file,
        "spot_checked": spot["checked"],
        "spot_check_failed": spot["failed"],
        "model": meta.get("model"),
        "output": options.merge.output,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
        **provenance(outdir),
    }
    write_json(out.summary, summary)
    log.info("merged %d rows (%d records skipped) into %s", check.next_order, summary["skipped"], final)
    return summary


def provenance(outdir: str | Path) -> dict:
    """The workflow's git commit and the run's wall time so far (from its claim on the outdir)."""
    root = Path(__file__).resolve().parents[3]  # the checkout holding src/virnucpro_core
    try:
        res = subprocess.run(["git", "-C", str(root), "describe", "--always", "--dirty", "--abbrev=12"], capture_output=True,
                             text=True, timeout=10)
        commit = res.stdout.strip() if res.returncode == 0 else None
    except (OSError, subprocess.TimeoutExpired):
        commit = None
    started = claim.read(outdir).get("started_epoch")
    return {"workflow_commit": commit or "unknown (not a git checkout)",
            "wall_seconds": round(time.time() - started, 1) if isinstance(started, (int, float)) else None}


def _concat_spot_checks(paths: list[str], dest: str) -> dict:
    rows, header = [], None
    for p in paths:
        with open(p, newline="") as fh:
            rd = list(csv.reader(fh, delimiter="\t"))
        header = rd[0]
        rows += rd[1:]
    write_tsv(dest, header or ["id"], rows)
    return {"checked": len(rows), "failed": sum(1 for r in rows if r[-1] != "pass")}

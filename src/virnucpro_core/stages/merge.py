"""Stage 4: every kept record once, in input order: ``embeddings.parquet`` (one file, or a dataset folder of one
part file per shard), ``skipped.tsv``, ``spot_check.tsv`` and ``summary.json``.

The accounting is checked over the small columns before anything is written: every input byte range still
hashes to what the shard step read, every shard's embeddings were computed from the parts the shard step
wrote (their SHA-256) and hold their ids in order, and per input file, records in = records embedded + records
skipped. Then the embeddings are moved, not copied: a shard's file already has the output's columns, so a
dataset part is the shard's file itself (a hard link; the workflow removes the shard's name afterwards) and
so is the single file of a one-shard run. A shard is rewritten only where it must change: rows of records
whose id an earlier part already used are dropped, and rows of duplicate sequences (:mod:`..dedup`) whose
first row is in an earlier shard are filled from it (the embed job fills those of its own shard). Those
fills stream: each source row is read once and spilled to its shard's fill file (Arrow IPC, memory-mapped
back), so memory holds a row group, never the output. A single-file
output of several shards is their concatenation, at disk speed (the embedding columns are stored
uncompressed). Any failure stops the merge before the output is renamed into place.
"""

from __future__ import annotations

import csv
import errno
import hashlib
import json
import logging
import os
import shutil
import subprocess
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.ipc as ipc
import pyarrow.parquet as pq

from .. import __version__
from ..run import claim
from ..io.duplicates import embedding_columns, fill_rows, read_dups
from ..io.files import atomic_path, remove_stale, umask, write_json, write_tsv
from ..run.layout import Layout
from ..options import Options
from ..io.tables import PARTS_KEY, RUN_KEY, provenance_of, writer_options
from ..run.parts import part_name
from ..io.part_files import SKIPPED_COLUMNS, part_paths

log = logging.getLogger(__name__)

BLOCK = 8 << 20  # bytes of input hashed at a time
BATCH_BYTES = 64 << 20  # rows of a shard read, filled and written at a time: about this many bytes


def check_inputs(parts: list[dict]) -> dict[str, str]:
    """Each input file's SHA-256, read once; raises if a byte range no longer hashes to what the shard step read."""
    by_file: dict[str, list[dict]] = {}
    for p in parts:
        by_file.setdefault(p["file"], []).append(p)

    def one(file: str) -> str:
        ranges = sorted(by_file[file], key=lambda p: p["start"])
        whole = hashlib.sha256()
        if not Path(file).is_file() or Path(file).stat().st_size != ranges[0]["size"]:
            raise RuntimeError(f"{file} is not the file that was sharded; rerun the shard step: snakemake --forcerun shard")
        with open(file, "rb") as fh:
            for p in ranges:
                h, left = hashlib.sha256(), p["end"] - p["start"]
                while left:
                    block = fh.read(min(BLOCK, left))
                    if not block:
                        break
                    h.update(block)
                    whole.update(block)
                    left -= len(block)
                if h.hexdigest() != p["sha256"]:
                    raise RuntimeError(f"{file} is not the file that was sharded (bytes {p['start']}-{p['end']} changed); "
                                       "rerun the shard step: snakemake --forcerun shard")
        return whole.hexdigest()

    with ThreadPoolExecutor(min(4, max(1, len(by_file)))) as pool:
        return dict(zip(by_file, pool.map(one, by_file)))


class _Shard:
    """One shard's embeddings file, checked against the parts it was computed from."""

    def __init__(self, index: int, path: str, spec: dict, parts: dict[str, dict], shard_dir: Path) -> None:
        self.index, self.path, self.name = index, Path(path), spec["name"]
        self.parts = [parts[n] for n in spec["parts"]]
        self.file = pq.ParquetFile(self.path, pre_buffer=False)
        kv = self.file.metadata.metadata or {}
        got = json.loads(kv.get(PARTS_KEY, b"[]"))
        want = [{"name": p["name"], "rows": p["rows"], "sha256": p["rows_sha256"]} for p in self.parts]
        if got != want:
            raise RuntimeError(f"merge check failed: {path} was not computed from the parts {', '.join(spec['parts'])} as the "
                               "shard step wrote them; rerun its embed job")
        self.rows = sum(p["rows"] for p in self.parts)
        if self.file.metadata.num_rows != self.rows:
            raise RuntimeError(f"merge check failed: {path} holds {self.file.metadata.num_rows} rows, its parts {self.rows}")
        self.start = {p["name"]: sum(q["rows"] for q in self.parts[:i]) for i, p in enumerate(self.parts)}  # part -> first row
        self.kv = kv
        self.meta = provenance_of(kv)
        self.shard_dir = shard_dir
        self.dups = read_dups(path)
        self.drop = np.zeros(self.rows, bool)

    def check_ids(self) -> None:
        """The embeddings hold the parts' rows, in order (ids compared a row group at a time)."""
        mine = (b.column(0) for b in self.file.iter_batches(batch_size=1 << 16, columns=["id"], use_threads=False))
        theirs = (b.column(0) for p in self.parts
                  for b in pq.ParquetFile(part_paths(self.shard_dir, p["name"])["rows"]).iter_batches(batch_size=1 << 16,
                                                                                                     columns=["id"]))
        a = b = None
        n = 0
        while True:
            if a is None or len(a) == 0:
                a = next(mine, None)
            if b is None or len(b) == 0:
                b = next(theirs, None)
            if a is None or b is None:
                if a is not None or b is not None:
                    raise RuntimeError(f"merge check failed: {self.path} and its parts hold different numbers of rows")
                return
            k = min(len(a), len(b))
            if not a.slice(0, k).equals(b.slice(0, k)):
                bad = int(np.flatnonzero(pc.not_equal(a.slice(0, k), b.slice(0, k)).to_numpy(zero_copy_only=False))[0])
                raise RuntimeError(f"merge check failed: row {n + bad} of {self.path} is {a[bad]}, its part's is {b[bad]}: "
                                   "records are missing, duplicated or out of input order")
            a, b, n = a.slice(k), b.slice(k), n + k

    @property
    def changes(self) -> bool:
        return bool(len(self.dups) or self.drop.any())


def _counts(shard: _Shard) -> tuple[Counter, int, int]:
    """Per input file, the records with at least one row kept; truncated rows and the residues they lose."""
    records: Counter = Counter()
    for p in shard.parts:
        rec = pq.read_table(part_paths(shard.shard_dir, p["name"])["rows"], columns=["record"])["record"].to_numpy()
        rec = rec[~shard.drop[shard.start[p["name"]] : shard.start[p["name"]] + p["rows"]]]
        records[p["file"]] += int(len(rec) and 1 + np.count_nonzero(np.diff(rec)))
    t = pq.read_table(shard.path, columns=["length", "embedded_residues"])
    short = (t["length"].to_numpy() - t["embedded_residues"].to_numpy())[~shard.drop]
    return records, int((short > 0).sum()), int(short.sum())


def _spill(shards: list[_Shard], part_shard: dict[str, tuple[int, int]], columns: list[str], tmp: Path) -> dict[int, Path]:
    """Every duplicate's first row, read once from its shard and written to the duplicate's shard's fill file
    (with ``dst_row``): one pass over the shards that hold first rows, a row group at a time."""
    src = []  # (source shard, source row, destination shard, destination row)
    for s in shards:
        for row, part, part_row in s.dups.tolist():
            k, first = part_shard[part_name(part)]
            src.append((k, first + part_row, s.index, row))
    if not src:
        return {}
    src_a = np.array(src, dtype=np.int64)
    src_a = src_a[np.lexsort((src_a[:, 1], src_a[:, 0]))]
    writers: dict[int, ipc.RecordBatchFileWriter] = {}
    paths: dict[int, Path] = {}
    for k in np.unique(src_a[:, 0]).tolist():
        mine = src_a[src_a[:, 0] == k]
        for first, t in _batches(shards[k].file, columns):
            sel = mine[(mine[:, 1] >= first) & (mine[:, 1] < first + t.num_rows)]
            if len(sel):
                t = t.take(pa.array(sel[:, 1] - first))
                for dst in np.unique(sel[:, 2]).tolist():
                    m = sel[:, 2] == dst
                    batch = t.filter(pa.array(m)).append_column("dst_row", pa.array(sel[m, 3]))
                    if dst not in writers:
                        paths[dst] = tmp / f"fill-{dst:05d}.arrow"
                        writers[dst] = ipc.new_file(paths[dst], batch.schema)
                    writers[dst].write_table(batch)
    for w in writers.values():
        w.close()
    return paths


def _write_shard(shard: _Shard, writer: pq.ParquetWriter, fill: Path | None, columns: list[str]) -> None:
    """The shard's rows into ``writer``: duplicates filled from ``fill``, dropped rows left out."""
    filled = ipc.open_file(pa.memory_map(str(fill))).read_all() if fill else None
    order = np.argsort(filled["dst_row"].to_numpy(), kind="stable") if filled is not None else np.zeros(0, np.int64)
    dst = filled["dst_row"].to_numpy()[order] if filled is not None else np.zeros(0, np.int64)
    for first, t in _batches(shard.file):
        n = t.num_rows
        a, b = np.searchsorted(dst, first), np.searchsorted(dst, first + n)
        if b > a:  # rows [first, first + n) that are duplicates: filled from their first rows
            t = fill_rows(t, dst[a:b] - first, filled.select(columns).take(pa.array(order[a:b])))
        keep = ~shard.drop[first : first + n]
        if not keep.all():
            t = t.filter(pa.array(keep))
        writer.write_table(t.replace_schema_metadata(writer.schema.metadata))


def _batches(f: pq.ParquetFile, columns: list[str] | None = None):
    """(first row, table) of about ``BATCH_BYTES`` at a time (``iter_batches`` decodes the embeddings about twice as
    fast as ``read_row_group``)."""
    rows = max(1, f.metadata.num_rows)
    per_row = max(1, sum(f.metadata.row_group(i).total_byte_size for i in range(f.num_row_groups)) // rows)
    first = 0
    for batch in f.iter_batches(batch_size=max(1, BATCH_BYTES // per_row), columns=columns):
        yield first, pa.Table.from_batches([batch])
        first += batch.num_rows


def _place(src: Path, dst: Path) -> str:
    """``src`` under the name ``dst`` without copying (a hard link), or copied where the filesystem has none."""
    try:
        os.link(src, dst)
        return "linked"
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EACCES):
            raise
        log.warning("%s: no hard link on this filesystem (%s): copying", dst.parent, exc.strerror)
        shutil.copyfile(src, dst)
        return "copied"


def run(manifest: str | Path, skipped: str | Path, embeddings: list[str], spot_checks: list[str], outdir: str | Path,
        options: Options) -> dict:
    """Write ``embeddings.parquet`` (a file, or a folder of one part per shard, ``merge.output``), ``skipped.tsv``,
    ``spot_check.tsv`` and ``summary.json`` into ``outdir``."""
    t0 = time.perf_counter()
    out = Layout(str(outdir))
    man = json.loads(Path(manifest).read_text())
    shard_dir = Path(manifest).parent
    if len(embeddings) != len(man["shards"]):
        raise ValueError(f"expected {len(man['shards'])} shard embeddings, got {len(embeddings)}")
    sha = check_inputs(man["parts"])
    parts = {p["name"]: p for p in man["parts"]}
    shards = [_Shard(i, e, spec, parts, shard_dir) for i, (e, spec) in enumerate(zip(embeddings, man["shards"]))]
    part_shard = {n: (s.index, s.start[n]) for s in shards for n in s.start}  # part -> (shard, its first row there)
    for name, rows in man["dropped_rows"].items():
        k, first = part_shard[name]
        shards[k].drop[np.asarray(rows, np.int64) + first] = True
    records, truncated, lost = Counter(), 0, 0
    for s in shards:
        s.check_ids()
        r, t, n = _counts(s)
        records.update(r)
        truncated, lost = truncated + t, lost + n
    n_rows = sum(s.rows - int(s.drop.sum()) for s in shards)
    problems = [] if n_rows == man["rows"] else [f"{n_rows} rows to write, {man['rows']} kept by the shard step"]
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
        n_out, n_skip = records[f["file"]], skipped_per_file[f["file"]]
        per_file[f["file"]] = {"records_in": f["records"], "embedded": n_out, "skipped": n_skip}
        if f["records"] != n_out + n_skip:
            problems.append(f"{f['file']}: {f['records']} records in, {n_out} embedded + {n_skip} skipped")
    if problems:
        raise RuntimeError("merge check failed: " + "; ".join(problems))

    layout = options.merge.layout(len(shards))
    final = Path(out.embeddings)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(final)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    placed = Counter()
    try:
        schema = shards[0].file.schema_arrow
        columns = embedding_columns(schema)
        fills = _spill(shards, part_shard, columns, tmp_dir)
        if layout == "file" and len(shards) == 1 and not shards[0].changes:
            placed[_place(shards[0].path, tmp_dir / "embeddings.parquet")] += 1
        elif layout == "file":
            meta = {**shards[0].meta, "inputs": [i for s in shards for i in s.meta.get("inputs", [])]}
            file_schema = schema.with_metadata({"virnucpro": json.dumps(meta, sort_keys=True)})
            with pq.ParquetWriter(tmp_dir / "embeddings.parquet", file_schema, **writer_options(file_schema)) as writer:
                for s in shards:
                    _write_shard(s, writer, fills.get(s.index), columns)
            placed["written"] += len(shards)
        else:
            for s in shards:
                dest = tmp_dir / f"part-{s.index:05d}.parquet"
                if not s.changes:
                    placed[_place(s.path, dest)] += 1
                    continue
                part_schema = s.file.schema_arrow.with_metadata({k: v for k, v in s.kv.items() if not k.startswith(b"ARROW")})
                with pq.ParquetWriter(dest, part_schema, **writer_options(part_schema)) as writer:
                    _write_shard(s, writer, fills.get(s.index), columns)
                placed["written"] += 1
        for p in tmp_dir.glob("fill-*.arrow"):
            p.unlink()
        if final.is_dir():
            shutil.rmtree(final)
        elif final.exists():
            final.unlink()
        if layout == "dataset":
            os.chmod(tmp_dir, 0o777 & ~umask())  # a folder from mkdtemp is 0700: give it what mkdir would
        (tmp_dir if layout == "dataset" else tmp_dir / "embeddings.parquet").rename(final)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    spot = _concat_spot_checks(spot_checks, out.spot_checks)
    summary = {
        "records_in": sum(f["records"] for f in man["inputs"]),
        "embedded": n_rows,
        "embedded_input_records": sum(records.values()),
        "filled_from_duplicates": sum(json.loads(s.kv.get(RUN_KEY, b"{}")).get("duplicates", 0) for s in shards),
        "skipped": sum(skipped_per_file.values()),
        "skipped_by_reason": dict(reasons.most_common()),
        "truncated": {"records": truncated, "residues_not_embedded": lost},
        "per_file": per_file,
        "inputs": [{"file": f, "sha256": h} for f, h in sha.items()],
        "spot_checked": spot["checked"],
        "spot_check_failed": spot["failed"],
        "model": shards[0].meta.get("model"),
        "output": layout,
        "shards": {k: v for k, v in placed.items()},
        "merge_seconds": round(time.perf_counter() - t0, 2),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
        **provenance(outdir),
    }
    write_json(out.summary, summary)
    log.info("merged %d rows (%d filled from a duplicate, %d records skipped) into %s (%s: %s) in %.1f s", n_rows,
             summary["filled_from_duplicates"], summary["skipped"], final, layout, dict(placed), summary["merge_seconds"])
    return summary


def provenance(outdir: str | Path) -> dict:
    """The workflow's commit and the run's wall time so far (from its claim on the outdir)."""
    started = claim.read(outdir).get("started_epoch")
    return {"workflow_commit": workflow_commit(Path(__file__).resolve().parents[3]),  # the checkout holding src/
            "wall_seconds": round(time.time() - started, 1) if isinstance(started, (int, float)) else None}


def workflow_commit(root: Path) -> str:
    """``git describe`` of the workflow's own repository, whose top level is ``root``; else (a copy of the
    workflow in a user's own analysis repository, or no git at all) the package's version alone."""
    def git(*args: str) -> str | None:
        try:
            res = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return res.stdout.strip() if res.returncode == 0 else None

    top = git("rev-parse", "--show-toplevel")
    if top and Path(top).resolve() == root.resolve():
        commit = git("describe", "--always", "--dirty", "--abbrev=12")
        if commit:
            return commit
    return f"virnucpro_core {__version__} (not its own git checkout)"


def _concat_spot_checks(paths: list[str], dest: str) -> dict:
    rows, header = [], None
    for p in paths:
        with open(p, newline="") as fh:
            rd = list(csv.reader(fh, delimiter="\t"))
        header = rd[0]
        rows += rd[1:]
    write_tsv(dest, header or ["id"], rows)
    return {"checked": len(rows), "failed": sum(1 for r in rows if r[-1] != "pass")}

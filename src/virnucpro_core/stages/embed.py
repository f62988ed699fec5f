"""Stage 2: packed ESM-2 embeddings of one shard (consecutive parts of the input), on one GPU (or the CPU).

The job reads its parts, finds the rows whose sequence came earlier (:mod:`..dedup`: those are not embedded;
their rows are filled from the first, here if that is in this shard, else by the merge), plans packs
(:func:`..packing.build_plan`, a fraction of a second) and embeds. The
plan cuts the shard into chunks (contiguous rows, about ``packing.chunk_tokens`` tokens each). As soon as a
chunk's packs are done, a writer thread writes its rows to ``<out>.chunks/`` and appends them to ``out``
(still under a temporary name) while the GPU computes the next chunk, so host memory holds two chunks at
most and the writes cost no GPU time. A killed job redoes at most one chunk: a rerun finds the finished
chunks (checked against a key of the parts, the model and the options) and computes only the rest. A shard
of a single chunk has nothing to resume from and is written once. The output has the merged output's
columns, so the merge can move it into place as it is.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import shutil
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from .. import __version__
from ..io.duplicates import DUPS_DTYPE, LocalFill, embedding_columns, find_duplicates
from ..run.devices import acquire_device
from ..engine import sample_check
from ..engine.embedder import EmbedResult, Embedder, Outputs, build_embedder
from ..io.files import atomic_path, row_group_rows, sha256, write_json
from ..models.loader import LoadedModel, load_model
from ..models.resolve import resolve
from ..options import Options
from ..run.parts import part_index
from ..run.progress import JobProgress
from ..engine.packing import build_plan, load_plan, save_plan
from ..io.tables import (
    PARTS_KEY,
    RUN_KEY,
    column_array,
    embeddings_table,
    keys,
    provenance_of,
    read_metadata,
    writer_options,
)
from ..run.memory import chunk_tokens
from ..io.part_files import NUCLEOTIDE_COLUMNS, Shard, sequence_lengths

log = logging.getLogger(__name__)

def process_seconds() -> float | None:
    """Seconds since this process started (Linux), so start-up counts the interpreter and imports too."""
    try:
        start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        return float(Path("/proc/uptime").read_text().split()[0]) - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


IMPORTED = process_seconds()  # the interpreter and the stage's imports


def chunk_key(shard: Shard, earlier_digest: str, model: str | LoadedModel, options: Options) -> str:
    """What a finished chunk was computed from; a chunk with another key is recomputed."""
    opts = options.embedding
    if isinstance(model, LoadedModel):
        model_id = model.sha256
    elif Path(model).is_file():
        model_id = sha256(model)
    else:  # a fair-esm name: its release file
        model_id = model
    data = {"parts": shard.sha256, "earlier": earlier_digest, "model": model_id, "packing": options.to_dict()["packing"],
            "long_sequences": options.to_dict()["long_sequences"],
            "embedding": {k: getattr(opts, k) for k in ("layers", "poolings", "per_residue_layers", "dtype", "output_dtype",
                                                        "attention", "device", "deduplicate")}}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


class Chunks:
    """The folder of finished chunks ``<out>.chunks/NNNNN.parquet`` and the key they share."""

    def __init__(self, out: Path, key: str) -> None:
        self.dir = out.with_name(out.name + ".chunks")
        key_file = self.dir / "key"
        if self.dir.is_dir() and (not key_file.is_file() or key_file.read_text() != key):
            log.info("%s: discarding chunks computed from other inputs or options", self.dir)
            shutil.rmtree(self.dir)
        if not self.dir.is_dir():
            self.dir.mkdir(parents=True)
            key_file.write_text(key)

    def path(self, c: int) -> Path:
        return self.dir / f"{c:05d}.parquet"

    def done(self, c: int) -> dict | None:
        """A finished chunk's statistics, or None (absent or unreadable: a killed write is never renamed into place)."""
        try:
            return read_metadata(self.path(c))["run"]
        except (OSError, KeyError, ValueError):
            return None


class _Writer:
    """One thread writes finished chunks in row order while the GPU computes: each to its chunk file
    (uncompressed: only a rerun reads it; none for the last) and appended to ``out``'s temporary file. At
    most one chunk waits for it, so host memory holds two chunks. Embeddings are written plain (no
    compression, dictionaries or statistics: floats gain nothing from them), at about disk speed. It keeps the
    spot-check's sample rows as it writes them."""

    def __init__(self, chunks: Chunks, tmp: Path, n_chunks: int, sample: list[int] = ()) -> None:
        self.chunks, self.tmp, self.n_chunks = chunks, tmp, n_chunks
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="chunk-writer")
        self.pending: Future | None = None
        self.writer: pq.ParquetWriter | None = None
        self.sample, self.rows = np.asarray(sample, np.int64), 0
        self.stored: dict[int, np.ndarray] = {}  # the spot-check's rows, as written

    def _append(self, table: pa.Table) -> None:
        if self.writer is None:
            meta = provenance_of(table.schema.metadata)
            meta.pop("run", None)  # the whole job's statistics go to the footer at the end
            self.writer = pq.ParquetWriter(self.tmp, table.schema.with_metadata({"virnucpro": json.dumps(meta, sort_keys=True)}),
                                           **writer_options(table.schema))
        self.writer.write_table(table.replace_schema_metadata(self.writer.schema.metadata), row_group_size=row_group_rows(table))

    def _write(self, c: int, make_table) -> None:
        table = make_table()
        if c < self.n_chunks - 1 and not self.chunks.path(c).is_file():  # the last one: nothing left to resume
            with atomic_path(self.chunks.path(c)) as part:
                pq.write_table(table, part, compression="none", row_group_size=row_group_rows(table))
        self._append(table)
        mine = self.sample[(self.sample >= self.rows) & (self.sample < self.rows + table.num_rows)]
        if len(mine):
            self.stored.update(zip(mine.tolist(), np.array(column_array(table.take(pa.array(mine - self.rows)), "embedding"))))
        self.rows += table.num_rows

    def submit(self, c: int, make_table) -> None:
        """Write chunk ``c`` (``make_table()`` builds its rows) once the previous one is written."""
        self.wait()
        self.pending = self.pool.submit(self._write, c, make_table)

    def wait(self) -> None:
        if self.pending is not None:
            pending, self.pending = self.pending, None
            pending.result()  # a failed write is raised here

    def close(self, footer: dict[bytes, str]) -> None:
        """The last write done, the job's statistics into the footer."""
        self.wait()
        self.writer.add_key_value_metadata(footer)
        self.writer.close()
        self.writer = None

    def __enter__(self) -> "_Writer":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        """On an error, the chunk being written is still finished (a rerun resumes from it)."""
        try:
            if exc_type is not None and self.pending is not None:
                try:
                    self.wait()
                except Exception as write_error:  # the error already raised says more
                    log.warning("writing the last finished chunk failed too: %s", write_error)
        finally:
            self.pool.shutdown()
            if self.writer is not None:
                self.writer.close()


def embedded_residues(lengths: np.ndarray, options: Options) -> np.ndarray:
    """The residues each row's embedding covers: its first ``max_residues`` (truncate), or all of them (split)."""
    long = options.long_sequences
    return np.minimum(lengths, long.max_residues) if long.policy == "truncate" else lengths


def _chunk_table(shard_t: pa.Table, lo: int, hi: int, result: EmbedResult, options: Options, meta: dict,
                 fill: LocalFill) -> pa.Table:
    """Rows ``lo:hi`` of the shard: ``id``, ``length``, ``embedded_residues`` (fewer than ``length``: truncated),
    the embedding columns (a duplicate's filled from its first row here if that is in this shard; else zeros,
    or an empty list, filled by the merge: not null, which some pyarrow versions cannot read back as a
    fixed-size list) and, for nucleotide input, where each protein comes from."""
    np_dtype = {"float32": np.float32, "float16": np.float16}[options.embedding.output_dtype]
    rows = shard_t.slice(lo, hi - lo)
    columns: dict = {c: v.astype(np_dtype, copy=False) for c, v in result.pooled.items()}
    columns.update({c: [a.astype(np_dtype, copy=False) for a in v] for c, v in result.per_residue.items()})
    fill(columns, lo, hi - lo)  # duplicates of earlier rows of the shard
    lengths = sequence_lengths(rows)
    table = embeddings_table(rows["id"].to_pylist(), lengths, columns, meta)
    table = table.add_column(2, "embedded_residues", pa.array(embedded_residues(lengths, options), pa.int32()))
    for col in NUCLEOTIDE_COLUMNS:
        if col in rows.column_names:
            table = table.append_column(col, rows[col])
    return table


def _resumed(path: Path, lo: int, fill: LocalFill) -> pa.Table:
    """A finished chunk read back (filled when it was written); the rows that later chunks copy are kept."""
    table = pq.read_table(path)
    cols = embedding_columns(table.schema)
    fill.keep({c: column_array(table, c) if pa.types.is_fixed_size_list(table.schema.field(c).type)
               else [column_array(pa.table({c: x.values}), c) for x in table[c].combine_chunks()] for c in cols},
              lo, table.num_rows)
    return table


def run(parts: list[str | Path], model: str | LoadedModel, out: str | Path, options: Options, *,
        earlier: list[str | Path] = (), plan: str | Path | None = None, plan_out: str | Path | None = None,
        dups_out: str | Path | None = None, stats_out: str | Path | None = None, spot_check: str | Path | None = None,
        progress: JobProgress | None = None) -> dict:
    """Write the shard's embeddings Parquet ``out`` (rows of ``parts``, in order). ``earlier``: the keys files
    (``part_NNNNN.keys.npy``) of the parts before this shard (with ``embedding.deduplicate``, a row whose
    sequence one of them holds is a duplicate); ``plan``: a plan to follow instead of planning here;
    ``plan_out``/``dups_out``/``stats_out``: the plan, the duplicates (for the merge) and the job's statistics;
    ``spot_check``: a TSV path, to spot-check the shard in this job; ``progress``: where the job says how far
    it is (marked failed if it fails)."""
    progress = progress or JobProgress(None, Path(out).stem)
    try:
        return _run(parts, model, out, options, earlier=earlier, plan=plan, plan_out=plan_out, dups_out=dups_out,
                    stats_out=stats_out, spot_check=spot_check, progress=progress)
    except BaseException as exc:
        progress.update(force=True, state="failed", error=str(exc) or type(exc).__name__)
        raise


def _run(parts: list[str | Path], model: str | LoadedModel, out: str | Path, options: Options, *,
         earlier: list[str | Path], plan: str | Path | None, plan_out: str | Path | None, dups_out: str | Path | None,
         stats_out: str | Path | None, spot_check: str | Path | None, progress: JobProgress) -> dict:
    opts, out = options.embedding, Path(out)
    t0 = time.perf_counter()
    with acquire_device(opts.lock_dir, opts.device) as dev, ThreadPoolExecutor(1, thread_name_prefix="model-to-device") as pool:
        # the model goes onto the device while the parts are read and planned
        loading = pool.submit(_engine, model, dev, options)
        shard = Shard(parts)
        shard_t = shard.table
        own, dups, earlier_digest = _duplicates(shard, earlier, options)
        lengths = sequence_lengths(shard_t) if shard_t.num_rows else np.zeros(0, np.int64)
        long = options.long_sequences
        if plan:  # followed as it is: every row it plans is embedded
            the_plan = load_plan(plan)
            if the_plan.n_records != shard_t.num_rows:
                raise ValueError(f"{plan} plans {the_plan.n_records} records but the parts hold {shard_t.num_rows}")
            own = np.zeros(shard_t.num_rows, bool)
            for p in the_plan.packs:
                own[p.records] = True
            dups = dups[~own[dups["row"]]]
            if len(dups) != int((~own).sum()):
                raise ValueError(f"{plan} leaves rows out that are not duplicates of earlier rows")
        else:
            width = model.model.embed_dim if isinstance(model, LoadedModel) else resolve(model, options.model_dir).shape()[1]
            the_plan = build_plan(lengths, options.packing.budget(width), long.policy, long.overlap, long.max_residues,
                                  chunk_tokens(options), include=own)
        # duplicates whose first row is in this shard are filled as chunks are written; the others by the merge
        start = dict(zip((i["index"] for i in shard.info), np.cumsum([0, *shard.rows[:-1]]).tolist()))  # part -> first row
        local = np.isin(dups["part"], list(start))
        first_row = np.array([start[p] for p in dups["part"][local].tolist()], np.int64) + dups["part_row"][local]
        fill = LocalFill(dups[local], first_row)
        if plan_out:
            save_plan(the_plan, plan_out)
            write_json(Path(plan_out).with_suffix(".json"), the_plan.stats)
        chunks = Chunks(out, chunk_key(shard, earlier_digest, model, options))
        n = the_plan.n_chunks
        finished = {c: m for c in range(n) if (m := chunks.done(c)) is not None}
        todo = [c for c in range(n) if c not in finished]
        shard_tokens = sum(p.tokens for p in the_plan.packs)
        progress.update(force=True, state="running", rows=shard_t.num_rows, duplicates=len(dups), tokens_total=shard_tokens,
                        chunks=n, chunks_done=len(finished), tokens_done=sum(m["tokens"] for m in finished.values()))
        log.info("%d rows in %d parts, %d duplicates of earlier rows (not embedded), %d packs in %d chunks (%.2f s)",
                 shard_t.num_rows, len(parts), len(dups), len(the_plan.packs), n, time.perf_counter() - t0)
        if finished:
            log.info("resuming: %d of %d chunks already done in %s", len(finished), n, chunks.dir)
        loaded, embedder, outputs, t_load, t_device = loading.result()
        started = process_seconds()  # the interpreter, imports, model load and transfer
        log.info("ready %.1f s after the process started (imports %.1f s, then checkpoint read %.1f s and onto the device %.1f s): "
                 "%s on %s, %s, attention %s", started or float("nan"), IMPORTED or float("nan"), t_load, t_device, loaded.name, dev,
                 embedder.dtype_name, embedder.backend)
        sample = sample_check.sample(lengths, own, options) if spot_check and shard_t.num_rows else []
        with atomic_path(out) as tmp, _Writer(chunks, tmp, n, sample=sample) as writer:
            for c in range(n):
                if c in finished:
                    writer.submit(c, lambda c=c: _resumed(chunks.path(c), the_plan.chunks[c], fill))
                    continue
                lo, hi = the_plan.chunks[c], the_plan.chunks[c + 1]
                sub = the_plan.chunk(c)
                log.info("chunk %d/%d: records %d-%d, %d packs of <= %d tokens", c + 1, n, lo, hi, len(sub.packs), sub.budget)
                before, t_chunk = sum(finished[k]["tokens"] for k in finished), time.perf_counter()
                result = embedder.embed(shard_t["sequence"].slice(lo, hi - lo).to_pylist(), sub, outputs,
                                        ids=shard_t["id"].slice(lo, hi - lo).to_pylist(),
                                        on_pack=lambda t, b=before, t0=t_chunk: progress.update(
                                            tokens_done=b + t, tokens_per_s=t / max(time.perf_counter() - t0, 1e-9)))
                result.stats["startup_seconds"] = started if c == todo[0] else None
                finished[c] = result.stats
                done = sum(finished[k]["tokens"] for k in finished)
                # counted before the writer thread writes the chunk: a chunk file on disk is always in the progress
                progress.update(force=True, tokens_done=done, chunks_done=len(finished),
                                tokens_per_s=result.stats["tokens_per_s"])
                meta = provenance(loaded, outputs, embedder.dtype_name, opts.output_dtype, result.stats, shard)
                writer.submit(c, lambda lo=lo, hi=hi, result=result, meta=meta:
                              _chunk_table(shard_t, lo, hi, result, options, meta, fill))
                log.info("chunk %d/%d done: %d tokens of the shard, %.0f tokens/s, ETA %.0f s", c + 1, n, done,
                         result.stats["tokens_per_s"], (shard_tokens - done) / max(result.stats["tokens_per_s"], 1e-9))
                del result
            t_check, measured = time.perf_counter(), None  # the spot-check's forwards while the last chunk is written
            if sample:
                measured = sample_check.measure(embedder, shard_t, sample, options)
            t_check = time.perf_counter() - t_check
            stats = {**_sum_stats([finished[c] for c in range(n)]), "resumed_chunks": n - len(todo), "rows": shard_t.num_rows,
                     "duplicates": len(dups),
                     # this job's start-up: process start to its first pack, then that pack (compilation)
                     **{k: finished[todo[0]][k] if todo else None for k in ("startup_seconds", "first_pack_seconds")}}
            writer.close({RUN_KEY: json.dumps(stats, sort_keys=True), PARTS_KEY: json.dumps(shard.describe())})
        shutil.rmtree(chunks.dir)
        if dups_out:  # the duplicates of earlier shards' rows, for the merge to fill
            with atomic_path(dups_out) as tmp, open(tmp, "wb") as fh:
                np.save(fh, dups[~local], allow_pickle=False)
        if spot_check:
            t1 = time.perf_counter()
            stats["spot_check"] = sample_check.check(measured, writer.stored, spot_check, options, str(out),
                                                     embedder.dtype_name)
            stats["spot_check_seconds"] = t_check + time.perf_counter() - t1
    if stats_out:
        write_json(stats_out, stats)
    progress.update(force=True, state="done", tokens_done=stats["tokens"], tokens_per_s=stats["tokens_per_s"])
    log.info("done: %s", json.dumps(stats))
    return stats


def _duplicates(shard: Shard, earlier: list[str | Path], options: Options) -> tuple[np.ndarray, np.ndarray, str]:
    """Rows to embed, the duplicates, and a digest of the earlier parts' keys (they decide which rows are duplicates)."""
    if not options.embedding.deduplicate:
        return np.ones(shard.table.num_rows, bool), np.zeros(0, DUPS_DTYPE), ""
    digest = hashlib.sha256()  # the earlier parts' keys files, named, sized and dated: a rewritten one is another
    before = []
    for p in earlier:
        st = os.stat(p)
        digest.update(f"{Path(p).name} {st.st_size} {st.st_mtime_ns}\n".encode())
        before.append((part_index(str(p)), np.load(p, mmap_mode="r")))
    own_keys = keys(shard.table["key"]) if shard.table.num_rows else np.zeros(0, "V16")
    own, dups = find_duplicates(own_keys, shard.part_of_row, shard.row_in_part, before)
    return own, dups, digest.hexdigest()


def _engine(model: str | LoadedModel, dev: str, options: Options) -> tuple[LoadedModel, Embedder, Outputs, float, float]:
    """The model loaded and on ``dev``, with the seconds each took."""
    t0 = time.perf_counter()
    loaded = model if isinstance(model, LoadedModel) else load_model(model, options.model_dir)
    t1 = time.perf_counter()
    embedder = build_embedder(loaded, dev, options)
    return loaded, embedder, Outputs.resolve(loaded.num_layers, options.embedding), t1 - t0, time.perf_counter() - t1


def _sum_stats(parts: list[dict]) -> dict:
    """The chunks' statistics summed (the last chunk's for the rest: device, dtype, ...)."""
    stats = {**parts[-1], **{k: sum(p[k] for p in parts) for k in ("records", "packs", "tokens", "seconds")}, "chunks": len(parts)}
    stats["tokens_per_s"] = stats["tokens"] / stats["seconds"] if stats["seconds"] else 0.0
    return stats


def provenance(loaded: LoadedModel, outputs: Outputs, dtype: str, output_dtype: str, stats: dict | None = None,
               shard: Shard | None = None) -> dict:
    return {
        "model": loaded.name,
        "checkpoint": loaded.source,
        "checkpoint_sha256": loaded.sha256,
        "num_layers": loaded.num_layers,
        "embed_dim": loaded.embed_dim,
        "columns": [{"name": c, "layer": l, "pooling": p} for c, l, p in outputs.columns(loaded.num_layers)],
        "per_residue_layers": list(outputs.per_residue_layers),
        "compute_dtype": dtype,
        "output_dtype": output_dtype,
        "virnucpro_core": __version__,
        "torch": torch.__version__,
        "fair_esm": importlib.metadata.version("fair-esm"),
        **({"inputs": [{k: i[k] for k in ("file", "start", "end", "sha256")} for i in shard.info]} if shard else {}),
        **({"run": stats} if stats else {}),
    }

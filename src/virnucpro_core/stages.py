"""One entry point per workflow stage: shard -> plan -> embed -> spot-check -> merge.

Each reads and writes files only, so it runs the same from Snakemake, the command line
(``python -m virnucpro_core <stage>``) or Python.
"""

from __future__ import annotations

import csv
import json
import logging
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from . import __version__
from .devices import acquire_device
from .embed import Embedder, Outputs
from .equivalence import Thresholds, compare, downstream, reference_hidden
from .fasta import Record, Skipped, balance_shards, read_fasta
from .model import LoadedModel, load_model, sha256
from .nucleotide import translate_record
from .packed_esm import residues as split_residues
from .packing import Pack, build_plan, load_plan, save_plan, windows
from .parquet import atomic_write_table, column_array, embeddings_table, read_metadata

log = logging.getLogger(__name__)

SKIPPED_COLUMNS = ["id", "reason", "file", "record"]
NUCLEOTIDE_COLUMNS = {"parent_id": pa.string(), "window_start": pa.int64(), "window_end": pa.int64(), "frame": pa.int8()}
BOOKKEEPING = ["order", "file", "record"]  # shard columns carried to the merge, not into the output


def _write_tsv(path: Path, header: list[str], rows: list[list]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(tmp, "w", newline="") as fh:
        w = csv.writer(fh, delimiter="\t", lineterminator="\n")
        w.writerow(header)
        w.writerows(rows)
    tmp.replace(path)


def read_tsv(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh, delimiter="\t"))


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)


# ---------------------------------------------------------------- shard
def shard_stage(
    inputs: list[str],
    outdir: str | Path,
    n_shards: int | None = None,
    residues_per_shard: int | None = None,
    on_invalid: str = "error",
    nucleotide: dict | None = None,
) -> dict:
    """Validate the FASTA inputs and cut the kept records into residue-balanced shards.

    Writes ``shard_0000.parquet``... (columns ``order id file record sequence``, and for
    nucleotide input ``parent_id window_start window_end frame``), ``skipped.tsv`` and
    ``manifest.json`` (per-file counts and checksums) into ``outdir``. ``nucleotide``: the
    options of :func:`virnucpro_core.nucleotide.translate_record` for nucleotide input.
    """
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    records: list[Record] = []
    skipped: list[Skipped] = []
    extra: dict[str, list] = {c: [] for c in NUCLEOTIDE_COLUMNS} if nucleotide is not None else {}
    per_file = {str(Path(p)): {"records": 0, "kept": 0, "skipped": 0} for p in inputs}
    for item in read_fasta(inputs, on_invalid, "nucleotide" if nucleotide is not None else "protein"):
        counts = per_file[item.file]
        counts["records"] += 1
        if isinstance(item, Record) and nucleotide is not None:
            proteins = translate_record(item.id, item.sequence, **nucleotide)
            if not proteins:
                item = Skipped(item.file, item.number, item.id,
                               f"no translated protein of >= {nucleotide.get('min_protein_length', 20)} residues")
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
    lengths = [len(r.sequence) for r in records]
    if residues_per_shard:
        n_shards = max(1, -(-sum(lengths) // residues_per_shard))
    spec = balance_shards(lengths, n_shards or 1)
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
        atomic_write_table(table, outdir / f"shard_{i:04d}.parquet")
    _write_tsv(outdir / "skipped.tsv", SKIPPED_COLUMNS, [[s.id, s.reason, s.file, s.number] for s in skipped])
    manifest = {
        "inputs": [{"file": f, "sha256": sha256(f, cache=False), **c} for f, c in per_file.items()],
        "records": len(records),
        "skipped": len(skipped),
        "residues": int(sum(lengths)),
        "shards": spec.n_shards,
        "shard_records": [b - a for a, b in zip(spec.starts[:-1], spec.starts[1:])],
        "on_invalid": on_invalid,
    }
    _write_json(outdir / "manifest.json", manifest)
    log.info("%d records kept, %d skipped, %d residues in %d shards", len(records), len(skipped), sum(lengths), spec.n_shards)
    return manifest


# ---------------------------------------------------------------- plan
def plan_stage(shard: str | Path, out: str | Path, budget: int, policy: str = "truncate", overlap: int = 256, stats_out: str | Path | None = None) -> dict:
    table = pq.read_table(shard, columns=["sequence"])
    lengths = sequence_lengths(table)
    plan = build_plan(lengths, budget, policy, overlap)
    save_plan(plan, out)
    if stats_out:
        _write_json(Path(stats_out), plan.stats)
    log.info("plan: %s", json.dumps(plan.stats))
    return plan.stats


def sequence_lengths(table: pa.Table) -> np.ndarray:
    return pc.utf8_length(table["sequence"]).to_numpy(zero_copy_only=False).astype(np.int64)


# ---------------------------------------------------------------- embed
def embed_stage(
    shard: str | Path,
    plan: str | Path,
    model: str | LoadedModel,
    out: str | Path,
    device: str = "auto",
    dtype: str = "bfloat16",
    backend: str = "auto",
    layers: tuple[int, ...] = (-1,),
    poolings: tuple[str, ...] = ("mean",),
    per_residue_layers: tuple[int, ...] = (),
    output_dtype: str = "float32",
    lock_dir: str | Path = ".gpu-locks",
    model_dir: str | Path | None = None,
) -> dict:
    """Embed one shard following its plan; write the shard's embeddings Parquet."""
    shard_t = pq.read_table(shard)
    sequences = shard_t["sequence"].to_pylist()
    the_plan = load_plan(plan)
    if the_plan.n_records != len(sequences):
        raise ValueError(f"{plan} plans {the_plan.n_records} records but {shard} has {len(sequences)}")
    loaded = model if isinstance(model, LoadedModel) else load_model(model, model_dir)
    with acquire_device(lock_dir, device) as dev:
        if dev == "cpu" and dtype != "float32":
            log.info("on the CPU: computing in float32 instead of %s", dtype)
            dtype = "float32"
        embedder = Embedder(loaded, dev, dtype, backend)
        outputs = Outputs.resolve(loaded.num_layers, layers, poolings, per_residue_layers)
        log.info(
            "embedding %d records (%d packs of <= %d tokens) with %s on %s, %s, attention %s",
            len(sequences), len(the_plan.packs), the_plan.budget, loaded.name, dev, dtype, embedder.backend,
        )
        result = embedder.embed(sequences, the_plan, outputs, ids=shard_t["id"].to_pylist())
    np_dtype = {"float32": np.float32, "float16": np.float16}[output_dtype]
    columns: dict = {c: v.astype(np_dtype) for c, v in result.pooled.items()}
    columns.update({c: [a.astype(np_dtype) for a in v] for c, v in result.per_residue.items()})
    meta = provenance(loaded, outputs, dtype, output_dtype, result.stats)
    table = embeddings_table(shard_t["id"].to_pylist(), sequence_lengths(shard_t), columns, meta)
    for col in BOOKKEEPING + [c for c in NUCLEOTIDE_COLUMNS if c in shard_t.column_names]:
        table = table.append_column(col, shard_t[col])
    atomic_write_table(table, out)
    log.info("done: %s", json.dumps(result.stats))
    return result.stats


def provenance(loaded, outputs: Outputs, dtype: str, output_dtype: str, stats: dict | None = None) -> dict:
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
        **({"run": stats} if stats else {}),
    }


# ---------------------------------------------------------------- spot check
def sample_by_length(lengths: np.ndarray, n: int, n_longest: int = 3) -> np.ndarray:
    """Deterministic length-stratified sample of row indices: the longest records, then
    records at evenly spaced length quantiles."""
    order = np.argsort(-lengths, kind="stable")
    if n >= len(order):
        return np.sort(order)
    take = list(order[:n_longest])
    rest = order[n_longest:]
    k = n - len(take)
    if k > 0 and len(rest):
        take += list(rest[np.linspace(0, len(rest) - 1, k).round().astype(int)])
    return np.sort(np.unique(take))


def spot_check_stage(
    shard: str | Path,
    embeddings: str | Path,
    model: str,
    out: str | Path,
    sample: int = 16,
    device: str = "auto",
    dtype: str = "bfloat16",
    policy: str = "truncate",
    overlap: int = 256,
    pooled_threshold: float | None = None,
    residue_threshold: float | None = None,
    on_fail: str = "error",
    lock_dir: str | Path = ".gpu-locks",
    model_dir: str | Path | None = None,
) -> dict:
    """Re-embed a length-stratified sample unpacked (fair-esm's own forward, one sequence at a
    time, fp32 rotary) and compare with the packed results.

    Checked per sequence: cosine of the stored pooled embedding against the unpacked one, and,
    re-packing the sample into one pack, minimum per-residue cosine and relative L2.
    """
    shard_t = pq.read_table(shard)
    emb_t = pq.read_table(embeddings, columns=["id", "embedding"])
    if shard_t["id"].to_pylist() != emb_t["id"].to_pylist():
        raise ValueError(f"{embeddings} does not hold the records of {shard} in order")
    seqs = shard_t["sequence"].to_pylist()
    ids = shard_t["id"].to_pylist()
    rows = sample_by_length(sequence_lengths(shard_t), sample)
    header = ["id", "length", "pooled_cosine", "repacked_pooled_cosine", "min_residue_cosine", "rel_l2",
              "pooled_threshold", "residue_threshold", "status"]
    if len(rows) == 0:  # an empty shard (fewer records than shards)
        _write_tsv(Path(out), header, [])
        _write_json(Path(out).with_suffix(".json"), {"checked": 0, "failed": 0})
        return {"checked": 0, "failed": 0}
    stored = column_array(emb_t, "embedding")
    loaded = load_model(model, model_dir)
    meta = read_metadata(embeddings)
    with acquire_device(lock_dir, device) as dev:
        if dev == "cpu":
            dtype = "float32"
        th = Thresholds.for_dtype(dtype)
        th = Thresholds(pooled_threshold or th.pooled_cosine, residue_threshold or th.min_residue_cosine)
        embedder = Embedder(loaded, dev, dtype, "auto", compile=False)  # one pack: not worth compiling
        tok = embedder.tokenizer
        layer = loaded.num_layers
        # the sample's windows, as the plan cut them
        items = [(int(r), s, n) for r in rows for s, n in windows(len(seqs[r]), policy, overlap)]
        pack = Pack(*(np.array(c, dtype=np.int64) for c in zip(*items)))
        tokens = torch.from_numpy(tok.pack_tokens(seqs, pack)).to(dev)
        cu = torch.from_numpy(pack.cu_seqlens).to(dev)
        packed = split_residues(embedder.packed(tokens, cu, int(pack.lengths.max()) + 2, [layer])[layer], cu)
        singles = [torch.from_numpy(tok.pack_tokens(seqs, Pack(*(np.array([x]) for x in it)))) for it in items]
        ref = [h[1:-1] for h in reference_hidden(embedder.packed.esm2, singles, layer)]
        item_metrics = compare([ids[r] for r, _, _ in items], packed, ref)
        # pooled per record (windows weighted by residues), as the embed stage combines them
        sums: dict[int, list] = {}
        for (r, _, n), h in zip(items, ref):
            acc = sums.setdefault(r, [0.0, 0])
            acc[0] = acc[0] + h.double().mean(0) * n
            acc[1] += n
        ref_pooled = {r: (total / n).float().cpu() for r, (total, n) in sums.items()}
        out_rows = []
        for r in rows.tolist():
            ref_vec = ref_pooled[r]
            its = [m for (rr, _, _), m in zip(items, item_metrics) if rr == r]
            stored_cos = float(torch.nn.functional.cosine_similarity(torch.from_numpy(stored[r].astype(np.float64)), ref_vec.double(), dim=0))
            pooled_cos = min([stored_cos] + [m.pooled_cosine for m in its])
            min_res = min(m.min_residue_cosine for m in its)
            ok = pooled_cos >= th.pooled_cosine and min_res >= th.min_residue_cosine
            out_rows.append([ids[r], len(seqs[r]), f"{stored_cos:.10f}", f"{min(m.pooled_cosine for m in its):.10f}",
                             f"{min_res:.10f}", f"{max(m.rel_l2 for m in its):.3e}", th.pooled_cosine, th.min_residue_cosine,
                             "pass" if ok else "FAIL"])
        ref_mat = np.stack([ref_pooled[r].numpy() for r in rows.tolist()])
        down = downstream(stored[rows].astype(np.float64), ref_mat)
    _write_tsv(Path(out), header, out_rows)
    failed = [r for r in out_rows if r[-1] != "pass"]
    summary = {"checked": len(out_rows), "failed": len(failed), "dtype": dtype, "thresholds": th.as_dict(),
               "packed_dtype": meta.get("compute_dtype"), **down}
    _write_json(Path(out).with_suffix(".json"), summary)
    if failed:
        msg = f"spot-check of {shard}: {len(failed)} of {len(out_rows)} sequences below threshold " + ", ".join(
            f"{r[0]} (length {r[1]}, pooled {r[2]}, min residue {r[4]})" for r in failed[:10])
        if on_fail == "error":
            raise RuntimeError(msg)
        log.warning(msg)
    log.info("spot-check: %s", json.dumps(summary))
    return summary


# ---------------------------------------------------------------- merge
def merge_stage(
    manifest: str | Path,
    skipped: str | Path,
    embeddings: list[str],
    spot_checks: list[str],
    outdir: str | Path,
) -> dict:
    """One Parquet with every kept record once, in input order; skipped.tsv, spot_check.tsv and
    summary.json. Fails on any missing, duplicated or out-of-order record or a count mismatch."""
    outdir = Path(outdir)
    man = json.loads(Path(manifest).read_text())
    tables = [pq.read_table(p) for p in embeddings]
    if len(tables) != man["shards"]:
        raise ValueError(f"expected {man['shards']} shard embeddings, got {len(tables)}")
    table = pa.concat_tables(tables)
    order = table["order"].to_numpy()
    ids = table["id"].to_pylist()
    problems = []
    if len(ids) != man["records"]:
        problems.append(f"{len(ids)} embedded records, {man['records']} kept by the shard step")
    dup = sorted(i for i, n in Counter(ids).items() if n > 1)
    if dup:
        problems.append(f"duplicated ids in the embeddings: {dup[:5]}")
    if not np.array_equal(order, np.arange(len(order))):
        problems.append("records are missing or out of input order")
    skipped_rows = read_tsv(Path(skipped))
    # per input file: records in = records embedded (at least one row) + records skipped
    embedded_records = set(zip(table["file"].to_pylist(), table["record"].to_pylist()))
    embedded_per_file = Counter(file for file, _ in embedded_records)
    skipped_per_file = Counter(r["file"] for r in skipped_rows)
    per_file_out = {}
    for f in man["inputs"]:
        out_n, skip_n = embedded_per_file[f["file"]], skipped_per_file[f["file"]]
        per_file_out[f["file"]] = {"records_in": f["records"], "embedded": out_n, "skipped": skip_n}
        if f["records"] != out_n + skip_n:
            problems.append(f"{f['file']}: {f['records']} records in, {out_n} embedded + {skip_n} skipped")
    if problems:
        raise RuntimeError("merge check failed: " + "; ".join(problems))
    meta = read_metadata(embeddings[0]) if embeddings else {}
    meta.pop("run", None)
    meta["inputs"] = man["inputs"]
    final = table.drop_columns(BOOKKEEPING).replace_schema_metadata({"virnucpro": json.dumps(meta, sort_keys=True)})
    atomic_write_table(final, outdir / "embeddings.parquet")
    _write_tsv(outdir / "skipped.tsv", SKIPPED_COLUMNS, [[r[c] for c in SKIPPED_COLUMNS] for r in skipped_rows])
    spot_rows, header = [], None
    for p in spot_checks:
        with open(p, newline="") as fh:
            rd = list(csv.reader(fh, delimiter="\t"))
        header = rd[0]
        spot_rows += rd[1:]
    _write_tsv(outdir / "spot_check.tsv", header or ["id"], spot_rows)
    summary = {
        "records_in": sum(f["records"] for f in man["inputs"]),
        "embedded": len(ids),
        "embedded_input_records": len(embedded_records),
        "skipped": len(skipped_rows),
        "per_file": per_file_out,
        "spot_checked": len(spot_rows),
        "spot_check_failed": sum(1 for r in spot_rows if r[-1] != "pass"),
        "model": meta.get("model"),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    _write_json(outdir / "summary.json", summary)
    log.info("merged %d records (%d skipped) into %s", len(ids), len(skipped_rows), outdir / "embeddings.parquet")
    return summary

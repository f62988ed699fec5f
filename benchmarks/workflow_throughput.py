"""The whole workflow on one GPU against the engine in one process, on proteins and on reads.

    python benchmarks/workflow_throughput.py --out-dir $OUT [--protein-tokens 55000000] [--reads 340000] [--cores 16]

A random-weight 650M-shape checkpoint (fair-esm format) and two inputs (:mod:`inputs`): (a) proteins with a
real length distribution (median 270 residues, ~3% over 1022), (b) 300-bp reads of a bacterial-like genome,
translated in six frames with the default nucleotide options. A small warm-up run of the workflow first fills
the page cache and the on-disk kernel cache, as on a node that has run a job before. Then each input with the
default settings: ``snakemake --cores N --resources gpu=1``, wall time from start to end. Then the engine in
this process (the checkpoint loaded as the jobs load it, bf16, default budget) on the first
``--engine-tokens`` of the same proteins (for (b), the proteins the run translated). The ratio is the tokens
the workflow delivered (every row, duplicates included) per second of its wall time over the engine's tokens
per second; ``gpu_tokens`` leaves out the rows filled from a duplicate. Per step: when each job started and
ended, from its own log, relative to the start of the run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_embed import sync_time  # noqa: E402
from inputs import write_proteins, write_reads  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")


def workflow(config: list[str], cores: int, log: Path) -> tuple[float, float]:
    cmd = [sys.executable, "-m", "snakemake", "--cores", str(cores), "--resources", "gpu=1", "--config", *config]
    start = time.time()
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.time() - start
    log.write_text(" ".join(cmd) + "\n\n" + res.stdout + res.stderr)
    if res.returncode:
        print(res.stderr[-4000:])
        raise SystemExit(f"the workflow failed; see {log}")
    return start, wall


def steps(outdir: Path, start: float) -> list[dict]:
    """Each job's first and last log line, in seconds from the start of the run."""
    out = []
    for log in sorted((outdir / "logs").rglob("*.log")):
        t = [datetime.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
             for line in log.read_text().splitlines() if (m := STAMP.match(line))]
        if t:
            out.append({"job": str(log.relative_to(outdir / "logs").with_suffix("")), "start_s": round(min(t) - start, 2),
                        "end_s": round(max(t) - start, 2)})
    return sorted(out, key=lambda r: r["start_s"])


def embed_jobs(outdir: Path) -> list[dict]:
    keys = ("rows", "duplicates", "tokens", "seconds", "tokens_per_s", "startup_seconds", "first_pack_seconds", "chunks", "device",
            "attention_backend", "peak_gib", "spot_check_seconds")
    return [{"shard": p.stem, **{k: json.loads(p.read_text()).get(k) for k in keys}}
            for p in sorted((outdir / "embeddings").glob("shard_*.json"))]


def run_proteins(outdir: Path) -> list[str]:
    man = json.loads((outdir / "shards/manifest.json").read_text())
    return pa.concat_tables([pq.read_table(outdir / "shards" / f"{p['name']}.parquet", columns=["sequence"])
                             for p in man["parts"]])["sequence"].to_pylist()


def tokens_of(seqs: list[str]) -> int:
    return sum(min(len(s), 1022) + 2 for s in seqs)


def engine_rate(model: Path, seqs: list[str], n_tokens: int) -> tuple[float, int, list[float]]:
    """The engine in this process on the first ``n_tokens`` of ``seqs``: tokens/s (the better of two passes)."""
    from virnucpro_core.engine.embedder import Embedder, Outputs
    from virnucpro_core.models.loader import load_model
    from virnucpro_core.options import EmbeddingOptions
    from virnucpro_core.engine.packing import build_plan

    cum = np.cumsum([min(len(s), 1022) + 2 for s in seqs])
    sub = seqs[: int(np.searchsorted(cum, n_tokens)) + 1]
    loaded = load_model(str(model))
    emb = Embedder(loaded, "cuda", "bfloat16", "auto")
    outputs = Outputs.resolve(loaded.num_layers, EmbeddingOptions())
    plan = build_plan([len(s) for s in sub], 65536, "truncate", 0)
    warm = sub[:2000]
    emb.embed(warm, build_plan([len(s) for s in warm], 65536, "truncate", 0), outputs, progress_every=1e9)
    times = [sync_time(lambda: emb.embed(sub, plan, outputs, progress_every=1e9)) for _ in range(2)]
    n = tokens_of(sub)
    del emb
    torch.cuda.empty_cache()
    return n / min(times), n, times


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out-dir", required=True)
    ap.add_argument("--work", default="/tmp/virnucpro-throughput")
    ap.add_argument("--protein-tokens", type=int, default=55_000_000)
    ap.add_argument("--reads", type=int, default=340_000)
    ap.add_argument("--engine-tokens", type=int, default=8_000_000)
    ap.add_argument("--cores", type=int, default=16)
    ap.add_argument("--only", choices=("proteins", "reads"), help="one input only")
    args = ap.parse_args()
    out_dir, work = Path(args.out_dir), Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    model = work / "esm2_t33_650M_random.pt"
    t = time.time()
    if not model.exists():
        subprocess.run([sys.executable, "-m", "virnucpro_core", "random-model", str(model), "--layers", "33", "--dim", "1280",
                        "--heads", "20"], check=True)
    proteins, reads, warm = work / "proteins.faa", work / "reads.fna", work / "warm.faa"
    write_proteins(proteins, args.protein_tokens, seed=2)
    write_reads(reads, args.reads, seed=3)
    write_proteins(warm, 300_000, seed=4, prefix="warm")
    print(f"checkpoint and inputs written in {time.time() - t:.0f} s", flush=True)
    common = [f"model={model}", "embedding={lock_dir: /tmp/virnucpro-bench-locks}"]
    _, warm_wall = workflow([f"input={warm}", f"outdir={work / 'warm'}", *common], args.cores, out_dir / "snakemake-warm-up.log")
    print(f"warm-up run: {warm_wall:.1f} s", flush=True)

    doc = {"device": torch.cuda.get_device_name(0), "date": datetime.date.today().isoformat(),
           "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip(),
           "model": "650M shape, random weights, fair-esm checkpoint", "settings": "defaults (config/config.yaml), --resources gpu=1",
           "cores": args.cores, "warm_up_wall_s": warm_wall, "runs": {}}
    cases = {"proteins": [f"input={proteins}"], "reads": [f"input={reads}", "input_type=nucleotide"]}
    for name, config in cases.items():
        if args.only and name != args.only:
            continue
        outdir = work / name
        start, wall = workflow([*config, f"outdir={outdir}", *common], args.cores, out_dir / f"snakemake-{name}.log")
        for log in (outdir / "logs").rglob("*.log"):  # every job's own log, beside the workflow's
            (out_dir / f"{name}-logs" / log.relative_to(outdir / "logs")).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(log, out_dir / f"{name}-logs" / log.relative_to(outdir / "logs"))
        seqs = run_proteins(outdir)
        tokens = tokens_of(seqs)
        jobs = embed_jobs(outdir)
        gpu_tokens = sum(j["tokens"] for j in jobs)
        engine, n, times = engine_rate(model, seqs, args.engine_tokens)
        summary = json.loads((outdir / "summary.json").read_text())
        run = {"records": summary["records_in"], "rows": summary["embedded"], "filled_from_duplicates": summary["filled_from_duplicates"],
               "tokens": tokens, "gpu_tokens": gpu_tokens, "wall_s": wall, "workflow_tok_per_s": tokens / wall,
               "engine_tok_per_s": engine, "engine_tokens": n, "engine_passes_s": times,
               "workflow_vs_engine": tokens / wall / engine, "gpu_tokens_vs_engine": gpu_tokens / wall / engine,
               "gpu_busy_share": sum(j["seconds"] for j in jobs) / wall, "embed_jobs": jobs, "steps": steps(outdir, start),
               "merge": {k: summary.get(k) for k in ("output", "shards", "merge_seconds")}}
        doc["runs"][name] = run
        print(f"{name}: {run['rows']} rows ({run['filled_from_duplicates']} filled from a duplicate), {tokens} tokens in {wall:.1f} s "
              f"= {tokens / wall:.0f} tok/s; engine {engine:.0f} tok/s; workflow / engine {run['workflow_vs_engine']:.3f} "
              f"(GPU tokens only: {run['gpu_tokens_vs_engine']:.3f}); GPU busy {run['gpu_busy_share']:.3f}", flush=True)
        for s in run["steps"]:
            print(f"  {s['job']:32s} {s['start_s']:8.2f} -> {s['end_s']:8.2f} s", flush=True)
        for j in jobs:
            print(f"  {j}", flush=True)
        (out_dir / "workflow-throughput.json").write_text(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

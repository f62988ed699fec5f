"""The whole workflow on one GPU against the engine in one process (issue: scale-out).

    python benchmarks/workflow_throughput.py --out-dir $OUT [--tokens 50000000]

A random-weight 650M-shape checkpoint (fair-esm format), a uniref-like FASTA (bench_embed's
generator). First a small warm-up run of the workflow on the same model fills the page cache and
the on-disk kernel cache, as on a node that has run a job before. Then the measured run with the
default settings: ``snakemake --cores N --resources gpu=1``, wall time from start to end. Then
the engine in this process (checkpoint loaded as the jobs load it, compiled, default budget) on
the first ``--engine-tokens`` of the same proteins. Per embed job: start-up (process start to its
first pack), the first pack (compiled kernels from the cache), the engine rate inside the job;
per rule: peak RSS against the memory it asked for.
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_embed import dataset, sync_time  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def workflow(fasta: Path, model: Path, outdir: Path, cores: int, log: Path) -> float:
    cmd = [sys.executable, "-m", "snakemake", "--cores", str(cores), "--resources", "gpu=1", "--config",
           f"input={fasta}", f"model={model}", f"outdir={outdir}"]
    t = time.time()
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.time() - t
    log.write_text(" ".join(cmd) + "\n\n" + res.stdout + res.stderr)
    if res.returncode:
        print(res.stderr[-4000:])
        raise SystemExit(f"the workflow failed; see {log}")
    return wall


def jobs(outdir: Path) -> list[dict]:
    out = []
    for log in sorted((outdir / "logs/embed_shard").glob("*.log")):
        done = json.loads(re.search(r"done: (\{.*\})", log.read_text()).group(1))
        out.append({"shard": log.stem, **{k: done.get(k) for k in ("tokens", "tokens_per_s", "startup_seconds", "first_pack_seconds",
                                                                   "chunks", "device", "attention_backend")},
                    "spot_check": done.get("spot_check", {}).get("failed")})
    return out


def rule_memory(outdir: Path) -> list[dict]:
    rows = []
    for bench in sorted((outdir / "benchmarks").rglob("*.tsv")):
        head, values = bench.read_text().splitlines()[:2]
        row = dict(zip(head.split("\t"), values.split("\t")))
        rows.append({"job": str(bench.relative_to(outdir / "benchmarks").with_suffix("")), "s": float(row["s"]),
                     "max_rss_mb": float(row["max_rss"]) if row["max_rss"] != "NA" else None})
    return rows


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out-dir", required=True)
    ap.add_argument("--work", default="/tmp/virnucpro-throughput")
    ap.add_argument("--tokens", type=int, default=50_000_000)
    ap.add_argument("--engine-tokens", type=int, default=5_000_000)
    ap.add_argument("--cores", type=int, default=16)
    args = ap.parse_args()
    out_dir, work = Path(args.out_dir), Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    model = work / "esm2_t33_650M_random.pt"
    t = time.time()
    if not model.exists():
        subprocess.run([sys.executable, "-m", "virnucpro_core", "random-model", str(model), "--layers", "33", "--dim", "1280",
                        "--heads", "20"], check=True)
    print(f"checkpoint written in {time.time() - t:.0f} s", flush=True)
    seqs = dataset("uniref", args.tokens, seed=2)
    tokens = sum(len(s) + 2 for s in seqs)
    fasta = work / "uniref_like.faa"
    fasta.write_text("".join(f">prot_{i} synthetic\n{s}\n" for i, s in enumerate(seqs)))
    warm = work / "warm.faa"
    warm.write_text("".join(f">w_{i}\n{s}\n" for i, s in enumerate(seqs[:1000])))
    warm_wall = workflow(warm, model, work / "warm", args.cores, out_dir / "snakemake-warm-up.log")
    print(f"warm-up run (1000 proteins): {warm_wall:.1f} s", flush=True)

    outdir = work / "run"
    wall = workflow(fasta, model, outdir, args.cores, out_dir / "snakemake.log")
    per_job = jobs(outdir)
    print(f"workflow: {len(seqs)} proteins, {tokens} tokens in {wall:.1f} s = {tokens / wall:.0f} tok/s", flush=True)
    for j in per_job:
        print(f"  {j}", flush=True)

    # the engine in one process, the checkpoint loaded as the jobs load it
    from virnucpro_core.embed import Embedder, Outputs
    from virnucpro_core.model import load_model
    from virnucpro_core.options import EmbeddingOptions
    from virnucpro_core.packing import build_plan

    sub, n = [], 0
    for s in seqs:
        if n >= args.engine_tokens:
            break
        sub.append(s)
        n += len(s) + 2
    loaded = load_model(str(model))
    emb = Embedder(loaded, "cuda", "bfloat16", "auto")
    outputs = Outputs.resolve(loaded.num_layers, EmbeddingOptions())
    plan = build_plan([len(s) for s in sub], 65536, "truncate", 0)
    emb.embed(sub[:2000], build_plan([len(s) for s in sub[:2000]], 65536, "truncate", 0), outputs, progress_every=1e9)  # warm-up
    times = [sync_time(lambda: emb.embed(sub, plan, outputs, progress_every=1e9)) for _ in range(2)]  # the better of two
    engine = n / min(times)
    print(f"engine in process: {n} tokens, {engine:.0f} tok/s (runs {[round(x, 2) for x in times]})", flush=True)

    doc = {"device": torch.cuda.get_device_name(0), "date": datetime.date.today().isoformat(),
           "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip(),
           "model": "650M shape, random weights, fair-esm checkpoint", "proteins": len(seqs), "tokens": tokens,
           "settings": "defaults (config/config.yaml), --resources gpu=1", "cores": args.cores,
           "warm_up_wall_s": warm_wall, "workflow_wall_s": wall, "workflow_tok_per_s": tokens / wall,
           "engine_tok_per_s": engine, "engine_tokens": n, "workflow_vs_engine": tokens / wall / engine,
           "embed_jobs": per_job, "rules": rule_memory(outdir), "summary": json.loads((outdir / "summary.json").read_text())}
    print(f"workflow / engine: {doc['workflow_vs_engine']:.2f}", flush=True)
    (out_dir / "workflow-throughput.json").write_text(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

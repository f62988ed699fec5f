"""The workflow on GPUs: one run with --resources gpu=1, one with gpu=2, same input.

    python benchmarks/workflow_gpus.py --out-dir $OUT

650M-shape random-weight ESM-2 checkpoint, a uniref-like FASTA cut into shards; records
per-job devices (from the embed logs), an nvidia-smi sample during each run, the
embedding stage's wall time (first embed job start to last embed job end) and whether both
runs give the same embeddings.
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

import numpy as np
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).parent))
from bench_embed import dataset  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})")


def stamps(log: Path) -> tuple[float, float]:
    times = [datetime.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
             for line in log.read_text().splitlines() if (m := STAMP.match(line))]
    return min(times), max(times)


def run(gpus: int, fasta: Path, model: Path, work: Path, out_dir: Path, shards: int, cores: int) -> dict:
    outdir = work / f"gpu{gpus}"
    smi_file = out_dir / f"nvidia-smi-gpu{gpus}.csv"
    try:
        smi = subprocess.Popen(["nvidia-smi", "--query-gpu=timestamp,index,utilization.gpu,memory.used", "--format=csv", "-lms", "1000"],
                               stdout=open(smi_file, "w"), stderr=subprocess.DEVNULL)
    except FileNotFoundError:
        smi = None
    cmd = [sys.executable, "-m", "snakemake", "--cores", str(cores), "--resources", f"gpu={gpus}", "--config",
           f"input={fasta}", f"model={model}", f"outdir={outdir}", f"shards={shards}",
           f"embedding={{'lock_dir': '{work / 'locks'}'}}", "spot_check={sample: 8}"]
    t0 = time.time()
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.time() - t0
    if smi:
        smi.terminate()
    (out_dir / f"snakemake-gpu{gpus}.log").write_text(" ".join(cmd) + "\n\n" + res.stdout + res.stderr)
    if res.returncode:
        print(res.stderr[-3000:])
        raise SystemExit(f"snakemake with gpu={gpus} failed")
    logs = sorted((outdir / "logs/embed_shard").glob("*.log"))
    jobs = []
    for log in logs:
        text = log.read_text()
        start, end = stamps(log)
        dev = re.search(r"device: (\S+)", text).group(1)
        gpu = re.search(r"device: \S+ \(GPU (\S+),", text)
        done = json.loads(re.search(r"done: (\{.*\})", text).group(1))
        jobs.append({"shard": log.stem, "device": dev, "gpu": gpu.group(1) if gpu else "none", "start": start, "end": end,
                     "seconds": end - start, "engine_tok_per_s": done["tokens_per_s"], "tokens": done["tokens"]})
    # both GPUs busy at the same time: intervals of jobs on different GPUs that overlap
    overlap = max((min(a["end"], b["end"]) - max(a["start"], b["start"]) for a in jobs for b in jobs if a["gpu"] != b["gpu"]), default=0.0)
    spot = (outdir / "spot_check.tsv").read_text().splitlines()
    return {
        "gpus": gpus, "workflow_wall_s": wall,
        "embed_stage_wall_s": max(j["end"] for j in jobs) - min(j["start"] for j in jobs),
        "embed_jobs": jobs, "max_overlap_s_on_different_gpus": overlap,
        "devices_used": sorted({j["gpu"] for j in jobs}),
        "spot_check": {"checked": len(spot) - 1, "failed": sum(1 for r in spot[1:] if not r.endswith("pass"))},
        "summary": json.loads((outdir / "summary.json").read_text()),
    }


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out-dir", required=True)
    ap.add_argument("--work", default="/tmp/virnucpro-wf")
    ap.add_argument("--tokens", type=int, default=8_000_000)
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--cores", type=int, default=16)
    ap.add_argument("--gpus", default="1,2")
    ap.add_argument("--model", help="checkpoint to use instead of a random 650M-shape one")
    args = ap.parse_args()
    out_dir, work = Path(args.out_dir), Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    model = Path(args.model) if args.model else work / "esm2_t33_650M_random.pt"
    if not model.exists():
        subprocess.run([sys.executable, "-m", "virnucpro_core", "random-model", str(model), "--layers", "33", "--dim", "1280", "--heads", "20"], check=True)
    seqs = dataset("uniref", args.tokens, seed=1)
    fasta = work / "uniref_like.faa"
    fasta.write_text("".join(f">prot_{i} synthetic\n{s}\n" for i, s in enumerate(seqs)))
    print(f"{len(seqs)} proteins, {sum(len(s) + 2 for s in seqs)} tokens, {args.shards} shards", flush=True)
    results = []
    for g in (int(x) for x in args.gpus.split(",")):
        r = run(g, fasta, model, work, out_dir, args.shards, args.cores)
        results.append(r)
        print(f"gpu={g}: embed stage {r['embed_stage_wall_s']:.1f} s, workflow {r['workflow_wall_s']:.1f} s, devices {r['devices_used']}, "
              f"overlap on different GPUs {r['max_overlap_s_on_different_gpus']:.1f} s, spot-check {r['spot_check']}", flush=True)
        for j in r["embed_jobs"]:
            print(f"   {j['shard']} on {j['device']} (GPU {j['gpu']}) {j['seconds']:.1f} s, engine {j['engine_tok_per_s']:.0f} tok/s", flush=True)
    import torch

    doc = {"device": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] or ["cpu"],
           "date": datetime.date.today().isoformat(),
           "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip(),
           "proteins": len(seqs), "shards": args.shards, "runs": results}
    if len(results) == 2:
        a, b = (pq.read_table(work / f"gpu{g}/embeddings.parquet") for g in (1, 2))
        ea, eb = (np.stack(t["embedding"].to_numpy(zero_copy_only=False)) for t in (a, b))
        doc["same_ids_in_order"] = a["id"].to_pylist() == b["id"].to_pylist()
        doc["max_abs_diff_gpu1_vs_gpu2"] = float(np.abs(ea - eb).max())
        doc["embed_stage_speedup"] = results[0]["embed_stage_wall_s"] / results[1]["embed_stage_wall_s"]
        print(f"speed-up of the embedding stage, gpu=2 vs gpu=1: {doc['embed_stage_speedup']:.2f}x; "
              f"same ids in order: {doc['same_ids_in_order']}; max |diff| {doc['max_abs_diff_gpu1_vs_gpu2']:.2e}", flush=True)
    (out_dir / "workflow_gpus.json").write_text(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Where an embed job's start-up goes, on a warm node (issue: scale-out).

    python benchmarks/startup.py --out $OUT/startup.json

A random-weight 650M-shape checkpoint and a small uniref-like shard (one part of the shard step).
The embed stage runs as a job runs it (``python -m virnucpro_core embed``, a fresh process each time)
``--runs`` times: the first fills the on-disk kernel cache and the page cache, the others are what a
job on a node that has run one before sees. Per run: wall time, start-up (process start to the first
pack) and its parts as the job logs them, the first pack, and the slowest imports
(``python -X importtime``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_embed import dataset  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def cli(*args: str, importtime: bool = False) -> tuple[float, str]:
    """``python -m virnucpro_core ARGS`` in a fresh process, with this checkout's package: (wall seconds, stderr)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), *filter(None, [os.environ.get("PYTHONPATH")])])}
    cmd = [sys.executable, *(["-X", "importtime"] if importtime else []), "-m", "virnucpro_core", *args]
    t = time.time()
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if res.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{res.stderr[-4000:]}")
    return time.time() - t, res.stderr


def slowest_imports(stderr: str, n: int = 25) -> list[dict]:
    """Modules by cumulative import time (``-X importtime`` lines), the job's own imports and theirs."""
    rows = []
    for line in stderr.splitlines():
        m = re.match(r"import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)", line)
        if m and len(m.group(3)) <= 5:  # three levels deep
            rows.append({"module": m.group(4), "cumulative_s": int(m.group(2)) / 1e6})
    return sorted(rows, key=lambda r: -r["cumulative_s"])[:n]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--work", default="/tmp/virnucpro-startup")
    ap.add_argument("--tokens", type=int, default=400_000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--shape", default="33,1280,20", help="layers,dim,heads (default: the 650M shape)")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    layers, dim, heads = args.shape.split(",")
    model = work / f"esm2_t{layers}_{dim}_random.pt"
    if not model.exists():
        subprocess.run([sys.executable, "-m", "virnucpro_core", "random-model", str(model), "--layers", layers, "--dim", dim,
                        "--heads", heads], check=True, env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])})
    fasta = work / "small.faa"
    fasta.write_text("".join(f">p{i}\n{s}\n" for i, s in enumerate(dataset("uniref", args.tokens, seed=3))))
    cli("shard", str(fasta), "--out", str(work / "shards"), "--input_parts", "1")
    shard = work / "shards/part_00000.parquet"
    out = work / "embeddings.parquet"
    doc = {"date": datetime.date.today().isoformat(), "tokens": args.tokens, "runs": []}
    for run in range(args.runs):
        out.unlink(missing_ok=True)
        last = run == args.runs - 1
        wall, err = cli("embed", str(shard), "--model", str(model), "--out", str(out), importtime=last)
        done = json.loads(re.search(r"done: (\{.*\})", err).group(1))
        ready = re.search(r"ready .*", err)
        row = {"run": run + 1, "wall_s": wall, "startup_s": done.get("startup_seconds"),
               "first_pack_s": done.get("first_pack_seconds"), "engine_s": done.get("seconds"),
               "ready_line": ready.group(0) if ready else None, "device": done.get("device")}
        if last:
            row["slowest_imports"] = slowest_imports(err)
        doc["runs"].append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "slowest_imports"}), flush=True)
        for imp in row.get("slowest_imports", [])[:12]:
            print(f"    {imp['cumulative_s']:6.2f} s  {imp['module']}", flush=True)
        Path(args.out).write_text(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

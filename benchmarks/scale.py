"""Shard, plan and merge at scale on the CPU: wall time and peak memory per stage (issue: scale-out).

    python benchmarks/scale.py --records 1000000,4000000 --out benchmarks/results/scale-<date>.json

For each size: a synthetic protein FASTA (log-normal lengths, median 300, 30..3000 residues;
pyrodigal-style records), then each stage in its own process, as a workflow job runs it:
``shard`` (residues_per_shard), ``plan`` of every shard, a stand-in for the GPU stage that writes
each shard's embeddings (random 1280-d float32, so the merge moves real-sized data), and
``merge``. Peak RSS is the child's own high-water mark (``VmHWM``). No model is needed.
``--dim 64`` makes the embeddings 20x smaller, for sizes whose 1280-d output would not fit the disk
(16 M records: 82 GB of shard files and as much merged).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

# VmHWM, the process's own high-water mark (ru_maxrss would carry the parent's over fork and exec)
CHILD = """
import json, re, sys, time
_t0 = time.perf_counter()
{code}
_hwm = int(re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1))
print(json.dumps({{"seconds": time.perf_counter() - _t0, "peak_rss_mb": _hwm / 1024}}))
"""


def child(code: str) -> dict:
    res = subprocess.run([sys.executable, "-c", CHILD.format(code=code)], capture_output=True, text=True)
    if res.returncode:
        raise RuntimeError(res.stderr[-3000:])
    return json.loads(res.stdout.strip().splitlines()[-1])


def make_fasta(path: Path, n: int, seed: int = 0) -> int:
    rng = np.random.default_rng(seed)
    aa = np.frombuffer(b"ACDEFGHIKLMNPQRSTVWY", dtype=np.uint8)
    residues = 0
    with open(path, "wb") as fh:
        for start in range(0, n, 100_000):
            lengths = np.clip(rng.lognormal(np.log(300), 0.6, min(100_000, n - start)), 30, 3000).astype(int)
            body = aa[rng.integers(0, 20, int(lengths.sum()))].tobytes()
            pos, out = 0, []
            for i, length in enumerate(lengths, start):
                out.append(b">p%d # %d # %d # 1 # ID=%d\n%s*\n" % (i, 3 * i, 3 * i + 3 * length, i, body[pos : pos + length]))
                pos += length
            fh.write(b"".join(out))
            residues += int(lengths.sum())
    return residues


FAKE_EMBED = """
import numpy as np, pyarrow as pa, pyarrow.parquet as pq
from virnucpro_core.files import write_table
from virnucpro_core.parquet import embeddings_table
from virnucpro_core.stages.shard import BOOKKEEPING, sequence_lengths
rng = np.random.default_rng(0)
f = pq.ParquetFile({shard!r})
t = f.read(columns=["order", "id", "file", "record", "sequence"])
emb = rng.standard_normal((t.num_rows, {dim}), dtype=np.float32)
table = embeddings_table(t["id"].to_pylist(), sequence_lengths(t), {{"embedding": emb}}, {{"model": "synthetic"}})
for c in BOOKKEEPING:
    table = table.append_column(c, t[c])
write_table(table, {out!r})
"""


def run_size(n: int, work: Path, residues_per_shard: int, dim: int) -> dict:
    d = work / f"n{n}"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    fasta = d / "in.faa"
    t = time.perf_counter()
    residues = make_fasta(fasta, n)
    print(f"{n} records, {residues} residues, FASTA {fasta.stat().st_size / 1e9:.2f} GB in {time.perf_counter() - t:.0f} s", flush=True)
    row = {"records": n, "residues": residues, "fasta_bytes": fasta.stat().st_size, "embedding_dim": dim}
    opts = f"Options(residues_per_shard={residues_per_shard})"
    row["shard"] = child(f"from virnucpro_core.options import Options\nfrom virnucpro_core.stages import shard\n"
                         f"shard.run([{str(fasta)!r}], {str(d / 'shards')!r}, {opts})")
    man = json.loads((d / "shards/manifest.json").read_text())
    row["shards"] = man["shards"]
    print(f"  shard: {row['shard']}, {man['shards']} shards", flush=True)
    plans = [child(f"from virnucpro_core.options import Options\nfrom virnucpro_core.stages import plan\n"
                   f"plan.run({str(d / 'shards' / f'shard_{i:04d}.parquet')!r}, {str(d / f'plan{i}.parquet')!r}, None, Options())")
             for i in range(man["shards"])]
    row["plan"] = {"seconds": sum(p["seconds"] for p in plans), "peak_rss_mb": max(p["peak_rss_mb"] for p in plans)}
    print(f"  plan: {row['plan']}", flush=True)
    embs = []
    for i in range(man["shards"]):
        out = d / f"emb{i}.parquet"
        child(FAKE_EMBED.format(shard=str(d / "shards" / f"shard_{i:04d}.parquet"), out=str(out), dim=dim))
        embs.append(str(out))
    row["embeddings_bytes"] = sum(os.path.getsize(e) for e in embs)
    row["merge"] = child(f"from virnucpro_core.options import Options\nfrom virnucpro_core.stages import merge\n"
                         f"merge.run({str(d / 'shards/manifest.json')!r}, {str(d / 'shards/skipped.tsv')!r}, {embs!r}, [], "
                         f"{str(d / 'out')!r}, Options())")
    row["output_bytes"] = os.path.getsize(d / "out/embeddings.parquet")
    print(f"  merge: {row['merge']}, output {row['output_bytes'] / 1e9:.1f} GB", flush=True)
    for stage in ("shard", "plan", "merge"):
        row[stage]["us_per_record"] = 1e6 * row[stage]["seconds"] / n
    row["shard"]["residues_per_s"] = residues / row["shard"]["seconds"]
    shutil.rmtree(d)
    return row


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--records", default="1000000,4000000")
    ap.add_argument("--residues-per-shard", type=int, default=100_000_000)
    ap.add_argument("--work", default="/tmp/virnucpro-scale")
    ap.add_argument("--dim", type=int, default=1280, help="synthetic embedding width (1280: the 650M model's)")
    ap.add_argument("--out")
    args = ap.parse_args()
    doc = {"machine": f"{platform.node()} ({os.cpu_count()} cores)", "date": datetime.date.today().isoformat(),
           "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip(),
           "residues_per_shard": args.residues_per_shard, "rows": []}
    for n in (int(x) for x in args.records.split(",")):
        doc["rows"].append(run_size(n, Path(args.work), args.residues_per_shard, args.dim))
        if args.out:
            Path(args.out).write_text(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

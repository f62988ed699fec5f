"""The CPU stages at scale, each in its own process as a workflow job runs it (issue: GPU-bound end to end).

    python benchmarks/scale.py --out benchmarks/results/scale-parts-<date>.json [--baseline OLD_CHECKOUT]

- translation: six-frame translation (defaults: window 300, truncate, min 20, table 11) of 200,000 reads of
  300 bp from a bacterial-like genome (:mod:`inputs`), one core, Mbp/s;
- nucleotide shard: the shard step on those reads, one core, against ``--baseline`` (an older checkout,
  e.g. a ``git worktree`` of the commit before the parts) on the same core, with the proteins compared
  (ids, sequences, order);
- parallel shard: the shard step on 2 cores (2 parts, ``--jobs 2``) against 1 core (one job per file; one
  shard, so that the parts are what the cores get), for
  two files, one large plain file and one large gzip file, of reads (``--parallel-reads``) and of proteins
  (``--parallel-protein-tokens``);
- merge: a protein input in 4 shards with synthetic embeddings (64-d and 1280-d float32, written as the embed
  job writes them), merged to a dataset (the shards moved into place) and to one file (copied);
- protein shard and plan per record: the shard step on ``--records`` proteins, one core, and the plan of the
  embed step.
Peak RSS is each child's own high-water mark (``VmHWM``). No model is needed.
"""

from __future__ import annotations

import argparse
import datetime
import gzip
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).parent))
from inputs import write_proteins, write_reads  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

# VmHWM, the process's own high-water mark (ru_maxrss would carry the parent's over fork and exec)
CHILD = """
import json, os, re, sys, time
{pin}
_t0 = time.perf_counter()
{code}
_hwm = int(re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1))
print(json.dumps({{"seconds": time.perf_counter() - _t0, "peak_rss_mb": _hwm / 1024}}))
"""


def child(code: str, cores: int = 1, pythonpath: str | None = None) -> dict:
    pin = f"os.sched_setaffinity(0, {set(sorted(os.sched_getaffinity(0))[:cores])!r})"
    env = {**os.environ, **({"PYTHONPATH": pythonpath} if pythonpath else {})}
    res = subprocess.run([sys.executable, "-c", CHILD.format(pin=pin, code=code)], capture_output=True, text=True, env=env)
    if res.returncode:
        raise RuntimeError(res.stderr[-3000:])
    return json.loads(res.stdout.strip().splitlines()[-1])


SHARD = """
from virnucpro_core.options import Options
from virnucpro_core.stages import shard
shard.run({inputs!r}, {out!r}, Options().replace(**{changes!r}), jobs={jobs})
"""


def shard_run(inputs: list[Path], out: Path, cores: int, **changes) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    r = child(SHARD.format(inputs=[str(p) for p in inputs], out=str(out), changes=changes, jobs=cores), cores)
    r["parts"] = len(json.loads((out / "manifest.json").read_text())["parts"])
    return r


def rows(out: Path, columns=("id", "sequence")) -> pa.Table:
    man = json.loads((out / "manifest.json").read_text())
    return pa.concat_tables([pq.read_table(out / f"{p['name']}.parquet", columns=list(columns)) for p in man["parts"]])


def translation(reads: Path) -> dict:
    code = f"""
from virnucpro_core.io.nucleotide import translate_batch, check_nucleotides
from virnucpro_core.options import NucleotideOptions
ids, seqs = [], []
for line in open({str(reads)!r}):
    (ids.append(line[1:].split()[0]) if line.startswith(">") else seqs.append(check_nucleotides(line.strip())))
o = NucleotideOptions()
t = time.perf_counter()
n = sum(len(translate_batch(ids[i:i + 8192], seqs[i:i + 8192], o)) for i in range(0, len(ids), 8192))
s = time.perf_counter() - t
print(json.dumps({{"bases": sum(map(len, seqs)), "proteins": n, "translate_seconds": s}}))
"""
    res = subprocess.run([sys.executable, "-c", CHILD.format(pin=f"os.sched_setaffinity(0, {{{min(os.sched_getaffinity(0))}}})",
                                                             code=code)], capture_output=True, text=True)
    if res.returncode:
        raise RuntimeError(res.stderr[-3000:])
    r = json.loads(res.stdout.strip().splitlines()[0])
    r["mbp_per_s"] = r["bases"] / r["translate_seconds"] / 1e6
    return r


def nucleotide_shard(reads: Path, work: Path, baseline: Path | None) -> dict:
    new = shard_run([reads], work / "nt-new", 1, input_type="nucleotide", input_parts=1)
    out = {"new": new}
    if baseline:
        old_out = work / "nt-old"
        shutil.rmtree(old_out, ignore_errors=True)
        code = (f"from virnucpro_core.cli import main\n"
                f"main(['shard', {str(reads)!r}, '--out', {str(old_out)!r}, '--input_type', 'nucleotide'])")
        old = child(code, 1, pythonpath=str(baseline / "src"))
        commit = subprocess.run(["git", "-C", str(baseline), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        old_rows = pa.concat_tables([pq.read_table(p, columns=["id", "sequence"]) for p in sorted(old_out.glob("shard_*.parquet"))])
        out.update(baseline={**old, "commit": commit.stdout.strip()}, speedup=old["seconds"] / new["seconds"],
                   identical=rows(work / "nt-new").equals(old_rows), proteins=old_rows.num_rows)
    return out


def parallel_shard(work: Path, n_reads: int, protein_tokens: int) -> list[dict]:
    reads, proteins = work / "big-reads.fna", work / "big-proteins.faa"
    write_reads(reads, n_reads, seed=5)
    write_proteins(proteins, protein_tokens, seed=6)
    half = work / "reads-b.fna"
    text = reads.read_bytes()
    cut = text.index(b">", len(text) // 2)
    (work / "reads-a.fna").write_bytes(text[:cut])
    half.write_bytes(text[cut:])
    (work / "reads.fna.gz").write_bytes(gzip.compress(text, 6))
    (work / "proteins.faa.gz").write_bytes(gzip.compress(proteins.read_bytes(), 6))
    cases = [("reads, 2 files", [work / "reads-a.fna", half], {"input_type": "nucleotide"}, 2),
             ("reads, one plain file", [reads], {"input_type": "nucleotide"}, 1),
             ("reads, one gzip file", [work / "reads.fna.gz"], {"input_type": "nucleotide"}, 1),
             ("proteins, one plain file", [proteins], {}, 1),
             ("proteins, one gzip file", [work / "proteins.faa.gz"], {}, 1)]
    out = []
    for name, files, changes, one_core_parts in cases:
        one = shard_run(files, work / "p1", 1, input_parts=one_core_parts, shards=1, **changes)
        two = shard_run(files, work / "p2", 2, input_parts=2, shards=1, **changes)
        same = rows(work / "p1").equals(rows(work / "p2"))
        out.append({"input": name, "bytes": sum(f.stat().st_size for f in files), "one_core": one, "two_cores": two,
                    "speedup": one["seconds"] / two["seconds"], "identical": same})
        print(f"  {name}: 1 core {one['seconds']:.2f} s ({one['parts']} parts), 2 cores {two['seconds']:.2f} s "
              f"({two['parts']} parts): {out[-1]['speedup']:.2f}x, same rows: {same}", flush=True)
    return out


def synthetic_embeddings(parts: list[str], out: str, dim: int, rows_per_group: int = 20_000) -> None:
    """A shard's embeddings file as the embed job writes it (columns, compression, footer), random values."""
    from virnucpro_core.io.tables import PARTS_KEY, embeddings_table, writer_options
    from virnucpro_core.io.part_files import Shard, sequence_lengths

    shard = Shard(parts)
    t, rng, writer = shard.table, np.random.default_rng(0), None
    for lo in range(0, t.num_rows, rows_per_group):
        s = t.slice(lo, rows_per_group)
        table = embeddings_table(s["id"].to_pylist(), sequence_lengths(s),
                                 {"embedding": rng.standard_normal((s.num_rows, dim), dtype=np.float32)}, {"model": "synthetic"})
        table = table.add_column(2, "embedded_residues", pa.array(np.minimum(sequence_lengths(s), 1022), pa.int32()))
        if writer is None:
            writer = pq.ParquetWriter(out, table.schema, **writer_options(table.schema))
        writer.write_table(table)
    writer.add_key_value_metadata({PARTS_KEY: json.dumps(shard.describe())})
    writer.close()


FAKE_EMBED = """
import sys
sys.path.insert(0, {bench!r})
from scale import synthetic_embeddings
synthetic_embeddings({parts!r}, {out!r}, {dim})
"""

MERGE = """
from virnucpro_core.options import Options
from virnucpro_core.stages import merge
merge.run({manifest!r}, {skipped!r}, {embeddings!r}, [], {out!r}, Options().replace(**{{"merge.output": {output!r}}}))
"""


def merge_rows(work: Path, proteins: Path) -> list[dict]:
    d = work / "merge"
    shutil.rmtree(d, ignore_errors=True)
    shard_run([proteins], d / "shards", 1, shards=4)
    man = json.loads((d / "shards/manifest.json").read_text())
    out = []
    for dim in (64, 1280):
        embs = []
        for s in man["shards"]:
            e = d / f"emb-{s['name']}.parquet"
            child(FAKE_EMBED.format(bench=str(Path(__file__).parent), parts=[str(d / "shards" / f"{p}.parquet") for p in s["parts"]],
                                    out=str(e), dim=dim))
            embs.append(str(e))
        size = sum(os.path.getsize(e) for e in embs)
        for output in ("dataset", "file"):
            res = d / f"out-{dim}-{output}"
            shutil.rmtree(res, ignore_errors=True)
            r = child(MERGE.format(manifest=str(d / "shards/manifest.json"), skipped=str(d / "shards/skipped.tsv"), embeddings=embs,
                                   out=str(res), output=output))
            out.append({"dim": dim, "output": output, "rows": man["rows"], "embeddings_bytes": size, **r,
                        "mb_per_s": size / r["seconds"] / 1e6})
            print(f"  merge {dim}-d to a {output}: {r['seconds']:.2f} s ({size / 1e9:.2f} GB)", flush=True)
            shutil.rmtree(res)
        for e in embs:
            os.unlink(e)
    return out


PLAN = """
import numpy as np
from virnucpro_core.options import Options
from virnucpro_core.engine.packing import build_plan
from virnucpro_core.io.part_files import Shard, sequence_lengths
lengths = np.concatenate([sequence_lengths(Shard([p]).table) for p in {parts!r}])
build_plan(lengths, 65536, "truncate", 256, 1022, 16_000_000)
"""


def protein_shard(proteins: Path, work: Path, records: int) -> dict:
    out = shard_run([proteins], work / "prot", 1, input_parts=1)
    man = json.loads((work / "prot/manifest.json").read_text())
    plan = child(PLAN.format(parts=[str(work / "prot" / f"{p['name']}.parquet") for p in man["parts"]]))
    return {"records": records, "residues": man["residues"], "bytes": proteins.stat().st_size, "shard": out,
            "residues_per_s": man["residues"] / out["seconds"], "us_per_record": 1e6 * out["seconds"] / records,
            "plan": {**plan, "us_per_record": 1e6 * plan["seconds"] / records}}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reads", type=int, default=200_000)
    ap.add_argument("--protein-tokens", type=int, default=100_000_000, help="tokens of the protein input (default 100M)")
    ap.add_argument("--parallel-reads", type=int, default=1_000_000)
    ap.add_argument("--parallel-protein-tokens", type=int, default=400_000_000)
    ap.add_argument("--baseline", type=Path, help="an older checkout to compare the nucleotide shard step with")
    ap.add_argument("--work", type=Path, default=Path("/tmp/virnucpro-scale"))
    ap.add_argument("--out")
    args = ap.parse_args()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    reads, proteins = work / "reads.fna", work / "proteins.faa"
    bases = write_reads(reads, args.reads)
    n_prot = write_proteins(proteins, args.protein_tokens)
    print(f"{args.reads} reads ({bases / 1e6:.0f} Mbp), {n_prot} proteins ({proteins.stat().st_size / 1e6:.0f} MB)", flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    doc = {"machine": f"{platform.node()} ({os.cpu_count()} cores, {platform.processor() or platform.machine()})",
           "date": datetime.date.today().isoformat(), "commit": commit}

    def save():
        if args.out:
            Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")

    doc["translation"] = translation(reads)
    print(f"translation: {doc['translation']['mbp_per_s']:.1f} Mbp/s on one core", flush=True)
    doc["nucleotide_shard"] = nucleotide_shard(reads, work, args.baseline)
    print(f"nucleotide shard: {json.dumps(doc['nucleotide_shard'])}", flush=True)
    save()
    print("parallel shard:", flush=True)
    doc["parallel_shard"] = parallel_shard(work, args.parallel_reads, args.parallel_protein_tokens)
    save()
    doc["protein_shard"] = protein_shard(proteins, work, n_prot)
    print(f"protein shard: {json.dumps(doc['protein_shard'])}", flush=True)
    save()
    print("merge:", flush=True)
    doc["merge"] = merge_rows(work, proteins)
    save()
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

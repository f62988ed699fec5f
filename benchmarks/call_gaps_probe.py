"""Probe (issue 28, finished experiment): where the 650M engine's GPU idles within an embed call (profiler timeline),
and a call's fixed cost (600k against 2.4M tokens a call).

    python benchmarks/call_gaps_probe.py OUT.json   (on a GPU, from the repository root)
"""
import json, statistics, sys, time
import torch
sys.path.insert(0, "benchmarks")
from bench_embed import dataset, random_esm2, sync_time
from virnucpro_core.engine.embedder import Embedder, Outputs
from virnucpro_core.engine.packing import build_plan
from virnucpro_core.models.loader import LoadedModel
from virnucpro_core.options import ESM2_MODELS, EmbeddingOptions, PackingOptions

OUT = sys.argv[1]
out = {"device": torch.cuda.get_device_name(0), "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__}
name, esm2, params = random_esm2("650M")
layers, dim, heads = ESM2_MODELS[name]
loaded = LoadedModel(esm2, esm2.alphabet, name, "random", "-")
emb = Embedder(loaded, "cuda", "bfloat16", "auto", "auto")
outputs = Outputs.resolve(layers, EmbeddingOptions())
seqs = dataset("uniref", 600_000)
big = dataset("uniref", 2_400_000, seed=1)
plans = {n: build_plan([len(s) for s in q], PackingOptions().budget(dim), "truncate", 0) for n, q in (("600k", seqs), ("2.4M", big))}
data = {"600k": seqs, "2.4M": big}
for n in plans:
    emb.embed(data[n], plans[n], outputs, progress_every=1e9)
rates = {}
for n in plans:
    tokens = sum(p.tokens for p in plans[n].packs)
    ts = [sync_time(lambda: emb.embed(data[n], plans[n], outputs, progress_every=1e9)) for _ in range(3)]
    rates[n] = {"tokens": tokens, "packs": len(plans[n].packs), "runs_s": ts, "tok_per_s": tokens / statistics.median(ts)}
out["rates"] = rates
print(json.dumps(rates), flush=True)

from torch.profiler import ProfilerActivity, profile
with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]):
    torch.zeros(1, device="cuda").add_(1)
torch.cuda.synchronize()
with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
    t0 = time.perf_counter()
    emb.embed(seqs, plans["600k"], outputs, progress_every=1e9)
    torch.cuda.synchronize()
    wall = time.perf_counter() - t0
events = [e for e in prof.events() if e.device_type.name == "CUDA" and e.time_range.elapsed_us() >= 0]
ev = sorted(((e.time_range.start, e.time_range.end, e.name) for e in events), key=lambda r: r[0])
cpu = sorted(((e.time_range.start, e.time_range.end, e.name) for e in prof.events() if e.device_type.name == "CPU"), key=lambda r: r[0])
first_cpu = cpu[0][0] if cpu else ev[0][0]
gaps, end = [], ev[0][1]
prev = ev[0][2]
for s, e, n in ev[1:]:
    if s - end > 20:
        gaps.append({"gap_us": s - end, "at_ms": (end - ev[0][0]) / 1e3, "after": prev[:80], "before": n[:80]})
    if e > end:
        end, prev = e, n
busy = 0.0
cur_s, cur_e = ev[0][0], ev[0][1]
for s, e, _ in ev[1:]:
    if s > cur_e:
        busy += cur_e - cur_s
        cur_s, cur_e = s, e
    else:
        cur_e = max(cur_e, e)
busy += cur_e - cur_s
out["timeline"] = {"wall_s": wall, "kernels": len(ev), "gpu_span_ms": (end - ev[0][0]) / 1e3, "busy_ms": busy / 1e3,
                   "gaps_over_20us_ms": sum(g["gap_us"] for g in gaps) / 1e3, "n_gaps": len(gaps),
                   "first_cpu_event_to_first_kernel_ms": (ev[0][0] - first_cpu) / 1e3,
                   "top_gaps": sorted(gaps, key=lambda g: -g["gap_us"])[:25]}
print(json.dumps(out["timeline"], indent=1), flush=True)
cpu_ops = {}
for e in prof.key_averages():
    if e.cpu_time_total > 5000:
        cpu_ops[e.key[:80]] = {"calls": e.count, "cpu_ms": e.cpu_time_total / 1e3}
out["cpu_ops_over_5ms"] = dict(sorted(cpu_ops.items(), key=lambda kv: -kv[1]["cpu_ms"])[:30])
json.dump(out, open(OUT, "w"), indent=1)

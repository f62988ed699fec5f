"""The first probe of issue 28 (a finished experiment, see docs/performance.md): FA3 against FA2, fc1 variants, where the host gaps are, CUDA graphs, budgets; on the engine of bcdf02d. Writes $OUT/probe.json."""
import json, os, statistics, sys, time, traceback
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "src"))
import inputs  # noqa
from bench_embed import random_esm2, matmul_peak  # noqa
from virnucpro_core.engine import kernels  # noqa
from virnucpro_core.engine.embedder import Embedder, Outputs  # noqa
from virnucpro_core.engine.packing import build_plan  # noqa
from virnucpro_core.io.nucleotide import translate_batch  # noqa
from virnucpro_core.models.loader import LoadedModel  # noqa
from virnucpro_core.options import EmbeddingOptions, NucleotideOptions  # noqa

OUT = Path(os.environ.get("OUT", "/tmp/out"))
RES = {}


def save():
    (OUT / "probe.json").write_text(json.dumps(RES, indent=1))


def ev_time(fn, reps=20, warm=3):
    for _ in range(warm):
        fn()
    ts = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record(); fn(); e.record(); e.synchronize()
        ts.append(s.elapsed_time(e))
    return statistics.median(ts)


def real_lengths(n_tokens, seed=0):
    return [int(x) for x in np.minimum(inputs.protein_lengths(n_tokens, seed), 1022)]


def short_seqs(n_tokens, seed=0):
    g = inputs.genome(seed=seed)
    rng = np.random.default_rng(seed + 1)
    seqs, tot, ids = [], 0, []
    opts = NucleotideOptions()
    out = []
    while tot < n_tokens:
        batch = []
        for _ in range(5000):
            s = int(rng.integers(0, len(g) - 300)); r = g[s:s + 300]
            if rng.random() < 0.5:
                r = inputs.COMPLEMENT[r[::-1]]
            batch.append(r.tobytes().decode())
        p = translate_batch([f"r{i}" for i in range(len(batch))], batch, opts)
        for q in p.protein:
            out.append(q); tot += len(q) + 2
            if tot >= n_tokens:
                break
    return out


def rand_seqs(lengths, seed=1):
    rng = np.random.default_rng(seed)
    return [inputs.AA[rng.integers(0, 20, n)].tobytes().decode() for n in lengths]


def pack_cu(lengths, budget=65536):
    cu, tot = [0], 0
    for n in sorted(lengths, reverse=True):
        if tot + n + 2 > budget:
            break
        tot += n + 2; cu.append(tot)
    return torch.tensor(cu, dtype=torch.int32, device="cuda"), max(np.diff(cu))


# ---------------------------------------------------------------------------------------------------------
def probe_attention():
    import fa3_fwd_interface as fa3
    flash2 = torch.ops.aten._flash_attention_forward
    res = []
    for label, lens in (("real", real_lengths(400_000)), ("short", [len(s) for s in short_seqs(400_000)])):
        cu, ms = pack_cu(lens)
        T = int(cu[-1])
        for H, d in ((20, 64), (40, 64), (40, 128)):
            torch.manual_seed(0)
            qkv = torch.randn(T, 3, H, d, device="cuda", dtype=torch.bfloat16) * 2.5  # sharpened
            q, k, v = qkv[:, 0].contiguous(), qkv[:, 1].contiguous(), qkv[:, 2]
            scale = d ** -0.5
            f2 = lambda: flash2(q, k, v, cu, cu, ms, ms, 0.0, False, False, scale=scale)[0]
            f3 = lambda: fa3.flash_attn_varlen_func(q, k, v, cu, cu, ms, ms, softmax_scale=scale)
            o2, o3 = f2(), f3()
            if isinstance(o3, tuple):
                o3 = o3[0]
            # reference on the first 3 and last 3 sequences, fp32
            errs2, errs3 = [], []
            cuh = cu.tolist()
            for i in list(range(3)) + list(range(len(cuh) - 4, len(cuh) - 1)):
                s, e = cuh[i], cuh[i + 1]
                qi, ki, vi = (t[s:e].float().transpose(0, 1) for t in (q, k, v))
                ref = (torch.softmax(qi @ ki.transpose(1, 2) * scale, -1) @ vi).transpose(0, 1)
                errs2.append((o2[s:e].float() - ref).abs().max().item())
                errs3.append((o3[s:e].float() - ref).abs().max().item())
            r = {"set": label, "T": T, "S": len(cuh) - 1, "max_seqlen": int(ms), "H": H, "d": d,
                 "fa2_ms": ev_time(f2), "fa3_ms": ev_time(f3), "max_diff_fa2_fa3": (o2.float() - o3.float()).abs().max().item(),
                 "max_err_vs_fp32_fa2": max(errs2), "max_err_vs_fp32_fa3": max(errs3)}
            r["speedup"] = r["fa2_ms"] / r["fa3_ms"]
            print("attention", r, flush=True)
            res.append(r)
    RES["attention"] = res
    save()


# ---------------------------------------------------------------------------------------------------------
def probe_fc1():
    res = []
    M = 65536
    for D in (1280, 2560, 5120):
        torch.manual_seed(0)
        x = torch.randn(M, D, device="cuda", dtype=torch.bfloat16)
        w = (torch.randn(4 * D, D, device="cuda") * D ** -0.5).to(torch.bfloat16)
        b = (torch.randn(4 * D, device="cuda") * 0.1).to(torch.bfloat16)
        w2 = (torch.randn(D, 4 * D, device="cuda") * (4 * D) ** -0.5).to(torch.bfloat16)
        wq = (torch.randn(3 * D, D, device="cuda") * D ** -0.5).to(torch.bfloat16)
        wo = (torch.randn(D, D, device="cuda") * D ** -0.5).to(torch.bfloat16)
        g = torch.randn(M, 4 * D, device="cuda", dtype=torch.bfloat16)
        fl = 2 * M * D * 4 * D
        t = {
            "cublas_fc1_bias": ev_time(lambda: F.linear(x, w, b)),
            "triton_fc1_gelu": ev_time(lambda: kernels.linear_gelu(x, w, b)),
            "cublaslt_addmm_gelu": ev_time(lambda: torch._addmm_activation(b, x, w.t(), use_gelu=True)),
            "cublas_then_gelu": ev_time(lambda: F.gelu(F.linear(x, w, b))),
            "cublas_fc2": ev_time(lambda: F.linear(g, w2)),
            "cublas_qkv": ev_time(lambda: F.linear(x, wq)),
            "cublas_out": ev_time(lambda: F.linear(x, wo)),
        }
        tflops = {k: (fl if k not in ("cublas_qkv", "cublas_out") else (2 * M * D * 3 * D if k == "cublas_qkv" else 2 * M * D * D)) / (v / 1e3) / 1e12
                  for k, v in t.items()}
        # accuracy on 4096 rows
        xs = x[:4096]
        pre = xs.float() @ w.float().T + b.float()
        exact = F.gelu(pre)
        tanh = F.gelu(pre, approximate="tanh")
        step = lambda ref: ref.abs().clamp(min=1e-30).log2().floor().exp2() * 2 ** -7  # bf16 spacing
        acc = {}
        for k, y in (("triton", kernels.linear_gelu(xs, w, b)), ("addmm_gelu", torch._addmm_activation(b, xs, w.t(), use_gelu=True)),
                     ("cublas_then_gelu", F.gelu(F.linear(xs, w, b)))):
            yf = y.float()
            acc[k] = {"max_steps_vs_exact": ((yf - exact).abs() / step(exact)).max().item(),
                      "mean_abs_vs_exact": (yf - exact).abs().mean().item(),
                      "mean_abs_vs_tanh": (yf - tanh).abs().mean().item(),
                      "max_abs_vs_exact": (yf - exact).abs().max().item()}
        acc["exact_bf16_round"] = {"mean_abs_vs_exact": (exact.to(torch.bfloat16).float() - exact).abs().mean().item()}
        r = {"D": D, "M": M, "ms": t, "tflops": tflops, "accuracy": acc}
        print("fc1", json.dumps(r), flush=True)
        res.append(r)
        del x, w, b, w2, wq, wo, g
    RES["fc1"] = res
    save()


# ---------------------------------------------------------------------------------------------------------
def gaps_from_trace(path):
    tr = json.loads(Path(path).read_text())
    evs = tr["traceEvents"] if isinstance(tr, dict) else tr
    gpu = sorted((e for e in evs if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and e.get("ph") == "X"), key=lambda e: e["ts"])
    rt = [e for e in evs if e.get("cat") in ("cuda_runtime", "cuda_driver") and e.get("ph") == "X"]
    cpu = [e for e in evs if e.get("cat") == "cpu_op" and e.get("ph") == "X"]
    gaps = []
    for a, bb in zip(gpu, gpu[1:]):
        g = bb["ts"] - (a["ts"] + a["dur"])
        if g > 0:
            gaps.append((g, a["name"][:60], bb["name"][:60], a["ts"] + a["dur"], bb["ts"]))
    tot_gap = sum(g[0] for g in gaps)
    span = gpu[-1]["ts"] + gpu[-1]["dur"] - gpu[0]["ts"]
    big = sorted(gaps, reverse=True)[:15]
    hist = {">1ms": sum(g[0] for g in gaps if g[0] > 1000), "100us-1ms": sum(g[0] for g in gaps if 100 < g[0] <= 1000),
            "10-100us": sum(g[0] for g in gaps if 10 < g[0] <= 100), "<10us": sum(g[0] for g in gaps if g[0] <= 10)}
    # CPU-side runtime calls
    rts = {}
    for e in rt:
        d = rts.setdefault(e["name"], [0, 0.0]); d[0] += 1; d[1] += e["dur"]
    cps = {}
    for e in cpu:
        d = cps.setdefault(e["name"], [0, 0.0]); d[0] += 1; d[1] += e["dur"]
    bigdesc = []
    for g, an, bn, s, e in big:
        during = sorted({x["name"] for x in rt if x["ts"] < e and x["ts"] + x["dur"] > s and x["dur"] > 50})
        cpud = sorted({x["name"] for x in cpu if x["ts"] < e and x["ts"] + x["dur"] > s and x["dur"] > 100})[:12]
        bigdesc.append({"gap_us": g, "after": an, "before": bn, "runtime_calls_over_50us": during, "cpu_ops_over_100us": cpud})
    return {"gpu_span_us": span, "gap_total_us": tot_gap, "gap_share": tot_gap / span, "hist_us": hist, "n_kernels": len(gpu),
            "biggest": bigdesc,
            "runtime_top": sorted(([k, v[0], v[1]] for k, v in rts.items()), key=lambda r: -r[2])[:15],
            "cpu_ops_top": sorted(([k, v[0], v[1]] for k, v in cps.items()), key=lambda r: -r[2])[:25]}


def probe_engine(peak):
    from torch.profiler import ProfilerActivity, profile
    import fa3_fwd_interface as fa3

    def fa3_attend(q, k, v, cu, ms, scale):
        o = fa3.flash_attn_varlen_func(q, k, v, cu, cu, ms, ms, softmax_scale=scale)
        return o[0] if isinstance(o, tuple) else o

    res = {}
    real = rand_seqs(real_lengths(1_500_000))
    short = short_seqs(1_000_000)
    for shape in ("650M", "3B"):
        name, esm2, params = random_esm2(shape)
        loaded = LoadedModel(esm2, esm2.alphabet, name, "random", "-")
        emb = Embedder(loaded, "cuda", "bfloat16", "auto")
        fa2_attend = emb.packed.attend
        outputs = Outputs.resolve(esm2.num_layers, EmbeddingOptions())
        for data, seqs in (("real", real if shape == "650M" else real[: len(real) // 3]), ("short", short if shape == "650M" else short[: len(short) // 3])):
            lengths = [len(s) for s in seqs]
            tokens = sum(n + 2 for n in lengths)
            for budget in (65536, 131072):
                plan = build_plan(lengths, budget, "truncate", 0)
                for att, fn in (("fa2", fa2_attend), ("fa3", fa3_attend)):
                    emb.packed.attend = fn
                    go = lambda: emb.embed(seqs, plan, outputs, progress_every=1e9)
                    go()
                    ts = []
                    for _ in range(2):
                        torch.cuda.synchronize(); t = time.perf_counter(); go(); torch.cuda.synchronize(); ts.append(time.perf_counter() - t)
                    tps = tokens / min(ts)
                    key = f"{shape}/{data}/{budget}/{att}"
                    res[key] = {"tok_s": tps, "mfu": tps * 2 * params / peak, "runs": ts, "tokens": tokens}
                    print("engine", key, res[key], flush=True)
                    RES["engine"] = res
                    save()
        if shape == "650M":
            # where the gaps are: one pass with CPU+CUDA activities, fa2, 65536, real
            emb.packed.attend = fa2_attend
            seqs = real[: len(real) // 2]
            plan = build_plan([len(s) for s in seqs], 65536, "truncate", 0)
            with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
                emb.embed(seqs, plan, outputs, progress_every=1e9)
                torch.cuda.synchronize()
            prof.export_chrome_trace("/tmp/trace.json")
            RES["gaps_650M"] = gaps_from_trace("/tmp/trace.json")
            print("gaps", json.dumps(RES["gaps_650M"], indent=0)[:6000], flush=True)
            save()
            # CUDA graph of one full pack's forward against eager
            try:
                pack = plan.packs[1]
                tok, cu = emb._to_device(seqs, pack)
                ms = int(pack.lengths.max()) + 2
                L = esm2.num_layers
                fwd = lambda: emb.packed(tok, cu, ms, [L])
                eager = ev_time(fwd, reps=10)
                s = torch.cuda.Stream(); s.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(s):
                    for _ in range(2):
                        fwd()
                torch.cuda.current_stream().wait_stream(s)
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g):
                    out = fwd()
                graph = ev_time(g.replay, reps=10)
                ref = fwd()[L]
                g.replay()
                RES["cuda_graph_650M"] = {"T": int(tok.shape[0]), "S": len(pack.lengths), "eager_ms": eager, "graph_ms": graph,
                                          "gain": eager / graph - 1, "max_diff": (out[L] - ref).abs().max().item()}
                # eager in a loop with the next pack's launch not waiting: back-to-back forwards, wall clock
                torch.cuda.synchronize(); t = time.perf_counter()
                for _ in range(10):
                    fwd()
                torch.cuda.synchronize()
                RES["cuda_graph_650M"]["eager_wall_ms"] = (time.perf_counter() - t) / 10 * 1e3
                print("graph", RES["cuda_graph_650M"], flush=True)
            except Exception:
                RES["cuda_graph_650M"] = {"error": traceback.format_exc()[-2000:]}
                print(RES["cuda_graph_650M"], flush=True)
            save()
        del emb, esm2, loaded
        torch.cuda.empty_cache()


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    torch.backends.cuda.matmul.allow_tf32 = False
    peak = matmul_peak()
    RES["peak_tflops"] = peak / 1e12
    RES["device"] = torch.cuda.get_device_name(0)
    RES["torch"] = torch.__version__
    import triton
    RES["triton"] = triton.__version__
    print("peak", peak / 1e12, RES, flush=True)
    for f in (probe_attention, probe_fc1, lambda: probe_engine(peak)):
        try:
            t = time.time(); f(); print("took", time.time() - t, flush=True)
        except Exception:
            traceback.print_exc()
            RES.setdefault("errors", []).append(traceback.format_exc()[-3000:])
            save()


if __name__ == "__main__":
    main()

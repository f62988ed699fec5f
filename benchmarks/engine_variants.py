"""Engines A/B, one process, one GPU: where the non-GEMM time goes and what removes it.

    mkdir -p .dev/old && git archive <commit> src | tar -x -C .dev/old
    OUT=. python benchmarks/engine_variants.py [--shapes 650M,3B] [--engines old,current,cudnn,current@131072] [--old .dev/old]

Engines: ``old`` (the package of an earlier checkout), or a variant of this one (``VARIANTS``:
``current``, ``cudnn`` attention), each optionally ``@budget``. Each runs the whole embed loop
(prefetch, forward, pooling) over the same plan; the first pass loads (or compiles) the kernels,
then the median of ``--repeats`` passes, the engines' passes interleaved. Pooled outputs are
compared with the first engine's. The top GPU kernels of each are listed (torch profiler).
``--attention``: cuDNN's ragged attention against FlashAttention on one pack; ``--gelu``: GELU passes
(``GELUS``: from erfc, as the engine computes it, or from erf) against Inductor's; ``--fc1``: fc1 and
its GELU in one Triton matmul (kernels.linear_gelu, the engine's) against cuBLAS then the GELU pass,
for each tile config. Engines ``cublas_gelu`` and ``gelu_*`` put cuBLAS and a GELU pass back into the
engine. Writes $OUT/<name> after every row.

Runs so far (benchmarks/results/, H200, 2026-11-30): engine-variants-* chose the torch.compile
layout (coordinate-descent tuning +2.5%, the last bias and residual add moved into the next layer
norm +0.8%, max-autotune +1% for a 2 min compile, not taken) and showed Inductor's rotary kernel at
15% of the 650M forward; attention-cudnn-budget-* found cuDNN's ragged attention 45x slower than
FlashAttention (a cuDNN graph built every call) and budget 131072 +1.2%; engine-ab-triton-* the
Triton kernels against the torch.compile engine (+0.8% 650M, +1.2% 3B); engine-linear-* chose fc1 +
GELU in one Triton matmul and GELU from erfc, and left the other matmuls and q/k/v + rotary on
cuBLAS (the code of those trials: 6fec684); engine-gelu-* found fc1's matmul within 3% of cuBLAS and its
GELU epilogue bound by instruction issue (benchmarks/fc1_epilogue_probe.py), wrote the GELU in 17
instructions an element instead of 30 (+0.9% 3B, +1.2% 650M), and dropped the occupancy, split-epilogue
and Gluon ping-pong trials (their code: 72e5482).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import importlib.util
import json
import os
import statistics
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, "benchmarks")
from bench_embed import dataset, matmul_peak, profile_engine, random_esm2, sync_time  # noqa: E402
from virnucpro_core.engine import embedder as embed_module  # noqa: E402
from virnucpro_core.engine import kernels  # noqa: E402
from virnucpro_core.engine.attention import resolve_backend  # noqa: E402
from virnucpro_core.models.loader import LoadedModel  # noqa: E402
from virnucpro_core.options import EmbeddingOptions  # noqa: E402
from virnucpro_core.engine.packing import build_plan  # noqa: E402


def load_old(path: str):
    """The package of an earlier checkout of src/ (``git archive``), imported as ``oldcore``."""
    spec = importlib.util.spec_from_file_location("oldcore", f"{path}/src/virnucpro_core/__init__.py",
                                                  submodule_search_locations=[f"{path}/src/virnucpro_core"])
    pkg = importlib.util.module_from_spec(spec)
    sys.modules["oldcore"] = pkg
    spec.loader.exec_module(pkg)
    return pkg


def cudnn_attend(q, k, v, cu, max_seqlen, scale):
    """cuDNN's fused attention on ragged (packed) q/k/v: PyTorch has the op but its ``varlen_attn``
    does not route to it yet."""
    return torch.ops.aten._cudnn_attention_forward(q, k, v, None, cu, cu, max_seqlen, max_seqlen, False, 0.0, False, False,
                                                   scale=scale)[0]


def cudnn_fixed_attend(q, k, v, cu, max_seqlen, scale):
    """The same with the longest sequence always 1024 tokens: fewer cuDNN graphs to build."""
    return cudnn_attend(q, k, v, cu, 1024, scale)


try:
    import triton
    import triton.language as tl

    from virnucpro_core.engine.kernels import _gelu_fp32

    @triton.jit
    def _gelu(x, n, ERFC: tl.constexpr, BLOCK: tl.constexpr):
        """GELU in place, one pass: the engine's (``ERFC``: from erfc, as in kernels.linear_gelu) or the
        earlier 0.5 * x * (1 + erf(x / sqrt(2)))."""
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        m = i < n
        v = tl.load(x + i, mask=m, other=0.0).to(tl.float32)
        g = _gelu_fp32(v) if ERFC else 0.5 * v * (1.0 + tl.math.erf(v * 0.7071067811865476))
        tl.store(x + i, g.to(x.dtype.element_ty), mask=m)
except ImportError:
    triton = None


def gelu_pass(erfc: bool, block: int = 2048, warps: int = 8):
    """A GELU pass in place after cuBLAS's fc1 (tensors under 2^31 elements)."""

    def gelu_(x: torch.Tensor) -> torch.Tensor:
        n = x.numel()
        assert x.is_contiguous() and n < 2**31
        _gelu[(triton.cdiv(n, block),)](x, n, ERFC=erfc, BLOCK=block, num_warps=warps)
        return x

    return gelu_


GELUS = {"erfc": gelu_pass(True), "erf": gelu_pass(False), "erf_4096_8": gelu_pass(False, 4096, 8)}


def gelu_check(doc: dict) -> None:
    """The GELU passes of GELUS and Inductor's (torch.compile of F.gelu) on the feed-forward activations of
    a 65536-token pack (650M and 3B widths): time, GB/s, elements that differ from PyTorch's."""
    from triton.testing import do_bench

    inductor = torch.compile(torch.nn.functional.gelu, dynamic=True, options={"coordinate_descent_tuning": True})
    for width in (5120, 10240):
        x = (torch.randn(65536, width, device="cuda") * 2).to(torch.bfloat16)
        want = torch.nn.functional.gelu(x)
        row = {"shape": [65536, width]}
        for name, fn in {"inductor": inductor, **GELUS}.items():
            y = x.clone()
            got = fn(y)
            row[f"{name}_differs_from_torch"] = float((got != want).float().mean())
            ms = do_bench(lambda: fn(y), return_mode="median")
            row[f"{name}_ms"], row[f"{name}_GBps"] = ms, x.numel() * 2 * 2 / ms / 1e6
        doc["gelu"].append(row)
        print(json.dumps(row), flush=True)


# kernels.linear_gelu configs: name -> (BM, BN, BK, GROUP_M, num_stages, num_warps). Tried and dropped (the
# code: 72e5482; results: engine-gelu-*): two programs per multiprocessor, an epilogue split in two, and a
# Gluon ping-pong kernel (two consumer warpgroups taking turns, one's GELU epilogue under the other's matmul).
FC1_CONFIGS = {
    "256x128s3": (256, 128, 64, 8, 3, 8),
    "128x256s3": (128, 256, 64, 8, 3, 8),
    "128x128s4": (128, 128, 64, 8, 4, 8),
}
FC1_BEST: dict[int, tuple] = {}  # model dim -> the fastest config of fc1_check


def compiled_linear_gelu() -> dict:
    """Registers, spills and shared memory of each compiled linear_gelu kernel (Triton's cache), by object id."""
    caches = getattr(kernels._linear_gelu, "device_caches", {}).values()
    return {id(k): {"regs": k.n_regs, "spills": k.n_spills, "shared": k.metadata.shared}
            for cache in caches for k in cache[0].values()}


def ulp_err(got, exact):
    """Largest error in bf16 steps of the exact value (exact values above 1e-3), and mean absolute error."""
    big = exact.abs() > 1e-3
    ulp = torch.exp2(torch.floor(torch.log2(exact.abs().clamp(min=1e-3))) - 7)
    return float(((got.double() - exact).abs() / ulp)[big].max()), float((got.double() - exact).abs().mean())


def fc1_check(doc: dict, shapes: str) -> None:
    """fc1 and GELU of a 65519-token pack (650M and 3B widths): cuBLAS, then the erfc GELU pass, against
    kernels.linear_gelu with each config of FC1_CONFIGS; error against the fp64 GELU of the fp64 matmul."""
    from triton.testing import do_bench

    for dim in ({"650M": 1280, "3B": 2560}[s] for s in shapes.split(",")):
        m, n, k = 65519, 4 * dim, dim
        torch.manual_seed(0)
        x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
        w = (torch.randn(n, k, device="cuda") * k**-0.5).to(torch.bfloat16)
        b = (torch.randn(n, device="cuda") * 0.5).to(torch.bfloat16)
        exact = F.gelu(x.double() @ w.double().T + b.double())
        row = {"M": m, "N": n, "K": k}
        runs = {"cublas": lambda: F.linear(x, w, b), "cublas_gelu": lambda: GELUS["erfc"](F.linear(x, w, b))}
        for name, cfg in FC1_CONFIGS.items():
            runs[name] = lambda cfg=cfg: kernels.linear_gelu(x, w, b, cfg)
        for name, fn in runs.items():
            try:
                seen = compiled_linear_gelu()
                if name != "cublas":
                    row[f"{name}_max_ulp"], row[f"{name}_mean_abs"] = ulp_err(fn(), exact)
                row[f"{name}_ms"] = do_bench(fn, return_mode="median")
                row[f"{name}_tflops"] = 2 * m * n * k / row[f"{name}_ms"] / 1e9
                for key, meta in compiled_linear_gelu().items():
                    if key not in seen:
                        row[f"{name}_kernel"] = meta
            except Exception as exc:  # noqa: BLE001
                row[f"{name}_error"] = f"{type(exc).__name__}: {exc}"[:200]
        timed = {name: row[f"{name}_ms"] for name in FC1_CONFIGS if f"{name}_ms" in row}
        row["best"] = min(timed, key=timed.get)
        FC1_BEST[k] = FC1_CONFIGS[row["best"]]
        doc["fc1"].append(row)
        print(json.dumps(row), flush=True)
        exact = None


def cublas_then(gelu):
    """fc1 on cuBLAS, then ``gelu`` in place: the engine's feed-forward before linear_gelu."""
    return lambda h, w, b: gelu(F.linear(h, w, b))


# variant name -> change to a fresh Embedder of the current package
VARIANTS = {
    "current": lambda emb: None,
    "cudnn": lambda emb: setattr(emb.packed, "attend", cudnn_attend),
    "cudnn_fixed": lambda emb: setattr(emb.packed, "attend", cudnn_fixed_attend),
    "cublas_gelu": lambda emb: setattr(emb.packed, "linear_gelu", cublas_then(GELUS["erfc"])),
    "fc1_best": lambda emb: setattr(emb.packed, "linear_gelu", functools.partial(
        kernels.linear_gelu, config=FC1_BEST[emb.packed.esm2.embed_dim])),
    **{f"gelu_{k}": (lambda emb, f=f: setattr(emb.packed, "linear_gelu", cublas_then(f))) for k, f in GELUS.items()},
}


def attention_check(doc: dict) -> None:
    """PyTorch's varlen FlashAttention against cuDNN's ragged attention on one pack: time and difference."""
    from triton.testing import do_bench

    for heads in (20, 40):
        T = 65536
        torch.manual_seed(0)
        q, k, v = ((torch.randn(T, heads, 64, device="cuda") * 2).to(torch.bfloat16) for _ in range(3))
        lengths = np.clip(np.random.default_rng(0).lognormal(np.log(300), 0.6, T // 100), 30, 1022).astype(np.int64) + 2
        cu = np.concatenate([[0], np.cumsum(lengths)])
        cu = torch.tensor(np.append(cu[cu < T], T), dtype=torch.int32, device="cuda")
        _, fa = resolve_backend(q.device, q.dtype)
        row = {"heads": heads, "tokens": T, "sequences": len(cu) - 1, "fa_ms": do_bench(lambda: fa(q, k, v, cu, 1024, 0.125), return_mode="median")}
        ref = fa(q, k, v, cu, 1024, 0.125)
        for name, fn in (("cudnn", cudnn_attend), ("cudnn_fixed", cudnn_fixed_attend)):
            try:
                t = time.perf_counter()
                got = fn(q, k, v, cu, 1024, 0.125)
                torch.cuda.synchronize()
                row[f"{name}_first_call_s"] = time.perf_counter() - t
                row[f"{name}_max_abs_vs_fa"] = float((got.float() - ref.float()).abs().max())
                row[f"{name}_ms"] = do_bench(lambda: fn(q, k, v, cu, 1024, 0.125), return_mode="median")
                # a pack of other lengths: a new cuDNN graph?
                cu2 = cu.clone()
                cu2[1:-1] -= 7
                t = time.perf_counter()
                fn(q, k, v, cu2, 1000, 0.125)
                torch.cuda.synchronize()
                row[f"{name}_other_pack_s"] = time.perf_counter() - t
            except Exception as exc:  # noqa: BLE001
                row[f"{name}_error"] = f"{type(exc).__name__}: {exc}"[:300]
        doc["attention"].append(row)
        print(json.dumps(row), flush=True)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="650M,3B")
    ap.add_argument("--engines", default="old,current", help="variants (VARIANTS, or old with --old), each optionally @budget")
    ap.add_argument("--budget", type=int, default=65536)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--old", help="an earlier checkout (git archive of src/) to compare with")
    ap.add_argument("--attention", action="store_true", help="also time cuDNN's ragged attention against FlashAttention")
    ap.add_argument("--gelu", action="store_true", help="also time the GELU kernel against Inductor's and the candidates")
    ap.add_argument("--fc1", action="store_true", help="also time fc1 + GELU in one Triton kernel against cuBLAS + GELU")
    ap.add_argument("--top", type=int, default=14, help="kernels listed per engine (0: no profile)")
    ap.add_argument("--name", default="variants.json")
    args = ap.parse_args()
    out_path = os.path.join(os.environ.get("OUT", "."), args.name)
    peak = matmul_peak()
    doc = {"device": torch.cuda.get_device_name(0), "date": datetime.date.today().isoformat(), "torch": torch.__version__,
           "bf16_peak_tflops": peak / 1e12, "attention": [], "gelu": [], "fc1": [], "rows": [], "kernels": {}}
    print(f"peak {peak / 1e12:.0f} TFLOP/s", flush=True)
    if args.attention:
        attention_check(doc)
    if args.gelu:
        gelu_check(doc)
    if args.fc1:
        fc1_check(doc, args.shapes)
    if args.old:
        load_old(args.old)
        old = importlib.import_module("oldcore.embed")
    for shape in args.shapes.split(","):
        name, esm2, params = random_esm2(shape)
        layers = esm2.num_layers
        seqs = dataset("uniref", 1_000_000 if shape != "3B" else 500_000)
        lengths = [len(s) for s in seqs]
        tokens = sum(x + 2 for x in lengths)
        engines, firsts, pooled = {}, {}, {}
        for label in args.engines.split(","):
            variant, _, budget = label.partition("@")
            budget = int(budget or args.budget)
            mod = old if variant == "old" else embed_module
            plan = build_plan(lengths, budget, "truncate", 0)
            loaded = LoadedModel(esm2, esm2.alphabet, name, "random", "-")
            emb = mod.Embedder(loaded, "cuda", "bfloat16", "auto")
            if variant != "old":
                VARIANTS[variant](emb)
            outputs = mod.Outputs.resolve(layers, EmbeddingOptions())
            try:
                t0 = time.perf_counter()
                pooled[label] = emb.embed(seqs, plan, outputs, progress_every=1e9).pooled["embedding"]
                torch.cuda.synchronize()
            except Exception as exc:  # noqa: BLE001
                print(f"{label}: {type(exc).__name__}: {str(exc)[:300]}", flush=True)
                doc["rows"].append({"model": name, "engine": label, "error": f"{type(exc).__name__}: {exc}"[:300]})
                continue
            firsts[label] = time.perf_counter() - t0
            engines[label] = (emb, outputs, plan, budget)
        times = {k: [] for k in engines}
        for _ in range(args.repeats):
            for label, (emb, outputs, plan, _) in engines.items():
                times[label].append(sync_time(lambda: emb.embed(seqs, plan, outputs, progress_every=1e9)))
        ref = next(iter(pooled.values()))
        for label, (emb, outputs, plan, budget) in engines.items():
            got = pooled[label]
            cos = (got * ref).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(ref, axis=1)
            tps = tokens / statistics.median(times[label])
            row = {"model": name, "engine": label, "budget": budget, "tok_per_s": tps, "mfu": tps * 2 * params / peak,
                   "first_pass_s": firsts[label], "runs_s": times[label],
                   "min_cos_vs_first": float(cos.min()), "max_abs_vs_first": float(np.abs(got - ref).max())}
            doc["rows"].append(row)
            print(json.dumps(row), flush=True)
            if args.top:
                k = profile_engine(emb, seqs, plan, outputs, top=25)
                doc["kernels"][f"{name}/{label}"] = k
                print(f"{label}: host gap {100 * k['host_gap_share']:.1f}%", flush=True)
                for r in k["top"][: args.top]:
                    print(f"  {100 * r['share']:5.1f}% {r['calls']:6d}  {r['kernel'][:110]}", flush=True)
            with open(out_path, "w") as f:
                json.dump(doc, f, indent=1)
        engines = esm2 = None
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())

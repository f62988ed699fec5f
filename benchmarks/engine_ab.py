"""A/B of the engine: an older checkout's against this one's, in one process, on one GPU (issue: speed).

    git -C <repo> archive <commit> src | tar -x -C /tmp/old      # the older engine's src
    python benchmarks/engine_ab.py --old /tmp/old/src --out-dir OUT [--model 650M|3B] [--tokens 4000000] [--reps 3]

The OLD package (``--old``: a folder holding ``virnucpro_core``) is imported as ``virnucpro_core_old`` (its
modules import each other relatively), the NEW one is this checkout's ``src``. One random-weight ESM-2 of
the chosen shape is built with fair-esm's classes (the new package's ``build_esm2``) and cast to bf16 on
the GPU; each engine's ``Embedder`` gets its own deep copy (an Embedder casts its model in place). Input:
random residues of real protein lengths (``inputs.protein_lengths``: log-normal, median 270), planned by
each package's own ``build_plan`` (65536-token packs, truncation). Each engine is warmed up once (Triton
compiles or loads its kernels), then the two are timed in turn, ``--reps`` times each (old, new, then
new, old, ...: drift falls on both), whole ``embed`` calls from sequences to pooled rows on the device.
Reported: median tokens/s of each, new/old, the pooled outputs' max |diff| and min cosine (the same
weights and packs: bitwise or near-identical), and % of the bf16 peak (tokens/s x 2 x parameters
against a timed 8192^3 bf16 ``torch.mm``, the best of 10). Writes ``OUT/engine-ab.json``.
About 90 s on an H200 for the 650M shape with the defaults. ``--device cpu --tiny`` runs a 2-layer 64-d
model on the CPU in fp32 (a check of the loading and the comparison, not a measurement).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import importlib
import importlib.util
import itertools
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "src"))  # the NEW package: this checkout's
sys.path.insert(0, str(HERE))

from bench_embed import matmul_times
from inputs import AA, protein_lengths

SHAPES = {"650M": (33, 1280, 20), "3B": (36, 2560, 40), "tiny": (2, 64, 4)}
OLD_NAME = "virnucpro_core_old"


def import_package(name: str, folder: Path):
    """The package in ``folder`` (``__init__.py`` and its modules) imported under the top-level ``name``."""
    init = folder / "__init__.py"
    if not init.is_file():
        raise SystemExit(f"{folder}: no package there (expected {init})")
    spec = importlib.util.spec_from_file_location(name, init, submodule_search_locations=[str(folder)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def submodule(package: str, *candidates: str):
    """The first of ``candidates`` (module paths inside ``package``) that exists: checkouts before the
    layout by concern had flat module names (``embed``, ``packing``, ``model``)."""
    for c in candidates:
        name = f"{package}.{c}"
        try:
            return importlib.import_module(name)
        except ModuleNotFoundError as exc:  # this candidate (or its folder) is not there: the next one
            if exc.name != name and not name.startswith(f"{exc.name}."):
                raise
    raise SystemExit(f"{package}: none of {candidates}")


class Engine:
    """One package's Embedder over its own copy of the model, with its plan and outputs."""

    def __init__(self, label: str, package: str, model, lengths: list[int], budget: int, device: str, dtype: str,
                 backend: str) -> None:
        embedder = submodule(package, "engine.embedder", "embed")
        packing = submodule(package, "engine.packing", "packing")
        loader = submodule(package, "models.loader", "model")
        options = submodule(package, "options")
        self.label, self.package = label, package
        self.file = sys.modules[package].__file__
        loaded = loader.LoadedModel(model, model.alphabet, f"random-{label}", "random", "-")
        self.emb = embedder.Embedder(loaded, device, dtype, backend)
        self.plan = packing.build_plan(lengths, budget, "truncate", 0)
        self.outputs = embedder.Outputs.resolve(model.num_layers, options.EmbeddingOptions())
        self.tokens = sum(p.tokens for p in self.plan.packs)
        self.build_plan = packing.build_plan
        packed = self.emb.packed
        self.info = {"package": self.file, "backend": self.emb.backend, "fused_kernels": getattr(packed, "fused", None),
                     "packs": len(self.plan.packs), "tokens": self.tokens}

    def embed(self, seqs: list[str], plan=None):
        return self.emb.embed(seqs, plan or self.plan, self.outputs, progress_every=1e9)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def matmul_peak(n: int = 8192, reps: int = 10) -> dict:
    """The bf16 matmul rate of ``torch.mm`` on n x n: the best and the median of ``reps`` timed calls (FLOP/s)."""
    times = matmul_times(n, reps)
    torch.cuda.empty_cache()
    return {"n": n, "best_flops": 2 * n**3 / min(times), "median_flops": 2 * n**3 / statistics.median(times)}


def git_head(path: Path) -> str | None:
    try:
        head = subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=False)
        dirty = subprocess.run(["git", "-C", str(path), "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + (" (modified)" if dirty.stdout.strip() else "")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--old", required=True, type=Path, help="folder holding the older virnucpro_core (an older checkout's src)")
    ap.add_argument("--out-dir", required=True, type=Path)
    ap.add_argument("--model", choices=["650M", "3B"], default="650M", help="random-weight ESM-2 shape (default 650M)")
    ap.add_argument("--tokens", type=int, default=4_000_000, help="tokens of input, residues + BOS + EOS (default 4M)")
    ap.add_argument("--reps", type=int, default=3, help="timed embed calls of each engine (default 3)")
    ap.add_argument("--budget", type=int, default=65536, help="tokens per pack (default 65536)")
    ap.add_argument("--warmup-tokens", type=int, default=500_000, help="tokens of the warm-up run of each engine")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--tiny", action="store_true", help="a 2-layer 64-d model (with --device cpu: a check, not a measurement)")
    args = ap.parse_args()
    dev = args.device
    if dev == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this benchmark is for a GPU (--device cpu --tiny checks it on the CPU)")
    dtype, backend = ("bfloat16", "auto") if dev == "cuda" else ("float32", "reference")

    old_src = args.old.resolve()
    old_pkg = old_src / "virnucpro_core" if (old_src / "virnucpro_core").is_dir() else old_src
    import_package(OLD_NAME, old_pkg)
    import virnucpro_core  # the NEW package
    from virnucpro_core.models.loader import build_esm2

    if Path(virnucpro_core.__file__).resolve().parent == old_pkg:
        raise SystemExit(f"--old {args.old} is this checkout's package: nothing to compare")
    print(f"old: {sys.modules[OLD_NAME].__file__}\nnew: {virnucpro_core.__file__}", flush=True)

    shape = SHAPES["tiny" if args.tiny else args.model]
    torch.manual_seed(args.seed)
    with torch.device(dev):
        base = build_esm2(*shape).eval()
    base = base.to(getattr(torch, dtype))
    params = sum(p.numel() for p in base.parameters())

    lengths = protein_lengths(args.tokens, args.seed)
    rng = np.random.default_rng(args.seed + 1)
    body = AA[rng.integers(0, 20, int(lengths.sum()))].tobytes().decode()
    bounds = np.concatenate([[0], np.cumsum(lengths)])
    seqs = [body[s:e] for s, e in itertools.pairwise(bounds)]
    lengths = [int(n) for n in lengths]
    print(f"model {shape} ({params / 1e6:.0f}M parameters) {dtype} on {dev}; {len(seqs)} proteins, "
          f"median {int(np.median(lengths))} residues", flush=True)

    # each engine its own copy: an Embedder moves and casts the model it is given in place
    engines = [Engine(label, pkg, copy.deepcopy(base), lengths, args.budget, dev, dtype, backend)
               for label, pkg in (("old", OLD_NAME), ("new", "virnucpro_core"))]
    del base
    old, new = engines
    if old.tokens != new.tokens:
        print(f"warning: the plans differ: {old.tokens} tokens (old) vs {new.tokens} (new)", flush=True)

    n_warm = max(1, int(np.searchsorted(np.cumsum(np.minimum(lengths, 1022) + 2), args.warmup_tokens)))
    warmup = {}
    for e in engines:
        plan = e.build_plan(lengths[:n_warm], args.budget, "truncate", 0)
        sync(dev)
        t = time.perf_counter()
        _ = e.embed(seqs[:n_warm], plan).pooled  # the copy to the host included
        sync(dev)
        warmup[e.label] = time.perf_counter() - t
        print(f"warm-up {e.label}: {warmup[e.label]:.1f} s ({e.info['backend']}, fused kernels {e.info['fused_kernels']})", flush=True)

    times = {"old": [], "new": []}
    pooled = {}
    for rep in range(args.reps):
        for e in (engines if rep % 2 == 0 else engines[::-1]):
            sync(dev)
            t = time.perf_counter()
            result = e.embed(seqs)
            sync(dev)
            times[e.label].append(time.perf_counter() - t)
            pooled.setdefault(e.label, []).append(result)  # copied to the host below, outside the timing
            print(f"rep {rep + 1} {e.label}: {times[e.label][-1]:.2f} s, {e.tokens / times[e.label][-1]:,.0f} tokens/s", flush=True)

    def compare(x, y) -> dict:
        a, b = (np.asarray(r.pooled["embedding"], dtype=np.float64) for r in (x, y))
        cos = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)
        return {"bitwise_equal": bool(np.array_equal(a, b)), "max_abs_diff": float(np.abs(a - b).max()),
                "min_cosine": float(min(cos.min(), 1.0)), "rows": int(a.shape[0])}

    diff = compare(pooled["old"][-1], pooled["new"][-1])
    # the noise floor: one engine against itself (a record's windows and rows are summed with atomic adds on a GPU)
    diff["old_run_to_run"] = compare(pooled["old"][-2], pooled["old"][-1]) if args.reps > 1 else None
    # the forwards alone, no pooling: one pack's last-layer states, old vs new
    pack = new.plan.packs[0]
    tokens, cu = new.emb._to_device(seqs, pack)
    states = [e.emb.packed(tokens, cu, int(pack.lengths.max()) + 2, [shape[0]])[shape[0]] for e in engines]
    diff["first_pack_states"] = {"tokens": int(pack.tokens), "bitwise_equal": bool(torch.equal(*states)),
                                 "max_abs_diff": float((states[0].float() - states[1].float()).abs().max())}
    del states

    peak = matmul_peak() if dev == "cuda" else None
    per = {}
    for e in engines:
        med = statistics.median(times[e.label])
        tps = e.tokens / med
        per[e.label] = {**e.info, "runs_s": times[e.label], "median_s": med, "tokens_per_s": tps,
                        "warmup_s": warmup[e.label],
                        "pct_bf16_peak": 100 * tps * 2 * params / peak["best_flops"] if peak else None}
    ratio = per["new"]["tokens_per_s"] / per["old"]["tokens_per_s"]
    doc = {
        "benchmark": "engine_ab", "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name() if dev == "cuda" else "cpu", "torch": torch.__version__,
        "triton": getattr(sys.modules.get("triton"), "__version__", None),
        "old_path": str(old_src), "new_path": str(ROOT / "src"), "new_git": git_head(ROOT),
        "model": {"shape": "tiny" if args.tiny else args.model, "layers": shape[0], "dim": shape[1], "heads": shape[2],
                  "parameters": params, "dtype": dtype, "weights": f"random, torch.manual_seed({args.seed})"},
        "input": {"proteins": len(seqs), "tokens": args.tokens, "median_length": int(np.median(lengths)), "budget": args.budget,
                  "seed": args.seed, "warmup_proteins": n_warm},
        "reps": args.reps, "old": per["old"], "new": per["new"], "ratio_new_over_old": ratio,
        "bf16_peak": {"n": peak["n"], "best_tflops": peak["best_flops"] / 1e12, "median_tflops": peak["median_flops"] / 1e12} if peak else None,
        "pooled_old_vs_new": diff,
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    out = args.out_dir / "engine-ab.json"
    out.write_text(json.dumps(doc, indent=1) + "\n")

    print(f"\n{doc['device']}, {doc['model']['shape']} {dtype}, {new.tokens:,} tokens, {args.reps} reps each")
    for label in ("old", "new"):
        p = per[label]
        pct = f", {p['pct_bf16_peak']:.1f}% of bf16 peak" if p["pct_bf16_peak"] is not None else ""
        print(f"  {label}: median {p['tokens_per_s']:,.0f} tokens/s ({p['median_s']:.2f} s; runs "
              f"{', '.join(f'{t:.2f}' for t in p['runs_s'])}){pct}")
    print(f"  new/old: {ratio:.4f}")
    if peak:
        print(f"  bf16 peak (torch.mm {peak['n']}^3, best of 10): {peak['best_flops'] / 1e12:.0f} TFLOP/s")
    print(f"  pooled outputs: bitwise equal {diff['bitwise_equal']}, max |diff| {diff['max_abs_diff']:.3g}, "
          f"min cosine {diff['min_cosine']:.8f} over {diff['rows']} rows")
    if diff["old_run_to_run"]:
        r = diff["old_run_to_run"]
        print(f"  old against itself (noise floor): bitwise equal {r['bitwise_equal']}, max |diff| {r['max_abs_diff']:.3g}")
    f = diff["first_pack_states"]
    print(f"  first pack's last-layer states ({f['tokens']} tokens), old vs new: bitwise equal {f['bitwise_equal']}, "
          f"max |diff| {f['max_abs_diff']:.3g}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Packed vs unpacked ESM-2 on a GPU, random weights of the real shapes, bf16 (issue: core engine).

    python benchmarks/gpu_equivalence.py --shapes 650M,3B,15B --out benchmarks/results/equivalence-<device>-<date>.json

Random-init attention is near uniform and hides position errors, so q and k projections are
scaled (x2.5 each) and the mean attention entropy, as a fraction of uniform, is printed.
Per length it reports pooled cosine, minimum per-residue cosine and relative L2 of
- packed bf16 vs unpacked bf16 (fair-esm's own forward, one sequence, fp32 rotary),
- each against an fp32 reference (fair-esm's forward in fp32 on the same bf16-rounded weights),
- packed bf16 vs fair-esm's native bf16 forward (its bf16 rotary): the test that can fail,
and checks the bars of the issue, for the engine as configured by default ("packed"), with the exact GELU, and
with FlashAttention-2 and the exact GELU (the engine before issue 28). Then each against fp32 on a sample of 48
sequences of real lengths: the median 1 - pooled cosine and its geometric-mean ratio to the engine before.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import subprocess
import sys

import numpy as np
import torch

from bench_embed import SHAPES
from virnucpro_core.engine.attention import available_backends
from virnucpro_core.engine.equivalence import reference_hidden
from virnucpro_core.models.loader import build_esm2
from virnucpro_core.options import ESM2_MODELS
from virnucpro_core.engine.packed_esm2 import PackedESM2, residues
from virnucpro_core.engine.packing import Pack
from virnucpro_core.engine.tokenizer import Tokenizer

LENGTHS = (3, 8, 50, 160, 250, 400, 700, 1000)
SAMPLE = 48
AA = "ACDEFGHIKLMNPQRSTVWY"


def sharpen(model, factor: float) -> None:
    for layer in model.layers:
        for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj):
            proj.weight.data *= factor
            proj.bias.data *= factor


@torch.inference_mode()
def attention_entropy(model, tokens: torch.Tensor) -> float:
    """Mean attention entropy over layers, heads and queries, as a fraction of log(T)."""
    att = model(tokens[None], need_head_weights=True)["attentions"][0].float()  # L, H, T, T
    ent = -(att * att.clamp_min(1e-30).log()).sum(-1)
    return float(ent.mean() / math.log(tokens.numel()))


def metrics(a: torch.Tensor, b: torch.Tensor) -> dict:
    a, b = a.double(), b.double()
    cos = torch.nn.functional.cosine_similarity
    return {
        "pooled_cos": float(cos(a.mean(0), b.mean(0), dim=0)),
        "min_res_cos": float(cos(a, b, dim=-1).min()),
        "rel_l2": float((a - b).norm() / b.norm()),
    }


def run_shape(name: str, factor: float, seed: int, log, device: str = "cuda") -> dict:
    layers, dim, heads = ESM2_MODELS[name]
    torch.manual_seed(seed)
    with torch.device(device):
        model = build_esm2(layers, dim, heads).eval()
    sharpen(model, factor)
    model = model.to(device, torch.bfloat16)
    tok = Tokenizer(model.alphabet)
    rng = np.random.default_rng(seed)
    seqs = ["".join(rng.choice(list(AA), n)) for n in LENGTHS]
    # a sample of real lengths for the accuracy against fp32 (log-normal, median 270)
    sample = ["".join(rng.choice(list(AA), int(n))) for n in np.clip(rng.lognormal(np.log(270), 0.7, SAMPLE), 20, 1000)]
    singles = [single(tok, q, device) for q in seqs]
    L = layers
    result = {"model": name, "sharpen": factor, "layers": L, "dim": dim, "heads": heads}
    result["attention_entropy_frac"] = attention_entropy(model, singles[LENGTHS.index(400)])
    log(f"{name}: q,k x{factor}: mean attention entropy {result['attention_entropy_frac']:.3f} of uniform")
    # the engine as configured by default, then with the exact GELU, then with both levers of issue 28 off
    # (FlashAttention-2 and the exact GELU: the engine before it)
    fa2 = next(b for b in available_backends(torch.device(device), torch.bfloat16) if b in ("flash_attn", "torch_varlen", "reference"))
    variants, sampled = {}, {}
    for label, kw in (("packed", {}), ("packed_exact_gelu", {"gelu": "exact"}), ("packed_fa2_exact_gelu", {"backend": fa2, "gelu": "exact"})):
        engine = PackedESM2(model, **kw)
        variants[label], sampled[label] = packed_states(engine, tok, seqs, device), packed_states(engine, tok, sample, device)
        result.setdefault("variants", {})[label] = {"backend": engine.backend, "gelu": engine.gelu, "fused_kernels": engine.fused}
        del engine
    result["backend"] = result["variants"]["packed"]["backend"]
    unpacked = [h[1:-1].float() for h in reference_hidden(model, singles, L, fp32_rope=True)]
    native = [h[1:-1].float() for h in reference_hidden(model, singles, L, fp32_rope=False)]
    ref32 = model.float()
    fp32 = [h[1:-1].float() for h in reference_hidden(ref32, singles, L, fp32_rope=True)]
    fp32_sample = [h[1:-1].float() for h in reference_hidden(ref32, [single(tok, q, device) for q in sample], L, fp32_rope=True)]
    rows = []
    for i, n in enumerate(LENGTHS):
        row = {"length": n}
        for label, test in variants.items():
            row[f"{label}_vs_unpacked"] = metrics(test[i], unpacked[i])
            row[f"{label}_vs_fp32"] = metrics(test[i], fp32[i])
            row[f"{label}_vs_native_bf16"] = metrics(test[i], native[i])
        row["unpacked_vs_fp32"] = metrics(unpacked[i], fp32[i])
        row["native_bf16_vs_fp32"] = metrics(native[i], fp32[i])
        rows.append(row)
    result["rows"] = rows
    result["checks"] = checks(rows)
    result["checks_by_variant"] = {v: checks(rows, v)["all_pass"] for v in variants}
    # accuracy against fp32 from 50 residues up: medians over the lengths of 1 - pooled cosine and relative L2
    long_rows = [r for r in rows if r["length"] >= 50]
    result["accuracy_vs_fp32"] = {
        v: {"median_1_minus_pooled_cos": float(np.median([1 - r[f"{v}_vs_fp32"]["pooled_cos"] for r in long_rows])),
            "median_rel_l2": float(np.median([r[f"{v}_vs_fp32"]["rel_l2"] for r in long_rows]))}
        for v in [*variants, "unpacked", "native_bf16"]
    }
    # and over the sample: per variant the median 1 - pooled cosine, and the geometric mean over the sequences of
    # its ratio to the engine before issue 28's
    gap = {v: np.array([1 - metrics(h, r)["pooled_cos"] for h, r in zip(states, fp32_sample)]) for v, states in sampled.items()}
    result["sample_accuracy_vs_fp32"] = {
        "sequences": len(sample), "median_length": int(np.median([len(q) for q in sample])),
        **{v: ratio_summary(g, gap["packed_fa2_exact_gelu"]) for v, g in gap.items()}}
    del model, ref32
    torch.cuda.empty_cache()
    return result


def ratio_summary(gap: np.ndarray, before: np.ndarray) -> dict:
    """Median 1 - cosine of a variant, and the geometric mean over the sequences of its ratio to the engine
    before issue 28's, with a 95% interval (normal approximation of the mean log ratio)."""
    logs = np.log(gap / before)
    half = 1.96 * logs.std(ddof=1) / np.sqrt(len(logs)) if len(logs) > 1 else 0.0
    return {"median_1_minus_pooled_cos": float(np.median(gap)), "geomean_ratio_to_packed_fa2_exact_gelu": float(np.exp(logs.mean())),
            "ratio_95_interval": [float(np.exp(logs.mean() - half)), float(np.exp(logs.mean() + half))]}


def single(tok: Tokenizer, seq: str, device: str) -> torch.Tensor:
    return torch.from_numpy(tok.pack_tokens([seq], Pack(np.array([0]), np.array([0]), np.array([len(seq)])))).to(device)


def packed_states(engine: PackedESM2, tok: Tokenizer, seqs: list[str], device: str) -> list[torch.Tensor]:
    """Last-layer residue states (L, D) fp32 of ``seqs``, all in one pack."""
    idx = np.arange(len(seqs))
    pack = Pack(idx, np.zeros_like(idx), np.array([len(q) for q in seqs]))
    tokens = torch.from_numpy(tok.pack_tokens(seqs, pack)).to(device)
    cu = torch.from_numpy(pack.cu_seqlens).to(device)
    L = engine.num_layers
    return [h.float() for h in residues(engine(tokens, cu, int(pack.lengths.max()) + 2, [L])[L], cu)]


def checks(rows: list[dict], v: str = "packed") -> dict:
    """The issue's bars, per length."""
    out = {}
    for r in rows:
        n = r["length"]
        pu = 1 - r[f"{v}_vs_unpacked"]["pooled_cos"]
        uf = 1 - r["unpacked_vs_fp32"]["pooled_cos"]
        c = {
            "packing_within_1.5x_bf16_noise": pu <= 1.5 * uf,
            "pooled_cos_ge_0.9995": r[f"{v}_vs_unpacked"]["pooled_cos"] >= 0.9995,
        }
        if n >= 250:
            c["pooled_cos_ge_0.9999"] = r[f"{v}_vs_unpacked"]["pooled_cos"] >= 0.9999
        if n >= 50:
            c["closer_to_fp32_than_native_bf16"] = (
                r[f"{v}_vs_fp32"]["pooled_cos"] >= r["native_bf16_vs_fp32"]["pooled_cos"]
            )
        out[n] = c
    out["all_pass"] = all(all(c.values()) for k, c in out.items() if k != "all_pass")
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="650M,3B")
    ap.add_argument("--sharpen", type=float, default=2.5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out")
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    lines = []

    def log(msg):
        print(msg, flush=True)
        lines.append(msg)

    results = []
    for s in args.shapes.split(","):
        res = run_shape(SHAPES[s], args.sharpen, args.seed, log, args.device)
        results.append(res)
        log(f"\n{res['model']} (backend {res['backend']}): pooled cos / min residue cos / rel L2")
        log(f"{'len':>5} | {'packed vs unpacked':^30} | {'unpacked vs fp32':^30} | {'packed vs fp32':^30} | {'native bf16 vs fp32':^30} | {'packed vs native bf16':^30}")
        fmt = lambda m: f"{m['pooled_cos']:.6f} {m['min_res_cos']:.5f} {m['rel_l2']:.2e}"  # noqa: E731
        for r in res["rows"]:
            log(f"{r['length']:>5} | {fmt(r['packed_vs_unpacked']):^30} | {fmt(r['unpacked_vs_fp32']):^30} | {fmt(r['packed_vs_fp32']):^30} | "
                f"{fmt(r['native_bf16_vs_fp32']):^30} | {fmt(r['packed_vs_native_bf16']):^30}")
        log(f"checks: {json.dumps(res['checks'])}")
        log(f"checks by variant: {json.dumps(res['checks_by_variant'])}")
        log(f"accuracy against fp32 on {SAMPLE} sequences of real lengths: " + "; ".join(
            f"{v} median 1-cos {a['median_1_minus_pooled_cos']:.2e}, x{a['geomean_ratio_to_packed_fa2_exact_gelu']:.3f} the engine before "
            f"(95%: {a['ratio_95_interval'][0]:.3f}-{a['ratio_95_interval'][1]:.3f})"
            for v, a in res["sample_accuracy_vs_fp32"].items() if isinstance(a, dict)))
        log("accuracy against fp32 (medians over lengths >= 50): " + "; ".join(
            f"{v} 1-cos {a['median_1_minus_pooled_cos']:.2e}, rel L2 {a['median_rel_l2']:.4f}" for v, a in res["accuracy_vs_fp32"].items()))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    doc = {
        "device": torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu",
        "date": datetime.date.today().isoformat(),
        "commit": commit,
        "torch": torch.__version__,
        "results": results,
    }
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(doc, fh, indent=1)
    return 0 if all(r["checks"]["all_pass"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())

"""Packed vs unpacked ESM-2 on a GPU, random weights of the real shapes, bf16 (issue: core engine).

    python benchmarks/gpu_equivalence.py --shapes 650M,3B --out benchmarks/results/equivalence-<device>-<date>.json

Random-init attention is near uniform and hides position errors, so q and k projections are
scaled (x2.5 each) and the mean attention entropy, as a fraction of uniform, is printed.
Per length it reports pooled cosine, minimum per-residue cosine and relative L2 of
- packed bf16 vs unpacked bf16 (fair-esm's own forward, one sequence, fp32 rotary),
- each against an fp32 reference (fair-esm's forward in fp32 on the same bf16-rounded weights),
- packed bf16 vs fair-esm's native bf16 forward (its bf16 rotary): the test that can fail,
and checks the bars of the issue.
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
from virnucpro_core.engine.equivalence import reference_hidden
from virnucpro_core.models.loader import build_esm2
from virnucpro_core.options import ESM2_MODELS
from virnucpro_core.engine.packed_esm2 import PackedESM2, residues
from virnucpro_core.engine.packing import Pack
from virnucpro_core.engine.tokenizer import Tokenizer

LENGTHS = (3, 8, 50, 160, 250, 400, 700, 1000)
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
    idx = np.arange(len(seqs))
    pack = Pack(idx, np.zeros_like(idx), np.array(LENGTHS))
    tokens = torch.from_numpy(tok.pack_tokens(seqs, pack)).to(device)
    cu = torch.from_numpy(pack.cu_seqlens).to(device)
    singles = [torch.from_numpy(tok.pack_tokens(seqs, Pack(np.array([i]), np.array([0]), np.array([n])))) for i, n in enumerate(LENGTHS)]
    L = layers
    result = {"model": name, "sharpen": factor, "layers": L, "dim": dim, "heads": heads}
    result["attention_entropy_frac"] = attention_entropy(model, singles[LENGTHS.index(400)].to(device))
    log(f"{name}: q,k x{factor}: mean attention entropy {result['attention_entropy_frac']:.3f} of uniform")
    engine = PackedESM2(model)
    result["fused_kernels"] = engine.fused
    hid = engine(tokens, cu, max(LENGTHS) + 2, [L])[L]
    variants = {"packed": [h.float() for h in residues(hid, cu)]}
    result["backend"] = engine.backend
    unpacked = [h[1:-1].float() for h in reference_hidden(model, singles, L, fp32_rope=True)]
    native = [h[1:-1].float() for h in reference_hidden(model, singles, L, fp32_rope=False)]
    ref32 = model.float()
    fp32 = [h[1:-1].float() for h in reference_hidden(ref32, singles, L, fp32_rope=True)]
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
    del model, ref32
    torch.cuda.empty_cache()
    return result


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

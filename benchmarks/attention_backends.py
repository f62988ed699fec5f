"""FlashAttention-3 against FlashAttention-2 on packs, by the length of the pack's sequences (issue: engine ceiling).

    python benchmarks/attention_backends.py --out benchmarks/results/attention-backends-<device>-<date>.json

Each pack holds 65536 tokens of sequences whose lengths are uniform in [L/2, L] (a pack of the engine's plan
holds sequences of about one length: next-fit decreasing), q/k/v random bf16 (sharpened x2.5), for the head
shapes of ESM-2 650M (20 x 64), 3B (40 x 64) and 15B (40 x 128). Times are CUDA-event medians of 20 calls of
each backend's attention function as the engine resolves it (``flash_attn_3`` unconditionally: the engine's
hand-over to FA2 for short packs is switched off here). The crossover sets ``attention.FA2_MAX_SEQLEN``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys

import numpy as np
import torch

from virnucpro_core.engine import attention

HEADS = {"650M": (20, 64), "3B": (40, 64), "15B": (40, 128)}
LONGEST = (48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)


def median_ms(fn, reps: int = 20) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e))
    return statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=65536)
    ap.add_argument("--out")
    args = ap.parse_args()
    dev = torch.device("cuda")
    found = attention.available_backends(dev, torch.bfloat16)
    if "flash_attn_3" not in found:
        raise SystemExit(f"no FlashAttention-3 here (backends: {found}); install the fa3 extra on a Hopper GPU")
    attention.FA2_MAX_SEQLEN = 0  # FA3 for every pack
    fa3 = attention.resolve_backend(dev, torch.bfloat16, "flash_attn_3")[1]
    fa2_name = next(b for b in found if b in ("flash_attn", "torch_varlen"))
    fa2 = attention.resolve_backend(dev, torch.bfloat16, fa2_name)[1]
    rng = np.random.default_rng(0)
    rows = []
    for longest in LONGEST:
        lengths, total = [], 0
        while True:
            n = int(rng.integers(longest // 2, longest + 1))
            if total + n > args.tokens:
                break
            lengths.append(n)
            total += n
        cu = torch.tensor(np.cumsum([0, *lengths]), dtype=torch.int32, device=dev)
        for shape, (heads, dim) in HEADS.items():
            q, k, v = ((torch.randn(total, heads, dim, device=dev) * 2.5).to(torch.bfloat16) for _ in range(3))
            scale = dim**-0.5
            t2 = median_ms(lambda: fa2(q, k, v, cu, longest, scale))
            t3 = median_ms(lambda: fa3(q, k, v, cu, longest, scale))
            diff = float((fa2(q, k, v, cu, longest, scale).float() - fa3(q, k, v, cu, longest, scale).float()).abs().max())
            rows.append({"longest": longest, "sequences": len(lengths), "tokens": total, "shape": shape, "heads": heads,
                         "head_dim": dim, "fa2_ms": t2, "fa3_ms": t3, "fa3_speedup": t2 / t3, "max_abs_diff": diff})
            print(f"longest {longest:>5} ({len(lengths):>5} sequences)  {shape:>4} {heads} x {dim:>3}:  {fa2_name} {t2:.3f} ms, "
                  f"flash_attn_3 {t3:.3f} ms, x{t2 / t3:.2f}, max |diff| {diff:.4f}", flush=True)
    doc = {"device": torch.cuda.get_device_name(0), "date": datetime.date.today().isoformat(), "torch": torch.__version__,
           "fa2": fa2_name, "rows": rows}
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(doc, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

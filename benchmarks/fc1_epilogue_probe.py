"""What fc1's GELU epilogue costs: kernels.linear_gelu's matmul with other epilogues (H200, one process).

    OUT=. python benchmarks/fc1_epilogue_probe.py

The engine's kernel (kernels._linear_gelu) with its activation replaced: ``triton_bias``: bias only (the
matmul's own cost); ``triton_gelu_previous``: the GELU as it was written before 72e5482 (fdiv, exp,
select); ``triton_sigmoid_probe``: x * sigmoid(1.702 x) (two special-function ops, a timing probe, not a
GELU the engine could use); against cuBLAS (bias), cuBLAS then PyTorch's GELU, and kernels.linear_gelu
itself. Writes $OUT/fc1-epilogue-probe.json. The runs in results/engine-gelu-* used a copy of the kernel
in this file, whose ``triton_gelu`` column (the same GELU as linear_gelu, the same 4376 lines of SASS)
ran 1.2 ms slower than linear_gelu at the 3B width, unexplained; linear_gelu was the reference there too.
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.testing import do_bench
from triton.tools.tensor_descriptor import TensorDescriptor

sys.path.insert(0, "src")
from virnucpro_core.engine import kernels  # noqa: E402


@triton.jit
def _gelu_previous(v):
    """kernels._gelu_fp32 before the rewrite (fdiv, exp, select): the same formula written out."""
    z = tl.abs(v) * 0.7071067811865476
    t = tl.math.fdiv(1.0, 1.0 + 0.5 * z)
    p = 0.17087277 * t - 0.82215223
    p = p * t + 1.48851587
    p = p * t - 1.13520398
    p = p * t + 0.27886807
    p = p * t - 0.18628806
    p = p * t + 0.09678418
    p = p * t + 0.37409196
    p = p * t + 1.00002368
    p = p * t - 1.26551223
    half_erfc = 0.5 * t * tl.exp(p - z * z)
    return v * tl.where(v >= 0, 1.0 - half_erfc, half_erfc)


@triton.jit
def _bias_only(v):
    return v


@triton.jit
def _sigmoid_probe(v):
    return v * tl.sigmoid(1.702 * v)


def probe(x, w, b, act):
    """kernels.linear_gelu with ``act`` in place of its GELU."""
    (M, K), N = x.shape, w.shape[0]
    bm, bn, bk, group, stages, warps = kernels.LINEAR_GELU
    out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    programs = torch.cuda.get_device_properties(0).multi_processor_count
    kernels._linear_gelu[(programs,)](TensorDescriptor.from_tensor(x, [bm, bk]), TensorDescriptor.from_tensor(w, [bn, bk]),
                                      TensorDescriptor.from_tensor(out, [bm, bn]), b, M, N, K, programs, BM=bm, BN=bn,
                                      BK=bk, GROUP_M=group, ACT=act, num_stages=stages, num_warps=warps)
    return out


def main() -> int:
    rows = []
    for dim in (2560, 1280):
        m, n, k = 65519, 4 * dim, dim
        torch.manual_seed(0)
        x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
        w = (torch.randn(n, k, device="cuda") * k**-0.5).to(torch.bfloat16)
        b = (torch.randn(n, device="cuda") * 0.5).to(torch.bfloat16)
        assert torch.equal(probe(x, w, b, kernels._gelu_fp32), kernels.linear_gelu(x, w, b))
        runs = {"cublas_bias": lambda: F.linear(x, w, b), "cublas_then_gelu_pass": lambda: F.gelu(F.linear(x, w, b)),
                "triton_bias": lambda: probe(x, w, b, _bias_only), "triton_sigmoid_probe": lambda: probe(x, w, b, _sigmoid_probe),
                "triton_gelu_previous": lambda: probe(x, w, b, _gelu_previous), "linear_gelu": lambda: kernels.linear_gelu(x, w, b)}
        row = {"M": m, "N": n, "K": k}
        for _ in range(2):  # interleaved twice, the second kept
            for name, fn in runs.items():
                row[f"{name}_ms"] = do_bench(fn, return_mode="median")
        rows.append(row)
        print(json.dumps(row), flush=True)
    doc = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "triton": triton.__version__, "rows": rows}
    with open(os.path.join(os.environ.get("OUT", "."), "fc1-epilogue-probe.json"), "w") as f:
        json.dump(doc, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

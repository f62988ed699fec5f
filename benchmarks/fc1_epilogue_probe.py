"""What fc1's GELU epilogue costs: kernels.linear_gelu's matmul with other epilogues (H200, one process).

    OUT=. python benchmarks/fc1_epilogue_probe.py

``bias``: bias only (the matmul's own cost); ``gelu``: the engine's GELU; ``gelu_previous``: the same
formula as it was written before 72e5482 (fdiv, exp, select); ``sigmoid``: x * sigmoid(1.702 x)
(two special-function ops, a timing probe, not a GELU the engine could use); against cuBLAS (bias) and
cuBLAS then PyTorch's GELU, and kernels.linear_gelu itself. Writes $OUT/fc1-epilogue-probe.json.

Seen on the H200 (results/engine-gelu-*): ``triton_gelu`` ran 1.2 ms slower than linear_gelu at the 3B
width although both compile to the same 4376 lines of SASS; linear_gelu is the reference for the GELU's cost.
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
from virnucpro_core import kernels  # noqa: E402


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
def _probe(x_desc, w_desc, out_desc, bias, M, N, K, programs, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
           GROUP_M: tl.constexpr, EPILOGUE: tl.constexpr):
    tiles_m, tiles_n = tl.cdiv(M, BM), tl.cdiv(N, BN)
    for tile in tl.range(tl.program_id(0), tiles_m * tiles_n, programs, flatten=True):
        group, r = tile // (GROUP_M * tiles_n), tile % (GROUP_M * tiles_n)
        rows = min(tiles_m - group * GROUP_M, GROUP_M)
        m0, n0 = (group * GROUP_M + r % rows) * BM, (r // rows) * BN
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k in range(0, tl.cdiv(K, BK)):
            acc = tl.dot(x_desc.load([m0, k * BK]), w_desc.load([n0, k * BK]).T, acc)
        n = n0 + tl.arange(0, BN)
        acc += tl.load(bias + n, mask=n < N, other=0.0).to(tl.float32)[None, :]
        if EPILOGUE == 1:
            acc = kernels._gelu_fp32(acc)
        elif EPILOGUE == 2:
            acc = acc * tl.sigmoid(1.702 * acc)
        elif EPILOGUE == 3:
            acc = _gelu_previous(acc)
        out_desc.store([m0, n0], acc.to(w_desc.dtype))


def probe(x, w, b, epilogue):
    (M, K), N = x.shape, w.shape[0]
    out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    programs = torch.cuda.get_device_properties(0).multi_processor_count
    _probe[(programs,)](TensorDescriptor.from_tensor(x, [256, 64]), TensorDescriptor.from_tensor(w, [128, 64]),
                        TensorDescriptor.from_tensor(out, [256, 128]), b, M, N, K, programs, BM=256, BN=128, BK=64,
                        GROUP_M=8, EPILOGUE=epilogue, num_stages=3, num_warps=8)
    return out


def main() -> int:
    rows = []
    for dim in (2560, 1280):
        m, n, k = 65519, 4 * dim, dim
        torch.manual_seed(0)
        x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
        w = (torch.randn(n, k, device="cuda") * k**-0.5).to(torch.bfloat16)
        b = (torch.randn(n, device="cuda") * 0.5).to(torch.bfloat16)
        assert torch.equal(probe(x, w, b, 1), kernels.linear_gelu(x, w, b))
        runs = {"cublas_bias": lambda: F.linear(x, w, b), "cublas_then_gelu_pass": lambda: F.gelu(F.linear(x, w, b)),
                "triton_bias": lambda: probe(x, w, b, 0), "triton_gelu": lambda: probe(x, w, b, 1),
                "triton_sigmoid_probe": lambda: probe(x, w, b, 2), "triton_gelu_previous": lambda: probe(x, w, b, 3),
                "linear_gelu": lambda: kernels.linear_gelu(x, w, b)}
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

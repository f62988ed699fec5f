"""Triton kernel for the one element-wise step torch.compile left slow: rotary q/k.

Inductor's kernel for fair-esm's ``rotate_half`` form (``cat(-x2, x1)``) ran at about a quarter of
the H200's memory bandwidth (15% of the 650M forward). This kernel reads q and k straight from the
fused q/k/v projection, rotates them in fp32 with the fp32 tables, and writes q and k contiguous:
the same arithmetic as :func:`.attention.apply_rotary`, which stays the CPU and reference path.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: attention.apply_rotary is used
    triton = None

if triton is not None:

    @triton.jit
    def _rotary_qk(qkv, cos, sin, out, T, H: tl.constexpr, HALF: tl.constexpr, HALF_P2: tl.constexpr, BLOCK_T: tl.constexpr):
        """qkv (T, 3, H, 2*HALF), cos/sin (T, 2*HALF) fp32 with equal halves -> out (2, T, H, 2*HALF)."""
        D: tl.constexpr = H * 2 * HALF
        t = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)[:, None]  # (BLOCK_T, 1)
        j = tl.arange(0, HALF_P2)[None, :]  # (1, HALF_P2)
        m = (t < T) & (j < HALF)
        c = tl.load(cos + t * (2 * HALF) + j, mask=m, other=0.0)
        s = tl.load(sin + t * (2 * HALF) + j, mask=m, other=0.0)
        for i in range(2 * H):  # the H heads of q, then the H heads of k
            src = qkv + t * (3 * D) + i * (2 * HALF) + j
            x1 = tl.load(src, mask=m, other=0.0).to(tl.float32)
            x2 = tl.load(src + HALF, mask=m, other=0.0).to(tl.float32)
            dst = out + ((i // H) * T + t) * D + (i % H) * (2 * HALF) + j
            tl.store(dst, (x1 * c - x2 * s).to(out.dtype.element_ty), mask=m)
            tl.store(dst + HALF, (x2 * c + x1 * s).to(out.dtype.element_ty), mask=m)


def available(device: torch.device) -> bool:
    return triton is not None and device.type == "cuda"


def rotary_qk(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotated q and k, each (T, H, d) contiguous, from ``qkv`` (T, 3, H, d) contiguous on a CUDA device."""
    T, three, H, d = qkv.shape
    assert three == 3 and qkv.is_contiguous() and cos.is_contiguous() and sin.is_contiguous() and d % 2 == 0
    out = torch.empty(2, T, H, d, dtype=qkv.dtype, device=qkv.device)
    block = 64
    _rotary_qk[(triton.cdiv(T, block),)](qkv, cos, sin, out, T, H=H, HALF=d // 2, HALF_P2=triton.next_power_of_2(d // 2), BLOCK_T=block, num_warps=4)
    return out[0], out[1]

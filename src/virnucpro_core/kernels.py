"""Triton kernels for the element-wise work between the matmuls of a layer, on a GPU.

Three kernels do all of it, each one pass over memory:
- :func:`add_layer_norm`: a matmul's output (and its bias) added to the fp32 residual stream in
  place, then the layer norm of the result in the model's dtype, for the next matmul;
- :func:`gelu_`: exact (erf) GELU in place, as fair-esm's;
- :func:`rotary_qk`: rotary q/k read straight from the fused q/k/v projection, in fp32 with the fp32
  tables, written contiguous for attention (v goes to attention as a view).

They compute what :mod:`.packed_esm`'s PyTorch path computes (the CPU and reference path), in the
same order. They replace torch.compile's kernels of the same work: the forward is 0.8% (650M) and
1.2% (3B) faster than with those (H200, one process), and an embed job no longer imports the
compiler and loads its cache before its first pack (about 12 s of start-up on the H200). Triton
keeps compiled kernels in its on-disk cache (``~/.triton/cache``): a job loads them in milliseconds.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the PyTorch path of packed_esm is used
    triton = None

if triton is not None:

    @triton.jit
    def _add_layer_norm(x, y, y_bias, w, b, h, D, eps, HAS_Y: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
        """One row of x (T, D) fp32: x += y (+ y_bias), in place; h = layer_norm(x) * w + b."""
        row = tl.program_id(0).to(tl.int64) * D
        cols = tl.arange(0, BLOCK)
        m = cols < D
        v = tl.load(x + row + cols, mask=m, other=0.0)
        if HAS_Y:
            v = v + tl.load(y + row + cols, mask=m, other=0.0).to(tl.float32)
            if HAS_BIAS:
                v = v + tl.load(y_bias + cols, mask=m, other=0.0).to(tl.float32)
            tl.store(x + row + cols, v, mask=m)
        mean = tl.sum(v, axis=0) / D
        c = tl.where(m, v - mean, 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(c * c, axis=0) / D + eps)
        out = c * rstd * tl.load(w + cols, mask=m, other=0.0) + tl.load(b + cols, mask=m, other=0.0)
        tl.store(h + row + cols, out.to(h.dtype.element_ty), mask=m)

    @triton.jit
    def _gelu(x, n, BLOCK: tl.constexpr):
        i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        m = i < n
        v = tl.load(x + i, mask=m, other=0.0).to(tl.float32)
        tl.store(x + i, (0.5 * v * (1.0 + tl.math.erf(v * 0.7071067811865476))).to(x.dtype.element_ty), mask=m)

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


def add_layer_norm(x: torch.Tensor, y: torch.Tensor | None, y_bias: torch.Tensor | None, weight: torch.Tensor,
                   bias: torch.Tensor, eps: float, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` (T, D) fp32 += ``y`` (+ ``y_bias``) in place; returns x and its layer norm (T, D) in ``dtype``."""
    T, D = x.shape
    assert x.is_contiguous() and x.dtype == torch.float32 and (y is None or y.is_contiguous())
    h = torch.empty(T, D, dtype=dtype, device=x.device)
    block = triton.next_power_of_2(D)
    _add_layer_norm[(T,)](x, x if y is None else y, weight if y_bias is None else y_bias, weight, bias, h, D, eps,
                          HAS_Y=y is not None, HAS_BIAS=y_bias is not None, BLOCK=block, num_warps=min(16, max(4, block // 512)))
    return x, h


def gelu_(x: torch.Tensor) -> torch.Tensor:
    """Exact (erf) GELU of ``x`` in place, computed in fp32."""
    assert x.is_contiguous()
    n, block = x.numel(), 2048
    _gelu[(triton.cdiv(n, block),)](x, n, BLOCK=block, num_warps=8)
    return x


def rotary_qk(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotated q and k, each (T, H, d) contiguous, from ``qkv`` (T, 3, H, d) contiguous on a CUDA device."""
    T, three, H, d = qkv.shape
    assert three == 3 and qkv.is_contiguous() and cos.is_contiguous() and sin.is_contiguous() and d % 2 == 0
    out = torch.empty(2, T, H, d, dtype=qkv.dtype, device=qkv.device)
    block = 64
    _rotary_qk[(triton.cdiv(T, block),)](qkv, cos, sin, out, T, H=H, HALF=d // 2, HALF_P2=triton.next_power_of_2(d // 2), BLOCK_T=block, num_warps=4)
    return out[0], out[1]

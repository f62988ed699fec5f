"""Triton kernels for a layer's work besides cuBLAS's matmuls, on a GPU.

- :func:`add_layer_norm`: one or two matmul outputs (and their biases) added to the fp32 residual stream (in
  place, or only in registers), then the layer norm of the sum in the model's dtype, for the next matmul;
- :func:`linear_gelu`: fc1 and its exact GELU in one matmul kernel, the bias and GELU in fp32 on the
  accumulator, rounded once (cuBLAS, then a GELU pass, rounds twice and moves the activations twice);
- :func:`rotary_qk`: rotary q/k read straight from the fused q/k/v projection, in fp32 with the fp32
  tables, written contiguous for attention (v goes to attention as a view).

They compute what :mod:`.packed_esm2`'s PyTorch path (``PYTORCH``, the CPU and reference path) computes, in the
same order, except that fc1's output is not rounded before the GELU. They replaced torch.compile
(an embed job no longer imports the compiler and loads its cache: about 12 s of start-up on the
H200). Triton keeps compiled kernels in its on-disk cache (``~/.triton/cache``): a job loads them in
milliseconds; the arguments that vary with the pack (rows, programs) are not specialised on, so one
compiled variant serves every pack. Measurements: docs/performance.md.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # CPU-only installs: the PyTorch path of packed_esm2 is used
    triton = None

if triton is not None:

    @triton.jit
    def _add_layer_norm(x, y1, b1, y2, b2, w, b, h, D, eps, UPDATES: tl.constexpr, BIAS1: tl.constexpr, BIAS2: tl.constexpr,
                        STORE: tl.constexpr, BLOCK: tl.constexpr):
        """One row of x (T, D) fp32: v = x + y1 (+ b1) + y2 (+ b2), the first UPDATES of them, stored back to x
        when STORE; h = layer_norm(v) * w + b."""
        row = tl.program_id(0).to(tl.int64) * D
        cols = tl.arange(0, BLOCK)
        m = cols < D
        v = tl.load(x + row + cols, mask=m, other=0.0)
        if UPDATES >= 1:
            v = v + tl.load(y1 + row + cols, mask=m, other=0.0).to(tl.float32)
            if BIAS1:
                v = v + tl.load(b1 + cols, mask=m, other=0.0).to(tl.float32)
        if UPDATES >= 2:
            v = v + tl.load(y2 + row + cols, mask=m, other=0.0).to(tl.float32)
            if BIAS2:
                v = v + tl.load(b2 + cols, mask=m, other=0.0).to(tl.float32)
        if STORE:
            tl.store(x + row + cols, v, mask=m)
        mean = tl.sum(v, axis=0) / D
        c = tl.where(m, v - mean, 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(c * c, axis=0) / D + eps)
        out = c * rstd * tl.load(w + cols, mask=m, other=0.0) + tl.load(b + cols, mask=m, other=0.0)
        tl.store(h + row + cols, out.to(h.dtype.element_ty), mask=m)

    @triton.jit
    def _rcp(x):
        return tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True, pack=1)

    @triton.jit
    def _exp2(x):
        return tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True, pack=1)

    @triton.jit
    def _gelu_fp32(v):
        """Exact GELU x * Phi(x) of fp32 ``v`` as max(x, 0) - |x| * Phi(-|x|), with Phi(-|x|) = erfc(z) / 2,
        z = |x| / sqrt(2), and erfc(z) = t * exp(-z^2 + P(t)), t = 1 / (1 + z / 2) (Numerical Recipes' erfcc;
        relative error 1.2e-7 in exact arithmetic, 1e-5 in fp32 for x above -13, below which the result
        underflows fp32). P's coefficients are scaled to base 2 with the 1/2 folded in: 17 instructions an
        element (SASS), two of them approximate special-function ones (reciprocal, exp2), against 30 for the
        formula written with a division, exp and a select. Branch-free, and no cancellation for x < 0 (0.5 * x * (1 + erf(x / sqrt(2))) loses all
        digits below x = -5). fc1's epilogue is bound by these instructions: they run between its tiles."""
        t = _rcp(1.0 + tl.abs(v) * 0.353553391)
        p = 0.246517298 * t - 1.18611495  # log2(e) * (P(t) - ln 2)
        p = p * t + 2.14747446
        p = p * t - 1.63775315
        p = p * t + 0.402321582
        p = p * t - 0.26875686
        p = p * t + 0.139630057
        p = p * t + 0.539700616
        p = p * t + 1.4427292
        p = p * t - 2.82574822
        half_erfc = t * _exp2(p - (v * 0.72134752) * v)  # Phi(-|x|); log2(e) / 2 = 0.72134752
        return tl.maximum(v, 0.0) - tl.abs(v) * half_erfc

    # M and programs vary with the pack: not specialised on (Triton would compile a variant for each
    # divisibility by 16 it meets, seconds each on a job's first packs), as T for the rotary
    @triton.jit(do_not_specialize=["M", "programs"])
    def _linear_gelu(x_desc, w_desc, out_desc, bias, M, N, K, programs, BM: tl.constexpr, BN: tl.constexpr,
                     BK: tl.constexpr, GROUP_M: tl.constexpr, ACT: tl.constexpr):
        """out (M, N) = ACT(x (M, K) @ w (N, K).T + bias), in fp32 until the store; ACT is _gelu_fp32 (other
        functions tried: docs/performance.md, Finished experiments). One (BM, BN) tile after another over a persistent grid
        of ``programs``, in groups of GROUP_M row tiles so that a group's x rows stay in L2."""
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
            out_desc.store([m0, n0], ACT(acc).to(w_desc.dtype))

    @triton.jit(do_not_specialize=["T"])
    def _rotary_qk(qkv, cos, sin, out, T, H: tl.constexpr, HALF: tl.constexpr, HALF_P2: tl.constexpr, BLOCK_T: tl.constexpr):
        """qkv (T, 3, H, 2*HALF), cos/sin (T, 2*HALF) fp32 with equal halves -> out (2, T, H, 2*HALF). A program
        rotates one head of q or k over BLOCK_T tokens; the 2H programs of a block of tokens are neighbours, so
        its rows of the tables are read from L2."""
        D: tl.constexpr = H * 2 * HALF
        i = tl.program_id(0) % (2 * H)  # the H heads of q, then the H heads of k
        t = ((tl.program_id(0) // (2 * H)) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)[:, None]  # (BLOCK_T, 1)
        j = tl.arange(0, HALF_P2)[None, :]  # (1, HALF_P2)
        m = (t < T) & (j < HALF)
        c = tl.load(cos + t * (2 * HALF) + j, mask=m, other=0.0)
        s = tl.load(sin + t * (2 * HALF) + j, mask=m, other=0.0)
        src = qkv + t * (3 * D) + i * (2 * HALF) + j
        x1 = tl.load(src, mask=m, other=0.0).to(tl.float32)
        x2 = tl.load(src + HALF, mask=m, other=0.0).to(tl.float32)
        dst = out + ((i // H) * T + t) * D + (i % H) * (2 * HALF) + j
        tl.store(dst, (x1 * c - x2 * s).to(out.dtype.element_ty), mask=m)
        tl.store(dst + HALF, (x2 * c + x1 * s).to(out.dtype.element_ty), mask=m)


def available(device: torch.device) -> bool:
    return triton is not None and device.type == "cuda"


def add_layer_norm(x: torch.Tensor, updates: tuple, weight: torch.Tensor, bias: torch.Tensor, eps: float,
                   dtype: torch.dtype, store: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` (T, D) fp32 plus up to two ``updates`` ((T, D) matmul output, bias (D,) or ``None``), stored in place
    when ``store``; returns x and the layer norm (T, D) in ``dtype`` of the sum."""
    T, D = x.shape
    assert x.is_contiguous() and x.dtype == torch.float32 and len(updates) <= 2 and all(y.is_contiguous() for y, _ in updates)
    h = torch.empty(T, D, dtype=dtype, device=x.device)
    (y1, b1), (y2, b2) = (*updates, (None, None), (None, None))[:2]
    block = triton.next_power_of_2(D)
    _add_layer_norm[(T,)](x, x if y1 is None else y1, weight if b1 is None else b1, x if y2 is None else y2,
                          weight if b2 is None else b2, weight, bias, h, D, eps, UPDATES=len(updates), BIAS1=b1 is not None,
                          BIAS2=b2 is not None, STORE=store and bool(updates), BLOCK=block, num_warps=norm_warps(block))
    return x, h


def norm_warps(block: int) -> int:
    """Warps for a layer-norm row of ``block`` (a power of two) columns: on the H200 3.7-4.1 TB/s at 1280, 2560 and
    5120 columns, one or two updates, stored or not (16 warps, taken before from 8192 columns on, ran at 3.6 at 5120:
    benchmarks/results/residual-rotary-probe-nvidia-h200-2026-12-01.json)."""
    return 4 if block <= 4096 else 8


# linear_gelu's tiles: (BM, BN, BK, GROUP_M, num_stages, num_warps), the fastest of those tried on the H200
LINEAR_GELU = (256, 128, 64, 8, 3, 8)


def linear_gelu(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, config: tuple = LINEAR_GELU,
                programs: int | None = None) -> torch.Tensor:
    """Exact GELU of ``x @ w.T + b`` (x (M, K), w (N, K), b (N,), one dtype) in one kernel. ``programs``:
    the persistent grid (default: one per multiprocessor)."""
    (M, K), N = x.shape, w.shape[0]
    assert x.is_contiguous() and w.is_contiguous() and w.shape[1] == K and x.dtype == w.dtype == b.dtype
    bm, bn, bk, group, stages, warps = config
    out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    tiles = triton.cdiv(M, bm) * triton.cdiv(N, bn)
    programs = min(tiles, programs or torch.cuda.get_device_properties(x.device).multi_processor_count)
    _linear_gelu[(programs,)](TensorDescriptor.from_tensor(x, [bm, bk]), TensorDescriptor.from_tensor(w, [bn, bk]),
                              TensorDescriptor.from_tensor(out, [bm, bn]), b, M, N, K, programs, BM=bm, BN=bn, BK=bk,
                              GROUP_M=group, ACT=_gelu_fp32, num_stages=stages, num_warps=warps)
    return out


def rotary_qk(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotated q and k, each (T, H, d) contiguous, from ``qkv`` (T, 3, H, d) contiguous on a CUDA device."""
    T, three, H, d = qkv.shape
    assert three == 3 and qkv.is_contiguous() and cos.is_contiguous() and sin.is_contiguous() and d % 2 == 0
    out = torch.empty(2, T, H, d, dtype=qkv.dtype, device=qkv.device)
    block = 128  # with 8 warps: 3.8-3.9 TB/s on the H200 at 650M, 3B and 15B, against 2.6-3.5 for a loop over heads
    _rotary_qk[(triton.cdiv(T, block) * 2 * H,)](qkv, cos, sin, out, T, H=H, HALF=d // 2, HALF_P2=triton.next_power_of_2(d // 2),
                                                 BLOCK_T=block, num_warps=8)
    return out[0], out[1]

"""Triton kernels for a layer's work besides cuBLAS's matmuls, on a GPU.

- :func:`add_layer_norm`: a matmul's output (and its bias) added to the fp32 residual stream in
  place, then the layer norm of the result in the model's dtype, for the next matmul;
- :func:`linear_gelu`: fc1 and its exact GELU in one matmul kernel, the bias and GELU in fp32 on the
  accumulator, rounded once (cuBLAS, then a GELU pass, rounds twice and moves the activations twice);
- :func:`rotary_qk`: rotary q/k read straight from the fused q/k/v projection, in fp32 with the fp32
  tables, written contiguous for attention (v goes to attention as a view).

They compute what :mod:`.packed_esm`'s PyTorch path computes (the CPU and reference path), in the
same order, except that fc1's output is not rounded before the GELU. They replaced torch.compile
(an embed job no longer imports the compiler and loads its cache: about 12 s of start-up on the
H200). Triton keeps compiled kernels in its on-disk cache (``~/.triton/cache``): a job loads them in
milliseconds. Measurements: README's Performance section.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # CPU-only installs: the PyTorch path of packed_esm is used
    triton = None
try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier, tma, warpgroup_mma, warpgroup_mma_wait
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor as GluonDescriptor
except ImportError:
    gluon = None

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
    def _rcp(x):
        return tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True, pack=1)

    @triton.jit
    def _exp2(x):
        return tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True, pack=1)

    @triton.jit
    def _gelu_fp32(v):
        """Exact GELU x * Phi(x) of fp32 ``v`` as max(x, 0) - |x| * Phi(-|x|), with Phi(-|x|) = erfc(z) / 2,
        z = |x| / sqrt(2), and erfc(z) = t * exp(-z^2 + P(t)), t = 1 / (1 + z / 2) (Numerical Recipes' erfcc;
        relative error 1.2e-7 in exact arithmetic, 1e-5 in fp32 for all x). P's coefficients are scaled to
        base 2 with the 1/2 folded in: 17 instructions an element (SASS), two of them approximate
        special-function ones (reciprocal, exp2), against 30 for the formula written with a division, exp and
        a select. Branch-free, and no cancellation for x < 0 (0.5 * x * (1 + erf(x / sqrt(2))) loses all
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

    @triton.jit
    def _linear_gelu(x_desc, w_desc, out_desc, bias, M, N, K, programs, BM: tl.constexpr, BN: tl.constexpr,
                     BK: tl.constexpr, GROUP_M: tl.constexpr, SPLIT: tl.constexpr):
        """out (M, N) = gelu(x (M, K) @ w (N, K).T + bias), in fp32 until the store. One (BM, BN) tile after
        another over a persistent grid of ``programs``, in groups of GROUP_M row tiles so that a group's
        x rows stay in L2. SPLIT = 2: the epilogue in two (BM, BN / 2) halves (half the staging memory)."""
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
            if SPLIT == 1:
                out_desc.store([m0, n0], _gelu_fp32(acc).to(w_desc.dtype))
            else:
                left, right = tl.split(tl.permute(tl.reshape(acc, (BM, 2, BN // 2)), (0, 2, 1)))
                out_desc.store([m0, n0], _gelu_fp32(left).to(w_desc.dtype))
                out_desc.store([m0, n0 + BN // 2], _gelu_fp32(right).to(w_desc.dtype))

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


if gluon is not None:

    @gluon.jit
    def _gelu_gl(v):
        """_gelu_fp32 in Gluon."""
        z = gl.abs(v) * 0.7071067811865476
        t = gl.fdiv(1.0, 1.0 + 0.5 * z)
        p = 0.17087277 * t - 0.82215223
        p = p * t + 1.48851587
        p = p * t - 1.13520398
        p = p * t + 0.27886807
        p = p * t - 0.18628806
        p = p * t + 0.09678418
        p = p * t + 0.37409196
        p = p * t + 1.00002368
        p = p * t - 1.26551223
        half_erfc = 0.5 * t * gl.exp(p - z * z)
        return v * gl.where(v >= 0, 1.0 - half_erfc, half_erfc)

    @gluon.jit
    def _tile_origin(tile, tiles_m, tiles_n, BM: gl.constexpr, BN: gl.constexpr, GROUP_M: gl.constexpr):
        group = tile // (GROUP_M * tiles_n)
        r = tile % (GROUP_M * tiles_n)
        rows = gl.minimum(tiles_m - group * GROUP_M, GROUP_M)
        return (group * GROUP_M + r % rows) * BM, (r // rows) * BN

    @gluon.jit
    def _lg_loader(x_desc, w_desc, a_bufs, b_bufs, ready, empty, M, N, K, programs, GROUP_M: gl.constexpr):
        """One warp: TMA loads of every k step of the program's tiles, in order, into the STAGES ring."""
        BM: gl.constexpr = x_desc.block_type.shape[0]
        BK: gl.constexpr = x_desc.block_type.shape[1]
        BN: gl.constexpr = w_desc.block_type.shape[0]
        STAGES: gl.constexpr = a_bufs.type.shape[0]
        tiles_m, tiles_n, k_tiles = gl.cdiv(M, BM), gl.cdiv(N, BN), gl.cdiv(K, BK)
        step = 0
        for tile in range(gl.program_id(0), tiles_m * tiles_n, programs):
            m0, n0 = _tile_origin(tile, tiles_m, tiles_n, BM, BN, GROUP_M)
            for k in range(k_tiles):
                s = step % STAGES
                mbarrier.wait(empty.index(s), ((step // STAGES) & 1) ^ 1)
                mbarrier.expect(ready.index(s), x_desc.block_type.nbytes + w_desc.block_type.nbytes)
                tma.async_copy_global_to_shared(x_desc, [m0, k * BK], ready.index(s), a_bufs.index(s))
                tma.async_copy_global_to_shared(w_desc, [n0, k * BK], ready.index(s), b_bufs.index(s))
                step += 1

    @gluon.jit
    def _lg_consumer(out_desc, bias, a_bufs, b_bufs, ready, empty, c_smem, my_turn, next_turn, M, N, K, programs,
                     PARITY: gl.constexpr, GROUP_M: gl.constexpr):
        """One warpgroup: the matmul of every other tile of the program (PARITY: first or second), then its
        bias and GELU in fp32 and the TMA store, while the other warpgroup's matmul runs. The matmuls take
        turns (``my_turn`` / ``next_turn``): a consumer never waits for a stage two fills ahead, whose
        barrier phase would alias."""
        BM: gl.constexpr = a_bufs.type.shape[1]
        BK: gl.constexpr = a_bufs.type.shape[2]
        BN: gl.constexpr = b_bufs.type.shape[1]
        STAGES: gl.constexpr = a_bufs.type.shape[0]
        layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BN, 16])
        tiles_m, tiles_n, k_tiles = gl.cdiv(M, BM), gl.cdiv(N, BN), gl.cdiv(K, BK)
        step = PARITY * k_tiles
        turn = PARITY ^ 1  # the first consumer's first wait passes at once
        for tile in range(gl.program_id(0) + PARITY * programs, tiles_m * tiles_n, 2 * programs):
            m0, n0 = _tile_origin(tile, tiles_m, tiles_n, BM, BN, GROUP_M)
            acc = gl.zeros((BM, BN), gl.float32, layout)
            mbarrier.wait(my_turn, turn)
            turn ^= 1
            for k in range(k_tiles):
                s = (step + k) % STAGES
                mbarrier.wait(ready.index(s), ((step + k) // STAGES) & 1)
                acc = warpgroup_mma(a_bufs.index(s), b_bufs.index(s).permute((1, 0)), acc, is_async=True)
                acc = warpgroup_mma_wait(1, deps=(acc,))
                mbarrier.arrive(empty.index((step + k + STAGES - 1) % STAGES), count=1, pred=k > 0)
            mbarrier.arrive(next_turn, count=1)
            acc = warpgroup_mma_wait(0, deps=(acc,))
            mbarrier.arrive(empty.index((step + k_tiles - 1) % STAGES), count=1)
            step += 2 * k_tiles
            n = n0 + gl.arange(0, BN, layout=gl.SliceLayout(0, layout))
            acc = acc + gl.expand_dims(gl.load(bias + n, mask=n < N, other=0.0).to(gl.float32), 0)
            y = _gelu_gl(acc).to(out_desc.dtype)
            tma.store_wait(0)
            c_smem.store(y)
            fence_async_shared()
            tma.async_copy_shared_to_global(out_desc, [m0, n0], c_smem)
        tma.store_wait(0)

    @gluon.jit
    def _linear_gelu_ws(x_desc, w_desc, out_desc, bias, M, N, K, programs, GROUP_M: gl.constexpr, STAGES: gl.constexpr,
                        CONSUMER_REGS: gl.constexpr):
        """gelu(x @ w.T + bias) with the epilogue of one tile under the matmul of the next: two consumer
        warpgroups take turns (ping-pong), one producer warp loads."""
        a_bufs = gl.allocate_shared_memory(x_desc.dtype, [STAGES] + x_desc.block_type.shape, x_desc.layout)
        b_bufs = gl.allocate_shared_memory(w_desc.dtype, [STAGES] + w_desc.block_type.shape, w_desc.layout)
        c_bufs = gl.allocate_shared_memory(out_desc.dtype, [2] + out_desc.block_type.shape, out_desc.layout)
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        turns = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        for s in gl.static_range(STAGES):
            mbarrier.init(ready.index(s), count=1)
            mbarrier.init(empty.index(s), count=1)
        for i in gl.static_range(2):
            mbarrier.init(turns.index(i), count=1)
        gl.warp_specialize([
            (_lg_consumer, (out_desc, bias, a_bufs, b_bufs, ready, empty, c_bufs.index(0), turns.index(0), turns.index(1),
                            M, N, K, programs, 0, GROUP_M)),
            (_lg_consumer, (out_desc, bias, a_bufs, b_bufs, ready, empty, c_bufs.index(1), turns.index(1), turns.index(0),
                            M, N, K, programs, 1, GROUP_M)),
            (_lg_loader, (x_desc, w_desc, a_bufs, b_bufs, ready, empty, M, N, K, programs, GROUP_M)),
        ], [4, 1], [CONSUMER_REGS, 40])


GL_DTYPES = {torch.bfloat16: "bfloat16", torch.float16: "float16"}
# (BM, BN, BK, GROUP_M, STAGES, consumer registers)
LINEAR_GELU_WS = (128, 128, 64, 8, 4, 232)


def linear_gelu_ws(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, config: tuple = LINEAR_GELU_WS,
                   programs: int | None = None) -> torch.Tensor:
    """linear_gelu as a warp-specialised ping-pong kernel (Gluon, Hopper)."""
    (M, K), N = x.shape, w.shape[0]
    assert x.is_contiguous() and w.is_contiguous() and w.shape[1] == K and x.dtype == w.dtype == b.dtype
    bm, bn, bk, group, stages, regs = config
    dt = getattr(gl, GL_DTYPES[x.dtype])
    out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    desc = lambda t, shape: GluonDescriptor.from_tensor(t, shape, gl.NVMMASharedLayout.get_default_for(shape, dt))  # noqa: E731
    tiles = triton.cdiv(M, bm) * triton.cdiv(N, bn)
    programs = min(tiles, programs or torch.cuda.get_device_properties(x.device).multi_processor_count)
    # 12 warps (the producer warp's group counts whole): the consumers' registers, the rest to the producer
    _linear_gelu_ws[(programs,)](desc(x, [bm, bk]), desc(w, [bn, bk]), desc(out, [bm, bn]), b, M, N, K, programs,
                                 GROUP_M=group, STAGES=stages, CONSUMER_REGS=regs, num_warps=4,
                                 maxnreg=(2 * regs + 40) // 3 // 8 * 8)
    return out


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


# linear_gelu's tiles: (BM, BN, BK, GROUP_M, num_stages, num_warps, programs per multiprocessor, epilogue
# split), the fastest of those tried on the H200
LINEAR_GELU = (256, 128, 64, 8, 3, 8, 1, 1)


def linear_gelu(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, config: tuple = LINEAR_GELU,
                programs: int | None = None) -> torch.Tensor:
    """Exact GELU of ``x @ w.T + b`` (x (M, K), w (N, K), b (N,), one dtype) in one kernel. ``programs``:
    the persistent grid (default: the config's programs per multiprocessor)."""
    (M, K), N = x.shape, w.shape[0]
    assert x.is_contiguous() and w.is_contiguous() and w.shape[1] == K and x.dtype == w.dtype == b.dtype
    bm, bn, bk, group, stages, warps, per_sm, split = config
    out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    tiles = triton.cdiv(M, bm) * triton.cdiv(N, bn)
    programs = min(tiles, programs or per_sm * torch.cuda.get_device_properties(x.device).multi_processor_count)
    _linear_gelu[(programs,)](TensorDescriptor.from_tensor(x, [bm, bk]), TensorDescriptor.from_tensor(w, [bn, bk]),
                              TensorDescriptor.from_tensor(out, [bm, bn // split]), b, M, N, K, programs, BM=bm, BN=bn,
                              BK=bk, GROUP_M=group, SPLIT=split, num_stages=stages, num_warps=warps)
    return out


def rotary_qk(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotated q and k, each (T, H, d) contiguous, from ``qkv`` (T, 3, H, d) contiguous on a CUDA device."""
    T, three, H, d = qkv.shape
    assert three == 3 and qkv.is_contiguous() and cos.is_contiguous() and sin.is_contiguous() and d % 2 == 0
    out = torch.empty(2, T, H, d, dtype=qkv.dtype, device=qkv.device)
    block = 64
    _rotary_qk[(triton.cdiv(T, block),)](qkv, cos, sin, out, T, H=H, HALF=d // 2, HALF_P2=triton.next_power_of_2(d // 2), BLOCK_T=block, num_warps=4)
    return out[0], out[1]

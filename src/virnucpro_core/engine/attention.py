"""Variable-length (packed) self-attention backends and fp32 rotary embeddings.

Backends, chosen automatically (in this order) and overridable:
- ``flash_attn_3``: FlashAttention-3's varlen forward on a Hopper GPU in bf16, from ``flash_attn_interface``
  (FlashAttention's ``hopper/`` build) or ``fa3_fwd_interface`` (the ``fa3-fwd`` package: ``pip install
  ".[fa3]"``). Packs whose longest sequence has at most :data:`FA2_MAX_SEQLEN` tokens go to FlashAttention-2 (the
  next backend found), which is faster there (docs/engine.md);
- ``flash_attn``: ``flash_attn.flash_attn_varlen_func`` (FlashAttention-2) when the package is installed;
- ``torch_varlen``: PyTorch's own varlen FlashAttention, the kernel ``torch.nn.attention.varlen.varlen_attn``
  calls, called directly: importing that module imports torch's compiler (5 s of a job's start-up);
- ``reference``: plain softmax attention one sequence at a time (CPU, any dtype).
"""

from __future__ import annotations

import importlib
from typing import Callable

import torch

Attention = Callable[..., torch.Tensor]

FA3_MODULES = ("flash_attn_interface", "fa3_fwd_interface")  # FlashAttention's hopper/ build, the fa3-fwd package
# packs whose longest sequence has at most this many tokens go to FA2: there FA3's query tiles (192 rows at head dim
# 64) are mostly empty and it takes 1.1-1.9x FA2's time; from 192 tokens on FA3 is level with FA2 or up to 1.5x
# faster (H200, 65536-token packs: benchmarks/results/attention-backends-nvidia-h200-2026-12-01.json)
FA2_MAX_SEQLEN = 128


def _fa3_varlen() -> Callable | None:
    """FlashAttention-3's ``flash_attn_varlen_func`` from the first module of :data:`FA3_MODULES` that loads."""
    for name in FA3_MODULES:
        try:
            return importlib.import_module(name).flash_attn_varlen_func
        except (ImportError, OSError):
            continue
    return None


def available_backends(device: torch.device, dtype: torch.dtype) -> list[str]:
    found = []
    if device.type == "cuda" and dtype in (torch.float16, torch.bfloat16):
        if dtype == torch.bfloat16 and torch.cuda.get_device_capability(device) == (9, 0) and _fa3_varlen() is not None:
            found.append("flash_attn_3")
        try:
            import flash_attn  # noqa: F401

            found.append("flash_attn")
        except ImportError:
            pass
        if hasattr(torch.ops.aten, "_flash_attention_forward") and torch.backends.cuda.is_flash_attention_available():
            found.append("torch_varlen")
    found.append("reference")
    return found


def resolve_backend(device: torch.device, dtype: torch.dtype, requested: str = "auto") -> tuple[str, Attention]:
    """The backend's name and its attention function ``(q, k, v, cu_seqlens, max_seqlen, scale)``,
    with q, k, v of shape (tokens, heads, head_dim); resolved once per model."""
    found = available_backends(device, dtype)
    name = found[0] if requested == "auto" else requested
    if name not in found:
        raise ValueError(f"attention backend {requested!r} is not available for {device.type}/{dtype}; available: {found}")
    if name == "flash_attn_3":
        fa3 = _fa3_varlen()
        fa2 = next((b for b in found if b in ("flash_attn", "torch_varlen")), None)
        short = resolve_backend(device, dtype, fa2)[1] if fa2 else None

        def attend(q, k, v, cu, max_seqlen, scale):
            if short is not None and max_seqlen <= FA2_MAX_SEQLEN:
                return short(q, k, v, cu, max_seqlen, scale)
            out = fa3(q, k, v, cu, cu, max_seqlen, max_seqlen, softmax_scale=scale)
            return out[0] if isinstance(out, tuple) else out  # (out, softmax_lse) in some versions

    elif name == "flash_attn":
        from flash_attn import flash_attn_varlen_func

        def attend(q, k, v, cu, max_seqlen, scale):
            return flash_attn_varlen_func(q, k, v, cu, cu, max_seqlen, max_seqlen, softmax_scale=scale)

    elif name == "torch_varlen":
        flash = torch.ops.aten._flash_attention_forward

        def attend(q, k, v, cu, max_seqlen, scale):
            # (query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, dropout_p, is_causal, return_debug_mask) -> (out, ...)
            return flash(q, k, v, cu, cu, max_seqlen, max_seqlen, 0.0, False, False, scale=scale)[0]

    else:

        def attend(q, k, v, cu, max_seqlen, scale):
            return reference_attention(q, k, v, cu, scale)

    return name, attend


def reference_attention(q, k, v, cu_seqlens, scale):
    """Plain softmax attention, one sequence at a time."""
    out = torch.empty_like(q)
    bounds = cu_seqlens.tolist()
    for s, e in zip(bounds[:-1], bounds[1:]):
        qi, ki, vi = (t[s:e].transpose(0, 1) for t in (q, k, v))  # (heads, L, dim)
        att = torch.softmax((qi @ ki.transpose(1, 2)) * scale, dim=-1)
        out[s:e] = (att @ vi).transpose(0, 1)
    return out


def position_ids(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """0, 1, ..., L_i - 1 for every sequence of a pack: positions restart at each boundary.

    ``total`` (= cu_seqlens[-1]) comes from the host so that nothing waits on the GPU."""
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    starts = torch.repeat_interleave(cu_seqlens[:-1], lengths, output_size=total)
    return torch.arange(total, device=cu_seqlens.device) - starts


def rotary_tables(positions: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 cos/sin tables (tokens, head_dim) for integer positions.

    fair-esm builds them with ``arange(T).type_as(inv_freq)``: in a model cast to bf16
    both positions and inverse frequencies are bf16, exact only up to 256, so long
    sequences drift. Here both are fp32, whatever the model's dtype.
    """
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    freqs = positions.to(torch.float32)[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (..., tokens, heads, dim) in fp32 and return it in x's dtype (fair-esm's rotate_half form)."""
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return (xf * cos[:, None, :] + rotated * sin[:, None, :]).to(x.dtype)

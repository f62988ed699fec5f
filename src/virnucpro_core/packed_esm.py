"""Packed ESM-2 forward: one 1-D token tensor with ``cu_seqlens``, no padding.

Reuses the weights of a fair-esm ``ESM2`` (q/k/v fused into one projection) and computes
what fair-esm's forward computes, sequence by sequence:
token-dropout scale, pre-LN layers, rotary q/k (fp32 tables, positions restarting at every
sequence), varlen attention with scale 1/sqrt(head_dim), exact erf GELU, final layer norm.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from esm.model.esm2 import ESM2
from torch import nn

from .attention import apply_rotary, pick_backend, position_ids, rotary_tables, varlen_attention

POOLINGS = ("mean", "bos")


def attn_in(x, ln_w, ln_b, eps: float, qkv_w, qkv_b, cos, sin, heads: int):
    """Pre-LN, fused q/k/v projection, fp32 rotary on q and k: (tokens, heads, head_dim) each."""
    h = F.layer_norm(x, (x.shape[-1],), ln_w, ln_b, eps).to(qkv_w.dtype)
    q, k, v = F.linear(h, qkv_w, qkv_b).view(x.shape[0], 3, heads, -1).unbind(1)
    return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v


def attn_out_ffn(x, a, out_w, out_b, ln_w, ln_b, eps: float, fc1_w, fc1_b, fc2_w, fc2_b):
    """Attention output projection and residual, then pre-LN feed-forward and residual."""
    x = x + F.linear(a.reshape(x.shape[0], -1), out_w, out_b).to(x.dtype)
    h = F.layer_norm(x, (x.shape[-1],), ln_w, ln_b, eps).to(fc1_w.dtype)
    return x + F.linear(F.gelu(F.linear(h, fc1_w, fc1_b)), fc2_w, fc2_b).to(x.dtype)  # exact erf GELU, as fair-esm


class PackedESM2(nn.Module):
    """``compile``: fuse the element-wise work around the matmuls with torch.compile (GPU).
    ``fp32_residual``: keep the residual stream in fp32 (matmuls stay in the model's dtype)."""

    def __init__(self, esm2: ESM2, backend: str = "auto", compile: bool = False, fp32_residual: bool = True) -> None:
        super().__init__()
        self.esm2 = esm2
        self.num_layers = esm2.num_layers
        self.heads = esm2.attention_heads
        self.head_dim = esm2.embed_dim // esm2.attention_heads
        self.scale = self.head_dim**-0.5  # fair-esm's MultiheadAttention.scaling
        p = next(esm2.parameters())
        f = (lambda t: t.detach().float()) if fp32_residual else (lambda t: t.detach())  # noqa: E731
        self._f = f
        self.backend = pick_backend(p.device, p.dtype, backend)
        self.fp32_residual = fp32_residual
        # token dropout with no <mask> in the input: x * (1 - 0.15 * 0.8) / (1 - 0)
        self.embed_scale = esm2.embed_scale * ((1 - 0.15 * 0.8) if esm2.token_dropout else 1.0)
        self.weights = []
        for lyr in esm2.layers:
            sa, ln1, ln2 = lyr.self_attn, lyr.self_attn_layer_norm, lyr.final_layer_norm
            qkv_w = torch.cat([sa.q_proj.weight, sa.k_proj.weight, sa.v_proj.weight]).detach()
            qkv_b = torch.cat([sa.q_proj.bias, sa.k_proj.bias, sa.v_proj.bias]).detach()
            self.weights.append(
                (
                    (f(ln1.weight), f(ln1.bias), ln1.eps, qkv_w, qkv_b),
                    (sa.out_proj.weight, sa.out_proj.bias, f(ln2.weight), f(ln2.bias), ln2.eps, lyr.fc1.weight, lyr.fc1.bias, lyr.fc2.weight, lyr.fc2.bias),
                )
            )
        self.attn_in, self.attn_out_ffn = attn_in, attn_out_ffn
        if compile:
            self.attn_in = torch.compile(attn_in, dynamic=True)
            self.attn_out_ffn = torch.compile(attn_out_ffn, dynamic=True)

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, repr_layers: list[int]) -> dict[int, torch.Tensor]:
        """Hidden states (tokens, dim) for each layer in ``repr_layers`` (0 = embeddings;
        the last layer has the final layer norm applied, as in fair-esm)."""
        cos, sin = rotary_tables(position_ids(cu_seqlens, tokens.shape[0]), self.head_dim)
        x = self.esm2.embed_tokens(tokens) * self.embed_scale
        out = {0: x} if 0 in repr_layers else {}
        if self.fp32_residual:
            x = x.float()
        for i, (w_in, w_out) in enumerate(self.weights):
            q, k, v = self.attn_in(x, *w_in, cos, sin, self.heads)
            a = varlen_attention(q, k, v, cu_seqlens, max_seqlen, self.scale, self.backend)
            x = self.attn_out_ffn(x, a, *w_out)
            if i + 1 in repr_layers and i + 1 < self.num_layers:
                out[i + 1] = x
        if self.num_layers in repr_layers:
            ln = self.esm2.emb_layer_norm_after
            out[self.num_layers] = F.layer_norm(x, (x.shape[-1],), self._f(ln.weight), self._f(ln.bias), ln.eps)
        return out


def pool(hidden: torch.Tensor, cu_seqlens: torch.Tensor, how: str) -> torch.Tensor:
    """Per-sequence (n_seq, dim) fp32 pooling without a Python loop over sequences.

    ``mean``: over residues, BOS and EOS excluded (fair-esm esm-extract's ``mean``);
    ``bos``: the BOS token's state (esm-extract's ``bos``).
    """
    if how == "bos":
        return hidden[cu_seqlens[:-1].long()].float()
    if how != "mean":
        raise ValueError(f"pooling must be one of {POOLINGS}, not {how!r}")
    n = len(cu_seqlens) - 1
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    seq_of_token = torch.repeat_interleave(torch.arange(n, device=hidden.device), lengths, output_size=hidden.shape[0])
    keep = torch.ones(hidden.shape[0], dtype=torch.bool, device=hidden.device)
    keep[cu_seqlens[:-1].long()] = False
    keep[cu_seqlens[1:].long() - 1] = False
    sums = torch.zeros(n, hidden.shape[1], dtype=torch.float32, device=hidden.device)
    sums.index_add_(0, seq_of_token[keep], hidden[keep].float())
    return sums / (lengths - 2).clamp(min=1).unsqueeze(1).float()


def residues(hidden: torch.Tensor, cu_seqlens: torch.Tensor) -> list[torch.Tensor]:
    """Per-residue states of each sequence (BOS and EOS dropped)."""
    bounds = cu_seqlens.tolist()
    return [hidden[s + 1 : e - 1] for s, e in zip(bounds[:-1], bounds[1:])]

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


class PackedESM2(nn.Module):
    def __init__(self, esm2: ESM2, backend: str = "auto") -> None:
        super().__init__()
        self.esm2 = esm2
        self.num_layers = esm2.num_layers
        self.heads = esm2.attention_heads
        self.head_dim = esm2.embed_dim // esm2.attention_heads
        self.scale = self.head_dim**-0.5  # fair-esm's MultiheadAttention.scaling
        p = next(esm2.parameters())
        self.backend = pick_backend(p.device, p.dtype, backend)
        # token dropout with no <mask> in the input: x * (1 - 0.15 * 0.8) / (1 - 0)
        self.embed_scale = esm2.embed_scale * ((1 - 0.15 * 0.8) if esm2.token_dropout else 1.0)
        self.qkv_weight = [
            torch.cat([l.self_attn.q_proj.weight, l.self_attn.k_proj.weight, l.self_attn.v_proj.weight]).detach()
            for l in esm2.layers
        ]
        self.qkv_bias = [
            torch.cat([l.self_attn.q_proj.bias, l.self_attn.k_proj.bias, l.self_attn.v_proj.bias]).detach() for l in esm2.layers
        ]

    def layer(self, i: int, x: torch.Tensor, cos, sin, cu_seqlens, max_seqlen: int) -> torch.Tensor:
        lyr = self.esm2.layers[i]
        h = F.layer_norm(x, (x.shape[-1],), lyr.self_attn_layer_norm.weight, lyr.self_attn_layer_norm.bias, lyr.self_attn_layer_norm.eps)
        q, k, v = F.linear(h, self.qkv_weight[i], self.qkv_bias[i]).view(-1, 3, self.heads, self.head_dim).unbind(1)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        a = varlen_attention(q, k, v, cu_seqlens, max_seqlen, self.scale, self.backend)
        x = x + lyr.self_attn.out_proj(a.reshape(x.shape))
        h = F.layer_norm(x, (x.shape[-1],), lyr.final_layer_norm.weight, lyr.final_layer_norm.bias, lyr.final_layer_norm.eps)
        return x + lyr.fc2(F.gelu(lyr.fc1(h)))  # F.gelu is the exact erf form fair-esm uses

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, repr_layers: list[int]) -> dict[int, torch.Tensor]:
        """Hidden states (tokens, dim) for each layer in ``repr_layers`` (0 = embeddings;
        the last layer has the final layer norm applied, as in fair-esm)."""
        cos, sin = rotary_tables(position_ids(cu_seqlens), self.head_dim)
        x = self.esm2.embed_tokens(tokens) * self.embed_scale
        out = {0: x} if 0 in repr_layers else {}
        for i in range(self.num_layers):
            x = self.layer(i, x, cos, sin, cu_seqlens, max_seqlen)
            if i + 1 in repr_layers and i + 1 < self.num_layers:
                out[i + 1] = x
        if self.num_layers in repr_layers:
            ln = self.esm2.emb_layer_norm_after
            out[self.num_layers] = F.layer_norm(x, (x.shape[-1],), ln.weight, ln.bias, ln.eps)
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

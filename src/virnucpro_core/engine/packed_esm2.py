"""Packed ESM-2 forward: one 1-D token tensor with ``cu_seqlens``, no padding.

Reuses the weights of a fair-esm ``ESM2`` (q/k/v fused into one projection) and computes
what fair-esm's forward computes, sequence by sequence:
token-dropout scale, pre-LN layers, rotary q/k (fp32 tables, positions restarting at every
sequence), varlen attention with scale 1/sqrt(head_dim), exact GELU, final layer norm.
The residual stream is kept in fp32; the matmuls run in the model's dtype. On a GPU the work
besides cuBLAS's matmuls is Triton kernels (:mod:`.kernels`: residual add + layer norm, rotary, and
fc1 with its GELU); elsewhere it is PyTorch (the functions below), the same arithmetic in the same
order except that the kernels round fc1's output once, after the GELU.

Shapes: T tokens in the pack, D model dim, H heads, d = D / H head dim, S sequences.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from esm.model.esm2 import ESM2
from torch import Tensor, nn

from . import kernels
from .attention import apply_rotary, position_ids, resolve_backend, rotary_tables

POOLINGS = ("mean", "bos")


class LayerWeights(NamedTuple):
    """One transformer layer: pre-LN attention, then pre-LN feed-forward (fair-esm's names in comments)."""

    attn_ln_w: Tensor  # self_attn_layer_norm (fp32)
    attn_ln_b: Tensor
    qkv_w: Tensor  # q_proj, k_proj, v_proj stacked: (3D, D)
    qkv_b: Tensor
    out_w: Tensor  # self_attn.out_proj
    out_b: Tensor
    ffn_ln_w: Tensor  # final_layer_norm (fp32)
    ffn_ln_b: Tensor
    fc1_w: Tensor  # (4D, D)
    fc1_b: Tensor
    fc2_w: Tensor  # (D, 4D)
    fc2_b: Tensor
    eps: float

    @staticmethod
    def of(layer) -> "LayerWeights":
        sa, ln1, ln2 = layer.self_attn, layer.self_attn_layer_norm, layer.final_layer_norm
        assert ln1.eps == ln2.eps
        return LayerWeights(
            attn_ln_w=ln1.weight.detach().float(), attn_ln_b=ln1.bias.detach().float(),
            qkv_w=torch.cat([sa.q_proj.weight, sa.k_proj.weight, sa.v_proj.weight]).detach(),
            qkv_b=torch.cat([sa.q_proj.bias, sa.k_proj.bias, sa.v_proj.bias]).detach(),
            out_w=sa.out_proj.weight.detach(), out_b=sa.out_proj.bias.detach(),
            ffn_ln_w=ln2.weight.detach().float(), ffn_ln_b=ln2.bias.detach().float(),
            fc1_w=layer.fc1.weight.detach(), fc1_b=layer.fc1.bias.detach(),
            fc2_w=layer.fc2.weight.detach(), fc2_b=layer.fc2.bias.detach(),
            eps=ln1.eps,
        )


def add_residual(x: Tensor, y: Tensor, y_bias: Tensor | None) -> Tensor:
    """The residual ``x`` (T, D) fp32 plus a matmul's output ``y`` and then its bias, in fp32."""
    x = x + y.to(x.dtype)
    return x if y_bias is None else x + y_bias.to(x.dtype)


def add_layer_norm(x: Tensor, y: Tensor | None, y_bias: Tensor | None, weight: Tensor, bias: Tensor, eps: float,
                   dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """The residual ``x`` (T, D) fp32 plus a matmul's output ``y`` (and its bias), then its layer norm in ``dtype``."""
    if y is not None:
        x = add_residual(x, y, y_bias)
    return x, F.layer_norm(x, (x.shape[-1],), weight, bias, eps).to(dtype)


def linear_gelu(h: Tensor, w: Tensor, b: Tensor) -> Tensor:
    """fc1 then exact GELU."""
    return F.gelu(F.linear(h, w, b))


def rotate_qk(qkv: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """fp32 rotary on q and k of ``qkv`` (T, 3, H, d)."""
    q, k, _ = qkv.unbind(1)
    return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)


class PackedESM2(nn.Module):
    """``backend``: attention backend name or ``auto``. ``fused``: the element-wise work in Triton
    kernels (default: on a GPU, when Triton is installed)."""

    def __init__(self, esm2: ESM2, backend: str = "auto", fused: bool | None = None) -> None:
        super().__init__()
        self.esm2 = esm2
        self.num_layers = esm2.num_layers
        self.heads = esm2.attention_heads
        self.head_dim = esm2.embed_dim // esm2.attention_heads
        self.scale = self.head_dim**-0.5  # fair-esm's MultiheadAttention.scaling
        p = next(esm2.parameters())
        self.dtype = p.dtype
        self.backend, self.attend = resolve_backend(p.device, p.dtype, backend)
        # token dropout with no <mask> in the input: x * (1 - 0.15 * 0.8) / (1 - 0)
        self.embed_scale = esm2.embed_scale * ((1 - 0.15 * 0.8) if esm2.token_dropout else 1.0)
        self.layers = [LayerWeights.of(layer) for layer in esm2.layers]
        ln = esm2.emb_layer_norm_after
        self.final_ln = (ln.weight.detach().float(), ln.bias.detach().float(), ln.eps)
        self.fused = kernels.available(p.device) if fused is None else fused
        if self.fused:
            self.add_ln, self.rotate, self.linear_gelu = kernels.add_layer_norm, kernels.rotary_qk, kernels.linear_gelu
        else:
            self.add_ln, self.rotate, self.linear_gelu = add_layer_norm, rotate_qk, linear_gelu

    @torch.inference_mode()
    def forward(self, tokens: Tensor, cu_seqlens: Tensor, max_seqlen: int, repr_layers: list[int]) -> dict[int, Tensor]:
        """Hidden states (T, D) for each layer in ``repr_layers`` (0 = embeddings; the last layer
        has the final layer norm applied, as in fair-esm). ``tokens``: (T,); ``cu_seqlens``: (S + 1,)."""
        T, H = tokens.shape[0], self.heads
        cos, sin = rotary_tables(position_ids(cu_seqlens, T), self.head_dim)  # (T, d) fp32 each
        x = self.esm2.embed_tokens(tokens) * self.embed_scale  # (T, D)
        out = {0: x} if 0 in repr_layers else {}
        x = x.to(torch.float32, copy=True)  # the residual stream, updated in place by the kernels
        g = g_bias = None  # the last matmul's output and its bias, added at the next layer norm
        for i, w in enumerate(self.layers, 1):
            x, h = self.add_ln(x, g, g_bias, w.attn_ln_w, w.attn_ln_b, w.eps, self.dtype)  # (T, D) fp32, (T, D)
            qkv = F.linear(h, w.qkv_w, w.qkv_b).view(T, 3, H, self.head_dim)  # (T, 3, H, d)
            q, k = self.rotate(qkv, cos, sin)  # (T, H, d) each
            a = self.attend(q, k, qkv[:, 2], cu_seqlens, max_seqlen, self.scale)  # (T, H, d)
            x, h = self.add_ln(x, F.linear(a.reshape(T, -1), w.out_w, w.out_b), None, w.ffn_ln_w, w.ffn_ln_b, w.eps, self.dtype)
            g, g_bias = F.linear(self.linear_gelu(h, w.fc1_w, w.fc1_b), w.fc2_w), w.fc2_b  # (T, 4D) -> (T, D)
            if i in repr_layers and i < self.num_layers:
                out[i] = add_residual(x, g, g_bias)
        x = add_residual(x, g, g_bias)
        if self.num_layers in repr_layers:
            out[self.num_layers] = F.layer_norm(x, (x.shape[-1],), *self.final_ln)
        return out


def pool(hidden: Tensor, cu_seqlens: Tensor, how: str) -> Tensor:
    """Per-sequence (S, D) fp32 pooling without a Python loop over sequences.

    ``mean``: over residues, BOS and EOS excluded (fair-esm esm-extract's ``mean``);
    ``bos``: the BOS token's state (esm-extract's ``bos``).
    """
    if how == "bos":
        return hidden[cu_seqlens[:-1].long()].float()
    if how != "mean":
        raise ValueError(f"pooling must be one of {POOLINGS}, not {how!r}")
    n = len(cu_seqlens) - 1
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    # every token's sequence; BOS and EOS go to a row n that is dropped (no boolean indexing: no sync)
    seq_of_token = torch.repeat_interleave(torch.arange(n, device=hidden.device), lengths, output_size=hidden.shape[0])
    seq_of_token[cu_seqlens[:-1].long()] = n
    seq_of_token[cu_seqlens[1:].long() - 1] = n
    sums = torch.zeros(n + 1, hidden.shape[1], dtype=torch.float32, device=hidden.device)
    sums.index_add_(0, seq_of_token, hidden.float())
    return sums[:n] / (lengths - 2).clamp(min=1).unsqueeze(1).float()


def residues(hidden: Tensor, cu_seqlens: Tensor) -> list[Tensor]:
    """Per-residue states of each sequence (BOS and EOS dropped)."""
    bounds = cu_seqlens.tolist()
    return [hidden[s + 1 : e - 1] for s, e in zip(bounds[:-1], bounds[1:])]

"""Packed ESM-2 forward: one 1-D token tensor with ``cu_seqlens``, no padding.

Reuses the weights of a fair-esm ``ESM2`` (q/k/v fused into one projection) and computes
what fair-esm's forward computes, sequence by sequence:
token-dropout scale, pre-LN layers, rotary q/k (fp32 tables, positions restarting at every
sequence), varlen attention with scale 1/sqrt(head_dim), exact erf GELU, final layer norm.
The residual stream is kept in fp32; the matmuls run in the model's dtype. On a GPU the two
element-wise regions of a layer are compiled (``attn_in``: the previous layer's last bias and
residual add, layer norm, q/k/v; ``attn_out_ffn``: output projection to the last feed-forward
matmul) and rotary q/k is one Triton kernel (:mod:`.kernels`).

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
        """Every tensor an ``nn.Parameter``: torch.compile takes parameters as static inputs of
        fixed shape, so Inductor specialises the matmuls (plain tensors were 6% slower, 650M, H200)."""
        sa, ln1, ln2 = layer.self_attn, layer.self_attn_layer_norm, layer.final_layer_norm
        assert ln1.eps == ln2.eps
        p = lambda t: nn.Parameter(t.detach(), requires_grad=False)  # noqa: E731
        return LayerWeights(
            attn_ln_w=p(ln1.weight.float()), attn_ln_b=p(ln1.bias.float()),
            qkv_w=p(torch.cat([sa.q_proj.weight, sa.k_proj.weight, sa.v_proj.weight])),
            qkv_b=p(torch.cat([sa.q_proj.bias, sa.k_proj.bias, sa.v_proj.bias])),
            out_w=p(sa.out_proj.weight), out_b=p(sa.out_proj.bias),
            ffn_ln_w=p(ln2.weight.float()), ffn_ln_b=p(ln2.bias.float()),
            fc1_w=p(layer.fc1.weight), fc1_b=p(layer.fc1.bias),
            fc2_w=p(layer.fc2.weight), fc2_b=p(layer.fc2.bias),
            eps=ln1.eps,
        )


def attn_in(x: Tensor, w: LayerWeights, heads: int, g: Tensor | None = None, g_bias: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The previous layer's feed-forward output ``g`` (its bias not yet added) into the residual, then
    pre-LN and the fused q/k/v projection: one kernel reads the residual once for both."""
    if g is not None:
        x = x + g.to(x.dtype) + g_bias.to(x.dtype)  # (T, D) fp32
    h = F.layer_norm(x, (x.shape[-1],), w.attn_ln_w, w.attn_ln_b, w.eps).to(w.qkv_w.dtype)  # (T, D)
    return x, F.linear(h, w.qkv_w, w.qkv_b).view(x.shape[0], 3, heads, -1)  # (T, 3, H, d)


def attn_out_ffn(x: Tensor, a: Tensor, w: LayerWeights) -> tuple[Tensor, Tensor]:
    """Attention output projection and residual, then pre-LN feed-forward up to its second matmul;
    that matmul's bias and residual add go to the next layer's ``attn_in`` (or ``add_ffn``)."""
    x = x + F.linear(a.reshape(x.shape[0], -1), w.out_w, w.out_b).to(x.dtype)  # (T, D) fp32
    h = F.layer_norm(x, (x.shape[-1],), w.ffn_ln_w, w.ffn_ln_b, w.eps).to(w.fc1_w.dtype)
    h = F.gelu(F.linear(h, w.fc1_w, w.fc1_b))  # (T, 4D), exact erf GELU as fair-esm
    return x, F.linear(h, w.fc2_w)  # (T, D) fp32, (T, D) model dtype


def add_ffn(x: Tensor, g: Tensor, g_bias: Tensor) -> Tensor:
    return x + g.to(x.dtype) + g_bias.to(x.dtype)


def rotate_qk(qkv: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """fp32 rotary on q and k of ``qkv`` (T, 3, H, d)."""
    q, k, _ = qkv.unbind(1)
    return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)


class PackedESM2(nn.Module):
    """``backend``: attention backend name or ``auto``. ``compile``: fuse the element-wise work
    around the matmuls with torch.compile (GPU)."""

    def __init__(self, esm2: ESM2, backend: str = "auto", compile: bool = False) -> None:
        super().__init__()
        self.esm2 = esm2
        self.num_layers = esm2.num_layers
        self.heads = esm2.attention_heads
        self.head_dim = esm2.embed_dim // esm2.attention_heads
        self.scale = self.head_dim**-0.5  # fair-esm's MultiheadAttention.scaling
        p = next(esm2.parameters())
        self.backend, self.attend = resolve_backend(p.device, p.dtype, backend)
        # token dropout with no <mask> in the input: x * (1 - 0.15 * 0.8) / (1 - 0)
        self.embed_scale = esm2.embed_scale * ((1 - 0.15 * 0.8) if esm2.token_dropout else 1.0)
        self.layers = [LayerWeights.of(layer) for layer in esm2.layers]
        ln = esm2.emb_layer_norm_after
        self.final_ln = (ln.weight.detach().float(), ln.bias.detach().float(), ln.eps)
        # coordinate descent tuning: +2.5% on the 650M forward (layer norms), H200
        c = (lambda f: torch.compile(f, dynamic=True, options={"coordinate_descent_tuning": True})) if compile else (lambda f: f)  # noqa: E731
        self.attn_in, self.attn_out_ffn, self.add_ffn = c(attn_in), c(attn_out_ffn), c(add_ffn)
        self.rotate = kernels.rotary_qk if kernels.available(p.device) else c(rotate_qk)

    @torch.inference_mode()
    def forward(self, tokens: Tensor, cu_seqlens: Tensor, max_seqlen: int, repr_layers: list[int]) -> dict[int, Tensor]:
        """Hidden states (T, D) for each layer in ``repr_layers`` (0 = embeddings; the last layer
        has the final layer norm applied, as in fair-esm). ``tokens``: (T,); ``cu_seqlens``: (S + 1,)."""
        cos, sin = rotary_tables(position_ids(cu_seqlens, tokens.shape[0]), self.head_dim)  # (T, d) fp32 each
        x = self.esm2.embed_tokens(tokens) * self.embed_scale  # (T, D)
        out = {0: x} if 0 in repr_layers else {}
        x = x.float()  # the residual stream
        g = g_bias = None
        for i, w in enumerate(self.layers, 1):
            x, qkv = self.attn_in(x, w, self.heads, g, g_bias)  # (T, D) fp32, (T, 3, H, d)
            q, k = self.rotate(qkv, cos, sin)  # (T, H, d) each
            a = self.attend(q, k, qkv[:, 2], cu_seqlens, max_seqlen, self.scale)  # (T, H, d)
            x, g = self.attn_out_ffn(x, a, w)  # (T, D) fp32, (T, D) before the second feed-forward bias
            g_bias = w.fc2_b
            if i in repr_layers and i < self.num_layers:
                out[i] = self.add_ffn(x, g, g_bias)
        x = self.add_ffn(x, g, g_bias)
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

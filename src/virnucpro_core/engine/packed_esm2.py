"""Packed ESM-2 forward: one 1-D token tensor with ``cu_seqlens``, no padding.

:class:`PackedESM2` wraps a fair-esm ``ESM2`` and computes what fair-esm's forward computes, sequence
by sequence: token-dropout scale, pre-LN layers, rotary q/k (fp32 tables, positions restarting at
every sequence), varlen attention with scale 1/sqrt(head_dim), GELU (exact, or in bf16 on a GPU its tanh form
in cuBLAS's fc1 epilogue: :func:`gelu_form`), final layer norm. Each of
its :class:`PackedLayer` is built from one fair-esm ``TransformerLayer`` (its linear modules shared,
q/k/v fused into one projection, the layer norms held in fp32) and reads like it::

    x = x + self.attention(self.attn_norm(x), pack)
    x = x + self.ffn(self.ffn_norm(x), pack)

``x`` is a :class:`Residual`: the fp32 residual stream plus the last one or two matmul outputs not yet added
to it. ``x + update`` only records the update; the next layer norm adds the pending ones and normalises in one
pass (on a GPU one Triton kernel), storing the sum on the stream every second time: the residual adds fused
with the layer norms.
The matmuls run in the model's dtype. On a GPU the work besides cuBLAS's matmuls and attention is
Triton kernels (:mod:`.kernels`: residual add + layer norm, rotary, and fc1 with its exact GELU); elsewhere
it is PyTorch (the functions below, :data:`PYTORCH`), the same arithmetic in the same order except
that the kernels round fc1's output once, after the GELU. With the tanh GELU, fc1 is
:func:`linear_gelu_tanh` on either path.

Shapes: T tokens in the pack, D model dim, H heads, d = D / H head dim, S sequences.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from esm.model.esm2 import ESM2
from esm.modules import TransformerLayer
from torch import Tensor, nn

from . import kernels
from .attention import Attention, apply_rotary, position_ids, resolve_backend, rotary_tables

POOLINGS = ("mean", "bos")


# -- the PyTorch path: what the Triton kernels compute, in the same order ------------------------------

def add_residual(x: Tensor, updates: tuple[Update, ...]) -> Tensor:
    """The residual ``x`` (T, D) fp32 plus each update's matmul output and then its bias, in that order, in fp32."""
    for y, y_bias in updates:
        x = x + y.to(x.dtype)
        x = x if y_bias is None else x + y_bias.to(x.dtype)
    return x


def add_layer_norm(x: Tensor, updates: tuple[Update, ...], weight: Tensor, bias: Tensor, eps: float, dtype: torch.dtype,
                   store: bool = True) -> tuple[Tensor, Tensor]:
    """The residual ``x`` (T, D) fp32 plus ``updates``, and the layer norm of that sum in ``dtype``; the sum is
    returned as the new stream when ``store``, else ``x`` as it was."""
    v = add_residual(x, updates)
    return v if store else x, F.layer_norm(v, (v.shape[-1],), weight, bias, eps).to(dtype)


def linear_gelu(h: Tensor, w: Tensor, b: Tensor) -> Tensor:
    """fc1 then exact GELU."""
    return F.gelu(F.linear(h, w, b))


def linear_gelu_tanh(h: Tensor, w: Tensor, b: Tensor) -> Tensor:
    """fc1 then GELU's tanh form, 0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3))): on a GPU in cuBLAS's matmul
    epilogue (cuBLASLt; on the fp32 accumulator, rounded once), elsewhere a matmul, then the GELU."""
    if h.is_cuda:
        return torch._addmm_activation(b, h, w.t(), use_gelu=True)  # tanh on CUDA, exact on the CPU
    return F.gelu(F.linear(h, w, b), approximate="tanh")


def rotate_qk(qkv: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """fp32 rotary on q and k of ``qkv`` (T, 3, H, d)."""
    q, k, _ = qkv.unbind(1)
    return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)


class Ops(NamedTuple):
    """A layer's work besides the cuBLAS matmuls and attention, one implementation or the other."""

    add_layer_norm: Callable  # (x, updates, weight, bias, eps, dtype, store) -> (x, h)
    rotary_qk: Callable  # (qkv, cos, sin) -> (q, k)
    linear_gelu: Callable  # (h, fc1 weight, fc1 bias) -> GELU(fc1(h))


PYTORCH = Ops(add_layer_norm, rotate_qk, linear_gelu)
TRITON = Ops(kernels.add_layer_norm, kernels.rotary_qk, kernels.linear_gelu)
GELUS = ("auto", "exact")


def gelu_form(gelu: str, device: torch.device, dtype: torch.dtype) -> str:
    """The GELU fc1 computes: ``auto`` is its tanh form in bf16 on a GPU, where the form's error (at most 4.7e-4,
    1.3e-4 RMS over N(0, 1)) is an eighth of bf16's rounding of the output (1.1e-3 RMS) and cuBLAS fuses it into
    the matmul, and the exact (erf) GELU elsewhere; ``exact``: the exact GELU everywhere (fair-esm's)."""
    if gelu not in GELUS:
        raise ValueError(f"gelu must be one of {GELUS}, not {gelu!r}")
    return "tanh" if gelu == "auto" and device.type == "cuda" and dtype == torch.bfloat16 else "exact"


# -- the residual stream ---------------------------------------------------------------------------------

class Update(NamedTuple):
    """What a sub-block adds to the residual stream: a matmul's output (T, D) in the model's dtype, and
    a bias added after it in fp32 (``None``: the bias is already in the matmul)."""

    out: Tensor
    bias: Tensor | None = None


class Residual:
    """The residual stream: ``x`` (T, D) fp32 plus, pending, the last one or two :class:`Update` not yet added to it.

    ``+`` records an update; a :class:`LayerNorm32` of the stream normalises x plus its pending updates in one pass
    (``ops.add_layer_norm``: the fused kernel on a GPU), its output in ``dtype`` for the next matmul. With two
    updates pending it also stores the sum, in place on ``x``; with one it keeps the update pending, and the next
    layer norm adds it with the one after it: per layer 22 bytes an element read and written instead of 24, for
    the same fp32 sums in the same order. :meth:`tensor` reads the sum without changing the stream. A Residual is
    consumed by ``+`` (the new one shares ``x``, which the kernels update in place)."""

    def __init__(self, x: Tensor, ops: Ops, dtype: torch.dtype, pending: tuple[Update, ...] = ()) -> None:
        self.x, self.ops, self.dtype, self.pending = x, ops, dtype, pending

    def __add__(self, update: Update) -> Residual:
        if len(self.pending) == 2:  # two updates and no layer norm between them: the first two added
            return Residual(self.tensor(), self.ops, self.dtype, (update,))
        return Residual(self.x, self.ops, self.dtype, (*self.pending, update))

    def tensor(self) -> Tensor:
        """The stream's value (T, D) fp32; a new tensor when an update is pending."""
        return add_residual(self.x, self.pending) if self.pending else self.x

    def layer_norm(self, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
        """The layer norm (T, D) in ``dtype`` of the stream with its pending updates."""
        store = len(self.pending) == 2
        self.x, h = self.ops.add_layer_norm(self.x, self.pending, weight, bias, eps, self.dtype, store)
        if store:
            self.pending = ()
        return h


class LayerNorm32(nn.Module):
    """A layer norm whose weight and bias are fp32 whatever the model is cast to: cast to bf16, they are
    rounded to bf16 as every weight is, and kept in fp32 (the norm is computed in fp32 on the fp32 stream)."""

    def __init__(self, ln: nn.Module) -> None:
        super().__init__()
        self.weight = nn.Parameter(ln.weight.detach().float(), requires_grad=False)
        self.bias = nn.Parameter(ln.bias.detach().float(), requires_grad=False)
        self.eps = ln.eps

    def _apply(self, fn, recurse=True):  # .to(dtype) and the like: rounded to the dtype, then back to fp32
        return super()._apply(lambda t: fn(t).float(), recurse)

    def forward(self, x: Residual | Tensor) -> Tensor:
        """Of the residual stream: its pending update added first (fused), the output in the model's
        dtype; of a tensor (T, D) fp32: fp32."""
        if isinstance(x, Residual):
            return x.layer_norm(self.weight, self.bias, self.eps)
        return F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)


def _linear(weight: Tensor, bias: Tensor) -> nn.Linear:
    """An ``nn.Linear`` holding ``weight`` (out, in) and ``bias`` as they are: no random initialisation
    (built on torch's meta device instead, it would add 0.35 s to a job's start-up)."""
    m = nn.Linear.__new__(nn.Linear)
    nn.Module.__init__(m)
    m.in_features, m.out_features = weight.shape[1], weight.shape[0]
    m.weight, m.bias = nn.Parameter(weight, requires_grad=False), nn.Parameter(bias, requires_grad=False)
    return m


# -- the model ---------------------------------------------------------------------------------------------

class PackInfo(NamedTuple):
    """What every layer needs about the pack and the kernels, made once per forward."""

    cu_seqlens: Tensor  # (S + 1,) int32
    max_seqlen: int
    cos: Tensor  # (T, d) fp32 rotary tables, positions restarting at every sequence
    sin: Tensor
    ops: Ops
    attend: Attention  # (q, k, v, cu_seqlens, max_seqlen, scale) -> (T, H, d)


class PackedLayer(nn.Module):
    """One pre-LN transformer layer over a pack, built from fair-esm's ``TransformerLayer`` (whose linear
    modules it shares; fair-esm's names in comments)."""

    def __init__(self, layer: TransformerLayer) -> None:
        super().__init__()
        sa = layer.self_attn
        self.heads, self.head_dim, self.scale = sa.num_heads, sa.head_dim, sa.scaling  # scale = d ** -0.5
        self.attn_norm = LayerNorm32(layer.self_attn_layer_norm)  # fp32
        self.qkv = _linear(torch.cat([sa.q_proj.weight, sa.k_proj.weight, sa.v_proj.weight]).detach(),  # (3D, D)
                           torch.cat([sa.q_proj.bias, sa.k_proj.bias, sa.v_proj.bias]).detach())
        self.out_proj = sa.out_proj  # (D, D)
        self.ffn_norm = LayerNorm32(layer.final_layer_norm)  # fp32
        self.fc1, self.fc2 = layer.fc1, layer.fc2  # (4D, D), (D, 4D)

    def forward(self, x: Residual, pack: PackInfo) -> Residual:
        x = x + self.attention(self.attn_norm(x), pack)  # (T, D) fp32
        x = x + self.ffn(self.ffn_norm(x), pack)  # (T, D) fp32
        return x

    def attention(self, h: Tensor, pack: PackInfo) -> Update:
        """Self-attention of ``h`` (T, D); the out-projection's output, its bias in the matmul."""
        T = h.shape[0]
        qkv = self.qkv(h).view(T, 3, self.heads, self.head_dim)  # (T, 3, H, d)
        q, k = pack.ops.rotary_qk(qkv, pack.cos, pack.sin)  # (T, H, d) each, rotated in fp32
        a = pack.attend(q, k, qkv[:, 2], pack.cu_seqlens, pack.max_seqlen, self.scale)  # (T, H, d)
        return Update(self.out_proj(a.reshape(T, -1)))  # (T, D)

    def ffn(self, h: Tensor, pack: PackInfo) -> Update:
        """fc2(GELU(fc1(h))) of ``h`` (T, D); fc2's bias is added in fp32, with the residual."""
        g = pack.ops.linear_gelu(h, self.fc1.weight, self.fc1.bias)  # (T, 4D)
        return Update(F.linear(g, self.fc2.weight), self.fc2.bias)  # (T, D)


class PackedESM2(nn.Module):
    """A fair-esm ``ESM2`` (``esm2``, whose embedding and linear modules it shares) run over packs.

    ``backend``: attention backend name or ``auto``; ``gelu``: fc1's GELU (:func:`gelu_form`). It computes on
    the device and in the dtype of its weights: build it from a cast model, or cast it afterwards
    (``.to(device, dtype)``, which casts ``esm2`` too): the same tensors either way. The attention backend, the
    kernels (Triton on a GPU when installed, else :data:`PYTORCH`), the GELU and the dtype are chosen again
    after each cast. Dtypes:

    - the embedding, q/k/v, out-projection, fc1, fc2 and their biases: the model's dtype (the matmuls'),
      and so are layer-norm outputs (matmul inputs) and attention;
    - layer-norm weights and biases (:class:`LayerNorm32`, also the final one): fp32, holding the values
      rounded to the model's dtype;
    - the residual stream, the biases added to it after fc2, and every output but layer 0: fp32;
      layer 0 (the scaled embeddings): the model's dtype;
    - rotary tables and the rotation of q/k: fp32, q/k stored in the model's dtype.

    ``state_dict()`` holds ``esm2``'s tensors and the layers' (shared ones under both names, as tied weights).
    """

    def __init__(self, esm2: ESM2, backend: str = "auto", gelu: str = "auto") -> None:
        super().__init__()
        self.esm2 = esm2  # fair-esm's own forward: the spot check's reference
        self.num_layers, self.embed_dim = esm2.num_layers, esm2.embed_dim
        self.head_dim = esm2.embed_dim // esm2.attention_heads
        # token dropout with no <mask> in the input: x * (1 - 0.15 * 0.8) / (1 - 0)
        self.embed_scale = esm2.embed_scale * ((1 - 0.15 * 0.8) if esm2.token_dropout else 1.0)
        self.embed_tokens = esm2.embed_tokens
        self.layers = nn.ModuleList(PackedLayer(layer) for layer in esm2.layers)
        self.final_norm = LayerNorm32(esm2.emb_layer_norm_after)  # fp32
        self.requested_backend, self.requested_gelu = backend, gelu
        self._follow_weights()

    def _follow_weights(self) -> None:
        """The dtype, attention backend, kernels and GELU for the weights' device and dtype."""
        p = self.embed_tokens.weight
        self.dtype = p.dtype
        self.backend, self.attend = resolve_backend(p.device, p.dtype, self.requested_backend)
        self.fused = kernels.available(p.device)
        self.gelu = gelu_form(self.requested_gelu, p.device, p.dtype)
        self.ops = TRITON if self.fused else PYTORCH
        if self.gelu == "tanh":
            self.ops = self.ops._replace(linear_gelu=linear_gelu_tanh)

    def _apply(self, fn, recurse=True):  # .to(), .cuda(), .half(), ...
        super()._apply(fn, recurse)
        self._follow_weights()
        return self

    @torch.inference_mode()
    def forward(self, tokens: Tensor, cu_seqlens: Tensor, max_seqlen: int, repr_layers: list[int]) -> dict[int, Tensor]:
        """Hidden states (T, D) for each layer in ``repr_layers`` (0 = embeddings; the last layer
        has the final layer norm applied, as in fair-esm). ``tokens``: (T,); ``cu_seqlens``: (S + 1,)."""
        T = tokens.shape[0]
        cos, sin = rotary_tables(position_ids(cu_seqlens, T), self.head_dim)  # (T, d) fp32 each
        pack = PackInfo(cu_seqlens, max_seqlen, cos, sin, self.ops, self.attend)
        e = self.embed_tokens(tokens) * self.embed_scale  # (T, D)
        out = {0: e} if 0 in repr_layers else {}
        x = Residual(e.to(torch.float32, copy=True), self.ops, self.dtype)  # (T, D) fp32
        for i, layer in enumerate(self.layers, 1):
            x = layer(x, pack)
            if i in repr_layers and i < self.num_layers:
                out[i] = x.tensor()  # (T, D) fp32, a copy: the stream goes on
        if self.num_layers in repr_layers:
            out[self.num_layers] = self.final_norm(x.tensor())  # (T, D) fp32
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
    # every token's sequence; BOS and EOS go to a row n that is dropped. Nothing here waits for the GPU: no
    # boolean indexing, and index_fill_ (a Python number in the kernel's arguments) where ``t[i] = n`` would copy
    # n from pageable host memory, which waits for the pack's whole forward (about 1% of the 650M engine's time)
    seq_of_token = torch.repeat_interleave(torch.arange(n, device=hidden.device), lengths, output_size=hidden.shape[0])
    seq_of_token.index_fill_(0, cu_seqlens[:-1].long(), n)
    seq_of_token.index_fill_(0, cu_seqlens[1:].long() - 1, n)
    sums = torch.zeros(n + 1, hidden.shape[1], dtype=torch.float32, device=hidden.device)
    sums.index_add_(0, seq_of_token, hidden.float())
    return sums[:n] / (lengths - 2).clamp(min=1).unsqueeze(1).float()


def residues(hidden: Tensor, cu_seqlens: Tensor) -> list[Tensor]:
    """Per-residue states of each sequence (BOS and EOS dropped)."""
    bounds = cu_seqlens.tolist()
    return [hidden[s + 1 : e - 1] for s, e in zip(bounds[:-1], bounds[1:])]

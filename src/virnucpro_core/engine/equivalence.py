"""Unpacked reference (fair-esm's own forward, one sequence at a time) and equivalence metrics.

fair-esm's ``RotaryEmbedding`` builds its tables with ``arange(T).type_as(inv_freq)``: in a
model cast to bf16 the positions are bf16, exact only up to 256, so positions above 256 are
rounded and long sequences drift from the fp32 model. :func:`fp32_rotary` swaps in tables
computed in fp32 (and the rotation done in fp32), leaving the rest of fair-esm's forward as is;
the packed engine does the same, so the comparison measures packing, not rotary rounding.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass

import numpy as np
import torch
from esm.model.esm2 import ESM2

from .attention import apply_rotary, rotary_tables


class FP32Rotary(torch.nn.Module):
    """Drop-in for fair-esm's RotaryEmbedding: fp32 tables from exact integer positions."""

    def __init__(self, head_dim: int) -> None:
        super().__init__()
        self.head_dim = head_dim

    def forward(self, q: torch.Tensor, k: torch.Tensor):  # q, k: (batch*heads, T, dim)
        cos, sin = rotary_tables(torch.arange(k.shape[-2], device=k.device), self.head_dim)
        rot = lambda x: apply_rotary(x.transpose(0, 1), cos, sin).transpose(0, 1)  # noqa: E731
        return rot(q), rot(k)


@contextlib.contextmanager
def fp32_rotary(model: ESM2):
    saved = [layer.self_attn.rot_emb for layer in model.layers]
    head_dim = model.embed_dim // model.attention_heads
    try:
        for layer in model.layers:
            layer.self_attn.rot_emb = FP32Rotary(head_dim)
        yield model
    finally:
        for layer, rot in zip(model.layers, saved):
            layer.self_attn.rot_emb = rot


@torch.inference_mode()
def reference_hidden(model: ESM2, tokens: list[torch.Tensor], layer: int, fp32_rope: bool = True) -> list[torch.Tensor]:
    """fair-esm's forward on each tokenised sequence alone (no padding): (L+2, dim) states."""
    ctx = fp32_rotary(model) if fp32_rope else contextlib.nullcontext()
    device = next(model.parameters()).device
    out = []
    with ctx:
        for t in tokens:
            rep = model(t.to(device)[None], repr_layers=[layer])["representations"][layer]
            out.append(rep[0])
    return out


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1)


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30))


@dataclass
class SeqMetrics:
    id: str
    length: int
    pooled_cosine: float
    min_residue_cosine: float
    rel_l2: float


def compare(ids: list[str], test: list[torch.Tensor], ref: list[torch.Tensor]) -> list[SeqMetrics]:
    """Per sequence: cosine of mean-pooled residues, minimum per-residue cosine, relative L2.

    ``test``/``ref`` hold per-residue states (L, dim) of the same sequences.
    """
    rows = []
    for i, a, b in zip(ids, test, ref):
        rows.append(
            SeqMetrics(
                i,
                len(a),
                float(cosine(a.double().mean(0), b.double().mean(0))),
                float(cosine(a, b).min()),
                rel_l2(a, b),
            )
        )
    return rows


def downstream(test: np.ndarray, ref: np.ndarray) -> dict:
    """The packing study's downstream checks on pooled embeddings (n, dim).

    ``nn_preserved``: fraction of sequences whose nearest neighbour (cosine) in the sample is
    the same; ``max_pairwise_error``: largest |cos_test(i,j) - cos_ref(i,j)|.
    """
    def sims(x):
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
        s = x @ x.T
        np.fill_diagonal(s, -np.inf)
        return s

    st, sr = sims(test.astype(np.float64)), sims(ref.astype(np.float64))
    if len(test) < 2:
        return {"nn_preserved": 1.0, "max_pairwise_error": 0.0}
    off = ~np.eye(len(test), dtype=bool)
    return {
        "nn_preserved": float((st.argmax(1) == sr.argmax(1)).mean()),
        "max_pairwise_error": float(np.abs(st[off] - sr[off]).max()),
    }


@dataclass
class Thresholds:
    """Minimum pooled and per-residue cosine, packed vs unpacked, in the same dtype.

    Defaults from measured noise (docs/engine.md, "Equivalence"); stated in every spot-check output.
    """

    pooled_cosine: float
    min_residue_cosine: float

    @classmethod
    def resolve(cls, dtype: str, pooled_cosine: float | None, min_residue_cosine: float | None) -> "Thresholds":
        """The given thresholds; ``None`` takes the measured default for ``dtype``."""
        d = DEFAULT_THRESHOLDS[dtype]
        return cls(d.pooled_cosine if pooled_cosine is None else pooled_cosine,
                   d.min_residue_cosine if min_residue_cosine is None else min_residue_cosine)

    def as_dict(self) -> dict:
        return asdict(self)


DEFAULT_THRESHOLDS = {
    "float32": Thresholds(pooled_cosine=0.99999, min_residue_cosine=0.9999),
    "bfloat16": Thresholds(pooled_cosine=0.9995, min_residue_cosine=0.99),
    "float16": Thresholds(pooled_cosine=0.9995, min_residue_cosine=0.99),
}

"""Packing plan: windows for long sequences, next-fit-decreasing packs, the plan as Parquet.

A plan is data: one row per item ``(pack, record, start, length)``, where ``record`` is
the row of the record in its shard and ``[start, start + length)`` the residues the item
embeds. Every item costs ``length + 2`` tokens (fair-esm's BOS and EOS).

The records are cut into chunks, contiguous row ranges of about ``chunk_tokens`` tokens, packed
each on its own: the embed stage writes a chunk's rows as soon as its packs are done, and a killed
job resumes from its last complete chunk.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..io.files import write_table

MAX_RESIDUES = 1022  # ESM-2 was trained on 1024 tokens: BOS + 1022 residues + EOS


@dataclass(frozen=True)
class Pack:
    records: np.ndarray  # int64 row in the shard, one per item
    starts: np.ndarray  # int64 first residue of the item
    lengths: np.ndarray  # int64 residues of the item

    @property
    def tokens(self) -> int:
        return int(self.lengths.sum()) + 2 * len(self.lengths)

    @property
    def cu_seqlens(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.lengths + 2)]).astype(np.int32)

    def item(self, i: int) -> "Pack":
        """A pack of the i-th item alone."""
        return Pack(self.records[i : i + 1], self.starts[i : i + 1], self.lengths[i : i + 1])

    def split(self) -> tuple["Pack", "Pack"]:
        h = len(self.lengths) // 2
        return (
            Pack(self.records[:h], self.starts[:h], self.lengths[:h]),
            Pack(self.records[h:], self.starts[h:], self.lengths[h:]),
        )


@dataclass
class Plan:
    budget: int  # tokens per pack
    packs: list[Pack]  # in chunk order
    n_records: int
    stats: dict = field(default_factory=dict)
    chunks: list[int] = field(default_factory=list)  # record bounds: chunk c is rows [chunks[c], chunks[c + 1])

    def __post_init__(self) -> None:
        if not self.chunks:
            self.chunks = [0, self.n_records]

    @property
    def n_chunks(self) -> int:
        return len(self.chunks) - 1

    def chunk(self, c: int) -> "Plan":
        """Chunk ``c`` as a plan of its own, its records numbered from 0."""
        lo, hi = self.chunks[c], self.chunks[c + 1]
        packs = [Pack(p.records - lo, p.starts, p.lengths) for p in self.packs if lo <= p.records[0] < hi]
        return Plan(self.budget, packs, hi - lo)

    def efficiency(self) -> float:
        """Padding-free efficiency: real tokens / (budget x packs)."""
        if not self.packs:
            return 1.0
        return sum(p.tokens for p in self.packs) / (self.budget * len(self.packs))


def windows(length: int, policy: str, overlap: int, max_residues: int = MAX_RESIDUES) -> list[tuple[int, int]]:
    """(start, length) items for one record of ``length`` residues.

    ``truncate`` keeps the first ``max_residues`` (fair-esm's behaviour); ``split`` cuts
    windows of ``max_residues`` that overlap by at least ``overlap`` residues, the last one
    ending at the last residue, so every residue is covered.
    """
    if length <= max_residues:
        return [(0, length)]
    if policy == "truncate":
        return [(0, max_residues)]
    if policy != "split":
        raise ValueError(f"long-sequence policy must be 'truncate' or 'split', not {policy!r}")
    if not 0 <= overlap < max_residues:
        raise ValueError(f"window overlap must be in [0, {max_residues}), not {overlap}")
    step = max_residues - overlap
    n = -(-(length - max_residues) // step) + 1  # windows needed
    starts = np.linspace(0, length - max_residues, n).round().astype(int)
    return [(int(s), max_residues) for s in starts]


def items(lengths: np.ndarray, policy: str, overlap: int, max_residues: int = MAX_RESIDUES,
          include: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(record, start, length) of every item, in record order: :func:`windows` of each record, all at once.
    ``include``: the records to plan (the others, duplicates of earlier records, get no item)."""
    n = np.asarray(lengths, dtype=np.int64)
    rec = np.arange(len(n)) if include is None else np.flatnonzero(include)
    n = n[rec]
    if policy not in ("truncate", "split"):
        windows(max_residues + 1, policy, overlap, max_residues)  # raises naming the policy
    if policy == "truncate" or not (n > max_residues).any():
        return rec, np.zeros(len(rec), np.int64), np.minimum(n, max_residues)
    windows(max_residues + 1, policy, overlap, max_residues)  # checks the overlap
    over = np.maximum(n - max_residues, 0)
    k = np.where(over > 0, -(-over // (max_residues - overlap)) + 1, 1)  # windows per record
    item_rec = np.repeat(np.arange(len(n)), k)
    j = np.arange(len(item_rec)) - np.repeat(np.cumsum(k) - k, k)  # window number within its record
    kk, oo = k[item_rec], over[item_rec]
    with np.errstate(invalid="ignore", divide="ignore"):  # as np.linspace(0, over, k).round(), the last exactly at over
        starts = np.where(kk > 1, (j * (oo / np.maximum(kk - 1, 1))).round(), 0).astype(np.int64)
    starts = np.where(j == kk - 1, oo, starts)
    return rec[item_rec], starts, np.minimum(n[item_rec], max_residues)


def next_fit_decreasing(sizes: np.ndarray, budget: int) -> np.ndarray:
    """Bin index for every item: items by decreasing size, each bin filled until the next item does not fit.
    Items are at most a sixty-fourth of the default budget, so bins end within one item of it."""
    sizes = np.asarray(sizes, dtype=np.int64)
    if len(sizes) == 0:
        return np.zeros(0, dtype=np.int64)
    if sizes.max() > budget:
        raise ValueError(f"an item of {sizes.max()} tokens exceeds the token budget {budget}")
    order = np.argsort(-sizes, kind="stable")
    cum = np.cumsum(sizes[order])
    bins_sorted = np.empty(len(sizes), dtype=np.int64)
    start, b, base = 0, 0, 0
    while start < len(sizes):
        end = int(np.searchsorted(cum, base + budget, side="right"))
        bins_sorted[start:end] = b
        base, start, b = int(cum[end - 1]), end, b + 1
    bins = np.empty_like(bins_sorted)
    bins[order] = bins_sorted
    return bins


def chunk_bounds(record_tokens: np.ndarray, chunk_tokens: int) -> list[int]:
    """Record bounds of contiguous chunks: a chunk starts where the tokens before a record pass the
    next multiple of ``chunk_tokens`` (so no chunk is much over it)."""
    if len(record_tokens) == 0:
        return [0, 0]
    before = np.cumsum(record_tokens) - record_tokens
    chunk = before // chunk_tokens
    starts = np.flatnonzero(np.diff(chunk)) + 1
    return [0, *starts.tolist(), len(record_tokens)]


def build_plan(
    lengths: np.ndarray | list[int],
    budget: int,
    policy: str,
    overlap: int,
    max_residues: int = MAX_RESIDUES,
    chunk_tokens: int | None = None,
    include: np.ndarray | None = None,
) -> Plan:
    """Plan packs for records of the given lengths (rows of one shard), chunk by chunk; ``include`` limits the
    items to some records (the rest are duplicates, embedded once elsewhere)."""
    if budget < max_residues + 2:
        raise ValueError(f"token budget {budget} is below one full sequence ({max_residues + 2} tokens)")
    rec_a, st_a, ln_a = items(np.asarray(lengths, dtype=np.int64), policy, overlap, max_residues, include)
    n_records = len(lengths)
    chunks = chunk_bounds(np.bincount(rec_a, ln_a + 2, minlength=n_records).astype(np.int64), chunk_tokens) if chunk_tokens else [0, n_records]
    # bins numbered chunk after chunk, so packs come in chunk order
    bins = np.zeros(len(rec_a), dtype=np.int64)
    item_bounds = np.searchsorted(rec_a, chunks)
    offset = 0
    for a, b in zip(item_bounds[:-1], item_bounds[1:]):
        if b > a:
            bins[a:b] = next_fit_decreasing(ln_a[a:b] + 2, budget) + offset
            offset = int(bins[a:b].max()) + 1
    # packs in bin order (longest first); items within a pack in decreasing length
    order = np.lexsort((-ln_a, bins))
    bounds = np.flatnonzero(np.diff(bins[order])) + 1
    packs = [Pack(rec_a[i], st_a[i], ln_a[i]) for i in np.split(order, bounds)] if len(order) else []
    plan = Plan(budget, packs, n_records, chunks=chunks)
    plan.stats = plan_stats(plan, np.asarray(lengths, dtype=np.int64))
    return plan


def plan_stats(plan: Plan, lengths: np.ndarray) -> dict:
    tokens = [p.tokens for p in plan.packs]
    n_items = sum(len(p.lengths) for p in plan.packs)
    return {
        "records": int(plan.n_records),
        "items": int(n_items),
        "split_records": int(n_items - len(np.unique(np.concatenate([p.records for p in plan.packs] or [np.zeros(0, int)])))),
        "residues_in_records": int(lengths.sum()),
        "residues_embedded": int(sum(int(p.lengths.sum()) for p in plan.packs)),
        "packs": len(plan.packs),
        "budget": plan.budget,
        "tokens": int(sum(tokens)),
        "tokens_per_pack_min": int(min(tokens, default=0)),
        "tokens_per_pack_median": float(np.median(tokens)) if tokens else 0.0,
        "efficiency": plan.efficiency(),
        "chunks": plan.n_chunks,
    }


def save_plan(plan: Plan, path: str | Path) -> None:
    """Write the plan as Parquet (one row per item), stats in the schema metadata."""
    pack_ids = np.concatenate([np.full(len(p.lengths), i) for i, p in enumerate(plan.packs)] or [np.zeros(0)])
    cat = lambda attr: np.concatenate([getattr(p, attr) for p in plan.packs] or [np.zeros(0)])  # noqa: E731
    table = pa.table(
        {
            "pack": pa.array(pack_ids, pa.int32()),
            "record": pa.array(cat("records"), pa.int64()),
            "start": pa.array(cat("starts"), pa.int32()),
            "length": pa.array(cat("lengths"), pa.int32()),
        }
    )
    meta = {"budget": plan.budget, "n_records": plan.n_records, "stats": plan.stats, "chunks": plan.chunks}
    write_table(table.replace_schema_metadata({"virnucpro_plan": json.dumps(meta)}), path)


def load_plan(path: str | Path) -> Plan:
    table = pq.read_table(path)
    meta = json.loads(table.schema.metadata[b"virnucpro_plan"])
    pack = table["pack"].to_numpy()
    cols = [table[c].to_numpy().astype(np.int64) for c in ("record", "start", "length")]
    bounds = np.flatnonzero(np.diff(pack)) + 1
    packs = [Pack(*(c[s:e] for c in cols)) for s, e in zip(np.r_[0, bounds], np.r_[bounds, len(pack)]) if e > s]
    return Plan(meta["budget"], packs, meta["n_records"], meta["stats"], meta.get("chunks", []))

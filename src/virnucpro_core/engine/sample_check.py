"""The spot-check of a shard's sample: which rows (length-stratified), the sample through the packed forward
(re-packed into one pack) and through fair-esm's own forward one sequence at a time, and the comparison,
written as a TSV (one row per record) and a JSON summary. The spot-check stage and the embed stage (on its own
engine, while its last chunk is written) both run it.

Per sampled record: cosine of the stored pooled embedding against the unpacked forward, the re-packed pooled
cosine, and the minimum per-residue cosine and relative L2 over its windows.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from ..io.files import write_json, write_tsv
from ..options import Options
from .embedder import Embedder
from .equivalence import Thresholds, compare, cosine, downstream
from .packing import Pack, windows

log = logging.getLogger(__name__)

HEADER = ["id", "length", "pooled_cosine", "repacked_pooled_cosine", "min_residue_cosine", "rel_l2",
          "pooled_threshold", "residue_threshold", "status"]


def sample_by_length(lengths: np.ndarray, n: int, n_longest: int = 3) -> np.ndarray:
    """Deterministic length-stratified sample of row indices: the longest records, then
    records at evenly spaced length quantiles."""
    order = np.argsort(-lengths, kind="stable")
    if n >= len(order):
        return np.sort(order)
    take = list(order[:n_longest])
    rest = order[n_longest:]
    k = n - len(take)
    if k > 0 and len(rest):
        take += list(rest[np.linspace(0, len(rest) - 1, k).round().astype(int)])
    return np.sort(np.unique(take))


def sample(lengths: np.ndarray, own: np.ndarray, options: Options) -> list[int]:
    """The rows to check: a length-stratified sample of those the shard's job embedded (``own``; not the
    duplicates), from the rows' ``lengths``."""
    candidates = np.flatnonzero(own)
    return candidates[sample_by_length(lengths[candidates], options.spot_check.sample)].tolist()


@dataclass
class Measured:
    """The sample's windows (row, start, residues) through the packed forward (repacked into one pack) and the
    unpacked reference, with the sampled rows' ids and lengths."""

    rows: list[int]
    ids: dict[int, str]
    lengths: dict[int, int]
    items: list[tuple[int, int, int]]
    packed: list[torch.Tensor]
    ref: list[torch.Tensor]
    dtype: str


def measure(embedder: Embedder, table: pa.Table, rows: list[int], options: Options) -> Measured:
    """The GPU's part of the check: the sampled ``rows`` of the shard's ``table`` (``id``, ``sequence``), their
    windows as the plan cuts them, in one pack and one at a time."""
    long = options.long_sequences
    picked = table.select(["id", "sequence"]).take(rows)
    ids, seqs = picked["id"].to_pylist(), picked["sequence"].to_pylist()
    items = [(j, s, n) for j, seq in enumerate(seqs) for s, n in windows(len(seq), long.policy, long.overlap, long.max_residues)]
    pack = Pack(*(np.array(c, dtype=np.int64) for c in zip(*items)))
    layer = embedder.packed.num_layers
    packed = embedder.residue_states(seqs, pack, layer)
    ref = embedder.unpacked_residue_states(seqs, pack, layer)
    return Measured(list(rows), dict(zip(rows, ids)), dict(zip(rows, map(len, seqs))),
                    [(rows[j], s, n) for j, s, n in items], packed, ref, embedder.dtype_name)


def check(measured: Measured | None, stored: dict[int, np.ndarray], out: str | Path, options: Options, label: str,
          packed_dtype: str | None) -> dict:
    """Compare ``stored`` (row -> the ``embedding`` as written) with ``measured``; write the per-record table to
    ``out`` (TSV) and a summary beside it (``.json``); raise (``on_fail: error``) or warn when a record is below
    the thresholds. ``label`` names the embeddings in messages. No rows (an empty shard): empty files."""
    rows, opts = sorted(stored), options.spot_check
    if not rows:
        write_tsv(out, HEADER, [])
        write_json(Path(out).with_suffix(".json"), {"checked": 0, "failed": 0})
        return {"checked": 0, "failed": 0}
    if measured is None or measured.rows != rows:
        raise ValueError(f"the spot-check of {label} measured rows {measured and measured.rows[:5]} but its writer stored {rows[:5]}...")
    items, packed, ref, dtype = measured.items, measured.packed, measured.ref, measured.dtype
    ids, lengths = measured.ids, measured.lengths
    th = Thresholds.resolve(dtype, opts.pooled_cosine, opts.min_residue_cosine)
    metrics = compare([ids[r] for r, _, _ in items], packed, ref)
    out_rows, ref_pooled = [], []
    for r in rows:
        mine = [i for i, (rr, _, _) in enumerate(items) if rr == r]
        # pooled per record: windows weighted by residues, as the embed stage combines them
        weights = [items[i][2] for i in mine]
        ref_vec = (sum(ref[i].double().mean(0) * n for i, n in zip(mine, weights)) / sum(weights)).float().cpu()
        ref_pooled.append(ref_vec.numpy())
        stored_cos = float(cosine(torch.from_numpy(stored[r]), ref_vec))
        repacked = min(metrics[i].pooled_cosine for i in mine)
        min_res = min(metrics[i].min_residue_cosine for i in mine)
        ok = min(stored_cos, repacked) >= th.pooled_cosine and min_res >= th.min_residue_cosine
        out_rows.append([ids[r], lengths[r], f"{stored_cos:.10f}", f"{repacked:.10f}", f"{min_res:.10f}",
                         f"{max(metrics[i].rel_l2 for i in mine):.3e}", th.pooled_cosine, th.min_residue_cosine,
                         "pass" if ok else "FAIL"])
    down = downstream(np.stack([stored[r] for r in rows]).astype(np.float64), np.stack(ref_pooled))
    write_tsv(out, HEADER, out_rows)
    failed = [r for r in out_rows if r[-1] != "pass"]
    summary = {"checked": len(out_rows), "failed": len(failed), "dtype": dtype, "thresholds": th.as_dict(),
               "packed_dtype": packed_dtype, **down}
    write_json(Path(out).with_suffix(".json"), summary)
    if failed:
        msg = f"spot-check of {label}: {len(failed)} of {len(out_rows)} sequences below threshold " + ", ".join(
            f"{r[0]} (length {r[1]}, pooled {r[2]}, min residue {r[4]})" for r in failed[:10])
        if opts.on_fail == "error":
            raise RuntimeError(msg)
        log.warning(msg)
    log.info("spot-check: %s", json.dumps(summary))
    return summary

"""Stage 3: re-embed a length-stratified sample of a shard unpacked and compare with the packed result.

Per sampled record: cosine of the stored pooled embedding against fair-esm's own forward (one
sequence at a time, no padding, fp32 rotary), and, re-packing the sample into one pack, the
minimum per-residue cosine and relative L2 of every window.
"""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from ..run.devices import acquire_device
from ..io.duplicates import read_dups
from ..engine.embedder import Embedder, compute_dtype
from ..engine.equivalence import Thresholds, compare, cosine, downstream
from ..io.files import write_json, write_tsv
from ..models.loader import LoadedModel, load_model
from ..options import Options
from ..engine.packing import Pack, windows
from ..io.tables import read_metadata, take_rows
from .shard import Shard, sequence_lengths

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


def sample(shard_t: pa.Table, own: np.ndarray, options: Options) -> list[int]:
    """The rows to check: a length-stratified sample of those the shard's job embedded (not the duplicates)."""
    candidates = np.flatnonzero(own)
    return candidates[sample_by_length(sequence_lengths(shard_t)[candidates], options.spot_check.sample)].tolist()


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


def measure(embedder: Embedder, shard_t: pa.Table, rows: list[int], options: Options) -> Measured:
    """The GPU's part of the check: the sampled rows' windows, as the plan cuts them, in one pack and one at a time."""
    long = options.long_sequences
    picked = shard_t.select(["id", "sequence"]).take(pa.array(rows, pa.int64()))
    seqs = picked["sequence"].to_pylist()
    items = [(j, s, n) for j, seq in enumerate(seqs) for s, n in windows(len(seq), long.policy, long.overlap, long.max_residues)]
    pack = Pack(*(np.array(c, dtype=np.int64) for c in zip(*items)))
    layer = embedder.packed.num_layers
    packed = embedder.residue_states(seqs, pack, layer)
    ref = embedder.unpacked_residue_states(seqs, pack, layer)
    return Measured(list(rows), dict(zip(rows, picked["id"].to_pylist())), dict(zip(rows, map(len, seqs))),
                    [(rows[j], s, n) for j, s, n in items], packed, ref, embedder.dtype_name)


def run(parts: list[str | Path], embeddings: str | Path, model: str | LoadedModel, out: str | Path, options: Options,
        embedder: Embedder | None = None, shard_table: pa.Table | None = None,
        stored: dict[int, np.ndarray] | None = None, measured: Measured | None = None) -> dict:
    """Write the per-record table to ``out`` (TSV) and a summary next to it (``.json``); raise
    (``on_fail: error``) or warn when a record is below the thresholds. ``parts``: the shard's parts;
    ``embedder``: the embed job's own (the model already on its device), else the model is loaded here;
    ``shard_table``, ``stored``: the shard as that job read it and the sample's ``embedding`` values as its
    writer stored them (:func:`sample`); without them, both are read back from the files; ``measured``: the
    sample already through both forwards (:func:`measure`)."""
    shard_t = Shard(parts).table if shard_table is None else shard_table
    if stored is None:
        if shard_t["id"].to_pylist() != pq.read_table(embeddings, columns=["id"])["id"].to_pylist():
            raise ValueError(f"{embeddings} does not hold the records of {', '.join(map(str, parts))} in order")
        own = np.ones(shard_t.num_rows, bool)
        own[read_dups(embeddings)["row"]] = False  # duplicates: not computed in this shard
        rows = sample(shard_t, own, options)
        stored = dict(zip(rows, take_rows(embeddings, "embedding", rows)))
    rows = sorted(stored)
    opts = options.spot_check
    if not rows:  # an empty shard (fewer records than shards)
        write_tsv(out, HEADER, [])
        write_json(Path(out).with_suffix(".json"), {"checked": 0, "failed": 0})
        return {"checked": 0, "failed": 0}
    if measured is None:
        loaded = model if isinstance(model, LoadedModel) else load_model(model, options.model_dir)
        with contextlib.ExitStack() as stack:
            if embedder is None:
                dev = stack.enter_context(acquire_device(options.embedding.lock_dir, options.embedding.device))
                embedder = Embedder(loaded, dev, compute_dtype(dev, options.embedding.dtype), options.embedding.attention)
            measured = measure(embedder, shard_t, rows, options)
    if measured.rows != rows:
        raise ValueError(f"the spot-check of {embeddings} measured rows {measured.rows[:5]}... but its writer stored {rows[:5]}...")
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
               "packed_dtype": read_metadata(embeddings).get("compute_dtype"), **down}
    write_json(Path(out).with_suffix(".json"), summary)
    if failed:
        msg = f"spot-check of {embeddings}: {len(failed)} of {len(out_rows)} sequences below threshold " + ", ".join(
            f"{r[0]} (length {r[1]}, pooled {r[2]}, min residue {r[4]})" for r in failed[:10])
        if opts.on_fail == "error":
            raise RuntimeError(msg)
        log.warning(msg)
    log.info("spot-check: %s", json.dumps(summary))
    return summary

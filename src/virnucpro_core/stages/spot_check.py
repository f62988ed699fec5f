"""Stage 3, on its own (``python -m virnucpro_core spot-check``): re-embed a length-stratified sample of a
shard's written embeddings unpacked and compare (:mod:`..engine.sample_check`). In the workflow the embed job
runs the same check on its own engine; this stage reads everything back from the files.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from ..engine import sample_check
from ..engine.embedder import build_embedder
from ..io.duplicates import read_dups
from ..io.part_files import Shard, sequence_lengths
from ..io.tables import read_metadata, take_rows
from ..models.loader import LoadedModel, load_model
from ..options import Options
from ..run.devices import acquire_device


def run(parts: list[str | Path], embeddings: str | Path, model: str | LoadedModel, out: str | Path, options: Options) -> dict:
    """Check the shard's embeddings file ``embeddings`` (rows of ``parts``, in order) against ``model``; write the
    per-record table to ``out`` (TSV) and a summary beside it (``.json``); raise (``on_fail: error``) or warn
    when a record is below the thresholds."""
    shard_t = Shard(parts).table
    if shard_t["id"].to_pylist() != pq.read_table(embeddings, columns=["id"])["id"].to_pylist():
        raise ValueError(f"{embeddings} does not hold the records of {', '.join(map(str, parts))} in order")
    own = np.ones(shard_t.num_rows, bool)
    own[read_dups(embeddings)["row"]] = False  # duplicates: not computed in this shard
    rows = sample_check.sample(sequence_lengths(shard_t), own, options) if shard_t.num_rows else []
    stored = dict(zip(rows, take_rows(embeddings, "embedding", rows))) if rows else {}
    measured = None
    if rows:  # none in an empty shard (fewer records than shards)
        loaded = model if isinstance(model, LoadedModel) else load_model(model, options.model_dir)
        with acquire_device(options.embedding.lock_dir, options.embedding.device) as dev:
            embedder = build_embedder(loaded, dev, options)
            measured = sample_check.measure(embedder, shard_t, rows, options)
    return sample_check.check(measured, stored, out, options, str(embeddings), read_metadata(embeddings).get("compute_dtype"))

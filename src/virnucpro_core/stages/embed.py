"""Stage 3: packed ESM-2 embeddings of one shard, following its plan, on one GPU (or the CPU)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from .. import __version__
from ..devices import acquire_device
from ..embed import Embedder, Outputs
from ..files import write_table
from ..model import LoadedModel, load_model
from ..options import Options
from ..packing import load_plan
from ..parquet import embeddings_table
from .shard import BOOKKEEPING, NUCLEOTIDE_COLUMNS, sequence_lengths

log = logging.getLogger(__name__)


def compute_dtype(device: str, dtype: str) -> str:
    """The CPU computes in float32 whatever the configured GPU dtype."""
    if device == "cpu" and dtype != "float32":
        log.info("on the CPU: computing in float32 instead of %s", dtype)
        return "float32"
    return dtype


def run(shard: str | Path, plan: str | Path, model: str | LoadedModel, out: str | Path, options: Options) -> dict:
    """Write the shard's embeddings Parquet: ``id``, ``length``, the embedding columns, and the
    shard's bookkeeping columns for the merge."""
    opts = options.embedding
    shard_t = pq.read_table(shard)
    sequences = shard_t["sequence"].to_pylist()
    the_plan = load_plan(plan)
    if the_plan.n_records != len(sequences):
        raise ValueError(f"{plan} plans {the_plan.n_records} records but {shard} has {len(sequences)}")
    loaded = model if isinstance(model, LoadedModel) else load_model(model, options.model_dir)
    with acquire_device(opts.lock_dir, opts.device) as dev:
        dtype = compute_dtype(dev, opts.dtype)
        embedder = Embedder(loaded, dev, dtype, opts.attention)
        outputs = Outputs.resolve(loaded.num_layers, opts)
        log.info(
            "embedding %d records (%d packs of <= %d tokens) with %s on %s, %s, attention %s",
            len(sequences), len(the_plan.packs), the_plan.budget, loaded.name, dev, dtype, embedder.backend,
        )
        result = embedder.embed(sequences, the_plan, outputs, ids=shard_t["id"].to_pylist())
    np_dtype = {"float32": np.float32, "float16": np.float16}[opts.output_dtype]
    columns: dict = {c: v.astype(np_dtype) for c, v in result.pooled.items()}
    columns.update({c: [a.astype(np_dtype) for a in v] for c, v in result.per_residue.items()})
    meta = provenance(loaded, outputs, dtype, opts.output_dtype, result.stats)
    table = embeddings_table(shard_t["id"].to_pylist(), sequence_lengths(shard_t), columns, meta)
    for col in BOOKKEEPING + [c for c in NUCLEOTIDE_COLUMNS if c in shard_t.column_names]:
        table = table.append_column(col, shard_t[col])
    write_table(table, out)
    log.info("done: %s", json.dumps(result.stats))
    return result.stats


def provenance(loaded: LoadedModel, outputs: Outputs, dtype: str, output_dtype: str, stats: dict | None = None) -> dict:
    return {
        "model": loaded.name,
        "checkpoint": loaded.source,
        "checkpoint_sha256": loaded.sha256,
        "num_layers": loaded.num_layers,
        "embed_dim": loaded.embed_dim,
        "columns": [{"name": c, "layer": l, "pooling": p} for c, l, p in outputs.columns(loaded.num_layers)],
        "per_residue_layers": list(outputs.per_residue_layers),
        "compute_dtype": dtype,
        "output_dtype": output_dtype,
        "virnucpro_core": __version__,
        "torch": torch.__version__,
        **({"run": stats} if stats else {}),
    }

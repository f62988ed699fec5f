"""Stage 2: the packing plan of one shard (first-fit-decreasing packs under the token budget)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..files import write_json
from ..options import Options
from ..packing import build_plan, save_plan
from ..resources import chunk_tokens
from .shard import sequence_lengths

log = logging.getLogger(__name__)


def run(shard: str | Path, out: str | Path, stats_out: str | Path | None, options: Options) -> dict:
    """Write the plan (Parquet, one row per item) to ``out`` and its statistics to ``stats_out``."""
    f = pq.ParquetFile(shard)  # lengths a row group at a time: the sequences are never all in memory
    lengths = np.concatenate([sequence_lengths(pa.table(b)) for b in f.iter_batches(columns=["sequence"])] or [np.zeros(0, np.int64)])
    long = options.long_sequences
    plan = build_plan(lengths, options.packing.token_budget, long.policy, long.overlap, long.max_residues,
                      chunk_tokens=chunk_tokens(options))
    save_plan(plan, out)
    if stats_out:
        write_json(stats_out, plan.stats)
    log.info("plan: %s", json.dumps(plan.stats))
    return plan.stats

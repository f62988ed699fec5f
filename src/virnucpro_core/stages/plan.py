"""Stage 2: the packing plan of one shard (first-fit-decreasing packs under the token budget)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pyarrow.parquet as pq

from ..files import write_json
from ..options import Options
from ..packing import build_plan, save_plan
from .shard import sequence_lengths

log = logging.getLogger(__name__)


def run(shard: str | Path, out: str | Path, stats_out: str | Path | None, options: Options) -> dict:
    """Write the plan (Parquet, one row per item) to ``out`` and its statistics to ``stats_out``."""
    lengths = sequence_lengths(pq.read_table(shard, columns=["sequence"]))
    long = options.long_sequences
    plan = build_plan(lengths, options.packing.token_budget, long.policy, long.overlap)
    save_plan(plan, out)
    if stats_out:
        write_json(stats_out, plan.stats)
    log.info("plan: %s", json.dumps(plan.stats))
    return plan.stats

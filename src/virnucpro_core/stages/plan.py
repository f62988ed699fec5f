"""The packing plan of one shard (next-fit-decreasing packs under the token budget), on its own: the embed
stage plans its shard itself (a fraction of a second); this writes the same plan for a look at it, or for
``embed --plan``."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from ..io.files import write_json
from ..options import Options
from ..engine.packing import build_plan, save_plan
from ..run.memory import chunk_tokens
from ..io.part_files import Shard, sequence_lengths
from ..models.resolve import resolve

log = logging.getLogger(__name__)


def run(parts: list[str | Path], out: str | Path, stats_out: str | Path | None, options: Options,
        model: str | None = None) -> dict:
    """Write the plan of the shard made of ``parts`` (Parquet, one row per item) to ``out``, its statistics to
    ``stats_out``. Every row is planned (the embed stage leaves out duplicates of earlier rows). ``model`` (a spec)
    sets the token budget when ``packing.token_budget`` is null, as the embed stage does."""
    width = 0  # the model's, only when the budget is by the model
    if options.packing.token_budget is None:
        if model is None:
            raise ValueError("packing.token_budget is null (by the model): name the model, or set packing.token_budget")
        width = resolve(model, options.model_dir).shape()[1]
    budget = options.packing.budget(width)
    lengths = sequence_lengths(Shard(parts).table)
    long = options.long_sequences
    plan = build_plan(lengths, budget, long.policy, long.overlap, long.max_residues, chunk_tokens=chunk_tokens(options))
    save_plan(plan, out)
    if stats_out:
        write_json(stats_out, plan.stats)
    log.info("plan: %s", json.dumps(plan.stats))
    return plan.stats

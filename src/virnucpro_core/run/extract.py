"""``virnucpro extract MODEL FASTA OUTDIR``: the whole pipeline in one process, as fair-esm's
``esm-extract`` is one command. The stages and folder layout are the workflow's, so the outputs
(``OUTDIR/embeddings.parquet``, ``skipped.tsv``, ``spot_check.tsv``, ``summary.json``) are too;
the model is loaded once for every shard."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from .layout import Layout
from ..models.loader import load_model
from ..options import Options
from .progress import Bar
from ..stages import embed, merge, shard

log = logging.getLogger(__name__)

INCLUDE = ("mean", "per_tok", "bos")


def esm_extract_options(options: Options, repr_layers: list[int] | None, include: list[str] | None,
                        truncation_seq_length: int | None, toks_per_batch: int | None, nogpu: bool) -> Options:
    """esm-extract's flags, where given, as options: ``--repr_layers`` pooled layers (and per-residue
    ones with ``per_tok``), ``--include mean per_tok bos``, ``--truncation_seq_length``,
    ``--toks_per_batch`` (a pack's token budget here), ``--nogpu``."""
    changes: dict = {}
    if repr_layers:
        changes["embedding.layers"] = tuple(repr_layers)
    if include:
        unknown = sorted(set(include) - set(INCLUDE))
        if unknown:
            raise ValueError(f"--include {' '.join(unknown)}: not supported (one or more of {', '.join(INCLUDE)})")
        changes["embedding.poolings"] = tuple(p for p in ("mean", "bos") if p in include) or ("mean",)
        if "per_tok" in include:
            changes["embedding.per_residue_layers"] = tuple(repr_layers or options.embedding.layers)
    if truncation_seq_length:
        changes["long_sequences.max_residues"] = truncation_seq_length
    if toks_per_batch:
        changes["packing.token_budget"] = toks_per_batch
    if nogpu:
        changes["embedding.device"] = "cpu"
    return options.replace(**changes)


def extract(model: str, fastas: list[str], outdir: str | Path, options: Options) -> dict:
    out = Layout(str(outdir))
    options = options.replace(outdir=str(outdir))
    man = shard.run(fastas, out.shards, options, jobs=min(8, os.cpu_count() or 1))
    loaded = load_model(model, options.model_dir)
    embeddings, checks, done = [], [], []
    parts_of = {p["name"]: p for p in man["parts"]}
    rows = {p: json.loads(Path(out.part(p, "manifest")).read_text()) for p in parts_of}
    bar = Bar({s["name"]: sum(rows[p]["residues"] + 2 * rows[p]["rows"] for p in s["parts"]) for s in man["shards"]})
    try:
        for s in man["shards"]:
            name, parts = s["name"], [out.part(p) for p in s["parts"]]
            embed.run(parts, loaded, out.shard_embeddings(name), options, earlier=done, plan_out=out.plan(name),
                      dups_out=out.shard_dups(name), stats_out=out.shard_stats(name), spot_check=out.spot_check(name),
                      progress=bar.start(name))
            embeddings.append(out.shard_embeddings(name))
            checks.append(out.spot_check(name))
            done = done + [out.part(p, "keys") for p in s["parts"]]
    finally:
        bar.close()
    summary = merge.run(out.manifest, out.shard_skipped, embeddings, checks, outdir, options)
    for name in (s["name"] for s in man["shards"]):  # one copy of the embeddings: the merged one
        for p in (out.shard_embeddings(name), out.shard_dups(name)):
            Path(p).unlink(missing_ok=True)
    log.info("%d of %d records embedded into %s (%d shards, %d rows filled from a duplicate)", summary["embedded_input_records"],
             summary["records_in"], out.embeddings, len(man["shards"]), summary["filled_from_duplicates"])
    return summary

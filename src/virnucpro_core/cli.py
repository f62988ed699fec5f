"""Entry points: ``python -m virnucpro_core <stage> ...`` (also the ``virnucpro`` script), and
:func:`job`, which runs a Snakemake rule's stage from ``workflow/scripts/stage.py``.

Each stage's options are flags named like the config keys (``--embedding.dtype float32``), built
from :mod:`.options`; ``--config FILE`` reads a YAML or JSON file of the same form (e.g.
``config/config.yaml``), and flags override it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Callable

import yaml

from . import __version__
from .options import PATH_KEYS, Options, leaves
from .run import claim
from .run.parts import Part
from .run.progress import JobProgress
from .schema import markdown_table, schema_yaml

log = logging.getLogger("virnucpro_core")

# the option keys (and sections) each stage reads
STAGE_OPTIONS = {
    "shard": ("on_invalid", "input_type", "shards", "input_parts", "residues_per_shard", "nucleotide", "long_sequences"),
    "plan": ("model_dir", "packing", "long_sequences", "embedding"),
    "embed": ("model_dir", "embedding", "long_sequences", "spot_check"),
    "spot-check": ("model_dir", "embedding", "long_sequences", "spot_check"),
    "merge": ("merge",),
    "extract": ("model_dir", "on_invalid", "input_type", "shards", "input_parts", "residues_per_shard", "nucleotide",
                "long_sequences", "packing", "embedding", "spot_check", "merge"),
}


def _add_options(p: argparse.ArgumentParser, stage: str) -> None:
    p.add_argument("--config", help="YAML or JSON file of options, as config/config.yaml (flags override it)")
    for key, f, _ in leaves():
        if key.split(".")[0] in STAGE_OPTIONS[stage] and not f.metadata["job_resource"]:
            choices = f"; one of {', '.join(f.metadata['choices'])}" if f.metadata["choices"] else ""
            p.add_argument(f"--{key}", dest=key, default=argparse.SUPPRESS, metavar="VALUE",
                           help=f"{f.metadata['doc']}{choices} (default: {json.dumps(f.default)})")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="virnucpro_core", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=__version__)
    sub = p.add_subparsers(dest="stage", required=True)

    s = sub.add_parser("shard", help="validate FASTA inputs and write the records to embed, in parts (byte ranges) read at once")
    s.add_argument("inputs", nargs="+")
    s.add_argument("--out", required=True, help="folder for the parts (part_NNNNN.*), skipped.tsv and manifest.json")
    s.add_argument("--jobs", type=int, default=1, help="parts read at once, one process each (default 1)")
    _add_options(s, "shard")

    s = sub.add_parser("plan", help="next-fit-decreasing packing plan of one shard (the embed stage plans its own)")
    s.add_argument("parts", nargs="+", metavar="PART", help="the shard's parts (part_NNNNN.parquet), in order")
    s.add_argument("--out", required=True)
    s.add_argument("--stats")
    s.add_argument("--model", help="the model (as for embed): sets the token budget when packing.token_budget is null")
    _add_options(s, "plan")

    s = sub.add_parser("embed", help="packed ESM-2 embeddings of one shard")
    s.add_argument("parts", nargs="+", metavar="PART", help="the shard's parts (part_NNNNN.parquet), in order")
    s.add_argument("--plan", help="follow this plan (default: plan here, leaving out duplicates of earlier rows)")
    s.add_argument("--earlier", nargs="*", default=[], metavar="KEYS",
                   help="the keys files (part_NNNNN.keys.npy) of the parts before this shard, for de-duplication")
    s.add_argument("--model", required=True, help=PATH_KEYS["model"]["doc"])
    s.add_argument("--out", required=True)
    s.add_argument("--dups", help="write the duplicate rows (for the merge) to this .npy")
    s.add_argument("--spot-check", help="also spot-check the shard in this job, writing this TSV (and its .json)")
    _add_options(s, "embed")

    s = sub.add_parser("spot-check", help="compare a sample of a shard with the unpacked model")
    s.add_argument("parts", nargs="+", metavar="PART", help="the shard's parts (part_NNNNN.parquet), in order")
    s.add_argument("--embeddings", required=True)
    s.add_argument("--model", required=True, help=PATH_KEYS["model"]["doc"])
    s.add_argument("--out", required=True)
    _add_options(s, "spot-check")

    s = sub.add_parser("merge", help="merge shard embeddings into one Parquet (or a dataset folder), with accounting")
    s.add_argument("--shard-dir", required=True, help="the shard stage's folder (manifest.json, skipped.tsv, the parts)")
    s.add_argument("--embeddings", nargs="+", required=True)
    s.add_argument("--spot-checks", nargs="*", default=[])
    s.add_argument("--out", required=True)
    _add_options(s, "merge")

    s = sub.add_parser("extract", help="the whole pipeline in one process, like fair-esm's esm-extract",
                       description="MODEL FASTA... OUTDIR: embeddings of every record in OUTDIR/embeddings.parquet (with "
                                   "skipped.tsv, spot_check.tsv and summary.json), as the workflow writes them. esm-extract's "
                                   "flags are accepted with - or _; every option of config/config.yaml is a flag too.")
    s.add_argument("model", help=PATH_KEYS["model"]["doc"])
    s.add_argument("fasta", nargs="+", help="FASTA file(s), plain or gzip")
    s.add_argument("out_dir", metavar="OUTDIR")
    s.add_argument("--repr-layers", "--repr_layers", type=int, nargs="+", help="layers, negative from the end (default: -1)")
    s.add_argument("--include", nargs="+", help="mean, per_tok and/or bos (default: mean)")
    s.add_argument("--truncation-seq-length", "--truncation_seq_length", type=int, help="residues kept (default: 1022)")
    s.add_argument("--toks-per-batch", "--toks_per_batch", type=int, help="tokens per pack (default 65536; at least 1024)")
    s.add_argument("--nogpu", action="store_true", help="compute on the CPU")
    _add_options(s, "extract")

    s = sub.add_parser("status", help="how far a run is: per stage done / running / waiting, tokens, rate, ETA, failures",
                       description="Reads what the run writes under OUTDIR (also a run on a cluster, from the login node).")
    s.add_argument("outdir", metavar="OUTDIR")

    s = sub.add_parser("report", help="figures and tables of a finished run, for snakemake --report")
    s.add_argument("--outdir", required=True, help="the run's outdir")
    s.add_argument("--config", help="the run's configuration (YAML or JSON), recorded in the provenance table")

    s = sub.add_parser("fetch-model", help="download a fair-esm ESM-2 release once")
    s.add_argument("name")
    s.add_argument("--model-dir", default=Options().model_dir)

    s = sub.add_parser("random-model", help="write a random-weight ESM-2 checkpoint (tests, benchmarks)")
    s.add_argument("out")
    s.add_argument("--layers", type=int, default=2)
    s.add_argument("--dim", type=int, default=64)
    s.add_argument("--heads", type=int, default=4)
    s.add_argument("--seed", type=int, default=0)

    s = sub.add_parser("options", help="print every option with its default (YAML), the config schema or the options table")
    g = s.add_mutually_exclusive_group()
    g.add_argument("--schema", action="store_true", help="workflow/schemas/config.schema.yaml")
    g.add_argument("--markdown", action="store_true", help="the table of config/README.md")
    return p


def _read_config(path: str | None) -> dict:
    return (yaml.safe_load(Path(path).read_text()) or {}) if path else {}


def options_from_args(args: argparse.Namespace) -> Options:
    """``--config`` file, then the option flags given (dotted keys) on top."""
    keys = {k for k, _, _ in leaves()}
    flags = {k: v for k, v in vars(args).items() if k in keys}
    return Options.from_dict(_read_config(args.config), ignore=tuple(PATH_KEYS)).replace(**flags)


def _run(stage: str, fn: Callable[[], Any]) -> int:
    """Run a stage; a bad input, checkpoint or option (FastaError and CheckpointError are ValueErrors),
    a failed check or a full disk ends it with one line naming it."""
    log.info("virnucpro_core %s: %s", __version__, stage)
    try:
        fn()
    except (ValueError, RuntimeError, OSError) as exc:
        log.error("%s", exc)
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def _logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr, force=True)


# every stage's function, named once: the command line (main) and the rules (job) both call through here
STAGES = {
    "shard": "stages.shard:run", "shard-part": "stages.shard:run_part", "shard-index": "stages.shard:index",
    "plan": "stages.plan:run", "embed": "stages.embed:run", "spot-check": "stages.spot_check:run",
    "merge": "stages.merge:run", "report": "stages.report:write_report_files", "extract": "run.extract:extract",
    "fetch-model": "models.loader:fetch_model", "convert": "models.huggingface:convert",
}


def stage(name: str) -> Callable[..., Any]:
    """The function of stage ``name``, imported when asked for (torch only where a stage needs it)."""
    import importlib

    module, fn = STAGES[name].split(":")
    return getattr(importlib.import_module(f".{module}", __package__), fn)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.stage == "options":
        print(schema_yaml() if args.schema else markdown_table() if args.markdown else
              yaml.safe_dump(Options().to_dict(), sort_keys=False), end="")
        return 0
    if args.stage == "status":
        from .run.progress import report, snapshot

        if not Path(args.outdir).is_dir():
            print(f"error: {args.outdir}: no such folder", file=sys.stderr)
            return 1
        st = snapshot(args.outdir)
        print(report(st))
        return 0 if st.state != "failed" else 1
    if args.stage == "random-model":
        import torch

        from .models.loader import build_esm2, save_checkpoint

        torch.manual_seed(args.seed)
        save_checkpoint(build_esm2(args.layers, args.dim, args.heads), args.out)
        return 0
    _logging()
    name = args.stage
    if name == "fetch-model":
        return _run(name, lambda: print(stage(name)(args.name, args.model_dir)))
    if name == "report":
        return _run(name, lambda: stage(name)(args.outdir, _read_config(args.config) or None))
    options = options_from_args(args)
    if name == "extract":
        from .run.extract import esm_extract_options

        return _run(name, lambda: stage(name)(args.model, args.fasta, args.out_dir, esm_extract_options(
            options, args.repr_layers, args.include, args.truncation_seq_length, args.toks_per_batch, args.nogpu)))
    pos, kw = {
        "shard": lambda: ((args.inputs, args.out, options, args.jobs), {}),
        "plan": lambda: ((args.parts, args.out, args.stats, options), {"model": args.model}),
        "embed": lambda: ((args.parts, args.model, args.out, options),
                          {"earlier": args.earlier, "plan": args.plan, "dups_out": args.dups, "spot_check": args.spot_check}),
        "spot-check": lambda: ((args.parts, args.embeddings, args.model, args.out, options), {}),
        "merge": lambda: ((Path(args.shard_dir) / "manifest.json", Path(args.shard_dir) / "skipped.tsv", args.embeddings,
                           args.spot_checks, args.out, options), {}),
    }[name]()
    return _run(name, lambda: stage(name)(*pos, **kw))


# ------------------------------------------------------------------ Snakemake's script: directive
def job(smk: Any) -> None:
    """Run the stage of the Snakemake rule ``smk.rule`` (the ``snakemake`` object of a ``script:``).

    Paths and options arrive as data, never through a shell. Everything the job prints, Python
    or not, goes to the rule's log, as ``> {log} 2>&1`` would send it."""
    fd = os.open(smk.log[0], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    sys.stdout = os.fdopen(1, "w", buffering=1, closefd=False)
    sys.stderr = os.fdopen(2, "w", buffering=1, closefd=False)
    _logging()
    config = dict(smk.config)
    options = Options.from_dict(config, ignore=tuple(PATH_KEYS))
    i, o, params = smk.input, smk.output, smk.params
    rule_stage = {"shard": "shard-part", "shard_index": "shard-index", "embed_shard": "embed", "merge": "merge",
                  "report_figures": "report", "convert_hf_model": "convert", "fetch_model": "fetch-model"}
    if smk.rule not in rule_stage:
        raise ValueError(f"no stage for rule {smk.rule!r}")
    name = rule_stage[smk.rule]
    args = {
        "shard-part": lambda: ((Part(**params.part), Path(o.rows).parent, options), {}),
        "shard-index": lambda: (([Part(**p) for p in params.parts], Path(o.manifest).parent, options),
                                {"inputs": list(params.inputs)}),
        "embed": lambda: ((list(i.parts), i.model, o.embeddings, options),
                          {"earlier": list(i.earlier), "plan_out": o.plan, "dups_out": o.dups, "stats_out": o.stats,
                           "spot_check": o.spot_check, "progress": JobProgress(params.progress, smk.wildcards.shard)}),
        "merge": lambda: ((i.manifest, i.skipped, list(i.embeddings), list(i.spot_checks), options.outdir, options), {}),
        "report": lambda: ((options.outdir, config), {}),
        "convert": lambda: ((Path(i.config).parent, o[0]), {}),
        "fetch-model": lambda: ((smk.wildcards.name, options.model_dir), {}),
    }[name]
    pos, kw = args()
    work = lambda: stage(name)(*pos, **kw)  # noqa: E731

    def checked():
        run_id = os.environ.get(claim.ENV)
        if run_id:  # started by the workflow: the outdir must still be this run's
            claim.check(options.outdir, run_id)
        work()

    rc = _run(name, checked)
    # every output is closed and renamed by now: end without the interpreter's teardown (torch's CUDA
    # context and finalisers, about a second on a GPU node, between the last embed job and the merge)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)

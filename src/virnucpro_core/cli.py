"""Command line: ``python -m virnucpro_core <stage> ...`` (also the ``virnucpro`` script)."""

from __future__ import annotations

import argparse
import logging
import sys

from . import __version__


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


def _strs(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="virnucpro_core", description=__doc__)
    p.add_argument("--version", action="version", version=__version__)
    sub = p.add_subparsers(dest="stage", required=True)

    s = sub.add_parser("shard", help="validate FASTA inputs and cut them into residue-balanced shards")
    s.add_argument("inputs", nargs="+")
    s.add_argument("--outdir", required=True)
    g = s.add_mutually_exclusive_group()
    g.add_argument("--shards", type=int)
    g.add_argument("--residues-per-shard", type=int)
    s.add_argument("--on-invalid", choices=["error", "skip"], default="error")
    s.add_argument("--input-type", choices=["protein", "nucleotide"], default="protein")
    s.add_argument("--window", type=int, default=300, help="nucleotide window (bp)")
    s.add_argument("--step", type=int, help="nucleotide window step (bp; default: the window)")
    s.add_argument("--frames", choices=["six", "forward", "longest_orf"], default="six")
    s.add_argument("--genetic-code", type=int, default=11, help="NCBI translation table id")
    s.add_argument("--stops", choices=["truncate", "split", "keep_x"], default="truncate")
    s.add_argument("--min-protein-length", type=int, default=20)

    s = sub.add_parser("plan", help="first-fit-decreasing packing plan for one shard")
    s.add_argument("shard")
    s.add_argument("--out", required=True)
    s.add_argument("--stats")
    s.add_argument("--budget", type=int, default=16384, help="tokens per pack")
    s.add_argument("--long-policy", choices=["truncate", "split"], default="truncate")
    s.add_argument("--overlap", type=int, default=256)

    def model_args(s):
        s.add_argument("--model", required=True, help="fair-esm ESM-2 name or checkpoint path")
        s.add_argument("--model-dir", help="where named models are downloaded (default: torch hub's cache)")
        s.add_argument("--device", default="auto", help="auto, cpu or cuda")
        s.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
        s.add_argument("--lock-dir", default=".gpu-locks")

    s = sub.add_parser("embed", help="packed ESM-2 embeddings of one shard")
    s.add_argument("shard")
    s.add_argument("--plan", required=True)
    s.add_argument("--out", required=True)
    model_args(s)
    s.add_argument("--backend", default="auto", choices=["auto", "flash_attn", "torch_varlen", "reference"])
    s.add_argument("--layers", type=_ints, default=(-1,))
    s.add_argument("--poolings", type=_strs, default=("mean",))
    s.add_argument("--per-residue-layers", type=_ints, default=())
    s.add_argument("--output-dtype", choices=["float32", "float16"], default="float32")

    s = sub.add_parser("spot-check", help="compare a sample of a shard with the unpacked model")
    s.add_argument("shard")
    s.add_argument("--embeddings", required=True)
    s.add_argument("--out", required=True)
    model_args(s)
    s.add_argument("--sample", type=int, default=16)
    s.add_argument("--long-policy", choices=["truncate", "split"], default="truncate")
    s.add_argument("--overlap", type=int, default=256)
    s.add_argument("--pooled-threshold", type=float)
    s.add_argument("--residue-threshold", type=float)
    s.add_argument("--on-fail", choices=["error", "warn"], default="error")

    s = sub.add_parser("merge", help="merge shard embeddings into one Parquet, with accounting")
    s.add_argument("--manifest", required=True)
    s.add_argument("--skipped", required=True)
    s.add_argument("--embeddings", nargs="+", required=True)
    s.add_argument("--spot-checks", nargs="*", default=[])
    s.add_argument("--outdir", required=True)

    s = sub.add_parser("report", help="figures and tables of a finished run, for snakemake --report")
    s.add_argument("--outdir", required=True, help="the run's outdir")
    s.add_argument("--figdir", required=True)
    s.add_argument("--config-json", help="the run's configuration, recorded in the provenance table")

    s = sub.add_parser("fetch-model", help="download a fair-esm ESM-2 release once")
    s.add_argument("name")
    s.add_argument("--model-dir")

    s = sub.add_parser("random-model", help="write a random-weight ESM-2 checkpoint (tests, benchmarks)")
    s.add_argument("out")
    s.add_argument("--layers", type=int, default=2)
    s.add_argument("--dim", type=int, default=64)
    s.add_argument("--heads", type=int, default=4)
    s.add_argument("--seed", type=int, default=0)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("virnucpro_core").info("virnucpro_core %s: %s", __version__, args.stage)
    from . import stages
    from .fasta import FastaError
    from .model import CheckpointError

    try:
        if args.stage == "shard":
            nucleotide = None
            if args.input_type == "nucleotide":
                nucleotide = {"window": args.window, "step": args.step, "frames": args.frames, "table": args.genetic_code,
                              "stops": args.stops, "min_protein_length": args.min_protein_length}
            stages.shard_stage(args.inputs, args.outdir, args.shards, args.residues_per_shard, args.on_invalid, nucleotide)
        elif args.stage == "plan":
            stages.plan_stage(args.shard, args.out, args.budget, args.long_policy, args.overlap, args.stats)
        elif args.stage == "embed":
            stages.embed_stage(
                args.shard, args.plan, args.model, args.out, args.device, args.dtype, args.backend, args.layers,
                args.poolings, args.per_residue_layers, args.output_dtype, args.lock_dir, args.model_dir,
            )
        elif args.stage == "spot-check":
            stages.spot_check_stage(
                args.shard, args.embeddings, args.model, args.out, args.sample, args.device, args.dtype, args.long_policy,
                args.overlap, args.pooled_threshold, args.residue_threshold, args.on_fail, args.lock_dir, args.model_dir,
            )
        elif args.stage == "merge":
            stages.merge_stage(args.manifest, args.skipped, args.embeddings, args.spot_checks, args.outdir)
        elif args.stage == "report":
            import json

            from .report import write_report_files

            write_report_files(args.outdir, args.figdir, json.loads(args.config_json) if args.config_json else None)
        elif args.stage == "fetch-model":
            from .model import fetch_model

            print(fetch_model(args.name, args.model_dir))
        elif args.stage == "random-model":
            import torch

            from .model import build_esm2, save_checkpoint

            torch.manual_seed(args.seed)
            save_checkpoint(build_esm2(args.layers, args.dim, args.heads), args.out)
    except (FastaError, CheckpointError, ValueError, RuntimeError) as exc:
        logging.getLogger("virnucpro_core").error("%s", exc)
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0

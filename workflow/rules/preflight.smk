# Before the config file is read (Snakemake's own first lines): a model given on the command line that
# names nothing usable (e.g. a named model neither here nor downloadable) stops the run in one line.
# common.smk resolves the model of the merged config with the same function.
import os
import sys

sys.path.insert(0, os.path.join(workflow.basedir, "src"))
from virnucpro_core.models.checkpoint import CheckpointError
from virnucpro_core.models.resolve import resolve
from virnucpro_core.options import Options

if isinstance(config.get("model"), str):
    try:
        resolve(config["model"], config.get("model_dir") or Options().model_dir)
    except CheckpointError as exc:
        print(f"virnucpro: {exc}", file=sys.stderr)
        sys.exit(1)

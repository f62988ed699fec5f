# Before the config file is read (Snakemake's own first lines): a named model given on the command
# line that is neither here nor downloadable stops the run in one line. common.smk checks the same
# for a model named in config/config.yaml.
import os
import sys

sys.path.insert(0, os.path.join(workflow.basedir, "src"))
from virnucpro_core.models.checkpoint import named_model_problem
from virnucpro_core.options import Options

if isinstance(config.get("model"), str):
    problem = named_model_problem(
        config["model"], config.get("model_dir") or Options().model_dir
    )
    if problem:
        print(f"virnucpro: {problem}", file=sys.stderr)
        sys.exit(1)

import glob
import json
import os

import yaml
from snakemake.utils import validate


def typed(value):
    """--config parses nested values as strings ({sample: 8} gives '8'): type them as YAML."""
    if isinstance(value, dict):
        return {k: typed(v) for k, v in value.items()}
    if isinstance(value, list):
        return [typed(v) for v in value]
    return yaml.safe_load(value) if isinstance(value, str) and value else value


for key in ("nucleotide", "long_sequences", "packing", "embedding", "spot_check"):
    if key in config:
        config[key] = typed(config[key])

validate(config, "../schemas/config.schema.yaml")

OUT = config["outdir"]
ESM2_NAMES = {
    "esm2_t6_8M_UR50D",
    "esm2_t12_35M_UR50D",
    "esm2_t30_150M_UR50D",
    "esm2_t33_650M_UR50D",
    "esm2_t36_3B_UR50D",
    "esm2_t48_15B_UR50D",
}


wildcard_constraints:
    shard=r"shard_\d{4}",


def input_fastas():
    """The FASTA inputs: a path, a glob or a list of them, in the order given."""
    patterns = config["input"]
    if isinstance(patterns, str):
        patterns = [patterns]
    files = []
    for pattern in patterns:
        found = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        if not found:
            raise ValueError(f"config 'input': no file matches {pattern!r}")
        for f in found:
            if not os.path.isfile(f):
                raise ValueError(f"config 'input': {f!r} does not exist")
            files.append(f)
    return files


def model_file(wildcards=None):
    """A named model comes from fetch_model; a checkpoint path is used as is."""
    model = config["model"]
    if model in ESM2_NAMES:
        return f"{config['model_dir']}/{model}.pt"
    if not os.path.isfile(model):
        raise ValueError(
            f"config 'model': {model!r} is neither a fair-esm ESM-2 name "
            f"({', '.join(sorted(ESM2_NAMES))}) nor an existing checkpoint file"
        )
    return model


def shard_names():
    shard_dir = checkpoints.shard_fasta.get().output.shards
    return sorted(glob_wildcards(os.path.join(shard_dir, "{shard}.parquet")).shard)


def shard_embeddings(wildcards):
    return expand(f"{OUT}/embeddings/{{shard}}.parquet", shard=shard_names())


def shard_spot_checks(wildcards):
    return expand(f"{OUT}/spot_check/{{shard}}.tsv", shard=shard_names())


def shard_count_arg():
    if config["residues_per_shard"]:
        return f"--residues-per-shard {config['residues_per_shard']}"
    return f"--shards {config['shards']}"


def translate_args():
    """Options of the nucleotide front end, for nucleotide input."""
    if config["input_type"] != "nucleotide":
        return ""
    nt = config["nucleotide"]
    step = f" --step {nt['step']}" if nt["step"] else ""
    return (
        f"--input-type nucleotide --window {nt['window']}{step} --frames {nt['frames']} "
        f"--genetic-code {nt['genetic_code']} --stops {nt['stops']} "
        f"--min-protein-length {nt['min_protein_length']}"
    )


def csv(values):
    return ",".join(str(v) for v in values)

import glob
import os
import sys

from snakemake.utils import validate

# the options and the folder layout come from the core package (both import nothing heavy)
sys.path.insert(0, os.path.join(workflow.basedir, "src"))
from virnucpro_core.models.checkpoint import CheckpointError
from virnucpro_core.models.huggingface import weights_file
from virnucpro_core.models.resolve import resolve
from virnucpro_core.options import PATH_KEYS, Options, check_for_model
from virnucpro_core.run import claim, memory, parts, progress, summary
from virnucpro_core.run.layout import PART_PATTERN, SHARD_PATTERN, Layout

# types --config values by the options' declarations (nested ones arrive as strings),
# fills in the defaults, and names any unknown key or bad value
config.update(Options.from_dict(config, ignore=tuple(PATH_KEYS)).to_dict())
validate(config, "../schemas/config.schema.yaml")
OPTIONS = Options.from_dict(config, ignore=tuple(PATH_KEYS))
L = Layout(OPTIONS.outdir)
STAGE = "../scripts/stage.py"


wildcard_constraints:
    shard=SHARD_PATTERN,
    part=PART_PATTERN,


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


def gpus_asked():
    """N of --resources gpu=N (None when not given)."""
    gpus = workflow.global_resources.get("gpu")
    gpus = getattr(gpus, "value", gpus)
    return gpus if isinstance(gpus, int) else None


def stop(message):
    """End the run before any job with one line (no traceback)."""
    print(f"virnucpro: {message}", file=sys.stderr)
    sys.exit(1)


def model_source():
    """What config 'model' names (virnucpro_core.models.resolve): a named model's release file, found or
    fetched by fetch_model into model_dir if the network allows; a Hugging Face folder's conversion (made
    once by convert_hf_model); a checkpoint path as is. A spec that names nothing usable stops the run.
    """
    try:
        return resolve(config["model"], OPTIONS.model_dir)
    except CheckpointError as exc:
        stop(str(exc))


def hf_source(wildcards):
    """The Hugging Face folder's config and weights, for convert_hf_model."""
    folder = MODEL.folder
    return {"config": str(folder / "config.json"), "weights": str(weights_file(folder))}


def claim_outdir():
    """One run per outdir (virnucpro_core.run.claim), with the run's plan for `virnucpro status`; jobs, also those
    run elsewhere, inherit the run id. Then the run's progress on the terminal, from the files it writes.
    """
    global REPORTER
    if claim.ENV not in os.environ:
        os.environ[claim.ENV] = claim.claim(OPTIONS.outdir, parts.run_plan(PARTS))
    print(summary.progress_hint(OPTIONS.outdir))
    REPORTER = progress.Reporter(
        OPTIONS.outdir, every_plain=OPTIONS.progress_seconds
    ).start()


REPORTER = None


def summarise(ok):
    """The end of the run, in the terminal: what was done and any warnings, or why it failed."""
    if REPORTER is not None:
        REPORTER.close()
    if ok:
        print(summary.success(OPTIONS.outdir, gpus_asked()))
    else:
        print(summary.failure(OPTIONS.outdir), file=sys.stderr)


MODEL = model_source()
MODEL_FILE = str(MODEL.file)
MODEL_LAYERS, MODEL_DIM, MODEL_MB = MODEL.shape()
# options that depend on the model fail here, before any job
check_for_model(OPTIONS, MODEL_LAYERS)


def embed_mem_mb(wildcards, input):
    shard_mb = sum(os.path.getsize(p) for p in input.parts) / 1e6
    return memory.embed_mb(
        OPTIONS, MODEL_MB, MODEL_DIM, shard_mb, input.size_mb - MODEL_MB - shard_mb
    )


# the input's parts (one shard job each) and shards (consecutive parts, one embed job each), from the
# files' sizes: every job is known when the run starts, so each embed job waits only for its own parts
PARTS = parts.plan_parts(input_fastas(), OPTIONS, gpus_asked())
PART = {p.name: p for p in PARTS}
SHARD = {parts.shard_name(i): group for i, group in enumerate(parts.shards(PARTS))}


def part_spec(wildcards):
    return PART[wildcards.part].to_dict()


def part_input(wildcards):
    return PART[wildcards.part].file


def part_files(what="rows"):
    return [L.part(p.name, what) for p in PARTS]


def shard_parts(wildcards):
    return [L.part(p.name) for p in SHARD[wildcards.shard]]


def earlier_keys(wildcards):
    """With embedding.deduplicate, the sequence keys of the parts before the shard: a row whose sequence they
    hold is not embedded again."""
    if not OPTIONS.embedding.deduplicate:
        return []
    return [L.part(p.name, "keys") for p in PARTS[: SHARD[wildcards.shard][0].index]]


def per_shard(kind):
    """One path per shard, ``kind`` a Layout method (``shard_embeddings``, ``spot_check``...)."""
    return [getattr(L, kind)(name) for name in SHARD]


def merged_embeddings():
    """embeddings.parquet: a file, or with merge.output dataset (auto: more than one shard) a folder of part files."""
    if OPTIONS.merge.layout(len(SHARD)) == "dataset":
        return directory(L.embeddings)
    return L.embeddings

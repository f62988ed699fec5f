"""Every option of the workflow and the stages, with its default, written once.

``config/config.yaml`` sets these keys; ``workflow/schemas/config.schema.yaml`` and the table in
``config/README.md`` are generated from them (:mod:`.schema`), and so is the command line of each
stage; tests fail when any of them disagrees.
``input`` and ``model`` (the two keys without a default) are paths, given to each stage
as arguments, and declared in :data:`PATH_KEYS`.

Importing this module costs nothing: the workflow reads it before any job runs.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml

from .models.resolve import ESM2_MODELS


def opt(
    default: Any,
    doc: str,
    *,
    choices: tuple | None = None,
    minimum: float | None = None,
    maximum: float | None = None,
    job_resource: bool = False,
) -> Any:
    """A field with its documentation and constraints (``job_resource``: read by the workflow's
    ``resources:``, not by a stage)."""
    meta = {
        "doc": doc,
        "choices": choices,
        "minimum": minimum,
        "maximum": maximum,
        "job_resource": job_resource,
    }
    if isinstance(default, (list, dict)):
        raise TypeError("defaults are immutable: use a tuple")
    return field(default=default, metadata=meta)


def section(cls: type, doc: str) -> Any:
    return field(default_factory=cls, metadata={"doc": doc})


class _Checked:
    """Values are type-checked and coerced on construction (a list becomes a tuple, ``"8"`` an
    int)."""

    def __post_init__(self) -> None:
        hints = field_types(type(self))
        for f in dataclasses.fields(self):
            object.__setattr__(
                self, f.name, _value(hints[f.name], f.metadata, getattr(self, f.name), f.name)
            )


@dataclass(frozen=True, kw_only=True)
class NucleotideOptions(_Checked):
    window: int = opt(300, "window length in bp", minimum=3)
    step: int | None = opt(
        None, "bp between window starts; null means the window (no overlap)", minimum=1
    )
    frames: str = opt(
        "six",
        "six, forward (+1..+3) or longest_orf (the longest stop-free stretch of the six)",
        choices=("six", "forward", "longest_orf"),
    )
    genetic_code: int = opt(
        11, "NCBI translation table id (11 bacteria/archaea/plastids and most phages, 1 standard)"
    )
    stops: str = opt(
        "truncate",
        "truncate at the first stop, split at every stop, or keep_x (stops become X)",
        choices=("truncate", "split", "keep_x"),
    )
    min_protein_length: int = opt(20, "shorter translated proteins are dropped", minimum=1)


@dataclass(frozen=True, kw_only=True)
class LongSequenceOptions(_Checked):
    policy: str = opt(
        "truncate",
        "sequences over 1022 residues: truncate (fair-esm) or split into overlapping windows",
        choices=("truncate", "split"),
    )
    max_residues: int = opt(
        1022,
        "residues per window: ESM-2's 1022 (its 1024 tokens less BOS and "
        "EOS), or fewer to truncate "
        "earlier, as esm-extract's --truncation_seq_length",
        minimum=1,
        maximum=1022,
    )
    overlap: int = opt(
        256,
        "residues shared by neighbouring windows with policy split (at most "
        "half a window, so no "
        "residue is embedded more than twice)",
        minimum=0,
        maximum=511,
    )


@dataclass(frozen=True, kw_only=True)
class PackingOptions(_Checked):
    token_budget: int | None = opt(
        None,
        "tokens per pack (BOS and EOS included), at least 1024; null: by the model's width, "
        "131072 up to 1280 dims (650M and smaller), 65536 above (the fastest on an H200)",
        minimum=1024,
    )
    chunk_tokens: int = opt(
        16_000_000,
        "tokens per chunk of a shard: the embed job writes each "
        "chunk as it finishes, "
        "and a killed job redoes at most one (about a minute of an H200 at "
        "650M); with "
        "per_residue_layers at most 262144",
        minimum=1024,
    )

    def budget(self, embed_dim: int) -> int:
        """``token_budget``, or the one for a model ``embed_dim`` wide when it is null."""
        if self.token_budget is not None:
            return self.token_budget
        return 131072 if embed_dim <= 1280 else 65536


@dataclass(frozen=True, kw_only=True)
class EmbeddingOptions(_Checked):
    layers: tuple[int, ...] = opt(
        (-1,),
        "layers for pooled columns (negative counts from the end; "
        "the last layer is always written as `embedding`)",
    )
    poolings: tuple[str, ...] = opt(
        ("mean",),
        "pooled columns per layer: mean over residues (BOS/EOS excluded) and/or the BOS token",
        choices=("mean", "bos"),
        minimum=1,
    )
    per_residue_layers: tuple[int, ...] = opt(
        (), "layers whose per-residue states are also written (large)"
    )
    dtype: str = opt(
        "bfloat16",
        "compute dtype on the GPU (the CPU always computes in float32)",
        choices=("bfloat16", "float16", "float32"),
    )
    output_dtype: str = opt(
        "float32", "stored dtype of the embeddings", choices=("float32", "float16")
    )
    attention: str = opt(
        "auto",
        "attention backend; auto picks flash_attn_3 (FlashAttention-3 on a Hopper GPU in bfloat16, "
        "FlashAttention-2 for packs of short sequences), then flash_attn, then PyTorch varlen, then the reference",
        choices=("auto", "flash_attn_3", "flash_attn", "torch_varlen", "reference"),
    )
    gelu: str = opt(
        "auto",
        "fc1's GELU: auto computes its tanh form in bfloat16 on a GPU (in cuBLAS's matmul epilogue; "
        "its error, at most 4.7e-4, is below bfloat16's rounding) and the exact erf GELU elsewhere; "
        "exact computes fair-esm's erf GELU everywhere",
        choices=("auto", "exact"),
    )
    device: str = opt(
        "auto",
        "auto (a free GPU, else the CPU), cuda (wait for a GPU), or cpu",
        choices=("auto", "cuda", "cpu"),
    )
    lock_dir: str = opt(
        "/tmp/virnucpro-gpu-locks",
        "machine-wide folder of per-GPU lock files, so concurrent jobs never share a GPU",
    )
    mem_mb: int | None = opt(
        None,
        "memory (MB) of each GPU job, for cluster submission; null "
        "derives it from the model, "
        "the shard and the outputs",
        minimum=1,
        job_resource=True,
    )
    runtime: int = opt(
        720, "minutes per GPU job, for cluster submission", minimum=1, job_resource=True
    )
    deduplicate: bool = opt(
        True,
        "identical sequences (after normalisation; for truncate, their "
        "first max_residues) go "
        "through the model once, and every record still gets its own row, "
        "filled from the first",
    )


@dataclass(frozen=True, kw_only=True)
class SpotCheckOptions(_Checked):
    sample: int = opt(
        16, "sequences per shard re-embedded unpacked (the longest always included)", minimum=1
    )
    pooled_cosine: float | None = opt(
        None, "minimum pooled cosine, packed vs unpacked; null takes the default for the dtype"
    )
    min_residue_cosine: float | None = opt(
        None, "minimum per-residue cosine; null takes the default for the dtype"
    )
    on_fail: str = opt(
        "error",
        "a violation: error fails the job naming the records, warn only logs",
        choices=("error", "warn"),
    )


@dataclass(frozen=True, kw_only=True)
class MergeOptions(_Checked):
    output: str = opt(
        "auto",
        "embeddings.parquet as one file, or as a dataset folder of part "
        "files in input order (one "
        "per shard, moved into place without a copy); auto: a file when the run is "
        "one shard, else a dataset. "
        "pandas, pyarrow, polars and duckdb read either as one table",
        choices=("auto", "file", "dataset"),
    )

    def layout(self, shards: int) -> str:
        """``file`` or ``dataset``; auto: a file when the run is one shard (neither then copies a
        byte), else a dataset."""
        return self.output if self.output != "auto" else ("file" if shards == 1 else "dataset")


@dataclass(frozen=True, kw_only=True)
class Options(_Checked):
    """config/config.yaml, less ``input`` and ``model``."""

    outdir: str = opt("results", "folder for everything the run writes")
    model_dir: str = opt(
        "resources/models", "where named models are downloaded to (GPU nodes read them from here)"
    )
    on_invalid: str = opt(
        "error",
        "a bad FASTA record: error stops the run, skip lists it in skipped.tsv",
        choices=("error", "skip"),
    )
    input_type: str = opt(
        "protein",
        "protein FASTA, or nucleotide reads/contigs translated in windows and frames (VirNucPro)",
        choices=("protein", "nucleotide"),
    )
    nucleotide: NucleotideOptions = section(
        NucleotideOptions, "nucleotide input: windows, frames, genetic code, stops"
    )
    shards: int | None = opt(
        None,
        "number of shards (balanced by bytes), one embedding job each; "
        "null cuts them by "
        "residues_per_shard",
        minimum=1,
    )
    input_parts: int | None = opt(
        None,
        "jobs the shard step is cut into (byte ranges of the input "
        "files, read at once); "
        "null: parts of about 8 MB, at most 64 (more if there are more "
        "shards)",
        minimum=1,
    )
    residues_per_shard: int = opt(
        100_000_000,
        "residues per shard when shards is null, estimated "
        "from the input's bytes "
        "(about 6 minutes of an H200 at 650M); with --resources gpu=N a "
        "multiple of N shards",
        minimum=1,
    )
    long_sequences: LongSequenceOptions = section(
        LongSequenceOptions, "sequences over ESM-2's 1022 residues"
    )
    packing: PackingOptions = section(PackingOptions, "packs of sequences for the packed forward")
    embedding: EmbeddingOptions = section(
        EmbeddingOptions, "what is computed and written, and where"
    )
    spot_check: SpotCheckOptions = section(
        SpotCheckOptions, "the per-shard equivalence check against the unpacked model"
    )
    merge: MergeOptions = section(MergeOptions, "the merged output")
    progress_seconds: int = opt(
        60,
        "seconds between the run's progress lines when the output is "
        "not a terminal (a "
        "cluster's log file, nohup); on a terminal one line is kept up to "
        "date",
        minimum=1,
    )

    @classmethod
    def from_dict(cls, data: dict | None, ignore: tuple[str, ...] = ()) -> "Options":
        """Options from a (partial) config dict; strings where another type is declared are read as
        YAML (``--config`` gives nested values as strings). Unknown keys and bad values raise
        ValueError naming the key."""
        return _build(cls, data or {}, "", ignore)

    def to_dict(self) -> dict:
        return plain(dataclasses.asdict(self))

    def replace(self, **changes: Any) -> "Options":
        """A copy with dotted keys changed: ``opts.replace(**{"embedding.dtype": "float32"})``."""
        data = self.to_dict()
        for key, value in changes.items():
            *parents, leaf = key.split(".")
            node = data
            for p in parents:
                node = node[p]
            node[leaf] = value
        return Options.from_dict(data)


# The workflow's keys without a default, given to the stages as paths.
PATH_KEYS = {
    "input": {
        "doc": "FASTA file(s), plain or gzip; a path, a glob, or a list of them",
        "schema": {
            "oneOf": [
                {"type": "string", "minLength": 1},
                {"type": "array", "minItems": 1, "items": {"type": "string", "minLength": 1}},
            ]
        },
    },
    "model": {
        "doc": f"fair-esm ESM-2 model name ({', '.join(ESM2_MODELS)}), "
        "downloaded once into model_dir, "
        "or the path of a fair-esm-format checkpoint (.pt)",
        "schema": {"type": "string", "minLength": 1},
    },
}


def plain(value: Any) -> Any:
    """A value as YAML/JSON holds it: tuples as lists, all the way down."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def field_types(cls: type) -> dict[str, Any]:
    """An options dataclass's fields -> their types (annotations resolved)."""
    return typing.get_type_hints(cls)


def optional_of(hint: Any) -> tuple[Any, bool]:
    """(the type without None, whether None is allowed)."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0], True
    return hint, False


def _build(cls: type, data: dict, prefix: str, ignore: tuple[str, ...] = ()) -> Any:
    if not isinstance(data, dict):
        raise ValueError(f"config '{prefix.rstrip('.')}': expected a mapping, not {data!r}")
    hints = field_types(cls)
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(names) - set(ignore))
    if unknown:
        raise ValueError(
            f"config: unknown key '{prefix}{unknown[0]}'; "
            f"known: {', '.join(prefix + n for n in names)}"
        )
    kwargs = {}
    for name, value in data.items():
        if name in names:
            kwargs[name] = _value(hints[name], names[name].metadata, value, prefix + name)
    return cls(**kwargs)


def _read(kind: Any, value: Any, key: str) -> Any:
    """A string where another type is declared is read as YAML (``--config`` gives nested values
    as strings)."""
    if isinstance(value, str) and kind is not str:
        try:
            return yaml.safe_load(value) if value.strip() else None
        except yaml.YAMLError:
            raise ValueError(f"config '{key}': {value!r} is not a valid value") from None
    return value


def _value(hint: Any, meta: Any, value: Any, key: str) -> Any:
    base, nullable = optional_of(hint)
    if dataclasses.is_dataclass(base):
        return (
            value
            if isinstance(value, base)
            else _build(base, value if value is not None else {}, key + ".")
        )
    value = _read(base, value, key)
    if value is None:
        if nullable:
            return None
        raise ValueError(f"config '{key}': a value is required")
    if typing.get_origin(base) is tuple:
        item = typing.get_args(base)[0]
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            value = [value]
        out = tuple(_scalar(item, meta, _read(item, v, key), key) for v in value)
        if meta.get("minimum") is not None and len(out) < meta["minimum"]:
            raise ValueError(f"config '{key}': at least {meta['minimum']:g} value(s) needed")
        return out
    return _scalar(base, meta, value, key)


def _scalar(kind: type, meta: Any, value: Any, key: str) -> Any:
    if kind is bool:
        ok = isinstance(value, bool)
    else:
        ok = not isinstance(value, bool) and (
            isinstance(value, kind) or (kind is float and isinstance(value, int))
        )
    if not ok:
        raise ValueError(
            f"config '{key}': {value!r} is not {'an' if kind is int else 'a'} {kind.__name__}"
        )
    value = kind(value)
    if meta.get("choices") and value not in meta["choices"]:
        raise ValueError(f"config '{key}': {value!r} is not one of {list(meta['choices'])}")
    if kind not in (str, bool) and meta.get("minimum") is not None and value < meta["minimum"]:
        raise ValueError(f"config '{key}': {value!r} is below the minimum {meta['minimum']}")
    if meta.get("maximum") is not None and value > meta["maximum"]:
        raise ValueError(f"config '{key}': {value!r} is above the maximum {meta['maximum']}")
    return value


def leaves(cls: type = Options, prefix: str = "") -> list[tuple[str, dataclasses.Field, Any]]:
    """(dotted key, field, type hint) of every option, in declaration order."""
    out = []
    hints = field_types(cls)
    for f in dataclasses.fields(cls):
        base, _ = optional_of(hints[f.name])
        if dataclasses.is_dataclass(base):
            out += leaves(base, f"{prefix}{f.name}.")
        else:
            out.append((prefix + f.name, f, hints[f.name]))
    return out


def resolve_layers(layers: tuple[int, ...], num_layers: int, key: str) -> tuple[int, ...]:
    """Layer indices as 0..num_layers (0 = the embeddings; negative ones count from the end:
    -1 is the last layer), sorted and unique; ``key`` names the option in errors."""
    out = set()
    for layer in layers:
        index = num_layers + 1 + layer if layer < 0 else layer
        if not 0 <= index <= num_layers:
            raise ValueError(
                f"config '{key}': layer {layer} is out of range for a model of {num_layers} layers "
                f"(0..{num_layers}, or -{num_layers + 1}..-1 from the end)"
            )
        out.add(index)
    return tuple(sorted(out))


def check_for_model(options: Options, num_layers: int) -> None:
    """Options that depend on the model, checked before any job runs."""
    e = options.embedding
    resolve_layers(e.layers, num_layers, "embedding.layers")
    resolve_layers(e.per_residue_layers, num_layers, "embedding.per_residue_layers")

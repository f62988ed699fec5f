"""Every option's default is written once (src/virnucpro_core/options.py): the schema, the CLI,
config/config.yaml and config/README.md follow it, and values reach the stages unchanged."""

import pytest
import yaml

from conftest import ROOT
from virnucpro_core.cli import STAGE_OPTIONS, options_from_args, parser
from virnucpro_core.engine.equivalence import Thresholds
from virnucpro_core.options import PATH_KEYS, EmbeddingOptions, NucleotideOptions, Options, leaves
from virnucpro_core.schema import markdown_table, schema_yaml

STAGE_ARGS = {
    "shard": ["shard", "in.faa", "--out", "o"],
    "plan": ["plan", "s.parquet", "--out", "p.parquet"],
    "embed": ["embed", "s.parquet", "--plan", "p", "--model", "m.pt", "--out", "e"],
    "spot-check": ["spot-check", "s.parquet", "--embeddings", "e", "--model", "m.pt", "--out", "t.tsv"],
    "merge": ["merge", "--shard-dir", "s", "--embeddings", "e.parquet", "--out", "o"],
    "extract": ["extract", "m.pt", "in.faa", "out"],
}


def test_schema_file_is_generated_from_the_options():
    assert (ROOT / "workflow/schemas/config.schema.yaml").read_text() == schema_yaml(), (
        "regenerate: python -m virnucpro_core options --schema > workflow/schemas/config.schema.yaml")


def test_schema_defaults_equal_the_options():
    schema = yaml.safe_load((ROOT / "workflow/schemas/config.schema.yaml").read_text())
    for key, f, _ in leaves():
        node = schema
        for part in key.split("."):
            node = node["properties"][part]
        assert node["default"] == yaml.safe_load(yaml.safe_dump(list(f.default) if isinstance(f.default, tuple) else f.default)), key
    assert set(schema["required"]) == set(PATH_KEYS)


def test_config_readme_table_is_generated():
    assert markdown_table() in (ROOT / "config/README.md").read_text(), "regenerate: python -m virnucpro_core options --markdown"


def test_shipped_config_sets_every_option_to_its_default():
    shipped = yaml.safe_load((ROOT / "config/config.yaml").read_text())
    assert set(shipped) == set(PATH_KEYS) | set(Options().to_dict())
    data = {k: v for k, v in shipped.items() if k not in PATH_KEYS}
    assert Options.from_dict(data) == Options()
    assert Options.from_dict(data).to_dict() == data  # no key of the file is left out or extra


@pytest.mark.parametrize("stage", list(STAGE_OPTIONS))
def test_cli_defaults_are_the_options_and_each_flag_reaches_its_key(stage):
    assert options_from_args(parser().parse_args(STAGE_ARGS[stage])) == Options()
    for key, f, _ in leaves():
        flag = f"--{key}"
        reads = key.split(".")[0] in STAGE_OPTIONS[stage] and not f.metadata["job_resource"]
        if not reads:
            with pytest.raises(SystemExit):
                parser().parse_args(STAGE_ARGS[stage] + [flag, "1"])
            continue
        value = f.metadata["choices"][-1] if f.metadata["choices"] else f.default + 1 if type(f.default) is int else max(3, f.metadata["minimum"] or 0)
        if type(f.default) is int and f.metadata["maximum"] is not None and value > f.metadata["maximum"]:
            value = f.default - 1
        if isinstance(f.default, str) and not f.metadata["choices"]:
            value = "/somewhere/else"
        if isinstance(f.default, bool):
            value = str(not f.default).lower()
        opts = options_from_args(parser().parse_args(STAGE_ARGS[stage] + [flag, str(value)]))
        changed = {k: v for k, v in _flat(opts.to_dict()).items() if v != _flat(Options().to_dict())[k]}
        assert list(changed) == [key], (flag, changed)


def _flat(d, prefix=""):
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
    return out


def test_cli_reads_a_config_file_and_flags_override_it(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("input: x.faa\nmodel: m.pt\nembedding: {dtype: float16, layers: [2, -1]}\nspot_check: {sample: 3}\n")
    opts = options_from_args(parser().parse_args(STAGE_ARGS["spot-check"] + ["--config", str(cfg), "--spot_check.sample", "5"]))
    assert opts.embedding.dtype == "float16" and opts.embedding.layers == (2, -1) and opts.spot_check.sample == 5


def test_values_are_typed_and_bad_ones_named():
    # --config gives nested values as strings
    opts = Options.from_dict({"spot_check": {"sample": "32", "pooled_cosine": "0"}, "embedding": {"layers": "[-2, -1]"}})
    assert opts.spot_check.sample == 32 and opts.spot_check.pooled_cosine == 0.0 and opts.embedding.layers == (-2, -1)
    for bad, message in [
        ({"embedding": {"dtype": "fp8"}}, "config 'embedding.dtype': 'fp8' is not one of"),
        ({"nucleotide": {"window": 2}}, "config 'nucleotide.window': 2 is below the minimum 3"),
        ({"long_sequences": {"overlap": 512}}, "above the maximum 511"),
        ({"embedding": {"layers": "[1, "}}, "config 'embedding.layers': '\\[1, ' is not a valid value"),
        ({"shard": 3}, "unknown key 'shard'"),
        ({"spot_check": {"tolerance": 1}}, "unknown key 'spot_check.tolerance'"),
        ({"shards": "many"}, "config 'shards': 'many' is not an int"),
        ({"embedding": {"poolings": []}}, "at least 1 value"),
    ]:
        with pytest.raises(ValueError, match=message):
            Options.from_dict(bad)
    with pytest.raises(ValueError, match="'frames': 'all' is not one of"):
        NucleotideOptions(frames="all")


def test_an_explicit_zero_threshold_is_kept():
    assert Thresholds.resolve("bfloat16", 0.0, None).pooled_cosine == 0.0
    assert Thresholds.resolve("bfloat16", None, None).pooled_cosine == 0.9995
    assert Thresholds.resolve("float32", None, 0.5).min_residue_cosine == 0.5


def test_options_are_frozen_and_replace_validates():
    opts = Options()
    with pytest.raises(AttributeError):
        opts.shards = 3  # type: ignore[misc]
    assert opts.replace(**{"embedding.dtype": "float32"}).embedding == EmbeddingOptions(dtype="float32")
    with pytest.raises(ValueError, match="embedding.dtype"):
        opts.replace(**{"embedding.dtype": "int8"})


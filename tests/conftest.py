"""Shared by the tests: the shipped example files, the workflow run from the checkout, a tiny random ESM-2 and
the stages run in process. Test files import the helpers with ``from conftest import ...``."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from virnucpro_core.models.loader import LoadedModel, build_esm2, save_checkpoint

ROOT = Path(__file__).resolve().parents[1]  # the checkout: Snakefile, workflow/, resources/
EXAMPLE = ROOT / "resources/example/proteins.faa"  # 300 proteins, 5 of them over 1022 residues
READS = ROOT / "resources/example/reads.fna"  # 300 nucleotide reads
MODEL = ROOT / "resources/example/esm2_t2_tiny_random.pt"  # tiny random ESM-2 (2 layers, 64-d)
SNAKEMAKE = [sys.executable, "-m", "snakemake"]

AA = "ACDEFGHIKLMNPQRSTVWY"


def snakemake(*args: str, cwd=ROOT, timeout: float = 900, **kw) -> subprocess.CompletedProcess:
    """The workflow run from the checkout (``cwd``) with ``args``, its output captured as text."""
    return subprocess.run([*SNAKEMAKE, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, **kw)


def example_records(n: int) -> str:
    """The first ``n`` records of the shipped example, as FASTA text."""
    return "".join(">" + r for r in EXAMPLE.read_text().split(">")[1 : n + 1])


def random_protein(rng: np.random.Generator, n: int, letters: str = AA) -> str:
    return "".join(rng.choice(list(letters), n))


def sharpen(model, factor: float = 2.5) -> None:
    """Random-init attention is near uniform and hides position errors: sharpen q and k."""
    for layer in model.layers:
        for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj):
            proj.weight.data *= factor
            proj.bias.data *= factor


@pytest.fixture(scope="session")
def tiny_model() -> LoadedModel:
    torch.manual_seed(0)
    model = build_esm2(layers=3, embed_dim=64, heads=4).eval()
    sharpen(model, 3.0)
    return LoadedModel(model, model.alphabet, "tiny", "-", "-")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, tiny_model) -> str:
    path = tmp_path_factory.mktemp("model") / "esm2_t3_tiny.pt"
    save_checkpoint(tiny_model.model, path)
    return str(path)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


def cpu_options(d, **changes):
    """Options for an in-process run on the CPU, with the GPU locks in ``d``."""
    from virnucpro_core.options import Options

    return Options().replace(**{"embedding.device": "cpu", "embedding.lock_dir": str(d / "locks"), **changes})


def run_stages(d, inputs, options, model):
    """The workflow's stages in this process, as ``virnucpro extract`` runs them but keeping every shard's files:
    (summary, the run's Layout)."""
    from virnucpro_core.run.layout import Layout
    from virnucpro_core.stages import embed, merge, shard

    run = Layout(str(d))
    man = shard.run([str(p) for p in inputs], run.shards, options)
    done = []
    for s in man["shards"]:
        parts = [run.part(p) for p in s["parts"]]
        embed.run(parts, str(model), run.shard_embeddings(s["name"]), options, earlier=done,
                  plan_out=run.plan(s["name"]), dups_out=run.shard_dups(s["name"]), stats_out=run.shard_stats(s["name"]),
                  spot_check=run.spot_check(s["name"]))
        done += [run.part(p, "keys") for p in s["parts"]]
    embeddings = [run.shard_embeddings(s["name"]) for s in man["shards"]]
    spots = [run.spot_check(s["name"]) for s in man["shards"]]
    return merge.run(run.manifest, run.shard_skipped, embeddings, spots, d, options), run


def example_stages(tmp_path, n_shards: int, budget: int, name: str, **changes):
    """:func:`run_stages` on the example in ``tmp_path / name``: ``n_shards`` shards, packs of ``budget`` tokens."""
    d = tmp_path / name
    return run_stages(d, [EXAMPLE], cpu_options(d, shards=n_shards, **{"packing.token_budget": budget, **changes}), MODEL)

import numpy as np
import pytest
import torch

from virnucpro_core.models.loader import LoadedModel, build_esm2, save_checkpoint

AA = "ACDEFGHIKLMNPQRSTVWY"


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

import numpy as np
import pytest
import torch

from virnucpro_core.model import LoadedModel, build_esm2, save_checkpoint

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

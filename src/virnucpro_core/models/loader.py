"""ESM-2 through fair-esm: by name (fair-esm's download and cache) or a local checkpoint.

Checkpoints are read with ``torch.load(weights_only=True)`` and an explicit allow-list
(fair-esm's ESM-2 release files hold their config as ``argparse.Namespace``); a file that
needs any other global is refused, so a hostile pickle never runs.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import pickle
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import esm
import torch
from esm.model.esm2 import ESM2

from ..io.files import sha256
from ..options import Options
from .checkpoint import CheckpointError, shape_of, unreadable
from .huggingface import convert
from .resolve import ESM2_MODELS, MODEL_URL, REGRESSION_URL, resolve

log = logging.getLogger(__name__)

SAFE_GLOBALS = [argparse.Namespace]


@dataclass
class LoadedModel:
    model: ESM2
    alphabet: esm.data.Alphabet
    name: str
    source: str  # path of the checkpoint file
    sha256: str

    @property
    def num_layers(self) -> int:
        return self.model.num_layers

    @property
    def embed_dim(self) -> int:
        return self.model.embed_dim


def safe_load(path: str | Path) -> dict:
    """The checkpoint's tensors memory-mapped where the format allows (zip, torch >= 1.6): a job reads
    the pages it moves to the GPU, from the page cache when a job on this node has read them before."""
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as exc:
        first = str(exc).split("WeightsUnpickler error:")[-1].strip().splitlines()[0]
        raise CheckpointError(
            f"{path}: refused, loading it would need more than tensors and fair-esm's config "
            f"({first}). Only fair-esm-format checkpoints are loaded, never by full unpickling."
        ) from None
    except (RuntimeError, EOFError, OSError) as exc:
        raise unreadable(path, exc) from None


def build_esm2(layers: int, embed_dim: int, heads: int, token_dropout: bool = True) -> ESM2:
    """An ESM-2 of the given shape through fair-esm's own class (random weights)."""
    return ESM2(num_layers=layers, embed_dim=embed_dim, attention_heads=heads, alphabet="ESM-1b", token_dropout=token_dropout)


def save_checkpoint(model: ESM2, path: str | Path) -> None:
    """Write ``model`` in fair-esm's ESM-2 release format (``cfg`` + ``encoder.``-prefixed state)."""
    cfg = argparse.Namespace(
        encoder_layers=model.num_layers,
        encoder_embed_dim=model.embed_dim,
        encoder_ffn_embed_dim=4 * model.embed_dim,
        encoder_attention_heads=model.attention_heads,
        token_dropout=model.token_dropout,
    )
    state = {f"encoder.{k}": v for k, v in model.state_dict().items() if not k.startswith("contact_head.regression")}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"cfg": {"model": cfg}, "model": state}, path)


_INITS = ("normal_", "uniform_", "trunc_normal_", "kaiming_uniform_", "kaiming_normal_", "xavier_uniform_", "xavier_normal_",
          "constant_", "ones_", "zeros_")


@contextlib.contextmanager
def _no_random_init():
    """Module constructors skip their random initialisation (process-wide, for the milliseconds the
    construction takes): every tensor comes from the file. (Built on the meta device instead, the
    model's construction imported torch's compiler, through ``normal_`` and arithmetic on meta
    tensors: 5 s of a job's start-up on the H200 node.)"""
    saved = {name: getattr(torch.nn.init, name) for name in _INITS}
    try:
        for name in _INITS:
            setattr(torch.nn.init, name, lambda tensor, *args, **kwargs: tensor)
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch.nn.init, name, fn)


def _model_from_data(data: object, path: Path) -> ESM2:
    cfg, s = shape_of(data, path)  # the config against the tensors present, before anything is allocated
    with _no_random_init():  # every tensor comes from the file; torch.empty allocates no pages until written
        model = build_esm2(s.layers, s.embed_dim, s.heads, bool(getattr(cfg, "token_dropout", True)))
    # fair-esm's own key upgrade (esm.pretrained._load_model_and_alphabet_core_v2)
    pattern = re.compile(r"^(encoder\.sentence_encoder\.|encoder\.)")
    state = {pattern.sub("", k): v for k, v in data["model"].items()}
    expected = model.state_dict()
    optional = {"contact_head.regression.weight", "contact_head.regression.bias"}
    missing = sorted(set(expected) - set(state) - optional)
    unexpected = sorted(set(state) - set(expected))
    wrong = [
        f"{k} {tuple(state[k].shape)} (config expects {tuple(expected[k].shape)})"
        for k in sorted(set(state) & set(expected))
        if tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    shape = f"{cfg.encoder_layers} layers, dim {cfg.encoder_embed_dim}, {cfg.encoder_attention_heads} heads"
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} tensors, e.g. {', '.join(missing[:3])}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensors, e.g. {', '.join(unexpected[:3])}")
    if wrong:
        problems.append(f"wrong shapes: {'; '.join(wrong[:3])}")
    if problems:
        raise CheckpointError(f"{path}: does not match the ESM-2 architecture its config names ({shape}): " + "; ".join(problems))
    model.load_state_dict(state, strict=False, assign=True)
    for name in optional - set(state):  # contact regression: unused for embeddings
        module, attr = model.get_submodule(name.rsplit(".", 1)[0]), name.rsplit(".", 1)[1]
        setattr(module, attr, torch.nn.Parameter(torch.zeros_like(getattr(module, attr), device="cpu")))
    return model


def load_checkpoint(path: str | Path) -> LoadedModel:
    """Load a fair-esm-format ESM-2 checkpoint file; the contact-regression companion is optional."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file does not exist")
    data = safe_load(path)
    regression = path.with_name(path.stem + "-contact-regression.pt")
    if regression.is_file():
        extra = safe_load(regression)
        if not isinstance(extra, dict) or not isinstance(extra.get("model"), dict):
            raise CheckpointError(f"{regression}: not a fair-esm contact-regression file (expected a dict with 'model')")
        if isinstance(data, dict) and isinstance(data.get("model"), dict):
            data["model"].update(extra["model"])
    model = _model_from_data(data, path).eval()
    return LoadedModel(model, model.alphabet, path.stem, str(path), sha256(path))


def fetch_model(name: str, model_dir: str | Path) -> Path:
    """The release file of ``name``: found in ``model_dir`` or torch hub's cache, else downloaded
    once into ``model_dir`` (fair-esm's URLs, torch hub's downloader)."""
    if name not in ESM2_MODELS:
        raise CheckpointError(f"unknown model name {name!r}; known: {', '.join(ESM2_MODELS)}")
    dest = resolve(name, model_dir).file  # found, or to download (else the one sentence saying why not)
    if dest.is_file():  # here or in torch hub's cache
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    for url, target in ((MODEL_URL.format(name=name), dest),
                        (REGRESSION_URL.format(name=name), dest.with_name(f"{name}-contact-regression.pt"))):
        if not target.is_file():
            log.info("downloading %s -> %s", url, target)
            torch.hub.download_url_to_file(url, str(target), progress=False)
    return dest


def load_model(spec: str, model_dir: str | Path | None = None) -> LoadedModel:
    """The model ``spec`` names (:func:`..models.resolve.resolve`): a named model fetched first if it is not
    here, a Hugging Face ESM-2 converted once."""
    model_dir = model_dir or Options().model_dir
    src = resolve(spec, model_dir)
    if not src.file.is_file():
        if src.kind == "name":
            fetch_model(spec, model_dir)
        else:
            convert(src.folder, src.file)
    return load_checkpoint(src.file)

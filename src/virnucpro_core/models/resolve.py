"""What a model spec names, and where its checkpoint is: the one lookup that the workflow's rules, its
preflight and the loader all call (no torch here).

A spec is a fair-esm ESM-2 name (its release file in ``model_dir`` or torch hub's cache, else downloaded
once into ``model_dir`` by fair-esm's URLs), a fair-esm-format checkpoint file, or a Hugging Face ESM-2 (a
folder with ``config.json``, or ``org/name`` in the local Hugging Face cache; converted once into
``model_dir/converted/``). A spec that names nothing usable gets one sentence saying what is missing,
where it was looked for and what to do.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

from .checkpoint import CheckpointError, inspect
from .huggingface import converted_path, hf_folder, hf_shape, weights_file

# fair-esm's ESM-2 models: (layers, embedding dim, attention heads)
ESM2_MODELS = {
    "esm2_t6_8M_UR50D": (6, 320, 20),
    "esm2_t12_35M_UR50D": (12, 480, 20),
    "esm2_t30_150M_UR50D": (30, 640, 20),
    "esm2_t33_650M_UR50D": (33, 1280, 20),
    "esm2_t36_3B_UR50D": (36, 2560, 40),
    "esm2_t48_15B_UR50D": (48, 5120, 40),
}
MODEL_URL = "https://dl.fbaipublicfiles.com/fair-esm/models/{name}.pt"
REGRESSION_URL = "https://dl.fbaipublicfiles.com/fair-esm/regression/{name}-contact-regression.pt"


@dataclass(frozen=True)
class ModelSource:
    """A resolved spec. ``file``: the fair-esm-format checkpoint the jobs load; it may not exist yet (a named
    model still to be fetched, a Hugging Face folder still to be converted: the workflow's ``fetch_model`` and
    ``convert_hf_model`` rules, or :func:`..models.loader.load_model`, make it)."""

    spec: str
    kind: str  # "name", "checkpoint" or "huggingface"
    file: Path
    folder: Path | None = None  # the Hugging Face folder

    def shape(self) -> tuple[int, int, float]:
        """(layers, embedding dim, checkpoint MB): from the checkpoint's own index (no tensor read), the
        Hugging Face config, or fair-esm's table for a named model still to be downloaded."""
        if self.folder is not None:
            s = hf_shape(self.folder)
            return s.layers, s.embed_dim, os.path.getsize(weights_file(self.folder)) / 1e6
        if self.file.is_file():
            s = inspect(self.file)
            return s.layers, s.embed_dim, os.path.getsize(self.file) / 1e6
        layers, dim, _ = ESM2_MODELS[self.spec]
        return layers, dim, 12 * layers * dim * dim * 4 / 1e6  # the fp32 release file


def resolve(spec: str, model_dir: str | Path) -> ModelSource:
    """The checkpoint ``spec`` names; :class:`..models.checkpoint.CheckpointError` (one sentence) if none."""
    if spec in ESM2_MODELS:
        found = find_named(spec, model_dir)
        if found:
            return ModelSource(spec, "name", found)
        reason = unreachable(MODEL_URL.format(name=spec))
        if reason:
            raise CheckpointError(missing_model_message(spec, model_dir, reason))
        return ModelSource(spec, "name", Path(model_dir) / f"{spec}.pt")
    folder = hf_folder(spec)
    if folder is not None:
        return ModelSource(spec, "huggingface", converted_path(folder, model_dir), folder)
    if spec.endswith(".pt") or Path(spec).exists():
        if not Path(spec).is_file():
            raise CheckpointError(f"{spec}: checkpoint file does not exist")
        return ModelSource(spec, "checkpoint", Path(spec))
    raise CheckpointError(f"model {spec!r} is neither a fair-esm ESM-2 name ({', '.join(ESM2_MODELS)}), an existing "
                          "checkpoint file, nor a Hugging Face ESM-2 (a folder with config.json, or org/name in the "
                          "Hugging Face cache)")


def hub_checkpoints() -> Path:
    """torch hub's checkpoint cache, where fair-esm's own loader puts its downloads (as
    ``torch.hub.get_dir()`` finds it: $TORCH_HOME, else $XDG_CACHE_HOME/torch, else ~/.cache/torch)."""
    home = os.environ.get("TORCH_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "torch")
    return Path(home) / "hub" / "checkpoints"


def find_named(name: str, model_dir: str | Path) -> Path | None:
    """The release file of a fair-esm model name: in ``model_dir``, then in torch hub's cache."""
    for folder in (Path(model_dir), hub_checkpoints()):
        if (folder / f"{name}.pt").is_file():
            return folder / f"{name}.pt"
    return None


@functools.lru_cache(maxsize=None)
def unreachable(url: str, timeout: float = 5.0) -> str | None:
    """Why ``url`` cannot be fetched now (no network, a proxy, DNS), or None when it can (asked once
    a process: the workflow's checks before any job ask for the same URL)."""
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout).close()
        return None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        return str(getattr(exc, "reason", exc))


def missing_model_message(name: str, model_dir: str | Path, reason: str) -> str:
    """One sentence: what is missing, where it was looked for, and what to do."""
    return (f"model {name} is not in {model_dir}/ or {hub_checkpoints()}/ and cannot be downloaded here "
            f"({MODEL_URL.format(name=name)}: {reason}); on a machine with network run "
            f"`python -m virnucpro_core fetch-model {name} --model-dir {model_dir}` and copy {name}.pt into {model_dir}/, "
            "or set model to the path of a checkpoint")

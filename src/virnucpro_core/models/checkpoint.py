"""A fair-esm checkpoint's shape, checked against its tensors, without building the model.

:func:`inspect` reads only the pickled index of a checkpoint (its config and the shape of every
tensor, no tensor data, no torch), so the workflow checks the model and the options that depend
on it before any job runs. :func:`check` is the one check of a config against the tensors
present, also used when a checkpoint is loaded: a config that does not match the file is refused
with the file named, before anything is allocated.
"""

from __future__ import annotations

import argparse
import collections
import pickle
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path



class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file and what is wrong."""


@dataclass(frozen=True)
class Shape:
    layers: int
    embed_dim: int
    heads: int


_LAYER = re.compile(r"^(?:encoder\.sentence_encoder\.|encoder\.)?layers\.(\d+)\.")
_EMBED = re.compile(r"^(?:encoder\.sentence_encoder\.|encoder\.)?embed_tokens\.weight$")


def check(cfg: object, shapes: dict[str, tuple[int, ...]], path: str | Path) -> Shape:
    """The ESM-2 shape a checkpoint's config names, once it agrees with the tensors in the file."""
    if not isinstance(cfg, argparse.Namespace):
        raise CheckpointError(f"{path}: 'cfg' has no ESM-2 model config (found {type(cfg).__name__})")
    values = {}
    for key in ("encoder_layers", "encoder_embed_dim", "encoder_attention_heads"):
        if not hasattr(cfg, key):
            raise CheckpointError(f"{path}: ESM-2 config lacks {key!r}")
        v = getattr(cfg, key)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise CheckpointError(f"{path}: ESM-2 config {key}={v!r} is not a positive integer")
        values[key] = v
    shape = Shape(values["encoder_layers"], values["encoder_embed_dim"], values["encoder_attention_heads"])
    if shape.embed_dim % shape.heads:
        raise CheckpointError(f"{path}: ESM-2 config: embed dim {shape.embed_dim} is not divisible by {shape.heads} heads")
    present = {int(m.group(1)) for k in shapes if (m := _LAYER.match(k))}
    if present != set(range(shape.layers)):
        found = f"layers 0..{max(present)}" if present else "no layer tensors"
        raise CheckpointError(f"{path}: the config names {shape.layers} layers but the file holds {found} ({len(present)} layers)")
    embed = [s for k, s in shapes.items() if _EMBED.match(k)]
    if not embed or len(embed[0]) != 2 or embed[0][1] != shape.embed_dim:
        raise CheckpointError(f"{path}: the config names embed dim {shape.embed_dim} but embed_tokens.weight is "
                              f"{tuple(embed[0]) if embed else 'missing'}")
    return shape


class _Tensor:
    """Stands for a tensor while its index is read: only the shape is kept."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        self.shape = shape


def _rebuild(storage, offset, size, *rest):  # torch._utils._rebuild_tensor_v2 and kin
    return _Tensor(tuple(size))


class _Index(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) == ("argparse", "Namespace"):
            return argparse.Namespace
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module == "torch._utils" and name.startswith("_rebuild"):
            return _rebuild
        if module == "torch":  # storage types and dtypes, named in the persistent ids
            return name
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a fair-esm checkpoint")

    def persistent_load(self, pid):
        return None


def inspect(path: str | Path) -> Shape:
    """The checked shape of a fair-esm checkpoint file, from its index alone."""
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as z:
            name = next(n for n in z.namelist() if n.endswith("data.pkl"))
            data = _Index(z.open(name)).load()
    except (zipfile.BadZipFile, StopIteration, pickle.UnpicklingError, EOFError, OSError, AttributeError, TypeError) as exc:
        raise unreadable(path, exc) from None
    return shape_of(data, path)[1]


def unreadable(path: str | Path, exc: BaseException) -> CheckpointError:
    """The error for a file that is no PyTorch checkpoint at all."""
    path = Path(path)
    what = "an empty file (0 bytes)" if path.exists() and path.stat().st_size == 0 else f"{type(exc).__name__}: {exc}"
    return CheckpointError(f"{path}: not a readable PyTorch checkpoint ({what})")


def shape_of(data: object, path: str | Path) -> tuple[object, Shape]:
    """The config and the checked shape of a checkpoint's contents (tensors or stand-ins with a shape)."""
    if not isinstance(data, dict) or "model" not in data or "cfg" not in data:
        raise CheckpointError(f"{path}: not a fair-esm ESM-2 checkpoint (expected a dict with 'cfg' and 'model')")
    cfg = data["cfg"].get("model") if isinstance(data["cfg"], dict) else data["cfg"]
    if not isinstance(data["model"], dict):
        raise CheckpointError(f"{path}: 'model' is not a state dict")
    return cfg, check(cfg, {k: tuple(getattr(v, "shape", ())) for k, v in data["model"].items()}, path)

"""ESM-2 in Hugging Face format (``facebook/esm2_t33_650M_UR50D``: a folder with ``config.json`` and
``model.safetensors`` or ``pytorch_model.bin``, or the same in the local Hugging Face cache),
converted once into a fair-esm-format checkpoint that everything downstream reads as any other.

The conversion renames tensors (``encoder.layer.N.attention.self.query`` -> ``layers.N.self_attn.q_proj``
...), computes fair-esm's rotary ``inv_freq`` buffers, fills the language-model head (unused for
embeddings) when the folder has none, and refuses configs that are not ESM-2's architecture.
``config.json`` is read without torch (the workflow checks options against it before any job).
"""

from __future__ import annotations

import argparse
import json
import os
import re
from pathlib import Path

from .checkpoint import CheckpointError, Shape

WEIGHTS = ("model.safetensors", "pytorch_model.bin")
_LAYER_KEYS = {
    "attention.self.query": "self_attn.q_proj", "attention.self.key": "self_attn.k_proj",
    "attention.self.value": "self_attn.v_proj", "attention.output.dense": "self_attn.out_proj",
    "attention.LayerNorm": "self_attn_layer_norm", "intermediate.dense": "fc1", "output.dense": "fc2",
    "LayerNorm": "final_layer_norm",
}


def hf_folder(spec: str) -> Path | None:
    """The folder of a Hugging Face model: ``spec`` itself, or ``org/name`` in the local Hugging Face
    cache ($HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub), its ``main`` revision."""
    path = Path(spec)
    if path.is_dir():
        return path if (path / "config.json").is_file() else None
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", spec):
        return None
    hub = os.environ.get("HF_HUB_CACHE") or os.path.join(os.environ.get("HF_HOME") or os.path.expanduser("~/.cache/huggingface"), "hub")
    repo = Path(hub) / f"models--{spec.replace('/', '--')}"
    ref = repo / "refs" / "main"
    if ref.is_file() and (repo / "snapshots" / ref.read_text().strip() / "config.json").is_file():
        return repo / "snapshots" / ref.read_text().strip()
    return None


def weights_file(folder: Path) -> Path:
    for name in WEIGHTS:
        if (folder / name).is_file():
            return folder / name
    raise CheckpointError(f"{folder}: a Hugging Face model folder needs {' or '.join(WEIGHTS)} next to config.json")


def hf_shape(folder: Path) -> Shape:
    """The ESM-2 shape its config.json names; anything not ESM-2's architecture is refused."""
    cfg = json.loads((folder / "config.json").read_text())
    expect = {"model_type": "esm", "position_embedding_type": "rotary", "vocab_size": 33}
    wrong = [f"{k}={cfg.get(k)!r} (ESM-2: {v!r})" for k, v in expect.items() if cfg.get(k) != v]
    if cfg.get("emb_layer_norm_before"):
        wrong.append("emb_layer_norm_before=true (ESM-2: false)")
    if cfg.get("intermediate_size") != 4 * cfg.get("hidden_size", 0):
        wrong.append(f"intermediate_size={cfg.get('intermediate_size')} (ESM-2: 4 x hidden_size)")
    if wrong:
        raise CheckpointError(f"{folder / 'config.json'}: not an ESM-2 model: {', '.join(wrong)}")
    return Shape(cfg["num_hidden_layers"], cfg["hidden_size"], cfg["num_attention_heads"])


def converted_path(folder: Path, model_dir: str | Path) -> Path:
    """Where the conversion of ``folder`` goes: named after the model and its weights file's identity."""
    w = weights_file(folder)
    st = w.stat()
    name = re.sub(r"[^\w.-]+", "_", (folder.parent.parent.name.removeprefix("models--") if folder.parent.name == "snapshots"
                                       else folder.name))
    return Path(model_dir) / "converted" / f"{name}-{st.st_size}-{st.st_mtime_ns}.pt"


def convert(folder: str | Path, dest: str | Path) -> Path:
    """Write the fair-esm-format checkpoint of a Hugging Face ESM-2 folder to ``dest``."""
    import torch

    from ..io.files import atomic_path

    folder = Path(folder)
    shape = hf_shape(folder)
    cfg = json.loads((folder / "config.json").read_text())
    w = weights_file(folder)
    if w.suffix == ".safetensors":
        from safetensors.torch import load_file

        hf = load_file(w)
    else:
        hf = torch.load(w, map_location="cpu", weights_only=True)
    # EsmForMaskedLM's "esm." prefix; LayerNorm's legacy gamma/beta names (transformers >= 5 saves them so)
    hf = {re.sub(r"\.gamma$", ".weight", re.sub(r"\.beta$", ".bias", k.removeprefix("esm."))): v for k, v in hf.items()}
    state = {"embed_tokens.weight": hf["embeddings.word_embeddings.weight"]}
    head_dim = shape.embed_dim // shape.heads
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))  # fair-esm's RotaryEmbedding
    for i in range(shape.layers):
        for hf_key, esm_key in _LAYER_KEYS.items():
            for p in ("weight", "bias"):
                state[f"layers.{i}.{esm_key}.{p}"] = hf[f"encoder.layer.{i}.{hf_key}.{p}"]
        state[f"layers.{i}.self_attn.rot_emb.inv_freq"] = inv_freq
    for p in ("weight", "bias"):
        state[f"emb_layer_norm_after.{p}"] = hf[f"encoder.emb_layer_norm_after.{p}"]
    dim, vocab = shape.embed_dim, state["embed_tokens.weight"].shape[0]
    head = {"lm_head.dense.weight": (dim, dim), "lm_head.dense.bias": (dim,), "lm_head.layer_norm.weight": (dim,),
            "lm_head.layer_norm.bias": (dim,), "lm_head.bias": (vocab,)}
    for k, size in head.items():  # the masked-LM head: EsmForMaskedLM's if present, else zeros (unused here)
        state[k] = hf.get(k, torch.zeros(size))
    state["lm_head.weight"] = state["embed_tokens.weight"]  # tied, as in fair-esm
    state.update({k: v for k, v in hf.items() if k.startswith("contact_head.regression.")})
    model_cfg = argparse.Namespace(encoder_layers=shape.layers, encoder_embed_dim=dim, encoder_ffn_embed_dim=4 * dim,
                                   encoder_attention_heads=shape.heads, token_dropout=bool(cfg.get("token_dropout", True)))
    with atomic_path(dest) as tmp:
        torch.save({"cfg": {"model": model_cfg}, "model": {f"encoder.{k}": v.contiguous() for k, v in state.items()}}, tmp)
    return Path(dest)

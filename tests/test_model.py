"""Models (models/): fair-esm checkpoints (release format round trip, hostile files, wrong architectures),
named models from fair-esm's URL and the caches, Hugging Face ESM-2 folders converted once and taken by the workflow."""

import argparse
import json
import pickle

import numpy as np
import pytest
import torch

from conftest import snakemake
from virnucpro_core.models.loader import CheckpointError, build_esm2, fetch_model, load_checkpoint, load_model, save_checkpoint


def test_round_trip_equals_fair_esm_loader(tmp_path):
    import esm

    torch.manual_seed(1)
    model = build_esm2(2, 32, 4)
    path = tmp_path / "esm2_t2_32.pt"
    save_checkpoint(model, path)
    loaded = load_checkpoint(path)
    assert loaded.num_layers == 2 and loaded.embed_dim == 32 and len(loaded.sha256) == 64
    for k, v in model.state_dict().items():
        if not k.startswith("contact_head.regression"):  # not part of the release file
            assert torch.equal(v, loaded.model.state_dict()[k]), k
    # fair-esm's own loader reads the same file
    theirs, _ = esm.pretrained.load_model_and_alphabet_core("esm2_t2_32", torch.load(path, weights_only=False))
    for k, v in theirs.state_dict().items():
        if not k.startswith("contact_head"):
            assert torch.equal(v, loaded.model.state_dict()[k]), k


def test_contact_regression_companion_is_optional(tmp_path):
    model = build_esm2(2, 32, 4)
    path = tmp_path / "m.pt"
    save_checkpoint(model, path)
    w = torch.randn(1, 2 * 4)
    torch.save({"model": {"contact_head.regression.weight": w, "contact_head.regression.bias": torch.zeros(1)}},
               tmp_path / "m-contact-regression.pt")
    assert torch.equal(load_checkpoint(path).model.contact_head.regression.weight, w)


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_hostile_pickle_is_refused(tmp_path, capsys):
    path = tmp_path / "evil.pt"
    torch.save({"cfg": {"model": argparse.Namespace()}, "model": {}, "x": Evil()}, path)
    with pytest.raises(CheckpointError, match="refused") as exc:
        load_checkpoint(path)
    assert str(path) in str(exc.value)
    assert "pwned" not in capsys.readouterr().out


def test_plain_pickle_is_refused(tmp_path):
    path = tmp_path / "p.pt"
    path.write_bytes(pickle.dumps(Evil()))
    with pytest.raises(CheckpointError, match=str(path)):
        load_checkpoint(path)


def test_wrong_shape_names_what_differs(tmp_path):
    model = build_esm2(2, 32, 4)
    path = tmp_path / "m.pt"
    save_checkpoint(model, path)
    data = torch.load(path, weights_only=False)
    data["model"]["encoder.layers.0.fc1.weight"] = torch.zeros(10, 32)
    del data["model"]["encoder.layers.1.fc2.bias"]
    torch.save(data, path)
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(path)
    msg = str(exc.value)
    assert "layers.0.fc1.weight (10, 32) (config expects (128, 32))" in msg
    assert "layers.1.fc2.bias" in msg and "2 layers, dim 32, 4 heads" in msg


def test_not_a_checkpoint(tmp_path):
    path = tmp_path / "x.pt"
    torch.save({"weights": torch.zeros(1)}, path)
    with pytest.raises(CheckpointError, match="expected a dict with 'cfg' and 'model'"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="neither a fair-esm ESM-2 name"):
        load_model("esm3_unknown")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(str(tmp_path / "missing.pt"))


def test_named_model_uses_fair_esm_url_and_cache(tmp_path, monkeypatch):
    """Loading by name downloads fair-esm's release once into the model folder, then reads it."""
    calls = []

    def fake_download(url, dst, progress=False):
        calls.append(url)
        if url.endswith("esm2_t6_8M_UR50D.pt"):
            save_checkpoint(build_esm2(6, 320, 20), dst)
        else:
            torch.save({"model": {}}, dst)

    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    monkeypatch.setattr("virnucpro_core.models.resolve.unreachable", lambda url: None)  # as if online
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    loaded = load_model("esm2_t6_8M_UR50D", tmp_path)
    assert loaded.num_layers == 6 and loaded.embed_dim == 320
    assert calls == [
        "https://dl.fbaipublicfiles.com/fair-esm/models/esm2_t6_8M_UR50D.pt",
        "https://dl.fbaipublicfiles.com/fair-esm/regression/esm2_t6_8M_UR50D-contact-regression.pt",
    ]
    load_model("esm2_t6_8M_UR50D", tmp_path)
    assert len(calls) == 2  # cached


def test_fetch_model_returns_a_release_file_already_here_without_the_network(tmp_path, monkeypatch):
    """A release file in the model folder (here without its contact-regression companion) is used as it is."""
    save_checkpoint(build_esm2(6, 320, 20), tmp_path / "esm2_t6_8M_UR50D.pt")
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *a, **k: pytest.fail(f"downloaded {a[0]}"))
    monkeypatch.setattr("virnucpro_core.models.resolve.unreachable", lambda url: "offline")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    assert fetch_model("esm2_t6_8M_UR50D", tmp_path) == tmp_path / "esm2_t6_8M_UR50D.pt"
    assert not (tmp_path / "esm2_t6_8M_UR50D-contact-regression.pt").exists()


@pytest.mark.parametrize("change, message", [
    (lambda d: setattr(d["cfg"]["model"], "encoder_layers", 3_000_000), "the config names 3000000 layers but the file holds layers 0..1"),
    (lambda d: setattr(d["cfg"]["model"], "encoder_attention_heads", 5), "embed dim 32 is not divisible by 5 heads"),
    (lambda d: d["cfg"].__setitem__("model", [1, 2]), "'cfg' has no ESM-2 model config (found list)"),
    (lambda d: setattr(d["cfg"]["model"], "encoder_embed_dim", "32"), "encoder_embed_dim='32' is not a positive integer"),
    (lambda d: delattr(d["cfg"]["model"], "encoder_layers"), "ESM-2 config lacks 'encoder_layers'"),
], ids=["huge-layer-count", "heads", "list-config", "string-dim", "missing-key"])
def test_malformed_configs_are_refused_before_anything_is_built(tmp_path, change, message):
    """Checked against the tensors present, from the index alone (checkpoint.inspect) and on load."""
    import time

    from virnucpro_core.models.checkpoint import inspect

    path = tmp_path / "m.pt"
    save_checkpoint(build_esm2(2, 32, 4), path)
    data = torch.load(path, weights_only=False)
    change(data)
    torch.save(data, path)
    for read in (inspect, load_checkpoint):
        t = time.perf_counter()
        with pytest.raises(CheckpointError) as exc:
            read(path)
        assert str(exc.value).startswith(f"{path}: ") and message in str(exc.value)
        assert time.perf_counter() - t < 10  # refused, not built


def test_empty_files_and_bad_companions_are_named(tmp_path):
    from virnucpro_core.models.checkpoint import inspect

    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    for read in (inspect, load_checkpoint):
        with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint \\(an empty file \\(0 bytes\\)\\)"):
            read(empty)
    path = tmp_path / "m.pt"
    save_checkpoint(build_esm2(2, 32, 4), path)
    torch.save({"weights": torch.zeros(1)}, tmp_path / "m-contact-regression.pt")
    with pytest.raises(CheckpointError, match="m-contact-regression.pt: not a fair-esm contact-regression file"):
        load_checkpoint(path)
    assert inspect(path).layers == 2  # the index alone is fine


def test_named_model_found_in_torch_hubs_cache_is_used_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    cached = tmp_path / "torch/hub/checkpoints/esm2_t6_8M_UR50D.pt"
    save_checkpoint(build_esm2(6, 320, 20), cached)
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *a, **k: pytest.fail("downloaded"))
    loaded = load_model("esm2_t6_8M_UR50D", tmp_path / "models")
    assert loaded.source == str(cached) and loaded.num_layers == 6


def test_named_model_absent_and_offline_says_where_it_looked_and_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr("virnucpro_core.models.resolve.unreachable", lambda url: "[Errno -2] Name or service not known")
    with pytest.raises(CheckpointError) as err:
        load_model("esm2_t6_8M_UR50D", tmp_path / "models")
    msg = str(err.value)
    assert f"is not in {tmp_path / 'models'}/ or {tmp_path / 'torch/hub/checkpoints'}/" in msg
    assert "fetch-model esm2_t6_8M_UR50D" in msg and "or set model to the path of a checkpoint" in msg


# ------------------------------------------------------------------ Hugging Face ESM-2
def tiny_hf_esm(folder, layers=2, dim=64, heads=4, seed=0):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.EsmConfig(vocab_size=33, hidden_size=dim, num_hidden_layers=layers, num_attention_heads=heads,
                                 intermediate_size=4 * dim, position_embedding_type="rotary", token_dropout=True,
                                 pad_token_id=1, mask_token_id=32, layer_norm_eps=1e-5, emb_layer_norm_before=False,
                                 max_position_embeddings=1026)
    torch.manual_seed(seed)
    model = transformers.EsmModel(cfg, add_pooling_layer=False).eval()
    with torch.no_grad():  # random init of the real architecture, q/k sharpened so positions matter
        for p in model.parameters():
            p.normal_(0, 0.1)
        for layer in model.encoder.layer:
            layer.attention.self.query.weight.mul_(5)
            layer.attention.self.key.weight.mul_(5)
    model.save_pretrained(folder)  # config.json + model.safetensors
    return model


def test_a_hugging_face_esm2_folder_is_converted_once_and_embeds_as_transformers_does(tmp_path):
    from virnucpro_core.engine.embedder import Embedder
    from virnucpro_core.engine.packing import Pack

    hf = tiny_hf_esm(tmp_path / "hf")
    assert (tmp_path / "hf/model.safetensors").is_file()
    loaded = load_model(str(tmp_path / "hf"), tmp_path / "models")
    converted = list((tmp_path / "models/converted").glob("*.pt"))
    assert len(converted) == 1 and loaded.source == str(converted[0]) and len(loaded.sha256) == 64
    assert load_model(str(tmp_path / "hf"), tmp_path / "models").sha256 == loaded.sha256  # converted once
    seqs = ["MKTAYIAKQRQISFVKSHFSRQ", "ACDEFGHIKLMNPQRSTVWY" * 20, "MLLSVPLLLGLLGLAAA"]
    pack = Pack(np.arange(3), np.zeros(3, np.int64), np.array([len(s) for s in seqs]))
    emb = Embedder(loaded, "cpu", "float32", "reference")
    ours = emb.residue_states(seqs, pack, loaded.num_layers)
    for s, mine in zip(seqs, ours):
        toks = torch.tensor([[loaded.alphabet.cls_idx, *[loaded.alphabet.get_idx(c) for c in s], loaded.alphabet.eos_idx]])
        with torch.no_grad():
            theirs = hf(input_ids=toks, attention_mask=torch.ones_like(toks)).last_hidden_state[0, 1:-1]
        torch.testing.assert_close(mine, theirs, atol=2e-5, rtol=1e-4)


def test_a_hugging_face_model_of_another_architecture_is_refused(tmp_path):
    tiny_hf_esm(tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf/config.json").read_text())
    (tmp_path / "hf/config.json").write_text(json.dumps({**cfg, "position_embedding_type": "absolute"}))
    with pytest.raises(CheckpointError, match="not an ESM-2 model: position_embedding_type='absolute'"):
        load_model(str(tmp_path / "hf"), tmp_path / "models")


def test_org_slash_name_is_found_in_the_hugging_face_cache(tmp_path, monkeypatch):
    from virnucpro_core.models.huggingface import hf_folder

    snap = tmp_path / "hub/models--facebook--esm2_tiny/snapshots/abc123"
    tiny_hf_esm(snap)
    (tmp_path / "hub/models--facebook--esm2_tiny/refs").mkdir(parents=True)
    (tmp_path / "hub/models--facebook--esm2_tiny/refs/main").write_text("abc123")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    assert hf_folder("facebook/esm2_tiny") == snap and hf_folder("facebook/absent") is None
    loaded = load_model("facebook/esm2_tiny", tmp_path / "models")
    assert loaded.num_layers == 2 and "esm2_tiny" in loaded.source


@pytest.mark.slow
def test_the_workflow_takes_a_hugging_face_folder_as_model(tmp_path):
    import pyarrow.parquet as pq

    from virnucpro_core.io.tables import column_array

    tiny_hf_esm(tmp_path / "hf")
    out = tmp_path / "out"
    res = snakemake("--cores", "2", "--config", f"model={tmp_path / 'hf'}", f"outdir={out}", f"model_dir={tmp_path / 'models'}",
                    f"embedding={{lock_dir: {tmp_path / 'locks'}}}", timeout=600)
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    assert "convert_hf_model" in res.stdout + res.stderr
    converted = list((tmp_path / "models/converted").glob("*.pt"))
    assert len(converted) == 1
    t = pq.read_table(out / "embeddings.parquet")
    meta = json.loads(t.schema.metadata[b"virnucpro"])
    assert meta["checkpoint"] == str(converted[0]) and t.num_rows == 300
    assert np.isfinite(column_array(t, "embedding")).all()

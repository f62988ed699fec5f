"""Checkpoints: fair-esm release format round trip, hostile files, wrong architectures."""

import argparse
import pickle

import pytest
import torch

from virnucpro_core.model import CheckpointError, build_esm2, load_checkpoint, load_model, save_checkpoint


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
    monkeypatch.setattr("virnucpro_core.model.unreachable", lambda url: None)  # as if online
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    loaded = load_model("esm2_t6_8M_UR50D", tmp_path)
    assert loaded.num_layers == 6 and loaded.embed_dim == 320
    assert calls == [
        "https://dl.fbaipublicfiles.com/fair-esm/models/esm2_t6_8M_UR50D.pt",
        "https://dl.fbaipublicfiles.com/fair-esm/regression/esm2_t6_8M_UR50D-contact-regression.pt",
    ]
    load_model("esm2_t6_8M_UR50D", tmp_path)
    assert len(calls) == 2  # cached


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

    from virnucpro_core.checkpoint import inspect

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
    from virnucpro_core.checkpoint import inspect

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
    monkeypatch.setattr("virnucpro_core.model.unreachable", lambda url: "[Errno -2] Name or service not known")
    with pytest.raises(CheckpointError) as err:
        load_model("esm2_t6_8M_UR50D", tmp_path / "models")
    msg = str(err.value)
    assert f"is not in {tmp_path / 'models'}/ or {tmp_path / 'torch/hub/checkpoints'}/" in msg
    assert "fetch-model esm2_t6_8M_UR50D" in msg and "or set model to the path of a checkpoint" in msg

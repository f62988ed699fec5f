"""Packed forward vs fair-esm's own unpadded forward (fp32, CPU, tiny random ESM-2)."""

import copy

import numpy as np
import pytest
import torch

from conftest import random_protein
from virnucpro_core.engine import kernels
from virnucpro_core.engine.attention import position_ids, rotary_tables
from virnucpro_core.engine.equivalence import fp32_rotary, reference_hidden
from virnucpro_core.engine.packed_esm2 import PYTORCH, TRITON, LayerNorm32, PackedESM2, PackedLayer, Residual, Update, pool, residues
from virnucpro_core.engine.packing import Pack
from virnucpro_core.engine.tokenizer import Tokenizer

LENGTHS = [1, 2, 3, 8, 50, 160, 250, 400, 700, 1021, 1022]


def pack_of(seqs):
    idx = np.arange(len(seqs))
    return Pack(idx, np.zeros_like(idx), np.array([len(s) for s in seqs]))


def run_packed(model, seqs, engine=None, **kw):
    tok = Tokenizer(model.alphabet)
    pack = pack_of(seqs)
    tokens = torch.from_numpy(tok.pack_tokens(seqs, pack))
    cu = torch.from_numpy(pack.cu_seqlens)
    engine = engine or PackedESM2(model, **kw)
    layers = list(range(model.num_layers + 1))
    return engine(tokens, cu, max(len(s) for s in seqs) + 2, layers), cu


def singles(model, seqs):
    tok = Tokenizer(model.alphabet)
    return [torch.from_numpy(tok.pack_tokens([s], pack_of([s]))) for s in seqs]


def test_packed_equals_fair_esm_unpadded_fp32_all_layers(tiny_model, rng):
    model = tiny_model.model
    seqs = [random_protein(rng, n) for n in LENGTHS]
    hidden, cu = run_packed(model, seqs)
    for layer in range(model.num_layers + 1):
        ref = reference_hidden(model, singles(model, seqs), layer, fp32_rope=False)  # fp32 model: fair-esm as is
        got = [hidden[layer][s:e] for s, e in zip(cu[:-1].tolist(), cu[1:].tolist())]
        for n, a, b in zip(LENGTHS, got, ref):
            rel = float((a - b).norm() / b.norm())
            assert rel <= 1e-5, f"layer {layer}, length {n}: relative L2 {rel:.2e}"


def test_fp32_rotary_patch_is_identity_in_fp32_and_restored(tiny_model, rng):
    model = tiny_model.model
    seqs = [random_protein(rng, 300)]
    a = reference_hidden(model, singles(model, seqs), 3, fp32_rope=True)[0]
    b = reference_hidden(model, singles(model, seqs), 3, fp32_rope=False)[0]
    assert float((a - b).norm() / b.norm()) < 1e-6
    with fp32_rotary(model):
        pass
    assert type(model.layers[0].self_attn.rot_emb).__name__ == "RotaryEmbedding"


def test_residual_stream_stores_every_second_layer_norm_and_sums_in_order():
    torch.manual_seed(0)
    T, D = 6, 8
    x0 = torch.randn(T, D)
    norm = LayerNorm32(torch.nn.LayerNorm(D))
    updates = [Update(torch.randn(T, D).to(torch.bfloat16), torch.randn(D).to(torch.bfloat16) if i % 2 else None) for i in range(5)]
    stream, want = Residual(x0.clone(), PYTORCH, torch.bfloat16), x0.clone()
    stored = []
    for u in updates:  # layer norm, update, as in a layer's two halves
        x_before = stream.x.clone()
        h = norm(stream)
        stored.append(not torch.equal(stream.x, x_before))
        assert torch.equal(h, torch.nn.functional.layer_norm(want, (D,), norm.weight, norm.bias, norm.eps).to(torch.bfloat16))
        stream = stream + u
        want = want + u.out.float()
        want = want if u.bias is None else want + u.bias.float()  # added one at a time, in order: the same fp32 sums
        assert torch.equal(stream.tensor(), want)
    assert stored == [False, False, True, False, True]  # the sum is stored when two updates are pending


def test_position_ids_restart_at_every_boundary():
    cu = torch.tensor([0, 3, 4, 9], dtype=torch.int32)
    assert position_ids(cu, 9).tolist() == [0, 1, 2, 0, 0, 1, 2, 3, 4]


def test_rotary_tables_are_fp32_and_exact_for_large_positions():
    pos = torch.tensor([0, 257, 1023])
    cos, sin = rotary_tables(pos, 64)
    assert cos.dtype == torch.float32
    # bf16 positions would round 257 to 256; fp32 keeps the angle of position 257
    assert torch.allclose(cos[1, 0], torch.cos(torch.tensor(257.0)))
    assert not torch.allclose(cos[1, 0], torch.cos(torch.tensor(256.0)))


def test_embedding_does_not_depend_on_pack_neighbours(tiny_model, rng):
    model = tiny_model.model
    target = random_protein(rng, 333)
    packs = [[target], [random_protein(rng, 900), target], [random_protein(rng, 5), target, random_protein(rng, 700)]]
    pooled = []
    for seqs in packs:
        hidden, cu = run_packed(model, seqs)
        i = seqs.index(target)
        pooled.append(pool(hidden[model.num_layers], cu, "mean")[i])
    for p in pooled[1:]:
        assert float(torch.nn.functional.cosine_similarity(p, pooled[0], dim=0)) >= 0.99999


def test_pooling_matches_esm_extract(tiny_model, rng):
    """Mean over residues 1..L (BOS/EOS excluded) and the BOS state, as fair-esm esm-extract."""
    model = tiny_model.model
    seqs = [random_protein(rng, n) for n in (5, 40, 90)]
    hidden, cu = run_packed(model, seqs)
    layer = model.num_layers
    _, _, toks = model.alphabet.get_batch_converter()([(str(i), s) for i, s in enumerate(seqs)])
    rep = model(toks, repr_layers=[layer])["representations"][layer]
    mean = pool(hidden[layer], cu, "mean")
    bos = pool(hidden[layer], cu, "bos")
    for i, s in enumerate(seqs):
        assert torch.allclose(mean[i], rep[i, 1 : len(s) + 1].mean(0), atol=1e-5)
        assert torch.allclose(bos[i], rep[i, 0], atol=1e-5)
    assert [len(r) for r in residues(hidden[layer], cu)] == [5, 40, 90]


def test_unknown_backend_is_refused(tiny_model):
    with pytest.raises(ValueError, match="not available"):
        PackedESM2(tiny_model.model, backend="flash_attn")


def test_layers_are_modules_that_cast_and_load_the_ordinary_way(tiny_model, rng):
    """Casting a PackedESM2 gives what building it from the cast model gives, layer norms kept fp32;
    its state_dict loads into an engine of other weights and gives the same outputs."""
    seqs = [random_protein(rng, n) for n in (700, 3, 90)]
    fp32 = PackedESM2(copy.deepcopy(tiny_model.model))
    assert isinstance(fp32.layers, torch.nn.ModuleList) and all(isinstance(m, PackedLayer) for m in fp32.layers)
    assert fp32.layers[0].qkv.weight.shape == (3 * 64, 64)
    names = dict(fp32.named_parameters())
    assert "layers.0.qkv.weight" in names and "layers.2.ffn_norm.weight" in names and "final_norm.bias" in names

    cast = PackedESM2(copy.deepcopy(tiny_model.model)).to(torch.bfloat16)
    built = PackedESM2(copy.deepcopy(tiny_model.model).to(torch.bfloat16))
    assert cast.dtype == built.dtype == torch.bfloat16
    for (k, a), (k2, b) in zip(cast.state_dict().items(), built.state_dict().items()):
        assert k == k2 and a.dtype == b.dtype and torch.equal(a, b), k
        assert a.dtype == (torch.float32 if "norm" in k and not k.startswith("esm2.") else torch.bfloat16), k
    got, _ = run_packed(tiny_model.model, seqs, cast)
    want, _ = run_packed(tiny_model.model, seqs, built)
    assert all(torch.equal(got[l], want[l]) for l in want)
    assert got[0].dtype == torch.bfloat16 and got[3].dtype == got[1].dtype == torch.float32

    torch.manual_seed(1)
    other = PackedESM2(copy.deepcopy(tiny_model.model).apply(lambda m: [torch.nn.init.normal_(p) for p in m.parameters(recurse=False)]))
    before, _ = run_packed(tiny_model.model, seqs, other)
    other.load_state_dict(fp32.state_dict())
    after, _ = run_packed(tiny_model.model, seqs, other)
    want, _ = run_packed(tiny_model.model, seqs, fp32)
    assert not torch.equal(before[3], want[3])
    assert all(torch.equal(after[l], want[l]) for l in want)


def test_kernels_follow_kernels_available(tiny_model, monkeypatch):
    engine = PackedESM2(tiny_model.model)
    assert not engine.fused and engine.ops is PYTORCH  # the CPU
    monkeypatch.setattr(kernels, "available", lambda device: True)
    assert PackedESM2(tiny_model.model).ops is TRITON
    assert engine.float().ops is TRITON  # chosen again after a cast


def test_gelu_is_its_tanh_form_only_in_bf16_on_a_gpu(tiny_model):
    from virnucpro_core.engine.packed_esm2 import gelu_form, linear_gelu_tanh

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert gelu_form("auto", cuda, torch.bfloat16) == "tanh"
    assert [gelu_form("auto", cuda, torch.float16), gelu_form("auto", cpu, torch.bfloat16), gelu_form("exact", cuda, torch.bfloat16)] == ["exact"] * 3
    with pytest.raises(ValueError, match="gelu must be one of"):
        gelu_form("fast", cuda, torch.bfloat16)
    engine = PackedESM2(tiny_model.model)  # fp32 on the CPU: the exact GELU, whatever was asked
    assert engine.gelu == "exact" and engine.ops is PYTORCH
    x, w, b = torch.randn(7, 16), torch.randn(12, 16), torch.randn(12)
    pre = torch.nn.functional.linear(x, w, b)
    assert torch.allclose(linear_gelu_tanh(x, w, b), torch.nn.functional.gelu(pre, approximate="tanh"))
    assert not torch.allclose(linear_gelu_tanh(x, w, b), torch.nn.functional.gelu(pre), atol=1e-6)


def test_the_embedder_takes_the_configured_gelu(tiny_model):
    from virnucpro_core.engine.embedder import build_embedder
    from virnucpro_core.options import Options

    loaded = copy.deepcopy(tiny_model)
    assert build_embedder(loaded, "cpu", Options()).packed.requested_gelu == "auto"
    assert build_embedder(loaded, "cpu", Options().replace(**{"embedding.gelu": "exact"})).packed.requested_gelu == "exact"

"""Packed forward vs fair-esm's own unpadded forward (fp32, CPU, tiny random ESM-2)."""

import numpy as np
import pytest
import torch

from conftest import random_protein
from virnucpro_core.engine.attention import position_ids, rotary_tables
from virnucpro_core.engine.equivalence import fp32_rotary, reference_hidden
from virnucpro_core.engine.packed_esm2 import PackedESM2, pool, residues
from virnucpro_core.engine.packing import Pack
from virnucpro_core.engine.tokenizer import Tokenizer

LENGTHS = [1, 2, 3, 8, 50, 160, 250, 400, 700, 1021, 1022]


def pack_of(seqs):
    idx = np.arange(len(seqs))
    return Pack(idx, np.zeros_like(idx), np.array([len(s) for s in seqs]))


def run_packed(model, seqs, **kw):
    tok = Tokenizer(model.alphabet)
    pack = pack_of(seqs)
    tokens = torch.from_numpy(tok.pack_tokens(seqs, pack))
    cu = torch.from_numpy(pack.cu_seqlens)
    engine = PackedESM2(model, **kw)
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

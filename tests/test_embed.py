"""Embedding stage: OOM split-and-retry, long-sequence windows, outputs, Parquet round trip."""

import threading

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from conftest import random_protein
from virnucpro_core.engine.embedder import Embedder, Outputs, SequenceTooLargeError
from virnucpro_core.engine.equivalence import reference_hidden
from virnucpro_core.engine.packing import Pack, build_plan, windows
from virnucpro_core.engine.prefetch import prefetch
from virnucpro_core.engine.tokenizer import Tokenizer
from virnucpro_core.io.files import write_table
from virnucpro_core.io.tables import column_array, embeddings_table, read_metadata
from virnucpro_core.options import EmbeddingOptions


def embed(model, seqs, budget=4096, policy="truncate", outputs=None, hook=None, monkeypatch=None):
    """``hook``: called with each pack before its forward (may raise a fake OOM), patched in with ``monkeypatch``."""
    e = Embedder(model, "cpu", "float32", "reference")
    if hook is not None:
        forward = e._forward

        def hooked(pack, *args):
            hook(pack)
            return forward(pack, *args)

        monkeypatch.setattr(e, "_forward", hooked)
    plan = build_plan([len(s) for s in seqs], budget, policy, 200)
    return e.embed(seqs, plan, outputs or Outputs.resolve(model.num_layers, EmbeddingOptions()), ids=[f"seq{i}" for i in range(len(seqs))])


def test_prefetch_yields_every_pack_in_order_the_first_without_a_thread(tiny_model, rng, monkeypatch):
    tok = Tokenizer(tiny_model.alphabet)
    seqs = [random_protein(rng, n) for n in rng.integers(10, 100, 12)]
    packs = build_plan([len(s) for s in seqs], 256, "truncate", 0, max_residues=100).packs
    assert len(packs) > 2
    it = prefetch(tok, seqs, packs, torch.device("cpu"))
    pack, tokens, cu = next(it)
    assert pack is packs[0] and "pack-prefetch" not in [t.name for t in threading.enumerate()]
    got = [(pack, tokens, cu), *it]
    assert [g[0] for g in got] == packs
    for p, t, c in got:
        assert t.tolist() == tok.pack_tokens(seqs, p).tolist() and c.tolist() == p.cu_seqlens.tolist()
    assert list(prefetch(tok, seqs, [], torch.device("cpu"))) == []

    def fail(sequences, pack):
        if pack is packs[2]:
            raise ValueError("bad pack")
        return Tokenizer.pack_tokens(tok, sequences, pack)

    monkeypatch.setattr(tok, "pack_tokens", fail)
    with pytest.raises(ValueError, match="bad pack"):  # raised in the thread, surfaced to the consumer
        list(prefetch(tok, seqs, packs, torch.device("cpu")))


def test_oom_splits_packs_and_gives_the_same_embeddings(tiny_model, rng, caplog, monkeypatch):
    seqs = [random_protein(rng, n) for n in rng.integers(10, 300, 30)]
    clean = embed(tiny_model, seqs).pooled["embedding"]

    def oom_on_packs_over_3(pack):
        if len(pack.lengths) > 3:
            raise torch.cuda.OutOfMemoryError("fake OOM")

    split = embed(tiny_model, seqs, hook=oom_on_packs_over_3, monkeypatch=monkeypatch).pooled["embedding"]
    assert "out of memory on a pack" in caplog.text
    np.testing.assert_allclose(split, clean, atol=1e-5)


def test_oom_on_a_single_sequence_names_it(tiny_model, rng, monkeypatch):
    seqs = [random_protein(rng, 50), random_protein(rng, 900)]

    def oom_on_long(pack):
        if pack.lengths.max() > 500:
            raise torch.cuda.OutOfMemoryError("fake OOM")

    with pytest.raises(SequenceTooLargeError, match="record seq1 \\(row 1\\), 900 residues"):
        embed(tiny_model, seqs, hook=oom_on_long, monkeypatch=monkeypatch)


def test_split_policy_averages_windows_weighted_by_residues(tiny_model, rng):
    model = tiny_model.model
    seq = random_protein(rng, 2500)
    out = embed(tiny_model, [seq, "MKV"], policy="split", outputs=Outputs.resolve(3, EmbeddingOptions(per_residue_layers=(3,))))
    tok = Tokenizer(tiny_model.alphabet)
    ws = windows(2500, "split", 200)
    singles = [torch.from_numpy(tok.pack_tokens([seq], Pack(np.array([0]), np.array([s]), np.array([n])))) for s, n in ws]
    ref = [h[1:-1] for h in reference_hidden(model, singles, 3)]
    expected = sum(h.mean(0) * n for h, (_, n) in zip(ref, ws)) / sum(n for _, n in ws)
    np.testing.assert_allclose(out.pooled["embedding"][0], expected.numpy(), atol=1e-5)
    per_res = out.per_residue["per_residue_l3"][0]
    assert per_res.shape == (2500, 64)
    np.testing.assert_allclose(per_res[:10], ref[0][:10].numpy(), atol=1e-5)  # only the first window covers these
    s1 = ws[1][0]
    np.testing.assert_allclose(per_res[s1], (ref[0][s1] + ref[1][0]).numpy() / 2, atol=1e-5)  # overlap: averaged


def test_truncate_policy_equals_fair_esm_truncation(tiny_model, rng):
    seq = random_protein(rng, 1500)
    out = embed(tiny_model, [seq])
    tok = Tokenizer(tiny_model.alphabet)
    t = torch.from_numpy(tok.pack_tokens([seq[:1022]], Pack(np.array([0]), np.array([0]), np.array([1022]))))
    ref = reference_hidden(tiny_model.model, [t], 3)[0][1:-1].mean(0)
    np.testing.assert_allclose(out.pooled["embedding"][0], ref.numpy(), atol=1e-5)


def test_output_columns():
    o = Outputs.resolve(6, EmbeddingOptions(layers=(-2, 3), poolings=("bos",)))
    assert o.layers == (3, 5, 6) and o.poolings == ("mean", "bos")
    names = [c for c, _, _ in o.columns(6)]
    assert names[0] == "embedding" and "embedding_bos_l6" in names and "embedding_mean_l5" in names
    with pytest.raises(ValueError, match="out of range"):
        Outputs.resolve(6, EmbeddingOptions(layers=(7,)))


def test_parquet_round_trip_with_metadata(tmp_path):
    emb = np.random.default_rng(0).standard_normal((3, 8)).astype(np.float16)
    res = [np.ones((n, 8), np.float32) * n for n in (1, 2, 3)]
    t = embeddings_table(["a", "b", "c"], np.array([1, 2, 3]), {"embedding": emb, "per_residue_l1": res}, {"model": "m"})
    write_table(t, tmp_path / "e.parquet")
    back = pq.read_table(tmp_path / "e.parquet")
    typ = back.schema.field("embedding").type
    assert typ.list_size == 8 and str(typ.value_type) == "halffloat"
    assert back.schema.field("length").type == "int32"
    np.testing.assert_array_equal(column_array(back, "embedding"), emb)
    assert [len(x) for x in back["per_residue_l1"].to_pylist()] == [1, 2, 3]
    assert read_metadata(tmp_path / "e.parquet") == {"model": "m"}
    assert not list(tmp_path.glob(".*tmp"))

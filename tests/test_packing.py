"""Packing plan: next-fit-decreasing correctness, windows, round trip, tokens equal fair-esm's."""

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import random_protein
from virnucpro_core.engine.packing import MAX_RESIDUES, Pack, build_plan, items, load_plan, next_fit_decreasing, save_plan, windows
from virnucpro_core.engine.tokenizer import Tokenizer


@pytest.mark.parametrize("seed", range(5))
def test_packs_never_exceed_the_budget_and_cover_every_record_once(seed):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 3000, 800)
    budget = int(rng.choice([1024, 4096, 16384]))
    plan = build_plan(lengths, budget, policy="split", overlap=100)
    assert all(p.tokens <= budget for p in plan.packs)
    covered = {}
    for p in plan.packs:
        for r, s, n in zip(p.records.tolist(), p.starts.tolist(), p.lengths.tolist()):
            assert (r, s) not in covered
            covered[(r, s)] = n
    for r, n in enumerate(lengths.tolist()):
        got = sorted((s, w) for (rr, s), w in covered.items() if rr == r)
        assert got == windows(n, "split", 100)
    assert 0 < plan.efficiency() <= 1


def test_next_fit_decreasing():
    # 7, 5, 4, 3, 1 with capacity 10: [7], [5 4], [3 1]: each bin filled until the next item does not fit
    sizes = np.array([4, 7, 3, 5, 1])
    bins = next_fit_decreasing(sizes, 10)
    assert [sorted(sizes[bins == b].tolist(), reverse=True) for b in range(bins.max() + 1)] == [[7], [5, 4], [3, 1]]


def test_packs_of_real_lengths_are_full():
    lengths = np.clip(np.random.default_rng(0).lognormal(np.log(270), 0.7, 20_000), 20, 3000).astype(int)
    plan = build_plan(lengths, 65536, "truncate", 0)
    assert all(p.tokens > 65536 - 1024 for p in plan.packs[:-1])  # within one item of the budget, but the last


@pytest.mark.parametrize("policy, overlap, max_residues", [("split", 0, 1022), ("split", 256, 1022), ("split", 511, 600),
                                                           ("split", 99, 100), ("truncate", 256, 1022), ("truncate", 0, 50)])
def test_items_are_the_windows_of_every_record(policy, overlap, max_residues):
    lengths = np.random.default_rng(1).integers(1, 6000, 2000)
    include = np.random.default_rng(2).random(2000) < 0.8
    got = list(zip(*(a.tolist() for a in items(lengths, policy, overlap, max_residues, include))))
    want = [(r, s, n) for r in np.flatnonzero(include).tolist() for s, n in windows(int(lengths[r]), policy, overlap, max_residues)]
    assert got == want


def test_item_over_budget_is_refused():
    with pytest.raises(ValueError, match="exceeds the token budget"):
        next_fit_decreasing(np.array([2000]), 1024)
    with pytest.raises(ValueError, match="below one full sequence"):
        build_plan([10], 512, "truncate", 0)


def test_windows():
    assert windows(1022, "split", 256) == [(0, 1022)]
    assert windows(5000, "truncate", 256) == [(0, MAX_RESIDUES)]
    w = windows(3000, "split", 256)
    assert w[0] == (0, 1022) and w[-1] == (3000 - 1022, 1022)
    assert all(b[0] - (a[0] + a[1]) <= -256 for a, b in zip(w, w[1:]))  # overlap of at least 256
    with pytest.raises(ValueError, match="policy"):
        windows(2000, "drop", 0)


def test_plan_round_trip(tmp_path):
    plan = build_plan(np.array([5, 1500, 300, 1022, 1023]), 2048, "split", 200)
    save_plan(plan, tmp_path / "p.parquet")
    back = load_plan(tmp_path / "p.parquet")
    assert back.budget == 2048 and back.n_records == 5 and back.stats == plan.stats
    assert len(back.packs) == len(plan.packs)
    for a, b in zip(plan.packs, back.packs):
        assert (a.records == b.records).all() and (a.starts == b.starts).all() and (a.lengths == b.lengths).all()
    assert plan.stats["split_records"] == 2


def test_tokens_equal_fair_esm(tiny_model, rng):
    alphabet = tiny_model.alphabet
    seqs = [random_protein(rng, n, "ACDEFGHIKLMNPQRSTVWYXBUZO") for n in (1, 7, 300)]
    tok = Tokenizer(alphabet)
    pack = Pack(np.arange(3), np.zeros(3, int), np.array([1, 7, 300]))
    got = tok.pack_tokens(seqs, pack)
    _, _, ref = alphabet.get_batch_converter()([(str(i), s) for i, s in enumerate(seqs)])
    expected = np.concatenate([ref[i, : len(s) + 2].numpy() for i, s in enumerate(seqs)])
    assert (got == expected).all()


def test_unknown_letters_become_unk(tiny_model):
    tok = Tokenizer(tiny_model.alphabet)
    got = tok.pack_tokens(["AJA"], Pack(np.array([0]), np.array([0]), np.array([3])))
    a = tiny_model.alphabet
    assert got.tolist() == [a.cls_idx, a.get_idx("A"), a.unk_idx, a.get_idx("A"), a.eos_idx]


def test_chunks_are_contiguous_record_ranges_packed_on_their_own():
    rng = np.random.default_rng(3)
    lengths = rng.integers(20, 3000, 2000)
    plan = build_plan(lengths, 8192, "split", 256, chunk_tokens=100_000)
    bounds = plan.chunks
    assert bounds[0] == 0 and bounds[-1] == len(lengths) and all(a < b for a, b in zip(bounds, bounds[1:]))
    assert plan.n_chunks == plan.stats["chunks"] > 5
    seen = []
    for c in range(plan.n_chunks):
        sub = plan.chunk(c)
        tokens = sum(p.tokens for p in sub.packs)
        assert tokens <= 100_000 + 4 * 1024  # a chunk ends with the record that crosses the bound (<= 4 windows here)
        for p in sub.packs:
            assert p.records.min() >= 0 and p.records.max() < sub.n_records
            seen += [(int(r) + bounds[c], int(s)) for r, s in zip(p.records, p.starts)]
    whole = build_plan(lengths, 8192, "split", 256)
    assert sorted(seen) == sorted((int(r), int(s)) for p in whole.packs for r, s in zip(p.records, p.starts))
    assert [len(p.lengths) for p in plan.packs] == [len(p.lengths) for c in range(plan.n_chunks) for p in plan.chunk(c).packs]


def test_chunks_survive_save_and_load(tmp_path):
    plan = build_plan(np.full(500, 300), 4096, "truncate", 0, chunk_tokens=20_000)
    save_plan(plan, tmp_path / "p.parquet")
    back = load_plan(tmp_path / "p.parquet")
    assert back.chunks == plan.chunks and plan.n_chunks == 8


def test_token_budget_is_by_the_model_when_null(tmp_path):
    from conftest import EXAMPLE, MODEL, cpu_options, run_stages

    from virnucpro_core.options import PackingOptions
    from virnucpro_core.stages import plan as plan_stage

    assert PackingOptions().token_budget is None
    assert [PackingOptions().budget(d) for d in (320, 1280, 2560, 5120)] == [131072, 131072, 65536, 65536]
    assert PackingOptions(token_budget=4096).budget(5120) == 4096
    # the embed stage plans with the model's budget (the example's model is 64 wide), and so does the plan stage
    _, run = run_stages(tmp_path / "r", [EXAMPLE], cpu_options(tmp_path / "r", shards=1), MODEL)
    (name,) = run.shard_names()
    assert load_plan(run.plan(name)).budget == 131072
    parts = [run.part(p) for p in json.loads(Path(run.manifest).read_text())["shards"][0]["parts"]]
    opts = cpu_options(tmp_path)
    with pytest.raises(ValueError, match="packing.token_budget is null"):
        plan_stage.run(parts, tmp_path / "p.parquet", None, opts)
    plan_stage.run(parts, tmp_path / "p.parquet", None, opts, model=str(MODEL))
    assert load_plan(tmp_path / "p.parquet").budget == 131072
    plan_stage.run(parts, tmp_path / "q.parquet", None, opts.replace(**{"packing.token_budget": 2048}))
    assert load_plan(tmp_path / "q.parquet").budget == 2048

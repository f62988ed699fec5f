"""Identical sequences embedded once: every record keeps its row, equal to a run without de-duplication."""

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import MODEL, cpu_options, random_protein, run_stages
from virnucpro_core.io.duplicates import DUPS_DTYPE, LocalFill, distinct_keys, find_duplicates
from virnucpro_core.io.tables import column_array


def key(i: int) -> bytes:
    return i.to_bytes(16, "little")


def test_each_duplicate_points_at_the_first_row_with_its_key():
    keys = np.array([key(k) for k in (5, 1, 5, 2, 1, 9, 5)], dtype="V16")
    part, part_row = np.array([3, 3, 3, 4, 4, 4, 4]), np.array([0, 1, 2, 0, 1, 2, 3])
    earlier = [(1, distinct_keys(np.array([key(7), key(2), key(7)], dtype="V16"))),
               (2, distinct_keys(np.array([key(9), key(2)], dtype="V16")))]
    own, dups = find_duplicates(keys, part, part_row, earlier)
    assert own.tolist() == [True, True, False, False, False, False, False]
    assert dups.tolist() == [(2, 3, 0), (3, 1, 1), (4, 3, 1), (5, 2, 0), (6, 3, 0)]


def test_duplicates_in_later_chunks_are_filled_from_kept_rows_also_after_a_resume():
    rng = np.random.default_rng(0)
    first = np.array([0, 1, 2, 0, 4, 1, 2, 4, 0, 9])  # each row's first row in the shard (itself if none before)
    values = rng.standard_normal((10, 4)).astype(np.float32)
    want = values[first]
    dups = np.zeros(int((first != np.arange(10)).sum()), DUPS_DTYPE)
    dups["row"] = np.flatnonzero(first != np.arange(10))
    for resumed in (False, True):
        fill, got = LocalFill(dups, first[dups["row"]]), []
        for lo, hi in ((0, 4), (4, 7), (7, 10)):  # three chunks
            chunk = {"embedding": np.where((first != np.arange(10))[lo:hi, None], 0, values[lo:hi]),
                     "per_residue_l1": [np.full((2, 4), float(i)) if first[i] == i else np.zeros((0, 4)) for i in range(lo, hi)]}
            if resumed and lo == 0:  # read back, already filled: only its rows for later chunks are kept
                chunk = {"embedding": want[:4].copy(), "per_residue_l1": [np.full((2, 4), float(first[i])) for i in range(4)]}
                fill.keep(chunk, lo, hi - lo)
            else:
                fill(chunk, lo, hi - lo)
            got.append(chunk)
        np.testing.assert_array_equal(np.concatenate([c["embedding"] for c in got]), want)
        assert [float(a[0, 0]) for c in got for a in c["per_residue_l1"]] == first.astype(float).tolist()


def records(rng, n_unique=60, copies=3):
    """Proteins, some repeated (identical, or identical in their first 1022 residues), spread over the file."""
    seqs = [random_protein(rng, int(rng.integers(30, 700))) for _ in range(n_unique)]
    seqs.append(random_protein(rng, 1500))
    seqs.append(seqs[-1][:1022] + "W" * 40)  # the model sees the same 1022 residues (truncate)
    out = list(seqs)
    for _ in range(copies):
        out += [seqs[i] for i in rng.permutation(len(seqs))[: n_unique // 3]]
    return [out[i] for i in rng.permutation(len(out))]


@pytest.mark.slow
@pytest.mark.parametrize("shards, layers, chunk", [(1, (), 16_000_000), (1, (), 4096), (3, (), 4096), (3, (1,), 16_000_000)],
                         ids=["one-shard", "one-shard-in-chunks", "three-shards", "per-residue"])
def test_deduplicated_output_equals_the_output_without(tmp_path, rng, shards, layers, chunk):
    """Duplicates within a chunk, in a later chunk of the shard (filled by the embed job) and in a later shard
    (filled by the merge)."""
    seqs = records(rng)
    p = tmp_path / "dups.faa"
    p.write_text("".join(f">r{i}\n{s}\n" for i, s in enumerate(seqs)))
    runs = {}
    for dedup in (True, False):
        opts = cpu_options(tmp_path, shards=shards, **{"embedding.deduplicate": dedup, "embedding.per_residue_layers": layers,
                                                        "spot_check.sample": 4, "packing.chunk_tokens": chunk})
        runs[dedup] = run_stages(tmp_path / f"dedup-{dedup}", [p], opts, MODEL)
    (s_on, r_on), (s_off, r_off) = runs[True], runs[False]
    a, b = pq.read_table(r_on.embeddings), pq.read_table(r_off.embeddings)
    assert a.equals(b)  # every column, bit for bit (the CPU)
    assert a["id"].to_pylist() == [f"r{i}" for i in range(len(seqs))]
    n_dups = len(seqs) - len({s[:1022] for s in seqs})
    assert s_on["filled_from_duplicates"] == n_dups > 20 and s_off["filled_from_duplicates"] == 0
    stats = [json.loads(Path(r_on.shard_stats(f"shard_{k:04d}")).read_text()) for k in range(shards)]
    assert sum(s["duplicates"] for s in stats) == n_dups
    assert sum(s["tokens"] for s in stats) < sum(json.loads(Path(r_off.shard_stats(f"shard_{k:04d}")).read_text())["tokens"]
                                                for k in range(shards))
    assert not column_array(a, "embedding").std(0).min() == 0
    remote = sum(len(np.load(r_on.shard_dups(f"shard_{k:04d}"))) for k in range(shards))  # left to the merge
    assert (remote > 0) == (shards > 1)
    if shards == 1:
        assert s_on["shards"] == {"linked": 1}  # filled in the embed job: the merge moves the file, no copy

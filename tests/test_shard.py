"""The shard stage (stages/shard.py, planned by run/parts.py): the input cut into parts (byte ranges read at once)
that give what one job gives, grouped into contiguous shards balanced by bytes; the checks across parts (duplicate
ids, record numbers, offsets, accounting) still hold over the whole input."""

import gzip
import json
import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import READS, random_protein
from virnucpro_core.io.fasta import FastaError
from virnucpro_core.options import Options
from virnucpro_core.run.parts import plan_parts, shards
from virnucpro_core.stages import shard


def rows(d: Path, man: dict, columns=("id", "record", "sequence", "key")) -> list[tuple]:
    """Every row of every part, in order, with its record numbered in its file."""
    out = []
    for p in man["parts"]:
        t = pq.read_table(d / f"{p['name']}.parquet", columns=list(columns))
        for r in zip(*(t[c].to_pylist() for c in columns)):
            out.append((p["file"], *r[:1], r[1] + p["record_offset"], *r[2:]))
    return out


def sharded(tmp_path, inputs, name, **changes):
    d = tmp_path / name
    man = shard.run([str(p) for p in inputs], d, Options().replace(**changes), jobs=1)
    return d, man


def test_parts_cover_each_file_once_and_shards_are_consecutive_parts(tmp_path, rng):
    a, b = tmp_path / "a.faa", tmp_path / "b.faa"
    a.write_text("".join(f">a{i}\n{random_protein(rng, 300)}\n" for i in range(3000)))
    b.write_text("".join(f">b{i}\n{random_protein(rng, 300)}\n" for i in range(1000)))
    parts = plan_parts([str(a), str(b)], Options(input_parts=8, shards=2))
    for f in (a, b):
        mine = [(p.start, p.end) for p in parts if p.file == str(f)]
        assert mine[0][0] == 0 and mine[-1][1] == f.stat().st_size
        assert all(x[1] == y[0] for x, y in zip(mine, mine[1:]))
    assert len(parts) == 8 and [p.index for p in parts] == list(range(8))
    assert sum(p.file == str(a) for p in parts) == 6  # in proportion to the bytes
    groups = shards(parts)
    assert len(groups) == 2 and [len(g) for g in groups] == [4, 4]
    assert plan_parts([str(a)], Options(), gpus=3)[-1].shard == 2  # one shard per GPU at least
    five = plan_parts([str(a)], Options(residues_per_shard=a.stat().st_size // 4), gpus=3)
    assert five[-1].shard + 1 == 6  # 5 shards by size, rounded up to a multiple of the GPUs


@pytest.mark.parametrize("kind", ["plain", "gzip", "multi-member gzip"])
def test_parts_give_the_rows_one_job_gives(tmp_path, rng, kind, monkeypatch):
    from virnucpro_core.io import fasta

    monkeypatch.setattr(fasta, "GZIP_BLOCK", 1 << 12)  # several gzip blocks, so a gzip file has several parts
    records = "".join(f">p{i} d\n{random_protein(rng, int(rng.integers(20, 900)))}\n" for i in range(600))
    path = tmp_path / ("in.faa.gz" if "gzip" in kind else "in.faa")
    if kind == "plain":
        path.write_text(records)
    elif kind == "gzip":
        path.write_bytes(gzip.compress(records.encode()))
    else:
        cut = len(records) // 3 + 7  # inside a record
        path.write_bytes(gzip.compress(records[:cut].encode()) + gzip.compress(records[cut:].encode()))
    d1, one = sharded(tmp_path, [path], "one", input_parts=1)
    d5, five = sharded(tmp_path, [path], "five", input_parts=5)
    assert len(one["parts"]) == 1 and len(five["parts"]) >= 3
    assert rows(d5, five) == rows(d1, one)
    assert [r[1] for r in rows(d1, one)] == [f"p{i}" for i in range(600)]
    assert five["inputs"] == one["inputs"]
    opts = Options(input_parts=5)
    parts = plan_parts([str(path)], opts)
    mans = [json.loads((d5 / f"{p.name}.json").read_text()) for p in parts]
    assert [m["end_offset"] for m in mans[:-1]] == [m["first_offset"] for m in mans[1:]]
    assert mans[0]["first_offset"] == 0 and mans[-1]["end_offset"] == len(records)  # decompressed offsets
    mans[2]["first_offset"] += 1  # as if its node's zlib had inflated the file differently
    (d5 / f"{parts[2].name}.json").write_text(json.dumps(mans[2]))
    with pytest.raises(FastaError, match=rf"{path}: parts {parts[1].name} and {parts[2].name} disagree"):
        shard.index(parts, d5, opts)


def test_nucleotide_parts_of_several_files_give_the_rows_one_job_gives(tmp_path):
    text = READS.read_text()
    cut = text.index(">", len(text) // 2)
    a, b = tmp_path / "a.fna", tmp_path / "b.fna.gz"
    a.write_text(text[:cut])
    b.write_bytes(gzip.compress(text[cut:].encode()))
    cols = ("id", "record", "sequence", "parent_id", "window_start", "window_end", "frame")
    d1, one = sharded(tmp_path, [a, b], "one", input_parts=2, input_type="nucleotide")
    d7, seven = sharded(tmp_path, [a, b], "seven", input_parts=7, input_type="nucleotide")
    assert len(seven["parts"]) > len(one["parts"]) == 2
    assert rows(d7, seven, cols) == rows(d1, one, cols)
    assert seven["inputs"] == one["inputs"] and seven["rows"] == one["rows"] > 1000


def test_a_duplicate_id_in_a_later_part_is_caught(tmp_path, rng):
    body = [f">r{i}\n{random_protein(rng, 200)}\n" for i in range(400)]
    body[350] = f">r10 again\n{random_protein(rng, 200)}\n"  # r10 is in the first part
    p = tmp_path / "dup.faa"
    p.write_text("".join(body))
    with pytest.raises(FastaError, match=rf"{p}: record 351 \(r10\): duplicate id \(first seen in {p} record 11\)"):
        sharded(tmp_path, [p], "error", input_parts=4)
    d, man = sharded(tmp_path, [p], "skip", input_parts=4, on_invalid="skip")
    skipped = (d / "skipped.tsv").read_text().splitlines()
    assert skipped[1:] == [f"r10\tduplicate id (first seen in {p} record 11)\t{p}\t351"]
    assert man["rows"] == 399 and man["inputs"][0] == {"file": str(p), "records": 400, "embedded": 399, "skipped": 1}
    assert sum(map(len, man["dropped_rows"].values())) == 1  # the merge leaves its row out


def test_an_invalid_record_in_a_later_part_is_named_by_its_number_in_the_file(tmp_path, rng):
    body = [f">r{i}\n{random_protein(rng, 200)}\n" for i in range(400)]
    body[300] = ">bad\nMKV1LA\n"
    p = tmp_path / "bad.faa"
    p.write_text("".join(body))
    with pytest.raises(FastaError, match=rf"{p}: record 301 \(bad\): illegal character '1' at residue 4"):
        sharded(tmp_path, [p], "error", input_parts=4)
    d, man = sharded(tmp_path, [p], "skip", input_parts=4, on_invalid="skip")
    line = (d / "skipped.tsv").read_text().splitlines()[1].split("\t")
    assert line == ["bad", "illegal character '1' at residue 4", str(p), "301"]


def test_a_file_that_changed_since_the_run_was_planned_is_refused(tmp_path, rng):
    p = tmp_path / "in.faa"
    p.write_text(f">a\n{random_protein(rng, 50)}\n")
    part = plan_parts([str(p)], Options())[0]
    with open(p, "a") as fh:
        fh.write(">b\nMKV\n")
    with pytest.raises(FastaError, match="changed since the run was planned"):
        shard.run_part(part, tmp_path / "s", Options())


def test_sequence_keys_follow_what_the_model_sees(tmp_path, rng):
    long = random_protein(rng, 1500)
    p = tmp_path / "k.faa"
    p.write_text(f">a\n{long}\n>b\n{long[:1022]}X\n>c\n{long}\n")
    for policy, same in (("truncate", [True, True]), ("split", [False, True])):
        d, man = sharded(tmp_path, [p], policy, **{"long_sequences.policy": policy})
        k = pq.read_table(d / "part_00000.parquet", columns=["key"])["key"].to_pylist()
        assert [k[0] == k[1], k[0] == k[2]] == same


def test_shards_are_contiguous_balanced_and_deterministic(tmp_path):
    rng = np.random.default_rng(0)
    lengths = rng.integers(30, 1500, 1000).tolist()
    p = tmp_path / "in.faa"
    p.write_text("".join(f">r{i}\n{'M' * n}\n" for i, n in enumerate(lengths)))
    man = shard.run([str(p)], tmp_path / "a", Options(shards=7))
    assert len(man["shards"]) == 7 and sum(s["rows"] for s in man["shards"]) == 1000
    rows = [[pq.read_table(tmp_path / f"a/{n}.parquet") for n in s["parts"]] for s in man["shards"]]
    ids = [i for shard_rows in rows for t in shard_rows for i in t["id"].to_pylist()]
    assert ids == [f"r{i}" for i in range(1000)]  # contiguous, input order
    sums = [sum(len(x) for t in shard_rows for x in t["sequence"].to_pylist()) for shard_rows in rows]
    assert max(sums) - min(sums) <= 2 * max(lengths)  # balanced by bytes: within a record or two
    again = shard.run([str(p)], tmp_path / "b", Options(shards=7))
    assert again["shards"] == man["shards"] and again["parts"] == man["parts"]
    by_size = shard.run([str(p)], tmp_path / "c", Options(residues_per_shard=100_000))  # estimated from the bytes
    assert len(by_size["shards"]) == -(-p.stat().st_size // 100_000) and by_size["rows"] == 1000


def test_a_file_listed_twice_is_read_once(tmp_path, caplog):
    p = tmp_path / "a.faa"
    p.write_text(">a\nMKV\n>b\nMKL\n")
    man = shard.run([str(p), os.path.join(str(tmp_path), ".", "a.faa")], tmp_path / "shards", Options(shards=1))
    assert man["rows"] == 2 and [f["records"] for f in man["inputs"]] == [2]
    assert "listed more than once" in caplog.text

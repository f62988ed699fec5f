"""FASTA parsing, normalisation, bad input and sharding."""

import gzip

import numpy as np
import pytest

from virnucpro_core.fasta import FastaError, Record, Skipped, read_fasta


def write(tmp_path, name, data: bytes | str):
    p = tmp_path / name
    p.write_bytes(data.encode() if isinstance(data, str) else data)
    return p


def records(*paths, on_invalid="error"):
    return list(read_fasta(paths, on_invalid))


def test_normalisation_and_ids(tmp_path):
    p = write(tmp_path, "a.faa", ">p1 some description\nmkv\nlla*\n>p2\r\nAC-D.E\r\nF G\t\r\n>p3\nUOBZXJ\n")
    recs = records(p)
    assert [r.id for r in recs] == ["p1", "p2", "p3"]
    assert [r.sequence for r in recs] == ["MKVLLA", "ACDEFG", "UOBZXJ"]
    assert [(r.order, r.number) for r in recs] == [(0, 1), (1, 2), (2, 3)]


def test_gzip_and_plain_give_the_same_records(tmp_path):
    text = ">a\nMKV\n>b\nLLA\n"
    plain = write(tmp_path, "x.faa", text)
    gz = write(tmp_path, "x.faa.gz", gzip.compress(text.encode()))
    assert [r.sequence for r in records(plain)] == [r.sequence for r in records(gz)]


@pytest.mark.parametrize(
    "content, reason",
    [
        (">a\nMK*V\n", "record 1 (a): internal stop '*' at residue 3"),
        (">a\nMK1V\n", "record 1 (a): illegal character '1' at residue 3"),
        (">a\n\n>b\nMK\n", "record 1 (a): empty sequence"),
        (">\nMKV\n", "record 1: empty header"),
        ("MKV\n>a\nMK\n", "record 0: sequence data before the first header (line 1)"),
        (">a\nMKV\n>a\nLL\n", "record 2 (a): duplicate id (first seen in"),
        (b">a\xff\nMKV\n", "record 1: header is not valid UTF-8"),
        (">a\nMK\xc3\xa9V\n".encode("latin-1").decode("latin-1"), "record 1 (a): illegal character"),
    ],
)
def test_bad_records_error_or_skip(tmp_path, content, reason):
    p = write(tmp_path, "bad.faa", content)
    with pytest.raises(FastaError) as exc:
        records(p)
    assert str(p) in str(exc.value) and reason in str(exc.value)
    out = records(p, on_invalid="skip")
    skipped = [r for r in out if isinstance(r, Skipped)]
    assert len(skipped) == 1 and skipped[0].reason in str(exc.value)


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "empty file"),
        (b"\x00\x01\x02binary", "binary data"),
        (b"LOCUS       NC_001 100 bp\nORIGIN\n", "GenBank"),
        (b"@read1\nACGT\n+\nIIII\n", "FASTQ"),
    ],
)
def test_whole_file_problems_always_raise(tmp_path, content, message):
    p = write(tmp_path, "f.faa", content)
    for mode in ("error", "skip"):
        with pytest.raises(FastaError, match=message):
            records(p, on_invalid=mode)


def test_truncated_gzip_raises(tmp_path):
    data = gzip.compress("".join(f">r{i}\n" + "MKV" * 5000 + "\n" for i in range(20)).encode())
    p = write(tmp_path, "t.faa.gz", data[: len(data) // 2])
    with pytest.raises(FastaError, match="truncated or corrupt gzip"):
        records(p)


def test_duplicate_ids_across_files(tmp_path):
    a = write(tmp_path, "a.faa", ">x\nMKV\n")
    b = write(tmp_path, "b.faa", ">x\nLLA\n>y\nMM\n")
    out = records(a, b, on_invalid="skip")
    assert [type(r) for r in out] == [Record, Skipped, Record]
    assert f"first seen in {a} record 1" in out[1].reason
    assert out[2].order == 1  # order counts kept records


def test_missing_file(tmp_path):
    with pytest.raises(FastaError, match="does not exist"):
        records(tmp_path / "nope.faa")


def test_nucleotide_file_warns(tmp_path, caplog):
    p = write(tmp_path, "n.fa", ">r\nACGTACGTNNACGT\n")
    assert len(records(p)) == 1
    assert "looks like a nucleotide file" in caplog.text


def test_shards_stream_contiguous_balanced_and_deterministic(tmp_path):
    import pyarrow.parquet as pq

    from virnucpro_core.options import Options
    from virnucpro_core.stages import shard

    rng = np.random.default_rng(0)
    lengths = rng.integers(30, 1500, 1000).tolist()
    p = write(tmp_path, "in.faa", "".join(f">r{i}\n{'M' * n}\n" for i, n in enumerate(lengths)))
    man = shard.run([str(p)], tmp_path / "a", Options(shards=7))
    assert man["shards"] == 7 and sum(man["shard_records"]) == 1000
    tables = [pq.read_table(tmp_path / f"a/shard_{i:04d}.parquet") for i in range(7)]
    assert [t.num_rows for t in tables] == man["shard_records"]
    assert [x for t in tables for x in t["order"].to_pylist()] == list(range(1000))  # contiguous, input order
    sums = [sum(len(s) for s in t["sequence"].to_pylist()) for t in tables]
    assert max(sums) - min(sums) <= 2 * max(lengths)
    again = shard.run([str(p)], tmp_path / "b", Options(shards=7))
    assert again["shard_records"] == man["shard_records"]
    by_size = shard.run([str(p)], tmp_path / "c", Options(residues_per_shard=100_000))  # shards: null, no first pass
    assert by_size["shards"] == -(-sum(lengths) // 100_000) and sum(by_size["shard_records"]) == 1000



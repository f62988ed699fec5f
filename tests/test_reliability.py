"""Reliability: the bad-input matrix through the whole workflow, kill and resume (the embed stage's chunks),
determinism and accounting. Tiny random ESM-2 on the CPU."""

import gzip
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import EXAMPLE, MODEL, ROOT, SNAKEMAKE, cpu_options, example_stages, random_protein, run_stages
from virnucpro_core.io import files
from virnucpro_core.io.part_files import Shard
from virnucpro_core.run.layout import Layout
from virnucpro_core.stages import embed, shard
from virnucpro_core.io.tables import column_array, read_metadata

pytestmark = pytest.mark.slow


def workflow(tmp_path: Path, inputs: list[Path], *extra: str, name: str = "out", background: bool = False):
    out = tmp_path / name
    cmd = [*SNAKEMAKE, "--cores", "2", "--config", f"input={[str(p) for p in inputs]}",
           f"model={MODEL}", f"outdir={out}", "shards=1", f"embedding={{lock_dir: {tmp_path / 'locks'}}}",
           "spot_check={sample: 4}", *extra]
    if background:
        return out, cmd, subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                          start_new_session=True)
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    return out, res.returncode, res.stdout + res.stderr


def fasta(tmp_path: Path, name: str, content: bytes | str) -> Path:
    p = tmp_path / name
    p.write_bytes(content.encode() if isinstance(content, str) else content)
    return p


def shard_log(out: Path) -> str:
    """The shard step's logs: every part's, then the index's."""
    logs = sorted((out / "logs/shard").glob("*.log")) + [out / "logs/shard_index.log"]
    return "".join(p.read_text() for p in logs if p.is_file())


def embeddings(out: Path) -> dict[str, np.ndarray]:
    t = pq.read_table(out / "embeddings.parquet")
    return dict(zip(t["id"].to_pylist(), column_array(t, "embedding")))


# ------------------------------------------------------------------ files that are wrong as a whole
_rng = np.random.default_rng(7)
_gz = gzip.compress("".join(f">r{i}\n{random_protein(_rng, 500)}\n" for i in range(40)).encode())
TRUNCATED_GZ = _gz[: len(_gz) // 2]

@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "empty file, no FASTA records"),
        (os.urandom(64).replace(b">", b"?") + b"\x00", "binary data, not FASTA"),
        (b"LOCUS       AB000001   120 bp  DNA\nORIGIN\n        1 acgt\n//\n", "looks like GenBank"),
        (b"@read1\nACGTACGT\n+\nIIIIIIII\n", "looks like FASTQ"),
        (TRUNCATED_GZ, "truncated or corrupt gzip"),
    ],
    ids=["empty", "binary", "genbank", "fastq", "truncated-gzip"],
)
def test_wrong_file_stops_the_run_naming_it(tmp_path, content, message):
    bad = fasta(tmp_path, "bad.faa", content)
    for mode in ("error", "skip"):
        out, rc, text = workflow(tmp_path, [bad], f"on_invalid={mode}", name=mode)
        assert rc != 0
        log = shard_log(out)
        assert str(bad) in log and message in log
        assert not (out / "embeddings.parquet").exists()


# ------------------------------------------------------------------ invalid records: error, or skip
BAD_RECORDS = {
    "no-sequence.faa": (">ok1\nMKVL\n>empty\n>ok2\nMKVL\n", 2, "empty", "empty sequence"),
    "before-header.faa": ("MKVLA\n>ok3\nMKVL\n", 0, "", "sequence data before the first header (line 1)"),
    "empty-header.faa": (">ok4\nMKVL\n>\nMKVL\n", 2, "", "empty header (no id after '>')"),
    "dup-in-file.faa": (">d1\nMKVL\n>d1\nMKVA\n", 2, "d1", "duplicate id (first seen in"),
    "internal-stop.faa": (">st\nMKV*LA\n", 1, "st", "internal stop '*' at residue 4"),
    "digits.faa": (">dg\nMKV1LA\n", 1, "dg", "illegal character '1' at residue 4"),
    "bad-utf8.faa": (b">u\xff\xfe\nMKVL\n", 1, "", "header is not valid UTF-8"),
}


def bad_record_files(tmp_path):
    files = [fasta(tmp_path, name, content) for name, (content, *_rest) in BAD_RECORDS.items()]
    files.append(fasta(tmp_path, "dup-across.faa", ">ok1\nMKVA\n>ok5\nMKVA\n"))  # ok1 is in no-sequence.faa
    return files


@pytest.mark.parametrize("name", list(BAD_RECORDS))
def test_invalid_record_stops_the_run_naming_file_record_and_reason(tmp_path, name):
    content, number, rec_id, reason = BAD_RECORDS[name]
    p = fasta(tmp_path, name, content)
    out, rc, _ = workflow(tmp_path, [p])
    assert rc != 0
    where = f"{p}: record {number}" + (f" ({rec_id})" if rec_id else "")
    assert f"{where}: {reason}" in shard_log(out)


def test_invalid_records_are_skipped_with_reasons_and_the_rest_embedded(tmp_path):
    files = bad_record_files(tmp_path)
    out, rc, text = workflow(tmp_path, files, "on_invalid=skip")
    assert rc == 0, text[-3000:]
    skipped = [line.split("\t") for line in (out / "skipped.tsv").read_text().splitlines()[1:]]
    got = {(Path(f).name, int(n)): (i, r) for i, r, f, n in skipped}
    for name, (_, number, rec_id, reason) in BAD_RECORDS.items():
        assert got[(name, number)][0] == rec_id and reason in got[(name, number)][1]
    assert "duplicate id (first seen in" in got[("dup-across.faa", 1)][1]
    assert len(got) == len(BAD_RECORDS) + 1
    ids = pq.read_table(out / "embeddings.parquet")["id"].to_pylist()
    assert ids == ["ok1", "ok2", "ok3", "ok4", "d1", "ok5"]  # input order, first of each duplicate kept
    summary = json.loads((out / "summary.json").read_text())
    assert summary["records_in"] == summary["embedded"] + summary["skipped"] == 14
    for f in files:
        c = summary["per_file"][str(f)]
        assert c["records_in"] == c["embedded"] + c["skipped"]


# ------------------------------------------------------------------ records that are normalised
def test_messy_but_valid_records_embed_like_their_clean_form(tmp_path, rng, caplog):
    base = random_protein(rng, 120)
    long = random_protein(rng, 10_000)
    files = {
        "clean.faa": f">clean\n{base}\n>r1022\n{long[:1022]}\n",
        "lower.faa": f">lower\n{base.lower()}\n",
        "stop.faa": f">stop\n{base}*\n",
        "gaps.faa": f">gaps\n{base[:50]}--..{base[50:]}\n",
        "spaces.faa": f">spaces\n{base[:60]} \t{base[60:]}\n",
        "crlf.faa": f">crlf desc\r\n{base[:60]}\r\n{base[60:]}\r\n",
        "gz.faa.gz": gzip.compress(f">gz\n{base}\n".encode()),
        "iupac.faa": ">iupac\nMUOBZJXK\n",
        "long.faa": f">r1023\n{long[:1023]}\n>r10000\n{long}\n",
        "nonascii-header.faa": f">prot_é description ü\n{base}\n",
        "nucleotide.fna": ">nt\nACGTTGCAACGTGGCATTACGNNACGT\n",
    }
    paths = [fasta(tmp_path, n, c) for n, c in files.items()]
    out, rc, text = workflow(tmp_path, paths)
    assert rc == 0, text[-3000:]
    emb = embeddings(out)
    t = pq.read_table(out / "embeddings.parquet")
    lengths = dict(zip(t["id"].to_pylist(), t["length"].to_pylist()))
    for rid in ("lower", "stop", "gaps", "spaces", "crlf", "gz", "prot_é"):
        np.testing.assert_allclose(emb[rid], emb["clean"], atol=1e-6, err_msg=rid)
        assert lengths[rid] == 120
    assert lengths["iupac"] == 8 and lengths["r10000"] == 10_000
    # truncate (default): residues past 1022 do not change the embedding
    np.testing.assert_allclose(emb["r1023"], emb["r1022"], atol=1e-6)
    np.testing.assert_allclose(emb["r10000"], emb["r1022"], atol=1e-6)
    assert "nucleotide.fna: 100% of residues are A/C/G/T/N: this looks like a nucleotide file" in shard_log(out)


def test_split_policy_embeds_every_residue_of_long_records(tmp_path, rng):
    long = random_protein(rng, 10_000)
    p = fasta(tmp_path, "long.faa", f">r1022\n{long[:1022]}\n>r1023\n{long[:1023]}\n>r10000\n{long}\n")
    out, rc, text = workflow(tmp_path, [p], "long_sequences={policy: split, overlap: 256}")
    assert rc == 0, text[-3000:]
    emb = embeddings(out)
    assert not np.allclose(emb["r10000"], emb["r1022"], atol=1e-4)
    plan = json.loads((out / "plans/shard_0000.json").read_text())
    assert plan["items"] == 1 + 2 + 13 and plan["residues_embedded"] >= 10_000 + 1023 + 1022


# ------------------------------------------------------------------ kill and resume
def test_sigkill_mid_shard_loses_at_most_one_chunk_and_the_rerun_is_bit_identical(tmp_path):
    chunked = "packing={chunk_tokens: 4096}"  # the example's 80k tokens in ~20 chunks
    ref, rc, text = workflow(tmp_path, [EXAMPLE], chunked, name="uninterrupted")
    assert rc == 0, text[-3000:]
    out, cmd, proc = workflow(tmp_path, [EXAMPLE], chunked, name="killed", background=True)
    chunk_dir = out / "embeddings/shard_0000.parquet.chunks"
    deadline = time.time() + 120
    while not list(chunk_dir.glob("*.parquet")):
        assert proc.poll() is None and time.time() < deadline, "the workflow ended before the first chunk was written"
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)  # snakemake and its running job, mid-shard
    proc.wait()
    from virnucpro_core.run.progress import snapshot

    deadline = time.time() + 10  # the killed job's process goes a moment after Snakemake's
    while (st := snapshot(out)).state != "interrupted" and time.time() < deadline:  # what `virnucpro status` reports
        time.sleep(0.1)
    assert st.state == "interrupted" and [s.state for s in st.shards] == ["interrupted"], st
    assert 0 < st.tokens_done < st.tokens_total and st.rate == 0
    done = len(list(chunk_dir.glob("*.parquet")))
    total = pq.read_schema(out / "plans/shard_0000.parquet").metadata[b"virnucpro_plan"]
    total = len(json.loads(total)["chunks"]) - 1
    assert total >= 10 and 1 <= done < total
    assert not (out / "embeddings.parquet").exists()
    assert not (out / "embeddings/shard_0000.parquet").exists()  # never a partial file under the final name
    unlock = subprocess.run([*cmd, "--unlock"], cwd=ROOT, capture_output=True, text=True)
    assert unlock.returncode == 0
    res = subprocess.run([*cmd, "--rerun-incomplete"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    log = (out / "logs/embed_shard/shard_0000.log").read_text()
    assert f"resuming: {done} of {total} chunks already done" in log  # only the chunk in flight was lost
    assert not chunk_dir.exists()
    a, b = pq.read_table(ref / "embeddings.parquet"), pq.read_table(out / "embeddings.parquet")
    assert a.column_names == b.column_names and a["id"].to_pylist() == b["id"].to_pylist()
    np.testing.assert_array_equal(column_array(a, "embedding"), column_array(b, "embedding"))


def chunked_shard(d):
    """The example as one shard of about 10 chunks: (folder, options, its parts, embeddings path)."""
    opts = cpu_options(d, shards=1, **{"packing.chunk_tokens": 8192})
    man = shard.run([str(EXAMPLE)], d / "shards", opts)
    return d, opts, [Layout(str(d)).part(p) for p in man["shards"][0]["parts"]], d / "emb.parquet"


def test_a_failed_embed_job_resumes_from_its_chunks_and_discards_chunks_of_other_options(tmp_path, monkeypatch):
    d, opts, s, out = chunked_shard(tmp_path / "c")
    first = embed.run(s, str(MODEL), out, opts)
    assert first["chunks"] >= 5 and first["resumed_chunks"] == 0 and first["records"] == 300
    ref = pq.read_table(out)
    out.unlink()

    calls, real = [], embed.Embedder.embed
    def fail_on_third_chunk(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("killed")
        return real(self, *args, **kwargs)
    monkeypatch.setattr(embed.Embedder, "embed", fail_on_third_chunk)
    with pytest.raises(RuntimeError, match="killed"):
        embed.run(s, str(MODEL), out, opts)
    monkeypatch.setattr(embed.Embedder, "embed", real)
    assert not out.exists() and not list(d.glob(".emb.parquet.*.tmp"))
    again = embed.run(s, str(MODEL), out, opts)
    assert again["resumed_chunks"] == 2  # the 2nd chunk, still being written when the 3rd failed, was finished
    assert pq.read_table(out).select(ref.column_names).equals(ref.select(ref.column_names))  # bit for bit
    run_stats = read_metadata(out)["run"]  # the job's statistics, in the footer
    assert run_stats["records"] == 300 and run_stats["chunks"] == first["chunks"] and run_stats["resumed_chunks"] == 2

    # a folder left by a job of other options (here float16 output) is not used
    out.unlink()
    other = embed.Chunks(out, embed.chunk_key(Shard(s), "", str(MODEL), opts.replace(**{"embedding.output_dtype": "float16"})))
    files.write_table(ref.slice(0, 3), other.path(0))
    third = embed.run(s, str(MODEL), out, opts)
    assert third["resumed_chunks"] == 0 and pq.read_table(out)["embedding"].equals(ref["embedding"])


def test_a_failed_write_stops_the_embed_job_and_the_rerun_resumes(tmp_path, monkeypatch):
    d, opts, s, out = chunked_shard(tmp_path / "w")
    appends, real = [], pq.ParquetWriter.write_table

    def disk_full_on_second_append(self, table, *args, **kwargs):
        if Path(self.where).name.startswith(".emb.parquet."):  # the shard output, not a chunk file
            appends.append(table.num_rows)
            if len(appends) == 2:
                raise OSError(28, "No space left on device")
        return real(self, table, *args, **kwargs)

    monkeypatch.setattr(pq.ParquetWriter, "write_table", disk_full_on_second_append)
    with pytest.raises(OSError, match="No space left on device"):
        embed.run(s, str(MODEL), out, opts)
    assert not out.exists() and not list(d.glob(".emb.parquet.*.tmp"))  # nothing partial, nothing left behind
    monkeypatch.setattr(pq.ParquetWriter, "write_table", real)
    again = embed.run(s, str(MODEL), out, opts)
    assert again["resumed_chunks"] == 2  # each chunk's own file is written before it is appended
    assert pq.read_table(out).num_rows == 300 and not (d / "emb.parquet.chunks").exists()


# ------------------------------------------------------------------ determinism and accounting (in process)
def test_shard_and_pack_counts_do_not_change_embeddings(tmp_path):
    _, a = example_stages(tmp_path, 1, 65536, "a")
    _, b = example_stages(tmp_path, 5, 2048, "b")
    _, c = example_stages(tmp_path, 1, 65536, "c")
    ta, tb, tc = (pq.read_table(r.embeddings) for r in (a, b, c))
    assert ta["id"].to_pylist() == tb["id"].to_pylist()
    np.testing.assert_allclose(column_array(ta, "embedding"), column_array(tb, "embedding"), atol=1e-5)
    np.testing.assert_array_equal(column_array(ta, "embedding"), column_array(tc, "embedding"))  # rerun: identical


def test_fewer_records_than_shards(tmp_path):
    p = fasta(tmp_path, "two.faa", ">a\nMKVLA\n>b\nMKKLLAW\n")
    summary, run = run_stages(tmp_path / "r", [p], cpu_options(tmp_path / "r", shards=4, **{"packing.token_budget": 2048}), MODEL)
    man = json.loads(Path(run.manifest).read_text())
    assert len(man["shards"]) == 4 and sorted(s["rows"] for s in man["shards"]) == [0, 0, 1, 1]  # byte ranges with no record
    assert summary["embedded"] == 2 and summary["spot_checked"] == 2
    assert pq.read_table(run.embeddings)["id"].to_pylist() == ["a", "b"]

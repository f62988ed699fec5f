"""Hostile paths, odd files, clashing runs: names that try to run commands, odd line ends and binary files, a
fuzzed reader, full disks and killed writers, two runs on one outdir (run.claim), tiny runs and the checks made
before any job. Every case names its file and loses no record."""

import errno
import gzip
import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import EXAMPLE, MODEL, ROOT, SNAKEMAKE, example_records, snakemake
from virnucpro_core.io import files
from virnucpro_core.run import claim
from virnucpro_core.cli import main
from virnucpro_core.io.fasta import FastaError, Record, Skipped, read_fasta
from virnucpro_core.io.tables import read_metadata

# ------------------------------------------------------------------ names that try to run commands
@pytest.mark.slow
def test_hostile_names_change_nothing_that_runs(tmp_path):
    """Spaces, quotes, $(), ; and newlines in the input, model, outdir and lock folder names."""
    home = tmp_path / "hostile"
    home.mkdir()
    fasta = home / "in put;touch PWNED_in 'q\"\n.faa"
    fasta.write_text(example_records(10))
    model = home / "tiny$(touch PWNED_model).pt"
    shutil.copy(MODEL, model)
    outdir = home / "out dir;touch PWNED_out $(touch PWNED_out2)\nx"
    cfg = home / "config.yaml"
    cfg.write_text(yaml.safe_dump({"input": str(fasta), "model": str(model), "outdir": str(outdir), "shards": 1,
                                   "embedding": {"lock_dir": str(home / "locks $(touch PWNED_lock);x")},
                                   "spot_check": {"sample": 2}}))
    res = snakemake("--cores", "2", "--configfile", str(cfg))
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    pwned = [p for p in list(home.rglob("PWNED*")) + list(ROOT.rglob("PWNED*")) if "PWNED" in p.name and not p.name.endswith((".faa", ".pt"))]
    assert not pwned, pwned
    table = pq.read_table(outdir / "embeddings.parquet")
    assert table.num_rows == 10
    assert read_metadata(outdir / "embeddings.parquet")["checkpoint"] == str(model)  # the very file named, not a truncated path
    assert (outdir / "logs/shard_index.log").is_file() and (outdir / "logs/shard/part_00000.log").is_file()


# ------------------------------------------------------------------ line ends, byte-order marks, binary files
@pytest.mark.parametrize("data", [b">r1 d\rMKVLA\r>r2 d\rMKVLW\r>r3 d\rMKVLY\r", b">r1 d\r\nMKVLA\r\n>r2 d\nMKVLW\r>r3 d\r\nMKV\rLY"],
                         ids=["cr-only", "mixed"])
def test_classic_mac_and_mixed_line_ends_keep_every_record(tmp_path, data):
    p = tmp_path / "mac.faa"
    p.write_bytes(data)
    got = [(r.id, r.sequence) for r in read_fasta([p])]
    assert got == [("r1", "MKVLA"), ("r2", "MKVLW"), ("r3", "MKVLY")]


def test_a_utf8_byte_order_mark_keeps_the_first_record(tmp_path):
    p = tmp_path / "bom.faa"
    p.write_bytes(b"\xef\xbb\xbf>r1 first\nMKV\n>r2\nMKL\n")
    assert [(r.id, r.number, r.sequence) for r in read_fasta([p])] == [("r1", 1, "MKV"), ("r2", 2, "MKL")]


@pytest.mark.parametrize("name, data, message", [
    ("image.faa", (ROOT / "docs/section1-0.png").read_bytes(), "a PNG image, not FASTA"),
    ("utf16.faa", ">a\nMKV\n".encode("utf-16"), "UTF-16 text"),
    ("x.faa.bz2", b"BZh91AY&SY" + bytes(40), "bzip2-compressed"),
    ("nul.faa", b">a\nMKV\n" + b"\x00" * 10 + b"\n>b\nMK\n", "binary data, not FASTA (NUL byte at byte 8)"),
])
def test_binary_and_foreign_files_stop_naming_the_file(tmp_path, name, data, message):
    p = tmp_path / name
    p.write_bytes(data)
    for mode in ("error", "skip"):
        with pytest.raises(FastaError, match=re.escape(message)) as exc:
            list(read_fasta([p], mode))
        assert str(exc.value).startswith(str(p))


# ------------------------------------------------------------------ fuzzing the reader
LINE_ENDS = [b"\n", b"\r\n", b"\r"]
LINE = st.one_of(
    st.builds(lambda w: b">" + w, st.binary(max_size=12)),                                   # headers, any bytes
    st.sampled_from([b"MKVLA", b"mkv*", b"AC-D.E", b"XBZUOJ", b"ACGT", b"M K\tV", b"12", b"", b"  "]),
    st.binary(max_size=8),                                                                    # anything at all
)


def split_lines(data: bytes) -> list[bytes]:
    """An independent reading of line ends: LF, CRLF or CR alone."""
    return data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")


@settings(max_examples=400, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(st.tuples(LINE, st.sampled_from(LINE_ENDS)), max_size=25), bom=st.booleans(), gz=st.booleans(),
       on_invalid=st.sampled_from(["skip", "error"]))
def test_fuzz_reader_accounts_for_every_header_or_names_the_file(tmp_path, lines, bom, gz, on_invalid):
    text = (b"\xef\xbb\xbf" if bom else b"") + b"".join(line + end for line, end in lines)
    p = tmp_path / "fuzz.faa"
    p.write_bytes(gzip.compress(text) if gz else text)
    try:
        out = list(read_fasta([p], on_invalid))
    except FastaError as exc:
        assert str(exc).startswith(str(p)), exc
        return
    body = text[3:] if bom else text
    headers = sum(1 for line in split_lines(body) if line.startswith(b">"))
    numbered = [r for r in out if r.number > 0]
    assert len(numbered) == headers
    assert [r.number for r in numbered] == list(range(1, headers + 1))
    assert all(isinstance(r, (Record, Skipped)) for r in out)
    assert all(r.reason for r in out if isinstance(r, Skipped))


# ------------------------------------------------------------------ full disks, killed writers
def test_a_full_disk_leaves_no_temporary_file_and_one_line(tmp_path, monkeypatch, capsys):
    p = tmp_path / "in.faa"
    p.write_text(">a\nMKV\n")

    def full(*args, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pq.ParquetWriter, "write_table", full)  # the shard stage's writer
    assert main(["shard", str(p), "--out", str(tmp_path / "shards")]) == 1
    err = capsys.readouterr().err
    assert "error: [Errno 28] No space left on device" in err and "Traceback" not in err
    assert not list((tmp_path / "shards").glob(".*tmp")) and not list((tmp_path / "shards").glob("*.parquet"))

    def full_json(*args, **kw):
        Path(args[0]).write_text("{partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.undo()
    monkeypatch.setattr(Path, "write_text", full_json)  # then the manifest, the last file the stage writes
    assert main(["shard", str(p), "--out", str(tmp_path / "shards")]) == 1
    assert not list((tmp_path / "shards").glob(".*tmp"))


def test_a_killed_writers_temporary_file_is_removed_by_the_next_write(tmp_path):
    stale = tmp_path / ".embeddings.parquet.abc123.tmp"
    stale.write_bytes(b"partial")
    files.write_json(tmp_path / "other.json", {})
    assert stale.exists()  # another file's writes leave it alone
    files.write_tsv(tmp_path / "embeddings.parquet", ["a"], [])
    assert not stale.exists()


# ------------------------------------------------------------------ one run per outdir
def _hold(outdir, q):
    q.put(claim.claim(outdir))
    time.sleep(60)


def test_an_outdir_claimed_by_a_live_run_is_refused_and_a_dead_runs_claim_taken_over(tmp_path):
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    q = ctx.Queue()
    holder = ctx.Process(target=_hold, args=(tmp_path, q))
    holder.start()
    first = q.get(timeout=10)
    with pytest.raises(RuntimeError, match=f"is in use by another run \\(run {first}, pid {holder.pid}"):
        claim.claim(tmp_path)
    os.kill(holder.pid, signal.SIGKILL)
    holder.join()
    second = claim.claim(tmp_path)  # the kernel dropped the dead run's lock
    assert second != first and claim.read(tmp_path)["run_id"] == second
    claim.check(tmp_path, second)
    with pytest.raises(RuntimeError, match="claimed by another run"):
        claim.check(tmp_path, first)


@pytest.mark.parametrize("code", [errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOLCK])
def test_a_filesystem_without_flock_falls_back_to_the_claim_file(tmp_path, monkeypatch, capsys, code):
    import fcntl

    def no_flock(fh, op):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(fcntl, "flock", no_flock)  # Lustre mounted noflock, some NFS set-ups
    first = claim.claim(tmp_path)
    assert claim.read(tmp_path)["run_id"] == first
    assert "does not lock files" in capsys.readouterr().out
    # a claim by a live process of this host still stops a second run; a dead one's is taken over
    info = {**claim.read(tmp_path), "pid": os.getppid()}
    files.write_json(tmp_path / claim.CLAIM, info)
    with pytest.raises(RuntimeError, match=f"is in use by another run \\(run {first}, pid {os.getppid()}"):
        claim.claim(tmp_path)
    dead = subprocess.Popen(["true"])
    dead.wait()
    files.write_json(tmp_path / claim.CLAIM, {**info, "pid": dead.pid})
    second = claim.claim(tmp_path)
    assert second != first and "taking it over from run" in capsys.readouterr().out


def test_other_lock_errors_are_not_hidden(tmp_path, monkeypatch):
    import fcntl

    monkeypatch.setattr(fcntl, "flock", lambda fh, op: (_ for _ in ()).throw(OSError(errno.EIO, "I/O error")))
    with pytest.raises(OSError, match="I/O error"):
        claim.claim(tmp_path)


@pytest.mark.slow
def test_a_second_run_from_another_checkout_on_the_same_outdir_stops(tmp_path):
    other = tmp_path / "checkout2"
    shutil.copytree(ROOT, other, ignore=shutil.ignore_patterns(".git", ".venv*", ".snakemake", "results*", "__pycache__", ".pytest_cache"))
    out = tmp_path / "shared-out"
    cfg = [f"input={EXAMPLE}", f"model={MODEL}", f"outdir={out}", "shards=2", f"embedding={{lock_dir: {tmp_path / 'locks'}}}"]
    first = subprocess.Popen([*SNAKEMAKE, "--cores", "2", "--config", *cfg], cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while not (out / claim.CLAIM).exists():
        assert first.poll() is None and time.time() < deadline, "the first run ended before claiming its outdir"
        time.sleep(0.05)
    second = snakemake("--cores", "2", "--config", *cfg, cwd=other)
    text = second.stdout + second.stderr
    assert second.returncode != 0 and f"outdir {out} is in use by another run" in text and f"pid {first.pid}" in text, text[-3000:]
    assert first.wait(timeout=600) == 0, first.stdout.read()[-3000:]
    assert pq.read_table(out / "embeddings.parquet").num_rows == 300
    # once the first run has ended, its claim is stale and the next run takes the outdir
    again = snakemake("--cores", "2", "--config", *cfg, cwd=other)
    assert again.returncode == 0, (again.stdout + again.stderr)[-3000:]


# ------------------------------------------------------------------ tiny runs
@pytest.mark.slow
@pytest.mark.parametrize("n", [0, 1], ids=["no-record-embedded", "one-record"])
def test_the_default_target_succeeds_with_zero_or_one_embedded_record(tmp_path, n):
    p = tmp_path / "tiny.faa"
    p.write_text(example_records(n) + ">bad\nMK*V\n")
    out = tmp_path / "out"
    res = snakemake("--cores", "2", "--config", f"input={p}", f"model={MODEL}", f"outdir={out}", "on_invalid=skip",
                    f"embedding={{lock_dir: {tmp_path / 'locks'}}}")
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["embedded"] == n and summary["skipped"] == 1 and summary["records_in"] == n + 1
    assert (out / "report/projection.png").stat().st_size > 1000
    assert len(list((out / "embeddings").glob("shard_*.json"))) == 1  # one embed job
    assert pq.read_table(out / "embeddings.parquet").num_rows == n


# ------------------------------------------------------------------ checks before any job
def test_model_dependent_options_fail_before_any_job(tmp_path):
    res = snakemake("-n", "--cores", "1", "--config", f"outdir={tmp_path}", "embedding={layers: [40]}")
    text = res.stdout + res.stderr
    assert res.returncode != 0 and "config 'embedding.layers': layer 40 is out of range for a model of 2 layers" in text


def test_a_named_model_absent_offline_stops_before_any_job_in_one_line(tmp_path):
    cfg = tmp_path / "run.yaml"  # as a user's edited config: no --config on the command line
    cfg.write_text(yaml.safe_dump({"input": "resources/example/proteins.faa", "model": "esm2_t33_650M_UR50D",
                                   "model_dir": str(tmp_path / "models"), "outdir": str(tmp_path / "out")}))
    env = {**os.environ, "TORCH_HOME": str(tmp_path / "torch"), "https_proxy": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9"}
    res = snakemake("--cores", "1", "--configfile", str(cfg), env=env, timeout=120)
    assert res.returncode == 1
    lines = res.stderr.splitlines()
    assert lines[0].startswith(f"virnucpro: model esm2_t33_650M_UR50D is not in {tmp_path / 'models'}/ or "
                               f"{tmp_path / 'torch/hub/checkpoints'}/ and cannot be downloaded here"), res.stderr
    assert "fetch-model esm2_t33_650M_UR50D" in lines[0] and "Traceback" not in res.stderr
    assert not (tmp_path / "out").exists()  # no job ran


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_outputs_get_the_mode_a_plain_open_gives(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        files.write_table(pa.table({"a": [1]}), tmp_path / "t.parquet")
        files.write_json(tmp_path / "s.json", {})
        with open(tmp_path / "plain", "w"):
            pass
    finally:
        os.umask(old)
    for name in ("t.parquet", "s.json", "plain"):
        assert (tmp_path / name).stat().st_mode & 0o777 == mode, name

"""How far a run is: the embed job's progress file, `virnucpro status` on finished, running and failed runs,
the terminal's line (plain lines with no control characters when the output is not a terminal)."""

import io
import json
import re
import threading
import time
from pathlib import Path

import pytest

from conftest import EXAMPLE, MODEL, cpu_options, run_stages
from virnucpro_core.io import files
from virnucpro_core.run import claim, progress
from virnucpro_core.cli import main
from virnucpro_core.run.layout import Layout
from virnucpro_core.run.parts import plan_parts, run_plan
from virnucpro_core.stages import embed, shard


def test_an_embed_jobs_progress_file_is_updated_while_it_runs(tmp_path):
    run = Layout(str(tmp_path))
    opts = cpu_options(tmp_path, shards=1, **{"packing.token_budget": 2048, "packing.chunk_tokens": 8192})
    man = shard.run([str(EXAMPLE)], run.shards, opts)
    parts = [run.part(p) for p in man["shards"][0]["parts"]]
    prog = progress.JobProgress(run.progress("shard_0000"), "shard_0000", every=0.0)
    seen = []
    job = threading.Thread(target=embed.run, args=(parts, str(MODEL), run.shard_embeddings("shard_0000"), opts),
                           kwargs={"progress": prog})
    job.start()
    while job.is_alive():
        data = progress._read(Path(run.progress("shard_0000")))
        if data:
            seen.append((data["state"], data["tokens_done"], data.get("tokens_total")))
        time.sleep(0.005)
    job.join()
    running = [s for s in seen if s[0] == "running"]
    assert len({t for _, t, _ in running}) >= 3, seen[:20]  # updated pack after pack
    assert all(a[1] <= b[1] for a, b in zip(running, running[1:]))  # only forward
    final = json.loads(Path(run.progress("shard_0000")).read_text())
    assert final["state"] == "done" and final["tokens_done"] == final["tokens_total"] == running[-1][2] > 100_000


def claimed_run(tmp_path, name, on_invalid="error", bad=False):
    """A run's files as the workflow leaves them (claim with its plan, parts, shards, merge), in this process."""
    d = tmp_path / name
    fasta = tmp_path / f"{name}.faa"
    fasta.write_text(EXAMPLE.read_text() + (">bad\nMK1V\n" if bad else ""))
    opts = cpu_options(d, shards=2, on_invalid=on_invalid, outdir=str(d))
    claim.claim(d, run_plan(plan_parts([str(fasta)], opts)))
    return d, fasta, opts


def test_status_of_a_finished_run(tmp_path, capsys):
    d, fasta, opts = claimed_run(tmp_path, "done")
    run_stages(d, [fasta], opts, MODEL)
    from virnucpro_core.stages.report import write_report_files

    write_report_files(d)
    st = progress.snapshot(d)
    assert st.state == "finished" and [s.state for s in st.shards] == ["done", "done"]
    assert st.tokens_done == st.tokens_total == sum(json.loads(Path(Layout(str(d)).shard_stats(f"shard_{i:04d}")).read_text())["tokens"]
                                                  for i in range(2))
    assert main(["status", str(d)]) == 0
    out = capsys.readouterr().out
    assert f"virnucpro status of {d}: finished" in out and "shard_0001: done" in out and "merge: done" in out


def test_status_of_a_run_killed_mid_shard(tmp_path):
    d, fasta, opts = claimed_run(tmp_path, "killed")
    run = Layout(str(d))
    man = shard.run([str(fasta)], run.shards, opts)
    # shard 0 finished; shard 1 stopped mid-way: its progress file says running, its process is gone
    parts = [run.part(p) for p in man["shards"][0]["parts"]]
    embed.run(parts, str(MODEL), run.shard_embeddings("shard_0000"), opts, stats_out=run.shard_stats("shard_0000"),
              progress=progress.JobProgress(run.progress("shard_0000"), "shard_0000"))
    dead = __import__("subprocess").Popen(["true"])
    dead.wait()
    files.write_json(run.progress("shard_0001"), {"shard": "shard_0001", "state": "running", "pid": dead.pid,
                                                  "host": __import__("socket").gethostname(), "tokens_done": 1000,
                                                  "tokens_total": 50_000, "tokens_per_s": 9000.0, "updated": time.time()})
    st = progress.snapshot(d)
    assert [s.state for s in st.shards] == ["done", "interrupted"] and st.state == "interrupted"
    assert st.tokens_done == st.shards[0].tokens_done + 1000 and st.tokens_total > st.tokens_done
    assert st.rate == 0  # nothing runs now
    # the same, as a job on another node whose progress stopped two minutes ago
    files.write_json(run.progress("shard_0001"), {**progress._read(Path(run.progress("shard_0001"))), "host": "node-17",
                                                  "updated": time.time() - 200})
    assert progress.snapshot(d).shards[1].state == "interrupted"
    files.write_json(run.progress("shard_0001"), {**progress._read(Path(run.progress("shard_0001"))), "updated": time.time()})
    running = progress.snapshot(d)
    assert running.state == "running" and running.rate == 9000.0 and running.eta == pytest.approx(49_000 / 9000.0, rel=0.01)
    assert "shards 1 done, 1 running of 2" in progress.line(running)


def test_status_of_a_failed_run_names_the_failing_jobs_error(tmp_path, capsys):
    d, fasta, opts = claimed_run(tmp_path, "failed", bad=True)
    run = Layout(str(d))
    log = Path(run.log("shard", "part_00001"))
    log.parent.mkdir(parents=True, exist_ok=True)
    with pytest.raises(Exception) as exc:
        shard.run([str(fasta)], run.shards, opts)
    log.write_text(f"2026-12-01 10:00:00,000 ERROR virnucpro_core: {exc.value}\n")  # as the job's log holds it
    assert main(["status", str(d)]) == 1
    out = capsys.readouterr().out
    assert "failed" in out.splitlines()[0]
    assert f"{log}: {fasta}: record 301 (bad): illegal character '1' at residue 3" in out


def test_the_terminal_line_without_a_terminal_is_plain_lines():
    st = progress.RunStatus("out", "r1", time.time() - 5, 3, 4, False,
                            [progress.ShardStatus("shard_0000", "running", 2_500_000, 10_000_000, 250_000.0),
                             progress.ShardStatus("shard_0001", "waiting", 0, 10_000_000)])
    assert progress.line(st) == ("virnucpro: 2.5M of 20.0M tokens (12%); shards 0 done, 1 running of 2; parts 3/4; "
                                 "250k tokens/s; ETA 1 min 10 s")
    plain, tty = io.StringIO(), _Tty()
    for stream in (plain, tty):
        r = progress.Reporter("out", stream=stream)
        r.show("line 1")
        r.show("line 2")
        r.close()
    assert plain.getvalue() == "line 1\nline 2\n" and not re.search(r"[\r\x1b]", plain.getvalue())
    assert tty.getvalue().startswith("\r\x1b[Kline 1\r\x1b[Kline 2")  # one line, rewritten


def test_snakemakes_lines_go_above_the_status_line_on_a_terminal():
    tty = _Tty()
    r = progress.Reporter("out", stream=tty)
    r.show("status 1")
    r.write_above("rule embed_shard:")
    r.write_above("\n")
    r.show("status 2")
    assert tty.getvalue() == "\r\x1b[Kstatus 1\r\x1b[Krule embed_shard:\nstatus 1\r\x1b[Kstatus 2"


class _Tty(io.StringIO):
    def isatty(self):
        return True

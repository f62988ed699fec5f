"""The SLURM profile on a real one-node Slurm (tests/slurm/cluster.sh), tiny model, CPU.

Needs root and Debian's packages (installed by the script when missing); skipped otherwise.
"""

import os
import re
import shutil
import subprocess
from datetime import datetime
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import EXAMPLE, MODEL, ROOT, SNAKEMAKE
from virnucpro_core.io.tables import column_array

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

# test-only settings: no accounting daemon (sacct fails, so the plugin polls squeue), quick
# status checks, no account, and requests that fit a 2-core CI machine
TEST_ARGS = [
    "--slurm-status-command", "squeue", "--slurm-init-seconds-before-status-checks", "1",
    "--seconds-between-status-checks", "2", "--slurm-no-account", "--slurm-keep-successful-logs",
    "--default-resources", "slurm_partition=gpu", "mem_mb=1000", "runtime=30", "cpus_per_task=1",
    "--set-resources", *(f"{rule}:{k}={v}" for rule in ("shard", "shard_index", "embed_shard", "merge")
                         for k, v in (("mem_mb", 1000), ("cpus_per_task", 1))),
]


def can_run_slurm() -> str | None:
    if os.geteuid() != 0:
        return "needs root to start munge, slurmctld and slurmd"
    if not shutil.which("apt-get") and not shutil.which("slurmctld"):
        return "needs Debian's apt-get to install Slurm"
    return None


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    reason = can_run_slurm()
    if reason:
        pytest.skip(reason)
    d = tmp_path_factory.mktemp("slurm")
    start = subprocess.run(["bash", str(ROOT / "tests/slurm/cluster.sh"), "start", str(d)], capture_output=True, text=True, timeout=600)
    assert start.returncode == 0, start.stdout + start.stderr
    yield d
    subprocess.run(["bash", str(ROOT / "tests/slurm/cluster.sh"), "stop", str(d)], timeout=120)


def run(out: Path, *extra: str, env=None) -> subprocess.CompletedProcess:
    cfg = [f"input={EXAMPLE}", f"model={MODEL}", f"outdir={out}", "shards=2", f"embedding={{lock_dir: {out.parent / 'locks'}}}"]
    cmd = ["timeout", "-k", "20", "900", *SNAKEMAKE, *extra, "--config", *cfg]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)


def stamps(log: Path) -> tuple[datetime, datetime]:
    t = [datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f") for line in log.read_text().splitlines() if line[:4].isdigit()]
    return min(t), max(t)


def test_workflow_through_the_slurm_profile(cluster, tmp_path):
    env = {**os.environ, "SLURM_CONF": str(cluster / "slurm.conf")}
    out = tmp_path / "slurm"
    res = run(out, "--profile", "profiles/slurm", "--slurm-logdir", str(tmp_path / "slurm_logs"), *TEST_ARGS, env=env)
    text = res.stdout + res.stderr
    assert res.returncode == 0, text[-5000:]
    # every job went through sbatch: one SLURM job id per rule job
    submitted = re.findall(r"Job \d+ has been submitted with SLURM jobid (\d+)", text)
    # 2 shard parts (separate jobs), the index, 2 embeds (each with its spot-check), merge, report figures
    assert len(submitted) == 2 + 1 + 2 + 1 + 1 and len(set(submitted)) == len(submitted)
    shard_jobs = [log for log in (out / "logs/shard").glob("part_*.log")]
    assert len(shard_jobs) == 2
    # the two embedding jobs ran at the same time on the two GPUs Slurm gave them
    jobs = []
    for log in sorted((out / "logs/embed_shard").glob("*.log")):
        m = re.search(r"scheduler: SLURM job (\d+), CUDA_VISIBLE_DEVICES=(\S+)", log.read_text())
        assert m, log.read_text()
        jobs.append((m.group(1), m.group(2), *stamps(log)))
    assert {j[0] for j in jobs} <= set(submitted)
    assert len({j[1] for j in jobs}) == 2, jobs
    (_, _, s1, e1), (_, _, s2, e2) = jobs
    assert max(s1, s2) < min(e1, e2), f"embedding jobs did not overlap: {jobs}"
    # and the result equals a local run's
    local = tmp_path / "local"
    res = run(local, "--cores", "2")
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    a, b = (pq.read_table(d / "embeddings.parquet") for d in (out, local))
    assert a["id"].to_pylist() == b["id"].to_pylist()
    np.testing.assert_allclose(column_array(a, "embedding"), column_array(b, "embedding"), atol=1e-6)

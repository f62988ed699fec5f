"""One GPU per job: lock files, crashed jobs, scheduler-assigned devices (fake GPUs)."""

import multiprocessing as mp
import os
import signal
import time

import pytest

from virnucpro_core.devices import acquire_device


def hold(lock_dir, n, queue, seconds):
    with acquire_device(lock_dir, "auto", n_devices=n, poll_seconds=0.05) as dev:
        queue.put((os.getpid(), dev, time.time()))
        time.sleep(seconds)
        queue.put((os.getpid(), "released", time.time()))


@pytest.fixture(autouse=True)
def no_scheduler(monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)


def test_concurrent_jobs_never_share_a_device(tmp_path):
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    procs = [ctx.Process(target=hold, args=(tmp_path, 2, q, 0.4)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(10)
    events = [q.get(timeout=10) for _ in range(8)]
    held = {}
    for pid, what, t in sorted(events, key=lambda e: e[2]):
        if what == "released":
            held.pop(pid)
        else:
            assert what not in held.values(), f"{what} given to two jobs at once"
            held[pid] = what
    assert {e[1] for e in events} == {"cuda:0", "cuda:1", "released"}


def test_a_killed_jobs_lock_is_recovered(tmp_path):
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=hold, args=(tmp_path, 1, q, 60))
    p.start()
    assert q.get(timeout=10)[1] == "cuda:0"
    os.kill(p.pid, signal.SIGKILL)
    p.join()
    assert (tmp_path / "gpu-0.lock").exists()  # the file stays, the lock does not
    with acquire_device(tmp_path, "auto", n_devices=1, poll_seconds=0.05) as dev:
        assert dev == "cuda:0"


def test_scheduler_assignment_wins(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    with acquire_device(tmp_path, "auto", n_devices=1) as dev:
        assert dev == "cuda:0"
    assert not list(tmp_path.glob("*.lock"))


def test_visible_devices_name_the_locks(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,5")
    with acquire_device(tmp_path, "auto", n_devices=2) as a, acquire_device(tmp_path, "auto", n_devices=2) as b:
        assert (a, b) == ("cuda:0", "cuda:1")
    assert sorted(p.name for p in tmp_path.glob("*.lock")) == ["gpu-2.lock", "gpu-5.lock"]


def test_cpu_when_no_gpu(tmp_path):
    with acquire_device(tmp_path, "auto", n_devices=0) as dev:
        assert dev == "cpu"
    with pytest.raises(RuntimeError, match="no GPU"):
        with acquire_device(tmp_path, "cuda", n_devices=0):
            pass

"""One GPU per job: lock files, crashed jobs, scheduler-assigned devices (fake GPUs)."""

import multiprocessing as mp
import os
import signal
import time

import pytest

from virnucpro_core.run.devices import acquire_device


def hold(lock_dir, n, queue, seconds):
    with acquire_device(lock_dir, "auto", n_devices=n, poll_seconds=0.05) as dev:
        queue.put((os.getpid(), dev, time.time()))
        time.sleep(seconds)
        queue.put((os.getpid(), "released", time.time()))


def assert_never_shared(events):
    """(pid, device or "released", time) events: no device held by two jobs at once."""
    held = {}
    for pid, what, _ in sorted(events, key=lambda e: e[2]):
        if what == "released":
            held.pop(pid)
        else:
            assert what not in held.values(), f"{what} given to two jobs at once"
            held[pid] = what


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
    assert_never_shared(events)
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


# ------------------------------------------------------------------ two users of one machine
def _user(name: str) -> tuple[int, int]:
    import pwd
    import shutil
    import subprocess

    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        if not shutil.which("useradd"):
            pytest.skip("needs useradd to create a second user")
        subprocess.run(["useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", name], check=True)
        pw = pwd.getpwnam(name)
    return pw.pw_uid, pw.pw_gid


def hold_as(uid, gid, lock_dir, queue, seconds):
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)
    os.umask(0o022)
    try:
        hold(lock_dir, 2, queue, seconds)
    except BaseException as exc:  # reported, so the test names it
        queue.put((os.getpid(), f"error: {exc!r}", time.time()))
        raise


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create users and switch to them")
def test_two_users_share_the_gpus_without_sharing_one(tmp_path):
    import stat
    import tempfile

    a, b = _user("vnp-lock-a"), _user("vnp-lock-b")
    base = tempfile.mkdtemp(prefix="vnp-locks-", dir="/tmp")
    os.chmod(base, 0o1777)  # as /tmp
    lock_dir = os.path.join(base, "gpu-locks")  # made by the first user's job, as /tmp/virnucpro-gpu-locks is
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    first = ctx.Process(target=hold_as, args=(*a, lock_dir, q, 1.5))
    first.start()
    got = [q.get(timeout=10)]
    others = [ctx.Process(target=hold_as, args=(*who, lock_dir, q, 0.3)) for who in (b, b, a)]
    for p in others:
        p.start()
    for p in [first, *others]:
        p.join(20)
        assert p.exitcode == 0
    got += [q.get(timeout=10) for _ in range(7)]
    assert not [e for e in got if e[1].startswith("error")], got
    assert_never_shared(got)
    assert stat.S_IMODE(os.stat(lock_dir).st_mode) == 0o1777 and os.stat(lock_dir).st_uid == a[0]
    files = sorted(os.listdir(lock_dir))
    assert files == ["gpu-0.lock", "gpu-1.lock"]
    assert all(stat.S_IMODE(os.stat(os.path.join(lock_dir, f)).st_mode) == 0o666 for f in files)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create users and switch to them")
def test_a_lock_folder_only_its_owner_can_write_is_named_with_the_fix():
    import tempfile

    a, b = _user("vnp-lock-a"), _user("vnp-lock-b")
    base = tempfile.mkdtemp(prefix="vnp-locks-", dir="/tmp")
    os.chmod(base, 0o1777)
    lock_dir = os.path.join(base, "gpu-locks")
    os.mkdir(lock_dir)
    os.chown(lock_dir, *a)
    os.chmod(lock_dir, 0o755)  # as an older version left it
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=hold_as, args=(*b, lock_dir, q, 0.1))
    p.start()
    p.join(20)
    _, what, _ = q.get(timeout=10)
    assert p.exitcode != 0 and what.startswith("error: RuntimeError")
    assert f"cannot create or open the GPU lock file {lock_dir}/gpu-0.lock" in what and f"chmod 1777 {lock_dir}" in what

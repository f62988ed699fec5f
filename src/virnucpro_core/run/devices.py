"""One GPU per job: Snakemake counts GPUs (``--resources gpu=N``) but does not say which.

Each embedding job takes an exclusive ``flock`` on ``<lock_dir>/gpu-<id>.lock`` for the first
free visible GPU and holds it until it exits. The kernel drops the lock when the process dies,
so a crashed or killed job never leaves a stale lock. Under a scheduler (SLURM sets
``CUDA_VISIBLE_DEVICES`` for the job) the scheduler's choice is used as is.

The lock folder is shared by every user of the machine: it is made world-writable with the
sticky bit (as ``/tmp``), lock files are created readable and writable by all, and a lock file
another user created is opened read-only if need be (``flock`` needs no write access), so two
users' jobs never share a GPU and neither fails on the other's files.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import socket
import time
from pathlib import Path
from typing import Iterator

log = logging.getLogger(__name__)


def visible_gpus(n_devices: int | None = None) -> list[str]:
    """Names of the GPUs this process may use: CUDA_VISIBLE_DEVICES entries, or 0..n-1."""
    if n_devices is None:
        import torch

        n_devices = torch.cuda.device_count() if torch.cuda.is_available() else 0
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    names = [x.strip() for x in env.split(",") if x.strip()] if env is not None else [str(i) for i in range(n_devices)]
    return names[:n_devices]


def scheduler_assigned() -> bool:
    return "SLURM_JOB_ID" in os.environ and "CUDA_VISIBLE_DEVICES" in os.environ


def shared_folder(folder: Path) -> Path:
    """``folder``, created if need be as a folder every user can create files in (mode 1777)."""
    if not folder.is_dir():
        folder.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(PermissionError):  # another user made it in between: theirs to set
            folder.chmod(0o1777)
    return folder


def open_lock(path: Path) -> int:
    """A descriptor of the lock file (created readable and writable by every user)."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        with contextlib.suppress(PermissionError):
            os.fchmod(fd, 0o666)  # past the umask; only the owner may, and needs to
        return fd
    except PermissionError:
        pass
    try:
        return os.open(path, os.O_RDONLY)  # another user's lock file: flock works on a read-only descriptor
    except (PermissionError, FileNotFoundError):
        st = path.parent.stat()
        raise RuntimeError(
            f"cannot create or open the GPU lock file {path}: its folder belongs to user id {st.st_uid} with mode "
            f"{oct(st.st_mode & 0o7777)}. Set embedding.lock_dir to a folder every user of this machine can write, "
            f"or have its owner run: chmod 1777 {path.parent}") from None


@contextlib.contextmanager
def acquire_device(
    lock_dir: str | Path,
    requested: str,
    n_devices: int | None = None,
    poll_seconds: float = 5.0,
) -> Iterator[str]:
    """Yield a torch device string this job holds alone until the block ends.

    ``requested``: ``auto`` (a free GPU, else the CPU), ``cpu``, or ``cuda`` (a free GPU, waiting
    for one to come free).
    """
    names = [] if requested == "cpu" else visible_gpus(n_devices)
    if scheduler_assigned():
        log.info("scheduler: SLURM job %s, CUDA_VISIBLE_DEVICES=%s", os.environ["SLURM_JOB_ID"], os.environ["CUDA_VISIBLE_DEVICES"])
    if not names:
        if requested == "cuda":
            raise RuntimeError("device 'cuda' requested but no GPU is visible")
        log.info("device: cpu (no GPU visible%s)", "" if requested == "auto" else ", as requested")
        yield "cpu"
        return
    if scheduler_assigned():
        log.info("device: cuda:0 (GPU %s assigned by the scheduler, job %s)", names[0], os.environ["SLURM_JOB_ID"])
        yield "cuda:0"
        return
    lock_dir = shared_folder(Path(lock_dir))
    waited = False
    while True:
        for index, name in enumerate(names):
            path = lock_dir / f"gpu-{name}.lock"
            fd = open_lock(path)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            try:
                with contextlib.suppress(OSError):  # who holds it, for people looking (read-only: another user's file)
                    os.ftruncate(fd, 0)
                    os.pwrite(fd, f"pid {os.getpid()} user {os.getuid()} on {socket.gethostname()} since "
                                  f"{time.strftime('%Y-%m-%dT%H:%M:%S')}\n".encode(), 0)
                log.info("device: cuda:%d (GPU %s, lock %s)", index, name, path)
                yield f"cuda:{index}"
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
                os.close(fd)
            return
        if not waited:
            log.info("all %d visible GPUs are held by other jobs; waiting for one to come free", len(names))
            waited = True
        time.sleep(poll_seconds)

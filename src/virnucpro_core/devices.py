"""One GPU per job: Snakemake counts GPUs (``--resources gpu=N``) but does not say which.

Each embedding job takes an exclusive ``flock`` on ``<lock_dir>/gpu-<id>.lock`` for the first
free visible GPU and holds it until it exits. The kernel drops the lock when the process dies,
so a crashed or killed job never leaves a stale lock. Under a scheduler (SLURM sets
``CUDA_VISIBLE_DEVICES`` for the job) the scheduler's choice is used as is.
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
    lock_dir = Path(lock_dir)
    lock_dir.mkdir(parents=True, exist_ok=True)
    waited = False
    while True:
        for index, name in enumerate(names):
            fh = open(lock_dir / f"gpu-{name}.lock", "a+")
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                fh.close()
                continue
            try:
                fh.seek(0)
                fh.truncate()
                fh.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%dT%H:%M:%S')}\n")
                fh.flush()
                log.info("device: cuda:%d (GPU %s, lock %s)", index, name, fh.name)
                yield f"cuda:{index}"
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)
                fh.close()
            return
        if not waited:
            log.info("all %d visible GPUs are held by other jobs; waiting for one to come free", len(names))
            waited = True
        time.sleep(poll_seconds)

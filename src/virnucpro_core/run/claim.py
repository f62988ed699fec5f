"""One run per outdir: a run claims its outdir when it starts, and every job checks the claim.

The Snakemake process that starts a run (``onstart``) takes an exclusive ``flock`` on
``<outdir>/.virnucpro-run.lock`` and holds it until it exits, and writes who it is to
``<outdir>/.virnucpro-run.json``. A second run on the same outdir, from this checkout or any
other, finds the lock taken and stops before any job, naming the run that holds it. The kernel
drops the lock when a run dies (a kill, a lost session), so a stale claim is recognised and taken
over. Each job gets the run's id in ``VIRNUCPRO_RUN`` and stops if the outdir is claimed by
another run.

Where the filesystem has no ``flock`` (Lustre mounted ``noflock``, some NFS set-ups: ENOSYS,
EOPNOTSUPP, ENOLCK), the claim file alone guards the outdir, with a warning: a claim by a live
process of this host stops the run, any other claim is taken over, and the jobs' check still
stops the older run's jobs.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
import uuid
from pathlib import Path

from ..io.files import write_json

ENV = "VIRNUCPRO_RUN"
LOCK = ".virnucpro-run.lock"
CLAIM = ".virnucpro-run.json"
_held: dict[str, object] = {}  # outdir -> the open lock file: kept open for the life of the process
NO_FLOCK = (errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOLCK, errno.EINVAL)  # the filesystem has no flock


def _describe(info: dict) -> str:
    if not info:
        return "a run that has not said who it is yet"
    return f"run {info.get('run_id')}, pid {info.get('pid')} on {info.get('host')}, started {info.get('started')} in {info.get('cwd')}"


def read(outdir: str | Path) -> dict:
    try:
        return json.loads((Path(outdir) / CLAIM).read_text())
    except (OSError, ValueError):
        return {}


def claim(outdir: str | Path, plan: dict | None = None) -> str:
    """Claim ``outdir`` for this process until it exits; return the new run id. Raises
    RuntimeError naming the live run that holds it. ``plan``: what the run will do (its parts and shards),
    recorded with the claim for ``virnucpro status``."""
    d = Path(outdir)
    d.mkdir(parents=True, exist_ok=True)
    fh = open(d / LOCK, "a+")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.close()
        raise RuntimeError(f"outdir {d} is in use by another run ({_describe(read(d))}); wait for it to end, "
                           "or give this run another outdir") from None
    except OSError as exc:
        if exc.errno not in NO_FLOCK:
            raise
        fh.close()
        fh = None
        other = read(d)
        if other.get("host") == socket.gethostname() and _alive(other.get("pid")) and other.get("pid") != os.getpid():
            raise RuntimeError(f"outdir {d} is in use by another run ({_describe(other)}); wait for it to end, "
                               "or give this run another outdir") from None
        print(f"virnucpro: warning: the filesystem of {d} does not lock files ({os.strerror(exc.errno)}): only the claim file "
              f"{d / CLAIM} guards the outdir" + (f"; taking it over from {_describe(other)}" if other else ""), flush=True)
    run_id = uuid.uuid4().hex[:12]  # a dead run's claim is simply replaced
    info = {"run_id": run_id, "pid": os.getpid(), "host": socket.gethostname(), "cwd": os.getcwd(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "started_epoch": time.time(), **({"plan": plan} if plan else {})}
    write_json(d / CLAIM, info)
    _held[str(d)] = fh
    return run_id


def _alive(pid: object) -> bool:
    """Whether process ``pid`` of this host runs (a killed one not yet reaped, a zombie, does not)."""
    if not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        pass
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def check(outdir: str | Path, run_id: str) -> None:
    """In a job of run ``run_id``: stop if the outdir has been claimed by another run since."""
    info = read(outdir)
    if info.get("run_id") != run_id:
        raise RuntimeError(f"outdir {outdir} is claimed by another run ({_describe(info)}); this job of run {run_id} stops "
                           "so the two runs do not mix their outputs")

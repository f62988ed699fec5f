"""How far a run is, from the files it writes under ``outdir`` (no torch, no Snakemake): for the terminal while
the workflow runs, for ``virnucpro status OUTDIR`` (also from a cluster's login node), and for each embed job,
which writes its progress as ``<outdir>/progress/<shard>.json``, atomically replaced every few seconds.

A run's plan (its parts and shards, with the tokens each shard is estimated to hold) is in the claim file
(:mod:`.claim`) from the start; a shard's tokens are exact once its job has planned its packs.
"""

from __future__ import annotations

import json
import os
import re
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import claim
from ..io.files import write_json
from .layout import Layout

STALE_SECONDS = 120  # a running job's progress file not updated for this long: the job is gone
_LEVEL = re.compile(r"^\S+ \S+ ERROR \S+: (.*)$")


class JobProgress:
    """What an embed job writes as it goes: every ``every`` seconds at most, and at each change of state."""

    def __init__(self, path: str | Path | None, shard: str, every: float = 2.0) -> None:
        self.path, self.every, self.last = (Path(path) if path else None), every, 0.0
        self.data = {"shard": shard, "state": "starting", "pid": os.getpid(), "host": socket.gethostname(),
                     "started": time.time(), "tokens_done": 0, "tokens_total": None, "rows": None, "chunks": None,
                     "chunks_done": 0, "tokens_per_s": None}

    def update(self, force: bool = False, **values) -> None:
        self.data.update(values)
        now = time.time()
        if self.path and (force or now - self.last >= self.every):
            self.data["updated"] = now
            write_json(self.path, self.data)
            self.last = now


@dataclass
class ShardStatus:
    name: str
    state: str  # waiting, running, done, failed, interrupted
    tokens_done: int = 0
    tokens_total: int | None = None
    tokens_per_s: float | None = None
    error: str | None = None


@dataclass
class RunStatus:
    outdir: str
    run_id: str | None
    started: float | None
    parts_done: int
    parts_total: int | None
    index_done: bool
    shards: list[ShardStatus] = field(default_factory=list)
    merged: bool = False
    reported: bool = False
    failures: list[str] = field(default_factory=list)

    @property
    def tokens_done(self) -> int:
        return sum(s.tokens_done for s in self.shards)

    @property
    def tokens_total(self) -> int:
        return sum(s.tokens_total or 0 for s in self.shards)

    @property
    def rate(self) -> float:
        return sum(s.tokens_per_s or 0.0 for s in self.shards if s.state == "running")

    @property
    def eta(self) -> float | None:
        left = self.tokens_total - self.tokens_done
        return left / self.rate if self.rate > 0 else None

    @property
    def state(self) -> str:
        if self.merged and self.reported and not self.failures:
            return "finished"
        if any(s.state == "running" for s in self.shards):
            return "running"
        if self.failures:
            return "failed"
        if any(s.state == "interrupted" for s in self.shards):
            return "interrupted"
        return "waiting" if not self.started else "running"


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _alive(info: dict) -> bool:
    """Whether the job that wrote ``info`` still runs: its process, on this host; its last update, elsewhere."""
    if info.get("host") == socket.gethostname():
        return claim._alive(info.get("pid"))
    return time.time() - info.get("updated", 0) < STALE_SECONDS


def _error(log: Path) -> str | None:
    """A job log's last ERROR line (the job's own error), if any."""
    try:
        lines = [m.group(1) for line in log.read_text(errors="replace").splitlines() if (m := _LEVEL.match(line))]
    except OSError:
        return None
    return lines[-1] if lines else None


def snapshot(outdir: str | Path) -> RunStatus:
    """The run in ``outdir`` as its files show it now."""
    run = Layout(str(outdir))
    info = claim.read(outdir)
    plan = info.get("plan", {})
    started = info.get("started_epoch")
    fresh = lambda p: Path(p).is_file() and (not started or Path(p).stat().st_mtime >= started - 1)  # noqa: E731
    parts_done = len(list(Path(run.shards).glob("part_*.json")))
    names = list(plan.get("shards", {})) or sorted({p.stem for d in ("progress", "embeddings")
                                                    for p in Path(run.outdir, d).glob("shard_*.json")})
    status = RunStatus(str(outdir), info.get("run_id"), started, parts_done, plan.get("parts"), Path(run.manifest).is_file())
    for name in names:
        estimate = plan.get("shards", {}).get(name)
        stats, prog = _read(Path(run.shard_stats(name))), _read(Path(run.progress(name)))
        log = Path(run.log("embed_shard", name))
        if stats:
            s = ShardStatus(name, "done", stats.get("tokens", 0), stats.get("tokens"), stats.get("tokens_per_s"))
        elif prog:
            state = prog.get("state")
            if state in ("starting", "running") and not _alive(prog):
                state = "interrupted"
            s = ShardStatus(name, "running" if state == "starting" else state, prog.get("tokens_done", 0),
                            prog.get("tokens_total") or estimate, prog.get("tokens_per_s"),
                            prog.get("error") or (_error(log) if state == "failed" else None))
        else:
            s = ShardStatus(name, "waiting", 0, estimate)
        status.shards.append(s)
    status.merged, status.reported = fresh(run.summary), fresh(run.figure("provenance.html"))
    logs = Path(run.logs)
    for log in sorted(logs.rglob("*.log")) if logs.is_dir() else []:
        if fresh(log) and (err := _error(log)):
            status.failures.append(f"{log}: {err}")
    return status


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    m, s = divmod(int(seconds + 0.5), 60)
    h, m = divmod(m, 60)
    return f"{h} h {m:02d} min" if h else f"{m} min {s:02d} s" if m else f"{s} s"


def _tokens(n: float) -> str:
    return f"{n / 1e9:.2f}G" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.0f}k"


def line(st: RunStatus) -> str:
    """The run in one line (the terminal, while the workflow runs)."""
    done = sum(s.state == "done" for s in st.shards)
    running = sum(s.state == "running" for s in st.shards)
    total = st.tokens_total
    share = f" ({100 * st.tokens_done / total:.0f}%)" if total else ""
    parts = f"parts {st.parts_done}/{st.parts_total}" if st.parts_total else f"parts {st.parts_done}"
    return (f"virnucpro: {_tokens(st.tokens_done)} of {_tokens(total)} tokens{share}; shards {done} done, {running} running "
            f"of {len(st.shards)}; {parts}; {_tokens(st.rate)} tokens/s; ETA {_duration(st.eta)}")


def report(st: RunStatus) -> str:
    """The run in a few lines (``virnucpro status``)."""
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(st.started)) if st.started else "not started"
    elapsed = _duration(time.time() - st.started) if st.started else "-"
    out = [f"virnucpro status of {st.outdir}: {st.state} (run {st.run_id}, started {started}, {elapsed} ago)",
           f"  shard step: {st.parts_done}" + (f" of {st.parts_total}" if st.parts_total else "") + " parts done, "
           + ("checked together (manifest.json)" if st.index_done else "not yet checked together"),
           f"  embedding: {_tokens(st.tokens_done)} of {_tokens(st.tokens_total)} tokens"
           + (f", {_tokens(st.rate)} tokens/s, ETA {_duration(st.eta)}" if st.rate else "")]
    for s in st.shards:
        frac = f"{_tokens(s.tokens_done)}/{_tokens(s.tokens_total or 0)} tokens" if s.state != "waiting" else \
            f"~{_tokens(s.tokens_total or 0)} tokens"
        rate = f", {_tokens(s.tokens_per_s)} tokens/s" if s.tokens_per_s and s.state in ("running", "done") else ""
        out.append(f"    {s.name}: {s.state}, {frac}{rate}" + (f": {s.error}" if s.error else ""))
    out.append(f"  merge: {'done' if st.merged else 'waiting'}; report figures: {'done' if st.reported else 'waiting'}")
    if st.failures:
        out.append("  failed:")
        out += [f"    {f}" for f in st.failures]
    return "\n".join(out)


class Bar(JobProgress):
    """An in-process run's embedding as one progress bar with its ETA (``virnucpro extract``): on a terminal, a
    tqdm bar over every shard's tokens; elsewhere nothing (the log says how far each shard is)."""

    def __init__(self, estimates: dict[str, int], stream=None) -> None:
        from tqdm import tqdm

        super().__init__(None, "")
        self.stream = stream or sys.stderr
        self.estimates, self.done, self.shard = dict(estimates), {}, None
        self.tqdm = tqdm(total=sum(self.estimates.values()), unit="tok", unit_scale=True, file=self.stream, dynamic_ncols=True,
                         desc="embedding", disable=not (hasattr(self.stream, "isatty") and self.stream.isatty()))

    def start(self, shard: str) -> "Bar":
        self.shard = shard
        return self

    def update(self, force: bool = False, **values) -> None:
        if values.get("tokens_total") is not None:
            self.estimates[self.shard] = values["tokens_total"]  # exact once the shard is planned
            self.tqdm.total = sum(self.estimates.values())
        if "tokens_done" in values:
            self.done[self.shard] = values["tokens_done"]
            self.tqdm.n = sum(self.done.values())
        self.tqdm.refresh()

    def close(self) -> None:
        self.tqdm.close()


class Reporter:
    """The run's progress on the terminal while Snakemake runs (a thread of the Snakemake process). On a terminal,
    one line kept at the bottom and rewritten every ``every`` seconds (Snakemake's own lines go above it); else a
    plain line every ``every_plain`` seconds, with no control characters (a cluster's log file, ``nohup``)."""

    def __init__(self, outdir: str, stream=None, every: float = 2.0, every_plain: float = 60.0) -> None:
        self.outdir, self.stream = outdir, stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.every = every if self.tty else every_plain
        self.lock = threading.Lock()
        self.shown = ""  # the status line on the screen (a terminal), or ""
        self.midline = False  # Snakemake has written part of a line: the status line waits
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True, name="virnucpro-progress")

    def start(self) -> "Reporter":
        if self.tty:  # Snakemake's own lines clear the status line, then it is drawn again below them
            import logging

            for lg in [logging.getLogger(), *(logging.getLogger(n) for n in list(logging.root.manager.loggerDict))]:
                for h in getattr(lg, "handlers", []):
                    if isinstance(h, logging.StreamHandler) and h.stream is self.stream:
                        h.setStream(_Above(self))
        self.thread.start()
        return self

    def _run(self) -> None:
        while not self.stop.wait(self.every):
            self.show(line(snapshot(self.outdir)))

    def show(self, text: str) -> None:
        with self.lock:
            if not self.tty:
                self.stream.write(text + "\n")
            elif not self.midline:
                self.stream.write("\r\x1b[K" + text)
            self.shown = text if self.tty else ""
            self.stream.flush()

    def write_above(self, text: str) -> None:
        """Snakemake's output: the status line is cleared before a line starts and drawn again after it ends."""
        with self.lock:
            if self.shown and not self.midline:
                self.stream.write("\r\x1b[K")
            self.stream.write(text)
            self.midline = not text.endswith("\n")
            if self.shown and not self.midline:
                self.stream.write(self.shown)
            self.stream.flush()

    def close(self) -> None:
        self.stop.set()
        with self.lock:
            if self.tty and self.shown:
                self.stream.write("\r\x1b[K")
                self.stream.flush()
                self.shown = ""


class _Above:
    """A stream for Snakemake's log handler that writes above the status line."""

    def __init__(self, reporter: Reporter) -> None:
        self.reporter = reporter

    def write(self, text: str) -> int:
        self.reporter.write_above(text)
        return len(text)

    def flush(self) -> None:
        self.reporter.stream.flush()

    def isatty(self) -> bool:
        return True

    def fileno(self) -> int:
        return self.reporter.stream.fileno()

"""What the terminal shows at the end of a workflow run (Snakemake's ``onsuccess``/``onerror``):
the run in a few lines on success, the failing jobs' own error lines on failure. No torch here."""

from __future__ import annotations

import json
import re
from pathlib import Path

from . import claim
from .layout import Layout

_LEVEL = re.compile(r"^\S+ \S+ (WARNING|ERROR) \S+: (.*)$")
_RAISED = re.compile(r"^\w*(Error|Exception)\b.*: .+")


def _run_logs(outdir: str) -> list[Path]:
    """Log files this run wrote (changed since it claimed the outdir), oldest first."""
    started = claim.read(outdir).get("started_epoch", 0.0)
    logs = [p for p in Path(Layout(outdir).logs).rglob("*.log") if p.stat().st_mtime >= started - 1]
    return sorted(logs, key=lambda p: p.stat().st_mtime)


def _lines(log: Path, level: str) -> list[str]:
    return [m.group(2) for line in log.read_text(errors="replace").splitlines() if (m := _LEVEL.match(line)) and m.group(1) == level]


def success(outdir: str, gpus_asked: int | None) -> str:
    run = Layout(outdir)
    s = json.loads(Path(run.summary).read_text())
    reasons = ", ".join(f"{n} {r}" for r, n in s.get("skipped_by_reason", {}).items())
    t = s.get("truncated", {})
    out = [f"virnucpro: done in {s.get('wall_seconds')} s (workflow {s.get('workflow_commit')})",
           f"  records in {s['records_in']}: embedded {s['embedded_input_records']}, skipped {s['skipped']}"
           + (f" ({reasons})" if reasons else ""),
           f"  truncated records: {t.get('records', 0)}, {t.get('residues_not_embedded', 0)} residues not embedded "
           "(column embedded_residues)",
           f"  rows filled from a duplicate: {s.get('filled_from_duplicates', 0)} of {s['embedded']} (identical sequences "
           "embedded once)",
           f"  spot-check: {s['spot_checked']} sequences against the unpacked model, {s['spot_check_failed']} below threshold"]
    warnings = []
    embed_logs = sorted((Path(run.logs) / "embed_shard").glob("*.log"))
    on_cpu = [p.stem for p in embed_logs if "device: cpu" in p.read_text(errors="replace")]
    if gpus_asked and on_cpu:
        warnings.append(f"GPUs were asked for (--resources gpu={gpus_asked}) but {len(on_cpu)} of {len(embed_logs)} embed "
                        "jobs ran on the CPU: no GPU was visible to them (check CUDA_VISIBLE_DEVICES and the torch build)")
    for log in _run_logs(outdir):
        warnings += [f"{log.stem}: {w}" for w in _lines(log, "WARNING")]
    if warnings:
        out.append("  warnings:")
        out += [f"    - {w}" for w in dict.fromkeys(warnings)]
    out.append(f"  outputs: {run.embeddings}, {run.skipped}, {run.spot_checks}, {run.summary}")
    out.append("  report: snakemake --report report.html (with the same --config)")
    return "\n".join(out)


def failure(outdir: str) -> str:
    """The decisive line of each failed job: its ERROR line, else the exception its log ends with."""
    found = []
    for log in _run_logs(outdir):
        lines = log.read_text(errors="replace").splitlines()
        errors = _lines(log, "ERROR") or [line for line in lines[-5:] if _RAISED.match(line)]
        found += [f"  {log}: {e}" for e in errors[-1:]]
    if not found:
        return "virnucpro: the run failed before or outside a job; Snakemake's message above says why"
    return "virnucpro: the run failed\n" + "\n".join(found)


def progress_hint(outdir: str) -> str:
    return (f"virnucpro: the run's progress below (also: virnucpro status {outdir}); each embed job's own log in "
            f"{Path(Layout(outdir).logs) / 'embed_shard'}/<shard>.log")

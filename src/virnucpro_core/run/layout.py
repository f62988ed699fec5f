"""Where a run's files live under ``outdir``: read by the workflow's rules and by the report.

Part names are ``part_00000``, ``part_00001``... (one shard-step job each), shard names ``shard_0000``,
``shard_0001``... (one embedding job each); ``name`` below may also be a Snakemake wildcard pattern such
as ``{shard}``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..io.part_files import PART_FILES
from .parts import part_name, shard_name  # noqa: F401 (the names, for the layout's users)

SHARD_PATTERN = r"shard_\d{4}"
PART_PATTERN = r"part_\d{5}"


@dataclass(frozen=True)
class Layout:
    outdir: str

    def _p(self, *parts: str) -> str:
        return str(Path(self.outdir, *parts))

    # shard_fasta
    @property
    def shards(self) -> str:
        return self._p("shards")

    def part(self, name: str, what: str = "rows") -> str:
        """A part's ``rows``, ``manifest``, ``ids``, ``skipped`` or ``keys`` file (:data:`..io.part_files.PART_FILES`)."""
        return self._p("shards", f"{name}{PART_FILES[what]}")

    @property
    def manifest(self) -> str:
        return self._p("shards", "manifest.json")

    @property
    def shard_skipped(self) -> str:
        return self._p("shards", "skipped.tsv")

    # embed_shard (its plan, its duplicates, its statistics), spot_check
    def plan(self, name: str) -> str:
        return self._p("plans", f"{name}.parquet")

    def plan_stats(self, name: str) -> str:
        return self._p("plans", f"{name}.json")

    def shard_embeddings(self, name: str) -> str:
        return self._p("embeddings", f"{name}.parquet")

    def shard_dups(self, name: str) -> str:
        return self._p("embeddings", f"{name}.dups.npy")

    def shard_stats(self, name: str) -> str:
        return self._p("embeddings", f"{name}.json")

    def progress(self, name: str) -> str:
        """An embed job's progress as it runs (:mod:`.progress`), replaced every few seconds."""
        return self._p("progress", f"{name}.json")

    def spot_check(self, name: str) -> str:
        return self._p("spot_check", f"{name}.tsv")

    def spot_check_summary(self, name: str) -> str:
        return self._p("spot_check", f"{name}.json")

    # merge
    @property
    def embeddings(self) -> str:
        return self._p("embeddings.parquet")

    @property
    def skipped(self) -> str:
        return self._p("skipped.tsv")

    @property
    def spot_checks(self) -> str:
        return self._p("spot_check.tsv")

    @property
    def summary(self) -> str:
        return self._p("summary.json")

    # report_figures
    def figure(self, name: str) -> str:
        return self._p("report", name)

    # every rule
    @property
    def logs(self) -> str:
        return self._p("logs")

    def log(self, rule: str, name: str | None = None) -> str:
        return self._p("logs", rule, f"{name}.log") if name else self._p("logs", f"{rule}.log")

    def benchmark(self, rule: str, name: str | None = None) -> str:
        return self._p("benchmarks", rule, f"{name}.tsv") if name else self._p("benchmarks", f"{rule}.tsv")

    def shard_names(self) -> list[str]:
        """Names of the shards whose embed job finished (its statistics are written last; sorted)."""
        return sorted(p.stem for p in Path(self.outdir, "embeddings").glob("shard_*.json"))

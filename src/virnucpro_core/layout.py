"""Where a run's files live under ``outdir``: read by the workflow's rules and by the report.

Shard names are ``shard_0000``, ``shard_0001``...; ``name`` below may also be a Snakemake
wildcard pattern such as ``{shard}``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


def shard_name(index: int) -> str:
    return f"shard_{index:04d}"


SHARD_PATTERN = r"shard_\d{4}"


@dataclass(frozen=True)
class Layout:
    outdir: str

    def _p(self, *parts: str) -> str:
        return str(Path(self.outdir, *parts))

    # shard_fasta
    @property
    def shards(self) -> str:
        return self._p("shards")

    def shard(self, name: str) -> str:
        return self._p("shards", f"{name}.parquet")

    @property
    def manifest(self) -> str:
        return self._p("shards", "manifest.json")

    @property
    def shard_skipped(self) -> str:
        return self._p("shards", "skipped.tsv")

    # packing_plan
    def plan(self, name: str) -> str:
        return self._p("plans", f"{name}.parquet")

    def plan_stats(self, name: str) -> str:
        return self._p("plans", f"{name}.json")

    # embed_shard, spot_check
    def shard_embeddings(self, name: str) -> str:
        return self._p("embeddings", f"{name}.parquet")

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

    def shard_names(self, kind: str = "plans") -> list[str]:
        """Names of the shards that have a file in ``plans`` or ``embeddings`` (sorted)."""
        return sorted(p.stem for p in Path(self.outdir, kind).glob("shard_*.parquet"))

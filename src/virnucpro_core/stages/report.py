"""Figures and tables for the run report (``snakemake --report report.html``).

Reads what a finished run left in ``outdir`` (plans, the embed jobs' statistics, spot checks,
benchmarks, the merged Parquet; where each lives: :class:`.layout.Layout`) and writes PNG figures
and HTML tables. Imports no torch.
"""

from __future__ import annotations

import json
import logging
import platform
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.dataset as ds  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from .. import __version__  # noqa: E402
from ..io.files import read_tsv  # noqa: E402
from ..run.layout import Layout  # noqa: E402
from ..io.tables import column_array, read_metadata  # noqa: E402

log = logging.getLogger(__name__)
plt.rcParams.update({"figure.dpi": 110, "axes.grid": True, "grid.alpha": 0.3, "font.size": 9})


def _write_table(path: str, rows: list[dict], title: str) -> None:
    """A small self-contained HTML table (the report shows HTML inline)."""
    from html import escape

    cols = list(rows[0]) if rows else []
    head = "".join(f"<th>{escape(str(c))}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{escape(str(r[c]))}</td>" for c in cols) + "</tr>" for r in rows)
    style = ("body{font-family:sans-serif;font-size:13px;margin:12px} table{border-collapse:collapse} "
             "th,td{border:1px solid #ccc;padding:3px 8px;text-align:left;vertical-align:top;max-width:900px;"
             "overflow-wrap:anywhere} th{background:#eee}")
    Path(path).write_text(f"<!doctype html><html><head><meta charset='utf-8'><title>{escape(title)}</title><style>{style}</style></head>"
                    f"<body><h3>{escape(title)}</h3><table><tr>{head}</tr>{body}</table></body></html>\n")


def input_figure(run: Layout, dest: str) -> None:
    summary = json.loads(Path(run.summary).read_text())
    lengths = pq.read_table(run.embeddings, columns=["length"])["length"].to_numpy()
    skipped = read_tsv(run.skipped)
    fig, ax = plt.subplots(1, 3, figsize=(13, 3.6))
    files = list(summary["per_file"])
    names = [Path(f).name for f in files]
    emb = [summary["per_file"][f]["embedded"] for f in files]
    skp = [summary["per_file"][f]["skipped"] for f in files]
    y = np.arange(len(files))
    ax[0].barh(y, emb, label="embedded")
    ax[0].barh(y, skp, left=emb, label="skipped", color="tab:red")
    ax[0].set_yticks(y, names)
    ax[0].set_xlabel("input records")
    ax[0].set_title("Records per input file")
    ax[0].legend(loc="lower right")
    bins = np.logspace(np.log10(max(lengths.min(), 1)), np.log10(lengths.max() + 1), 40) if len(lengths) else 10
    ax[1].hist(lengths, bins=bins, color="tab:blue")
    ax[1].set_xscale("log")
    ax[1].axvline(1022, color="k", ls="--", lw=1, label="ESM-2 limit (1022)")
    ax[1].set_xlabel("sequence length (residues, log scale)")
    ax[1].set_ylabel("records")
    ax[1].set_title(f"Length of the {len(lengths)} embedded records")
    ax[1].legend()
    reasons: dict[str, int] = {}
    for r in skipped:
        key = r["reason"].split(" (")[0].split(" at ")[0]
        reasons[key] = reasons.get(key, 0) + 1
    if reasons:
        ax[2].barh(list(reasons), list(reasons.values()), color="tab:red")
        ax[2].set_xlabel("records")
    else:
        ax[2].text(0.5, 0.5, "no record skipped", ha="center", va="center", transform=ax[2].transAxes, fontsize=12)
        ax[2].set_xticks([])
        ax[2].set_yticks([])
    ax[2].set_title("Skipped records by reason")
    fig.tight_layout()
    fig.savefig(dest)
    plt.close(fig)


def packing_figure(run: Layout, dest: str) -> list[dict]:
    rows = []
    fig, ax = plt.subplots(1, 2, figsize=(12, 3.6))
    plans = run.shard_names()
    for name in plans:
        stats = json.loads(Path(run.plan_stats(name)).read_text())
        t = pq.read_table(run.plan(name))
        pack = t["pack"].to_numpy()
        tokens = np.bincount(pack, weights=t["length"].to_numpy() + 2)
        i = len(rows)
        ax[0].scatter(i + np.random.default_rng(i).uniform(-0.2, 0.2, len(tokens)), tokens, s=10)
        rows.append({"shard": name, "records": stats["records"], "packs": stats["packs"],
                     "budget_tokens": stats["budget"], "tokens": stats["tokens"],
                     "efficiency": f"{stats['efficiency']:.4f}", "split_records": stats["split_records"]})
    if plans:
        ax[0].axhline(rows[0]["budget_tokens"], color="k", ls="--", lw=1, label=f"token budget ({rows[0]['budget_tokens']})")
        ax[0].legend(fontsize=7, loc="lower right")
    ax[0].set_xticks(range(len(rows)), [r["shard"] for r in rows], rotation=45)
    ax[0].set_ylabel("tokens in pack (one dot per pack)")
    ax[0].set_ylim(bottom=0)
    ax[0].set_title("Tokens per pack vs budget")
    ax[1].bar([r["shard"] for r in rows], [float(r["efficiency"]) * 100 for r in rows])
    ax[1].set_ylim(0, 100)
    ax[1].set_ylabel("real tokens / (budget x packs), %")
    ax[1].set_title("Padding-free efficiency per shard")
    ax[1].tick_params(axis="x", rotation=45)
    fig.tight_layout()
    fig.savefig(dest)
    plt.close(fig)
    return rows


def embedding_figure(layout: Layout, dest: str) -> list[dict]:
    rows = []
    for name in layout.shard_names():
        run = json.loads(Path(layout.shard_stats(name)).read_text())
        bench = Path(layout.benchmark("embed_shard", name))
        wall = float(read_tsv(bench)[0]["s"]) if bench.exists() else float("nan")
        rows.append({"shard": name, "device": run.get("device"), "records": run.get("rows"), "duplicates": run.get("duplicates"),
                     "tokens": run.get("tokens"),
                     "job_wall_s": round(wall, 2), "engine_s": round(run.get("seconds", float("nan")), 2),
                     "tokens_per_s": round(run.get("tokens_per_s", 0.0)),
                     "peak_gpu_gib": "-" if run.get("peak_gib") is None else round(run["peak_gib"], 2),
                     "attention": run.get("attention_backend"), "dtype": run.get("dtype")})
    total_tokens = sum(r["tokens"] or 0 for r in rows)
    total_engine = sum(r["engine_s"] for r in rows)
    fig, ax = plt.subplots(1, 2, figsize=(12, 3.6))
    x = [r["shard"] for r in rows]
    ax[0].bar(x, [r["job_wall_s"] for r in rows], label="whole job")
    ax[0].bar(x, [r["engine_s"] for r in rows], label="embedding (engine)")
    ax[0].set_ylabel("seconds")
    ax[0].set_title("Wall time per shard")
    ax[0].legend()
    ax[1].bar(x, [r["tokens_per_s"] for r in rows], color="tab:green")
    ax[1].set_ylabel("tokens / s")
    ax[1].set_title(f"Throughput per shard (all: {total_tokens / max(total_engine, 1e-9):,.0f} tokens/s, "
                    f"{total_tokens:,} tokens)")
    for a in ax:
        a.tick_params(axis="x", rotation=45)
    fig.tight_layout()
    fig.savefig(dest)
    plt.close(fig)
    return rows


def equivalence_figure(run: Layout, dest: str) -> list[dict]:
    rows = read_tsv(run.spot_checks)
    fig, ax = plt.subplots(1, 2, figsize=(12, 3.6))
    if rows:
        length = np.array([int(r["length"]) for r in rows])
        for a, col, thr, title in (
            (ax[0], "pooled_cosine", "pooled_threshold", "Pooled cosine, packed vs unpacked"),
            (ax[1], "min_residue_cosine", "residue_threshold", "Minimum per-residue cosine"),
        ):
            floor = 1e-10
            v = np.maximum(1 - np.array([float(r[col]) for r in rows]), floor)
            ok = np.array([r["status"] == "pass" for r in rows])
            a.scatter(length[ok], v[ok], s=12, label="pass")
            a.scatter(length[~ok], v[~ok], s=20, color="tab:red", label="FAIL")
            a.axhline(1 - float(rows[0][thr]), color="k", ls="--", lw=1, label=f"threshold (cosine {rows[0][thr]})")
            a.set_xscale("log")
            a.set_yscale("log")
            a.set_ylim(floor / 2, max(1e-2, v.max() * 2))
            a.set_xlabel("sequence length (residues, log scale)")
            a.set_ylabel("1 - cosine (lower is closer; floor 1e-10)")
            a.set_title(title)
            a.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(dest)
    plt.close(fig)
    worst = sorted(rows, key=lambda r: float(r["pooled_cosine"]))[:20]
    return [{k: r[k] for k in ("id", "length", "pooled_cosine", "min_residue_cosine", "rel_l2", "status")} for r in worst]


def projection_figure(run: Layout, dest: str, sample: int = 5000, seed: int = 0) -> None:
    data = ds.dataset(run.embeddings, format="parquet")
    n = data.count_rows()
    if n < 3:
        fig, ax = plt.subplots(figsize=(6.5, 5))
        ax.text(0.5, 0.5, f"{n} embedded record(s): too few for a projection", ha="center", va="center",
                transform=ax.transAxes, fontsize=12)
        ax.set_axis_off()
        fig.savefig(dest)
        plt.close(fig)
        return
    # evenly spaced row groups, enough for the sample: a few are read, never the whole output
    groups = [g for f in data.get_fragments() for g in f.split_by_row_group()]
    per_group = max(1, n // len(groups))
    picked = np.unique(np.linspace(0, len(groups) - 1, min(len(groups), -(-sample // per_group))).round().astype(int))
    t = pa.concat_tables([groups[i].to_table(columns=["length", "embedding"]) for i in picked])
    if t.num_rows > sample:
        t = t.take(np.sort(np.random.default_rng(seed).choice(t.num_rows, sample, replace=False)))
    x = column_array(t, "embedding").astype(np.float64)
    length = t["length"].to_numpy()
    x = x - x.mean(0)
    w, v = np.linalg.eigh(x.T @ x)  # principal axes of the (dim x dim) scatter matrix: faster than an SVD of x
    w, v = np.maximum(w[::-1], 0), v[:, ::-1]
    xy = x @ v[:, :2]
    var = w / max(w.sum(), 1e-300)
    fig, ax = plt.subplots(figsize=(6.5, 5))
    sc = ax.scatter(xy[:, 0], xy[:, 1], c=np.log10(length), s=8, cmap="viridis")
    cb = fig.colorbar(sc, ax=ax)
    cb.set_label("log10 length (residues)")
    ax.set_xlabel(f"PC1 ({100 * var[0]:.1f}% of variance)")
    ax.set_ylabel(f"PC2 ({100 * var[1]:.1f}% of variance)")
    ax.set_title(f"PCA of {t.num_rows} embeddings (the `embedding` column)")
    fig.tight_layout()
    fig.savefig(dest)
    plt.close(fig)


def provenance_rows(run: Layout, config: dict | None = None) -> list[dict]:
    meta = read_metadata(run.embeddings)
    summary = json.loads(Path(run.summary).read_text())
    truncated = summary.get("truncated", {})
    import pyarrow

    rows = [
        ("records in / embedded / skipped", f"{summary['records_in']} / {summary['embedded_input_records']} / {summary['skipped']}"),
        ("truncated records", f"{truncated.get('records', 0)}, {truncated.get('residues_not_embedded', 0)} residues not "
                              "embedded (column embedded_residues)"),
        ("workflow commit", summary.get("workflow_commit")),
        ("wall time (s)", summary.get("wall_seconds")),
        ("model", meta.get("model")),
        ("checkpoint", meta.get("checkpoint")),
        ("checkpoint SHA-256", meta.get("checkpoint_sha256")),
        ("layers in model", meta.get("num_layers")),
        ("embedding dim", meta.get("embed_dim")),
        ("columns", ", ".join(f"{c['name']} (layer {c['layer']}, {c['pooling']})" for c in meta.get("columns", []))),
        ("compute dtype", meta.get("compute_dtype")),
        ("output dtype", meta.get("output_dtype")),
        ("attention backend", ", ".join(sorted({str(json.loads(Path(run.shard_stats(n)).read_text()).get("attention_backend"))
                                                for n in run.shard_names()}))),
        ("rows filled from a duplicate", summary.get("filled_from_duplicates", 0)),
        ("inputs", "; ".join(f"{i['file']} (sha256 {i['sha256'][:16]}...)" for i in summary.get("inputs", []))),
        ("virnucpro_core", __version__),
        ("torch", meta.get("torch")),
        ("fair-esm", meta.get("fair_esm")),
        ("pyarrow", pyarrow.__version__),
        ("python", platform.python_version()),
    ]
    if config:
        rows.append(("config", json.dumps(config, sort_keys=True)))
    return [{"item": k, "value": v} for k, v in rows]


def write_report_files(outdir: str | Path, config: dict | None = None) -> None:
    run = Layout(str(outdir))
    Path(run.figure("")).mkdir(parents=True, exist_ok=True)
    steps = {
        "input": lambda: input_figure(run, run.figure("input.png")),
        "packing": lambda: _write_table(run.figure("packing.html"), packing_figure(run, run.figure("packing.png")),
                                        "Packing per shard"),
        "embedding": lambda: _write_table(run.figure("embedding.html"), embedding_figure(run, run.figure("embedding.png")),
                                          "Embedding per shard"),
        "equivalence": lambda: _write_table(run.figure("spot_check_worst.html"), equivalence_figure(run, run.figure("equivalence.png")),
                                            "Spot-check: the 20 sequences with the lowest pooled cosine"),
        "projection": lambda: projection_figure(run, run.figure("projection.png")),
        "provenance": lambda: _write_table(run.figure("provenance.html"), provenance_rows(run, config), "Provenance"),
    }
    seconds = {}
    for name, step in steps.items():
        t = time.perf_counter()
        step()
        seconds[name] = round(time.perf_counter() - t, 2)
    log.info("figures and tables in %s in %.1f s (%s)", run.figure(""), sum(seconds.values()),
             ", ".join(f"{k} {v} s" for k, v in seconds.items()))

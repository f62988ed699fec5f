"""Stage 5: every kept record once, in input order, in one Parquet; skipped.tsv, spot_check.tsv and
summary.json. Fails on any missing, duplicated or out-of-order record or a count mismatch."""

from __future__ import annotations

import csv
import json
import logging
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..files import read_tsv, sha256, write_json, write_table, write_tsv
from ..layout import Layout
from ..parquet import read_metadata
from .shard import BOOKKEEPING, SKIPPED_COLUMNS

log = logging.getLogger(__name__)


def run(manifest: str | Path, skipped: str | Path, embeddings: list[str], spot_checks: list[str], outdir: str | Path) -> dict:
    """Write ``embeddings.parquet``, ``skipped.tsv``, ``spot_check.tsv`` and ``summary.json`` into ``outdir``."""
    out = Layout(str(outdir))
    man = json.loads(Path(manifest).read_text())
    for f in man["inputs"]:  # an input changed in place since it was sharded (its mtime kept) is caught here
        if not Path(f["file"]).is_file() or sha256(f["file"], cache=False) != f["sha256"]:
            raise RuntimeError(f"{f['file']} is not the file that was sharded (SHA-256 {f['sha256'][:16]}... then); "
                               "rerun the shard step: snakemake --forcerun shard_fasta")
    tables = [pq.read_table(p) for p in embeddings]
    if len(tables) != man["shards"]:
        raise ValueError(f"expected {man['shards']} shard embeddings, got {len(tables)}")
    table = pa.concat_tables(tables)
    order = table["order"].to_numpy()
    ids = table["id"].to_pylist()
    problems = []
    if len(ids) != man["records"]:
        problems.append(f"{len(ids)} embedded records, {man['records']} kept by the shard step")
    dup = sorted(i for i, n in Counter(ids).items() if n > 1)
    if dup:
        problems.append(f"duplicated ids in the embeddings: {dup[:5]}")
    if not np.array_equal(order, np.arange(len(order))):
        problems.append("records are missing or out of input order")
    skipped_rows = read_tsv(skipped)
    # per input file: records in = records embedded (at least one row) + records skipped
    embedded_records = set(zip(table["file"].to_pylist(), table["record"].to_pylist()))
    embedded_per_file = Counter(file for file, _ in embedded_records)
    skipped_per_file = Counter(r["file"] for r in skipped_rows)
    per_file_out = {}
    for f in man["inputs"]:
        out_n, skip_n = embedded_per_file[f["file"]], skipped_per_file[f["file"]]
        per_file_out[f["file"]] = {"records_in": f["records"], "embedded": out_n, "skipped": skip_n}
        if f["records"] != out_n + skip_n:
            problems.append(f"{f['file']}: {f['records']} records in, {out_n} embedded + {skip_n} skipped")
    if problems:
        raise RuntimeError("merge check failed: " + "; ".join(problems))
    meta = read_metadata(embeddings[0]) if embeddings else {}
    meta.pop("run", None)
    meta["inputs"] = man["inputs"]
    final = table.drop_columns(BOOKKEEPING).replace_schema_metadata({"virnucpro": json.dumps(meta, sort_keys=True)})
    write_table(final, out.embeddings)
    write_tsv(out.skipped, SKIPPED_COLUMNS, [[r[c] for c in SKIPPED_COLUMNS] for r in skipped_rows])
    spot_rows, header = [], None
    for p in spot_checks:
        with open(p, newline="") as fh:
            rd = list(csv.reader(fh, delimiter="\t"))
        header = rd[0]
        spot_rows += rd[1:]
    write_tsv(out.spot_checks, header or ["id"], spot_rows)
    summary = {
        "records_in": sum(f["records"] for f in man["inputs"]),
        "embedded": len(ids),
        "embedded_input_records": len(embedded_records),
        "skipped": len(skipped_rows),
        "per_file": per_file_out,
        "spot_checked": len(spot_rows),
        "spot_check_failed": sum(1 for r in spot_rows if r[-1] != "pass"),
        "model": meta.get("model"),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    write_json(out.summary, summary)
    log.info("merged %d records (%d skipped) into %s", len(ids), len(skipped_rows), out.embeddings)
    return summary

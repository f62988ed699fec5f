"""Stages that must not hold a run in memory: measured, not assumed."""

import json
import subprocess
import sys
import textwrap

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from virnucpro_core.files import write_json, write_table, write_tsv
from virnucpro_core.parquet import column_array, embeddings_table
from virnucpro_core.stages.shard import SKIPPED_COLUMNS


def test_the_merge_of_200_shards_streams(tmp_path):
    """200 shards of 200 rows of 256-d embeddings (40 MB): the merge's Arrow memory peaks at a few
    batches, not the run (the earlier merge concatenated every shard: over 40 MB)."""
    rng = np.random.default_rng(0)
    files, order = [], 0
    inp = tmp_path / "in.faa"
    inp.write_text("x")
    from virnucpro_core.files import sha256

    for i in range(200):
        ids = [f"p{order + j}" for j in range(200)]
        t = embeddings_table(ids, np.full(200, 50), {"embedding": rng.standard_normal((200, 256), dtype=np.float32)}, {"model": "m"})
        for name, values in (("order", np.arange(order, order + 200)), ("file", [str(inp)] * 200), ("record", np.arange(order, order + 200) + 1)):
            t = t.append_column(name, pa.array(values, pa.int32() if name == "record" else None))
        write_table(t, tmp_path / f"e{i}.parquet")
        files.append(str(tmp_path / f"e{i}.parquet"))
        order += 200
    write_json(tmp_path / "manifest.json", {"inputs": [{"file": str(inp), "sha256": sha256(inp, cache=False), "records": order}],
                                            "records": order, "shards": 200})
    write_tsv(tmp_path / "skipped.tsv", SKIPPED_COLUMNS, [])
    code = textwrap.dedent(f"""
        import json, pyarrow as pa
        from virnucpro_core.options import Options
        from virnucpro_core.stages import merge
        merge.BATCH_BYTES = 1 << 20
        merge.run({str(tmp_path / 'manifest.json')!r}, {str(tmp_path / 'skipped.tsv')!r}, {files!r}, [], {str(tmp_path / 'out')!r}, Options())
        print(json.dumps({{"arrow_peak": pa.default_memory_pool().max_memory()}}))
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    peak = json.loads(res.stdout.strip().splitlines()[-1])["arrow_peak"]
    assert peak < 12 << 20, f"merge held {peak / 2**20:.1f} MiB of Arrow memory for 40 MiB of embeddings"
    out = pq.read_table(tmp_path / "out/embeddings.parquet")
    assert out.num_rows == 40_000 and out["id"].to_pylist() == [f"p{i}" for i in range(40_000)]
    assert column_array(out, "embedding").shape == (40_000, 256)

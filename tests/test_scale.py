"""Stages that must not hold a run in memory: measured, not assumed."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pyarrow.parquet as pq

from virnucpro_core.options import Options
from virnucpro_core.io.tables import column_array
from virnucpro_core.stages import shard

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from scale import synthetic_embeddings  # noqa: E402


def test_the_merge_of_200_shards_into_one_file_streams(tmp_path):
    """200 shards of 200 rows of 256-d embeddings (40 MB) copied into one file: the merge's Arrow memory
    peaks at a few row groups, not the run."""
    fasta = tmp_path / "in.faa"
    fasta.write_text("".join(f">p{i}\nMKVLAAGIWRSTLLKPQE\n" for i in range(40_000)))
    man = shard.run([str(fasta)], tmp_path / "shards", Options(shards=200))
    assert len(man["shards"]) == 200
    files = []
    for s in man["shards"]:
        files.append(str(tmp_path / f"{s['name']}.parquet"))
        synthetic_embeddings([str(tmp_path / "shards" / f"{p}.parquet") for p in s["parts"]], files[-1], 256, rows_per_group=100)
    code = textwrap.dedent(f"""
        import json, pyarrow as pa
        from virnucpro_core.options import Options
        from virnucpro_core.stages import merge
        merge.run({str(tmp_path / 'shards/manifest.json')!r}, {str(tmp_path / 'shards/skipped.tsv')!r}, {files!r}, [],
                  {str(tmp_path / 'out')!r}, Options().replace(**{{"merge.output": "file"}}))
        print(json.dumps({{"arrow_peak": pa.default_memory_pool().max_memory()}}))
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    peak = json.loads(res.stdout.strip().splitlines()[-1])["arrow_peak"]
    assert peak < 12 << 20, f"merge held {peak / 2**20:.1f} MiB of Arrow memory for 40 MiB of embeddings"
    out = pq.read_table(tmp_path / "out/embeddings.parquet")
    assert out.num_rows == 40_000 and out["id"].to_pylist() == [f"p{i}" for i in range(40_000)]
    assert column_array(out, "embedding").shape == (40_000, 256)

"""The merge stage (stages/merge.py): the shards' embeddings checked against the shard manifest (a changed input,
a missing, duplicated or reordered record stop it, leaving no output) and written as one dataset in input order
(the shards' own files, linked) or one file, streamed: its memory is measured, not assumed."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import MODEL, ROOT, cpu_options, example_records, example_stages, run_stages
from virnucpro_core.io import files
from virnucpro_core.io.tables import column_array
from virnucpro_core.options import Options
from virnucpro_core.stages import merge, shard

sys.path.insert(0, str(ROOT / "benchmarks"))
from scale import synthetic_embeddings  # noqa: E402


def test_a_changed_input_is_caught_by_the_merge(tmp_path):
    p = tmp_path / "in.faa"
    p.write_text(example_records(5))
    _, run = run_stages(tmp_path / "r", [p], cpu_options(tmp_path, shards=1), MODEL)
    stat = p.stat()
    p.write_text(example_records(5).replace("M", "W", 1))  # same size, mtime put back
    os.utime(p, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    with pytest.raises(RuntimeError, match="is not the file that was sharded"):
        merge.run(run.manifest, run.shard_skipped, [run.shard_embeddings("shard_0000")], [], tmp_path / "out", cpu_options(tmp_path))
    assert not (tmp_path / "out/embeddings.parquet").exists()


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


@pytest.mark.slow
def test_merge_fails_loudly_on_a_missing_or_duplicated_record(tmp_path):
    _, run = example_stages(tmp_path, 2, 4096, "m")
    embs = [run.shard_embeddings(f"shard_{i:04d}") for i in range(2)]
    man = json.loads(Path(run.manifest).read_text())
    out = tmp_path / "m-out"
    shutil.rmtree(run.embeddings)
    with pytest.raises(RuntimeError, match="was not computed from the parts"):
        merge.run(run.manifest, run.shard_skipped, [embs[0], embs[0]], [], out, Options())
    shutil.copy(embs[1], tmp_path / "whole.parquet")
    t = pq.read_table(embs[1])
    kv = pq.read_metadata(embs[1]).metadata
    short = t.slice(0, t.num_rows - 1).replace_schema_metadata({k: v for k, v in kv.items() if not k.startswith(b"ARROW")})
    pq.write_table(short, embs[1])
    with pytest.raises(RuntimeError, match=f"holds {man['shards'][1]['rows'] - 1} rows, its parts {man['shards'][1]['rows']}"):
        merge.run(run.manifest, run.shard_skipped, embs, [], out, Options())
    shutil.copy(tmp_path / "whole.parquet", embs[1])
    swapped = pq.read_table(embs[0])
    ids = swapped["id"].to_pylist()
    ids[3], ids[4] = ids[4], ids[3]
    swapped = swapped.set_column(0, "id", pa.array(ids)).replace_schema_metadata(
        {k: v for k, v in pq.read_metadata(embs[0]).metadata.items() if not k.startswith(b"ARROW")})
    pq.write_table(swapped, embs[0])
    with pytest.raises(RuntimeError, match="row 3 of .* is .*: records are missing, duplicated or out of input order"):
        merge.run(run.manifest, run.shard_skipped, embs, [], out, Options())
    assert not (out / "embeddings.parquet").exists() and not list(out.glob(".embeddings.parquet.*"))  # no temporary output left


@pytest.mark.slow
def test_dataset_output_reads_as_one_table_in_input_order(tmp_path):
    import duckdb
    import pandas as pd
    import polars as pl

    _, run = example_stages(tmp_path, 3, 65536, "file", **{"merge.output": "file"})
    d = Path(run.outdir)
    one = pq.read_table(d / "embeddings.parquet")
    assert json.loads(Path(run.summary).read_text())["shards"] == {"written": 3}  # three shards: one file is a copy
    opts = cpu_options(d, **{"merge.output": "auto"})
    summary = merge.run(run.manifest, run.shard_skipped, [run.shard_embeddings(f"shard_{i:04d}") for i in range(3)], [],
                        tmp_path / "ds", opts)
    folder = tmp_path / "ds/embeddings.parquet"
    assert folder.stat().st_mode & 0o777 == 0o777 & ~files.umask()  # as mkdir makes it, not mkdtemp's 0700
    assert folder.is_dir() and sorted(p.name for p in folder.iterdir()) == [f"part-{i:05d}.parquet" for i in range(3)]
    assert summary["embedded"] == 300 and summary["output"] == "dataset" and summary["shards"] == {"linked": 3}
    for i in range(3):  # the shards' own files, not copies
        assert (folder / f"part-{i:05d}.parquet").stat().st_ino == Path(run.shard_embeddings(f"shard_{i:04d}")).stat().st_ino
    ids = one["id"].to_pylist()
    emb = column_array(one, "embedding")
    back = pq.read_table(folder)
    assert back["id"].to_pylist() == ids
    np.testing.assert_array_equal(column_array(back, "embedding"), emb)
    df = pd.read_parquet(folder)
    assert df["id"].tolist() == ids and np.array_equal(np.stack(df["embedding"].to_numpy()), emb)
    pf = pl.read_parquet(folder / "*.parquet")
    assert pf["id"].to_list() == ids and np.array_equal(pf["embedding"].to_numpy(), emb)
    rows = duckdb.sql(f"SELECT id, embedding FROM read_parquet('{folder}/*.parquet')").fetchall()
    # README's nearest-neighbour query: DuckDB's cosine is numpy's
    cos = duckdb.sql(f"SELECT b.id, list_cosine_similarity(a.embedding, b.embedding) FROM '{d / 'embeddings.parquet'}' a, "
                     f"'{d / 'embeddings.parquet'}' b WHERE a.id = '{ids[0]}'").fetchall()
    X = column_array(one, "embedding").astype(np.float64)
    expected = X @ X[0] / (np.linalg.norm(X, axis=1) * np.linalg.norm(X[0]))
    np.testing.assert_allclose([c for _, c in cos], expected[[ids.index(i) for i, _ in cos]], atol=1e-5)
    assert [r[0] for r in rows] == ids and np.allclose(np.array([r[1] for r in rows]), emb)

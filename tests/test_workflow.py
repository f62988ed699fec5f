"""The Snakemake workflow itself: end to end on the shipped example FASTA (tiny random ESM-2, CPU), its outputs,
logs, report and terminal lines; lint, formatting, profiles and config errors; the rule files (no shell commands,
no torch in the scheduler's imports); `virnucpro extract`, which runs the same stages in one command."""

import ast
import importlib.util
import json
import re
import subprocess
import sys
import textwrap

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from conftest import EXAMPLE, MODEL, ROOT, snakemake
from virnucpro_core.io.tables import column_array


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("wf") / "results"
    cfg = [f"input={EXAMPLE}", f"model={MODEL}", f"outdir={out}", "shards=4", f"embedding={{'lock_dir': '{out.parent / 'locks'}'}}"]
    res = snakemake("--cores", "2", "--resources", "gpu=1", "--config", *cfg)
    assert res.returncode == 0, res.stderr[-5000:]
    return out, cfg, res


def fasta_records(path):
    ids, seqs = [], []
    for line in path.read_text().splitlines():
        if line.startswith(">"):
            ids.append(line[1:].split()[0])
            seqs.append("")
        else:
            seqs[-1] += line.strip().rstrip("*")
    return ids, seqs


@pytest.mark.slow
def test_every_record_once_in_input_order(run):
    out, _, _ = run
    table = pq.read_table(out / "embeddings.parquet")
    ids, seqs = fasta_records(EXAMPLE)
    assert table["id"].to_pylist() == ids
    assert table["length"].to_pylist() == [len(s) for s in seqs]
    assert table.schema.field("length").type == "int32"
    assert table["embedding"].type.list_size == 64
    assert np.isfinite(column_array(table, "embedding")).all()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["records_in"] == 300 and summary["embedded"] == 300 and summary["skipped"] == 0
    assert (out / "skipped.tsv").read_text().splitlines() == ["id\treason\tfile\trecord"]


@pytest.mark.slow
def test_spot_check_passed(run):
    out, _, _ = run
    rows = (out / "spot_check.tsv").read_text().splitlines()
    header, rows = rows[0].split("\t"), [r.split("\t") for r in rows[1:]]
    assert len(rows) == 4 * 16
    assert all(r[header.index("status")] == "pass" for r in rows)
    assert max(int(r[1]) for r in rows) == 3000  # the longest record is always checked


@pytest.mark.slow
def test_embeddings_equal_fair_esm_forward_on_a_sample(run):
    import esm

    out, _, _ = run
    model, alphabet = esm.pretrained.load_model_and_alphabet_core("esm2_t2_tiny", torch.load(MODEL, weights_only=False))
    model.eval()
    table = pq.read_table(out / "embeddings.parquet")
    emb = column_array(table, "embedding")
    ids, seqs = fasta_records(EXAMPLE)
    sample = [0, 5, 17, 99, 150, 299] + [i for i, s in enumerate(seqs) if len(s) > 1022][:2]
    conv = alphabet.get_batch_converter(truncation_seq_length=1022)  # esm-extract's default
    for i in sample:
        _, _, toks = conv([(ids[i], seqs[i])])
        with torch.no_grad():
            rep = model(toks, repr_layers=[2])["representations"][2][0]
        n = min(len(seqs[i]), 1022)
        ref = rep[1 : n + 1].mean(0).numpy()
        np.testing.assert_allclose(emb[i], ref, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_rerun_does_nothing(run):
    out, cfg, _ = run
    res = snakemake("-n", "--cores", "2", "--config", *cfg)
    assert res.returncode == 0
    assert "Nothing to be done" in res.stdout + res.stderr


@pytest.mark.slow
def test_logs_and_benchmarks_written(run):
    out, _, _ = run
    log = (out / "logs/embed_shard/shard_0000.log").read_text()
    assert "device: cpu (no GPU visible)" in log and "tokens_per_s" in log
    assert len(list((out / "benchmarks/embed_shard").glob("*.tsv"))) == 4


def requested_memory(log: str) -> dict[str, int]:
    """Each job's mem_mb as Snakemake printed it: {"rule" or "rule/wildcard": MB}."""
    asked, job = {}, None
    for line in log.splitlines():
        if m := re.match(r"(?:local)?rule (\w+):$", line):
            job = [m.group(1), ""]
        elif job and (m := re.match(r" {4}wildcards: \w+=(\S+)", line)):
            job[1] = "/" + m.group(1)
        elif job and (m := re.match(r" {4}resources: .*\bmem_mb=(\d+)", line)):
            asked[job[0] + job[1]] = int(m.group(1))
        elif not line.startswith("    "):
            job = None
    return asked


@pytest.mark.slow
def test_every_job_stays_within_the_memory_it_asks_for(run):
    out, _, res = run
    asked = requested_memory(res.stdout + res.stderr)
    assert sorted(asked) == sorted(["shard_index", "merge", "report_figures", *(f"shard/part_{i:05d}" for i in range(4)),
                                    *(f"embed_shard/shard_{i:04d}" for i in range(4))])
    sampled = []
    for job, limit in asked.items():
        bench = (out / "benchmarks" / f"{job}.tsv").read_text().splitlines()
        max_rss = float(bench[1].split("\t")[2])
        assert max_rss <= limit, f"{job}: peak {max_rss:.0f} MB over the {limit} MB it asks for"
        if max_rss > 0:  # Snakemake samples memory at intervals: a job of a second can end unsampled (0)
            sampled.append(job)
    assert len(sampled) >= 6 and any(j.startswith("embed_shard") for j in sampled), sampled


@pytest.mark.slow
def test_status_reports_the_finished_run(run):
    from virnucpro_core.cli import main
    from virnucpro_core.run.progress import snapshot

    out, _, _ = run
    st = snapshot(out)
    assert st.state == "finished" and st.parts_done == st.parts_total == 4 and [s.state for s in st.shards] == ["done"] * 4
    assert main(["status", str(out)]) == 0


@pytest.mark.slow
def test_a_finished_run_keeps_one_copy_of_the_embeddings(run):
    out, _, _ = run
    assert (out / "embeddings.parquet").is_dir() and len(list((out / "embeddings.parquet").glob("part-*.parquet"))) == 4
    assert not list((out / "embeddings").glob("*.parquet")) and not list((out / "embeddings").glob("*.npy"))
    assert all(p.stat().st_nlink == 1 for p in (out / "embeddings.parquet").iterdir())
    summary = json.loads((out / "summary.json").read_text())
    assert summary["output"] == "dataset" and summary["shards"] == {"linked": 4}


def test_lint_is_clean():
    res = snakemake("--lint")
    assert res.returncode == 0 and "Congratulations" in res.stdout + res.stderr, res.stdout + res.stderr


def test_snakefmt_finds_nothing():
    res = subprocess.run([sys.executable, "-m", "snakefmt", "--check", "Snakefile", "workflow/"], cwd=ROOT,
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.parametrize("profile", ["local", "slurm"])
def test_dry_run_with_each_profile(profile, tmp_path):
    res = snakemake("-n", "--profile", f"profiles/{profile}", "--config", f"outdir={tmp_path}")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "shard_index" in res.stdout + res.stderr


def test_bad_config_value_is_named(tmp_path):
    res = snakemake("-n", "--cores", "1", "--config", f"outdir={tmp_path}", "on_invalid=ignore")
    assert res.returncode != 0
    text = res.stdout + res.stderr
    assert "on_invalid" in text and "'ignore'" in text


def test_missing_input_is_named(tmp_path):
    res = snakemake("-n", "--cores", "1", "--config", f"outdir={tmp_path}", "input=nope/*.faa")
    assert res.returncode != 0 and "no file matches 'nope/*.faa'" in res.stdout + res.stderr


# ------------------------------------------------------------------ the rule files
RULE_FILES = [ROOT / "Snakefile", *sorted((ROOT / "workflow/rules").glob("*.smk"))]
# an import of the core in a rule file: one line (or lines joined by \), or a parenthesised list of names
CORE_IMPORT = re.compile(r"^[ \t]*(?:from[ \t]+virnucpro_core\b[\w.]*[ \t]+import[ \t]+(?:\([^)]*\)|(?:[^\n]*\\\n)*[^\n]*)"
                         r"|import[ \t]+virnucpro_core\b(?:[^\n]*\\\n)*[^\n]*)", re.M)


def is_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # a name defined in a module, not a module
        return False


def rule_file_core_modules() -> list[str]:
    """Every virnucpro_core module that the Snakefile and workflow/rules/*.smk import: the module of each
    ``from ... import`` and each name it imports that is a module itself (``from virnucpro_core.run import claim,
    memory`` gives virnucpro_core.run, virnucpro_core.run.claim and virnucpro_core.run.memory)."""
    found = set()
    for f in RULE_FILES:
        for m in CORE_IMPORT.finditer(f.read_text()):
            for node in ast.walk(ast.parse(textwrap.dedent(m.group(0)), str(f))):
                if isinstance(node, ast.Import):
                    found.update(a.name for a in node.names if a.name.split(".")[0] == "virnucpro_core")
                elif isinstance(node, ast.ImportFrom):
                    found.add(node.module)
                    found.update(f"{node.module}.{a.name}" for a in node.names if is_module(f"{node.module}.{a.name}"))
    return sorted(found)


def test_rules_build_no_command_lines():
    """Rules hand paths and options to the core as data (script:), never through a shell."""
    for smk in (ROOT / "workflow/rules").glob("*.smk"):
        text = smk.read_text()
        assert "shell:" not in text and "python -m virnucpro_core" not in text, smk.name


def test_report_and_workflow_modules_import_no_torch():
    """Snakemake reads the rule files at every start (the run, each job, each dry run): no module they import may
    pull in torch or fair-esm. The modules are read from the rule files, so an import added to them is checked too;
    the report's stage is checked as well (its job draws the figures without torch)."""
    modules = rule_file_core_modules()
    assert modules and {"virnucpro_core.options", "virnucpro_core.run.layout", "virnucpro_core.run.progress"} <= set(modules), modules
    modules.append("virnucpro_core.stages.report")
    code = textwrap.dedent(f"""
        import importlib, json, sys
        sys.path.insert(0, {str(ROOT / "src")!r})  # as the rule files do
        heavy = {{}}
        for name in {modules!r}:
            importlib.import_module(name)
            for mod in ("torch", "esm"):
                if mod in sys.modules:
                    heavy.setdefault(mod, name)
        print(json.dumps({{"heavy": heavy, "modules": sorted(m for m in sys.modules if m.startswith("virnucpro_core"))}}))
    """)
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert set(modules) <= set(got["modules"])
    assert not got["heavy"], f"in sys.modules after importing (first module to pull it in): {got['heavy']}"


@pytest.mark.slow
def test_report_holds_every_section(run, tmp_path):
    out, cfg, _ = run
    figures = out / "report"
    for name in ("input.png", "packing.png", "embedding.png", "equivalence.png", "projection.png"):
        assert (figures / name).stat().st_size > 10_000, name
    provenance = (figures / "provenance.html").read_text()
    assert "checkpoint SHA-256" in provenance and "<td>attention backend</td><td>reference</td>" in provenance
    # the example's 5 records over 1022 residues (3,813 residues beyond), counted and marked per record
    assert "<td>truncated records</td><td>5, 3813 residues not embedded" in provenance
    summary = json.loads((out / "summary.json").read_text())
    assert summary["truncated"] == {"records": 5, "residues_not_embedded": 3813} and summary["wall_seconds"] > 0
    t = pq.read_table(out / "embeddings.parquet", columns=["length", "embedded_residues"])
    length, embedded = t["length"].to_numpy(), t["embedded_residues"].to_numpy()
    assert (embedded == np.minimum(length, 1022)).all() and (embedded < length).sum() == 5
    html = tmp_path / "report.html"
    res = snakemake("--report", str(html), "--config", *cfg)
    assert res.returncode == 0, res.stderr[-3000:]
    text = html.read_text()
    for section in ("1. Input", "2. Packing", "3. Embedding", "4. Equivalence", "5. Embeddings", "6. Provenance"):
        assert section in text, section
    for caption in ("skipped records by reason", "token budget", "tokens per second", "1 - cosine", "principal components",
                    "checkpoint checksum"):
        assert caption in text, caption
    assert not re.search(r'<script[^>]+src="http', text)  # self-contained


@pytest.mark.slow
def test_the_terminal_shows_a_summary_with_warnings_or_the_failing_jobs_own_error(tmp_path):
    locks = f"embedding={{'lock_dir': '{tmp_path / 'locks'}'}}"
    nuc = tmp_path / "looks_like_dna.faa"
    nuc.write_text(">n1\nACGTACGTACGTAGCTAGCTAGCATCGATCGATCGA\n>n2\nMKVLAAGGTTCCAAGGTTAACCGGTTAACCGGTT\n")
    res = snakemake("--cores", "2", "--resources", "gpu=2", "--config", f"input={nuc}", f"model={MODEL}",
                    f"outdir={tmp_path / 'ok'}", locks, "progress_seconds=1")
    text = res.stdout + res.stderr
    assert res.returncode == 0, text[-3000:]
    assert f"virnucpro: the run's progress below (also: virnucpro status {tmp_path / 'ok'})" in text
    assert f"{tmp_path / 'ok'}/logs/embed_shard/<shard>.log" in text
    assert re.search(r"virnucpro: \S+ of \S+ tokens .*; shards \d done, \d running of 2; parts \d/2; .* tokens/s; ETA", text)
    assert not re.search(r"[\r\x1b]", text)  # not a terminal: plain lines, no control characters
    summary = text[text.index("virnucpro: done in"):]
    assert "records in 2: embedded 2, skipped 0" in summary and "truncated records: 0, 0 residues" in summary
    assert "GPUs were asked for (--resources gpu=2) but 2 of 2 embed jobs ran on the CPU" in summary  # one shard per GPU asked for
    assert "this looks like a nucleotide file" in summary

    bad = tmp_path / "bad.faa"
    bad.write_text(">a\nMKV\n>b\nMK1V\n")
    res = snakemake("--cores", "2", "--config", f"input={bad}", f"model={MODEL}", f"outdir={tmp_path / 'bad'}", locks)
    text = res.stdout + res.stderr
    assert res.returncode != 0
    assert f"virnucpro: the run failed\n  {tmp_path / 'bad'}/logs/shard/part_00000.log: {bad}: record 2 (b): illegal character '1'" in text
    from virnucpro_core.run.progress import snapshot

    st = snapshot(tmp_path / "bad")  # what `virnucpro status` reports of the failed run
    assert st.state == "failed" and st.failures == [f"{tmp_path / 'bad'}/logs/shard/part_00000.log: {bad}: record 2 (b): "
                                                    "illegal character '1' at residue 3"]


@pytest.mark.slow
def test_extract_gives_the_workflows_embeddings_in_one_command(run, tmp_path):
    from virnucpro_core.cli import main

    out, _, _ = run
    assert main(["extract", str(MODEL), str(EXAMPLE), str(tmp_path / "x"), "--shards", "4", "--embedding.device", "cpu"]) == 0
    a, b = pq.read_table(out / "embeddings.parquet"), pq.read_table(tmp_path / "x/embeddings.parquet")
    assert a.column_names == b.column_names and a["id"].to_pylist() == b["id"].to_pylist()
    np.testing.assert_array_equal(column_array(a, "embedding"), column_array(b, "embedding"))
    assert json.loads((tmp_path / "x/summary.json").read_text())["spot_check_failed"] == 0
    assert not list((tmp_path / "x/embeddings").glob("*.parquet"))  # one copy of the embeddings: the merged one


def test_extract_maps_esm_extracts_flags(tmp_path):
    from virnucpro_core.cli import main

    args = ["extract", str(MODEL), str(EXAMPLE), str(tmp_path / "x"), "--repr_layers", "1", "-1", "--include", "mean", "bos",
            "per_tok", "--truncation_seq_length", "500", "--toks_per_batch", "4096", "--nogpu", "--spot_check.sample", "2"]
    assert main(args) == 0
    t = pq.read_table(tmp_path / "x/embeddings.parquet")
    assert t.column_names == ["id", "length", "embedded_residues", "embedding", "embedding_mean_l1", "embedding_bos_l1",
                              "embedding_bos_l2", "per_residue_l1", "per_residue_l2"]
    length, embedded = t["length"].to_numpy(), t["embedded_residues"].to_numpy()
    assert (embedded == np.minimum(length, 500)).all()
    assert [len(x) for x in t["per_residue_l2"].to_pylist()] == embedded.tolist()
    summary = json.loads((tmp_path / "x/summary.json").read_text())
    assert summary["truncated"]["records"] == int((length > 500).sum()) > 5
    assert main(["extract", str(MODEL), str(EXAMPLE), str(tmp_path / "y"), "--include", "contacts"]) == 1


def test_the_conda_env_pins_every_dependency_and_needs_no_clone():
    import tomllib

    import yaml

    env = yaml.safe_load((ROOT / "envs/virnucpro.yaml").read_text())
    pins = {re.split("==", p)[0].lower(): p for d in env["dependencies"] if isinstance(d, dict) for p in d["pip"]}
    assert not [p for p in pins if p.startswith("-e") or p.startswith(".")], "the env must not install a local clone"
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for dep in deps:
        name = re.split(r"[<>=!~ ]", dep)[0].lower()
        assert name in pins and "==" in pins[name], f"{name} is not pinned in envs/virnucpro.yaml"

"""Nucleotide front end: frames against Biopython, id scheme, windows, accounting."""

import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from Bio.Seq import Seq

from virnucpro_core.nucleotide import translate_frame, translate_record, window_starts

ROOT = Path(__file__).resolve().parents[1]
# a known gene: M K L V * on +1; its reverse complement carries frames -1..-3
GENE = "ATGAAACTGGTTTAAGGCATCGCC"


@pytest.mark.parametrize("frame", [1, 2, 3, -1, -2, -3])
def test_each_frame_equals_biopython(frame):
    seq = Seq(GENE) if frame > 0 else Seq(GENE).reverse_complement()
    off = abs(frame) - 1
    n = (len(GENE) - off) // 3 * 3
    assert translate_frame(GENE, frame, 11) == str(seq[off : off + n].translate(table=11))
    assert translate_frame(GENE, 1, 11) == "MKLV*GIA"


def test_genetic_code_is_used():
    # TGA is a stop in table 11, tryptophan in table 4 (mycoplasma)
    assert translate_frame("ATGTGAAAA", 1, 11) == "M*K"
    assert translate_frame("ATGTGAAAA", 1, 4) == "MWK"


def test_ambiguity_codes_as_biopython():
    assert translate_frame("ATGNNNAAR", 1, 11) == str(Seq("ATGNNNAAR").translate(table=11)) == "MXK"


def test_id_scheme_and_coordinates():
    dna = "CC" + GENE + "TT"  # the gene starts at base 3, frame +3
    prots = translate_record("r1", dna, window=300, frames="six", stops="truncate", min_protein_length=4)
    fwd = [p for p in prots if p.frame == 3]
    assert fwd[0].id == "r1:3-14:+3" and fwd[0].protein == "MKLV"
    assert dna[fwd[0].start - 1 : fwd[0].end] == GENE[:12]
    assert (fwd[0].parent_id, fwd[0].window_start, fwd[0].window_end) == ("r1", 1, len(dna))
    # a reverse-strand gene: coordinates on the given strand, frame negative
    rc = str(Seq(GENE).reverse_complement())
    rev = translate_record("r2", rc, frames="six", min_protein_length=4)
    hit = [p for p in rev if p.protein == "MKLV"][0]
    assert hit.frame < 0 and hit.id == f"r2:{hit.start}-{hit.end}:{hit.frame:+d}"
    assert str(Seq(rc[hit.start - 1 : hit.end]).reverse_complement().translate(table=11)) == "MKLV"


def test_stop_policies_and_longest_orf():
    dna = "ATGAAATAAGGCGGCGGCGGCTAGATG"  # MK*GGGG*M
    assert [p.protein for p in translate_record("r", dna, frames="forward", stops="truncate", min_protein_length=1) if p.frame == 1] == ["MK"]
    split = [p for p in translate_record("r", dna, frames="forward", stops="split", min_protein_length=1) if p.frame == 1]
    assert [p.protein for p in split] == ["MK", "GGGG", "M"]
    assert [p.id for p in split] == ["r:1-6:+1", "r:10-21:+1", "r:25-27:+1"]
    keep = [p.protein for p in translate_record("r", dna, frames="forward", stops="keep_x", min_protein_length=1) if p.frame == 1]
    assert keep == ["MKXGGGGXM"]
    longest = translate_record("r", dna, frames="longest_orf", min_protein_length=1)
    assert len(longest) == 1 and len(longest[0].protein) == max(len(p.protein) for p in translate_record("r", dna, stops="split", min_protein_length=1))


def test_windows_cover_every_base_last_window_anchored():
    assert window_starts(200, 300, 300) == [0]  # shorter than one window: one window
    assert window_starts(300, 300, 300) == [0]
    assert window_starts(700, 300, 300) == [0, 300, 400]  # last one anchored to the end
    assert window_starts(700, 300, 150) == [0, 150, 300, 400]
    recs = translate_record("r", "ATG" * 233 + "A", window=300, frames="forward", stops="keep_x", min_protein_length=1)
    assert sorted({(p.window_start, p.window_end) for p in recs}) == [(1, 300), (301, 600), (401, 700)]


@pytest.mark.slow
def test_reads_workflow_accounts_for_every_record(tmp_path):
    reads = ROOT / "resources/example/reads.fna"
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "snakemake", "--cores", "2", "--config", f"input={reads}", "input_type=nucleotide",
           f"model={ROOT / 'resources/example/esm2_t2_tiny_random.pt'}", f"outdir={out}", "shards=2",
           f"embedding={{lock_dir: {tmp_path / 'locks'}}}", "spot_check={sample: 4}"]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    t = pq.read_table(out / "embeddings.parquet")
    assert {"parent_id", "window_start", "window_end", "frame"} <= set(t.column_names)
    read_ids = [line[1:].split()[0] for line in reads.read_text().splitlines() if line.startswith(">")]
    skipped = [line.split("\t") for line in (out / "skipped.tsv").read_text().splitlines()[1:]]
    embedded_parents = set(t["parent_id"].to_pylist())
    assert embedded_parents | {s[0] for s in skipped} == set(read_ids)
    assert not embedded_parents & {s[0] for s in skipped}
    assert all("no translated protein of >= 20 residues" in s[1] for s in skipped) and skipped
    for rid, parent, frame in zip(t["id"].to_pylist(), t["parent_id"].to_pylist(), t["frame"].to_pylist()):
        p, span, f = rid.rsplit(":", 2)
        assert p == parent and int(f) == frame and 1 <= abs(frame) <= 3
    # parents appear in input order
    order = {r: i for i, r in enumerate(read_ids)}
    parents = t["parent_id"].to_pylist()
    assert all(order[a] <= order[b] for a, b in zip(parents, parents[1:]))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["records_in"] == 300 == summary["embedded_input_records"] + summary["skipped"]

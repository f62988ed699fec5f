"""Nucleotide front end: frames against Biopython, id scheme, windows, accounting."""

import json
import warnings
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from Bio.Seq import Seq

from virnucpro_core.nucleotide import translate_frame, translate_record, window_starts
from virnucpro_core.options import NucleotideOptions

ROOT = Path(__file__).resolve().parents[1]
# a known gene: M K L V * on +1; its reverse complement carries frames -1..-3
GENE = "ATGAAACTGGTTTAAGGCATCGCC"


# worked by hand from the codon table: frames +1..+3 read GENE from base 1, 2, 3; frames -1..-3
# read its reverse complement GGCGATGCCTTAAACCAGTTTCAT from base 1, 2, 3; whole codons only
HAND = {1: "MKLV*GIA", 2: "*NWFKAS", 3: "ETGLRHR", -1: "GDALNQFH", -2: "AMP*TSF", -3: "RCLKPVS"}


@pytest.mark.parametrize("frame", [1, 2, 3, -1, -2, -3])
def test_each_frame_equals_the_hand_translation(frame):
    assert translate_frame(GENE, frame, 11) == HAND[frame]


def test_frames_equal_biopython_on_whole_strands(rng):
    """Biopython translates the whole strand (or its whole reverse complement) from the frame's
    first base; it drops a trailing partial codon with a warning."""
    for n in (60, 61, 62, 301):
        dna = "".join(rng.choice(list("ACGT"), n))
        for k in (1, 2, 3):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                assert translate_frame(dna, k, 11) == str(Seq(dna)[k - 1 :].translate(table=11))
                assert translate_frame(dna, -k, 11) == str(Seq(dna).reverse_complement()[k - 1 :].translate(table=11))


def test_genetic_code_is_used():
    # TGA is a stop in table 11, tryptophan in table 4 (mycoplasma)
    assert translate_frame("ATGTGAAAA", 1, 11) == "M*K"
    assert translate_frame("ATGTGAAAA", 1, 4) == "MWK"


def test_ambiguity_codes_as_biopython():
    assert translate_frame("ATGNNNAAR", 1, 11) == str(Seq("ATGNNNAAR").translate(table=11)) == "MXK"


def test_id_scheme_and_coordinates():
    dna = "CC" + GENE + "TT"  # the gene starts at base 3, frame +3
    prots = translate_record("r1", dna, NucleotideOptions(window=300, frames="six", stops="truncate", min_protein_length=4))
    fwd = [p for p in prots if p.frame == 3]
    assert fwd[0].id == "r1:3-14:+3" and fwd[0].protein == "MKLV"
    assert dna[fwd[0].start - 1 : fwd[0].end] == GENE[:12]
    assert (fwd[0].parent_id, fwd[0].window_start, fwd[0].window_end) == ("r1", 1, len(dna))
    # a reverse-strand gene: coordinates on the given strand, frame negative
    rc = str(Seq(GENE).reverse_complement())
    rev = translate_record("r2", rc, NucleotideOptions(frames="six", min_protein_length=4))
    hit = [p for p in rev if p.protein == "MKLV"][0]
    assert hit.frame < 0 and hit.id == f"r2:{hit.start}-{hit.end}:{hit.frame:+d}"
    assert str(Seq(rc[hit.start - 1 : hit.end]).reverse_complement().translate(table=11)) == "MKLV"


def test_stop_policies_and_longest_orf():
    dna = "ATGAAATAAGGCGGCGGCGGCTAGATG"  # MK*GGGG*M
    assert [p.protein for p in translate_record("r", dna, NucleotideOptions(frames="forward", stops="truncate", min_protein_length=1)) if p.frame == 1] == ["MK"]
    split = [p for p in translate_record("r", dna, NucleotideOptions(frames="forward", stops="split", min_protein_length=1)) if p.frame == 1]
    assert [p.protein for p in split] == ["MK", "GGGG", "M"]
    assert [p.id for p in split] == ["r:1-6:+1", "r:10-21:+1", "r:25-27:+1"]
    keep = [p.protein for p in translate_record("r", dna, NucleotideOptions(frames="forward", stops="keep_x", min_protein_length=1)) if p.frame == 1]
    assert keep == ["MKXGGGGXM"]
    longest = translate_record("r", dna, NucleotideOptions(frames="longest_orf", min_protein_length=1))
    assert len(longest) == 1 and len(longest[0].protein) == max(len(p.protein) for p in translate_record("r", dna, NucleotideOptions(stops="split", min_protein_length=1)))


def test_windows_cover_every_base_last_window_anchored():
    assert window_starts(200, 300, 300) == [0]  # shorter than one window: one window
    assert window_starts(300, 300, 300) == [0]
    assert window_starts(700, 300, 300) == [0, 300, 400]  # last one anchored to the end
    assert window_starts(700, 300, 150) == [0, 150, 300, 400]
    recs = translate_record("r", "ATG" * 233 + "A", NucleotideOptions(window=300, frames="forward", stops="keep_x", min_protein_length=1))
    assert sorted({(p.window_start, p.window_end) for p in recs}) == [(1, 300), (301, 600), (401, 700)]


@pytest.mark.slow
@pytest.mark.parametrize("nucleotide", ["{}", "{stops: split, step: 150}"], ids=["defaults", "split-overlapping-windows"])
def test_reads_workflow_accounts_for_every_record(tmp_path, nucleotide):
    reads = ROOT / "resources/example/reads.fna"
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "snakemake", "--cores", "2", "--config", f"input={reads}", "input_type=nucleotide",
           f"model={ROOT / 'resources/example/esm2_t2_tiny_random.pt'}", f"outdir={out}", "shards=2",
           f"embedding={{lock_dir: {tmp_path / 'locks'}}}", "spot_check={sample: 4}", f"nucleotide={nucleotide}"]
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
    assert len(set(t["id"].to_pylist())) == t.num_rows


def test_frame_is_relative_to_the_record_not_the_window():
    # 602 bp: windows start at 0, 300 and 302; a gene at base 303 (0-based 302) is in record frame +3
    dna = "C" * 302 + GENE * 10 + "C" * (602 - 302 - 240)
    prots = translate_record("dna_04", dna, NucleotideOptions(frames="forward", stops="truncate", min_protein_length=4))
    hit = [p for p in prots if p.protein.startswith("MKLV")][0]
    assert hit.id == f"dna_04:303-{hit.end}:+3" and hit.frame == 3 and hit.window_start == 301
    # on the reverse strand: the gene's reverse complement ends 5 bases before the record's end
    rc = str(Seq(GENE).reverse_complement())
    dna = "A" * 40 + rc + "AA"  # 66 bp; the gene is read from base 3 of the reverse complement: frame -3
    hit = [p for p in translate_record("r", dna, NucleotideOptions(min_protein_length=4)) if p.protein == "MKLV"][0]
    assert hit.id == "r:53-64:-3" and hit.frame == -3
    assert str(Seq(dna).reverse_complement())[2:14] == GENE[:12]


def test_overlapping_windows_give_each_protein_once():
    # 301 bp: the end-anchored second window [2, 301] re-reads the bases of the first one
    rng = __import__("numpy").random.default_rng(3)
    dna = "".join(rng.choice(list("ACGT"), 301))
    for opts in (NucleotideOptions(stops="keep_x", min_protein_length=5), NucleotideOptions(stops="split", step=150, window=300),
                 NucleotideOptions(frames="longest_orf", step=30, window=90, min_protein_length=1)):
        prots = translate_record("dna_03", dna, opts)
        ids = [p.id for p in prots]
        assert len(ids) == len(set(ids)), opts
        for p in prots:  # every id names bases that translate to its protein in its record frame
            s, e = p.start, p.end
            seq = Seq(dna[s - 1 : e]) if p.frame > 0 else Seq(dna[s - 1 : e]).reverse_complement()
            assert str(seq.translate(table=11)).replace("*", "X") == p.protein
            assert p.frame == ((s - 1) % 3 + 1 if p.frame > 0 else -((301 - e) % 3 + 1))


@pytest.mark.parametrize("frames", ["six", "forward", "longest_orf"])
def test_shipped_reads_give_unique_ids_with_every_option(frames, tmp_path):
    from virnucpro_core.options import Options
    from virnucpro_core.stages import shard

    reads = ROOT / "resources/example/reads.fna"
    for stops in ("truncate", "split", "keep_x"):
        for step in (None, 150):
            opts = Options(input_type="nucleotide", shards=1, nucleotide=NucleotideOptions(frames=frames, stops=stops, step=step))
            out = tmp_path / f"{stops}-{step}"
            man = shard.run([str(reads)], out, opts)
            ids = pq.read_table(out / "shard_0000.parquet", columns=["id"])["id"].to_pylist()
            assert len(ids) == len(set(ids)) == man["records"] > 0, (stops, step)

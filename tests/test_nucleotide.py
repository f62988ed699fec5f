"""Nucleotide front end: the array translation against Biopython (the former implementation, kept here as the
reference), id scheme, windows, accounting."""

import itertools
import json
import warnings
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from Bio.Data import CodonTable
from Bio.Seq import Seq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import MODEL, READS, snakemake
from virnucpro_core.io.nucleotide import (FRAMES, Proteins, Translated, check_nucleotides, codon_table, record_frame,
                                       translate_batch, translate_frame, translate_record, window_starts)
from virnucpro_core.options import NucleotideOptions

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
    out = tmp_path / "out"
    res = snakemake("--cores", "2", "--config", f"input={READS}", "input_type=nucleotide", f"model={MODEL}", f"outdir={out}",
                    "shards=2", f"embedding={{lock_dir: {tmp_path / 'locks'}}}", "spot_check={sample: 4}",
                    f"nucleotide={nucleotide}", timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    t = pq.read_table(out / "embeddings.parquet")
    assert {"parent_id", "window_start", "window_end", "frame"} <= set(t.column_names)
    read_ids = [line[1:].split()[0] for line in READS.read_text().splitlines() if line.startswith(">")]
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

    for stops in ("truncate", "split", "keep_x"):
        for step in (None, 150):
            opts = Options(input_type="nucleotide", shards=1, nucleotide=NucleotideOptions(frames=frames, stops=stops, step=step))
            out = tmp_path / f"{stops}-{step}"
            man = shard.run([str(READS)], out, opts)
            ids = [i for p in man["parts"] for i in pq.read_table(out / f"{p['name']}.parquet", columns=["id"])["id"].to_pylist()]
            assert len(ids) == len(set(ids)) == man["rows"] > 0, (stops, step)


# --- the array translation against Biopython -------------------------------------------------------------------------
# The reference: the Biopython implementation that nucleotide.py had before the array translation, kept verbatim.

def reference_translate_frame(dna: str, frame: int, table: int) -> str:
    seq = Seq(dna) if frame > 0 else Seq(dna).reverse_complement()
    offset = abs(frame) - 1
    usable = (len(seq) - offset) // 3 * 3
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return str(seq[offset : offset + usable].translate(table=table))


def _reference_span(win_start: int, win_len: int, frame: int, aa_start: int, aa_end: int) -> tuple[int, int]:
    off = abs(frame) - 1
    if frame > 0:
        return win_start + off + 3 * aa_start + 1, win_start + off + 3 * aa_end
    end = win_start + win_len - off - 3 * aa_start
    return end - 3 * (aa_end - aa_start) + 1, end


def _reference_pieces(protein: str, stops: str) -> list[tuple[int, int, str]]:
    if stops == "keep_x":
        return [(0, len(protein), protein.replace("*", "X"))]
    if stops == "truncate":
        n = protein.find("*")
        n = len(protein) if n < 0 else n
        return [(0, n, protein[:n])]
    out, pos = [], 0
    for part in protein.split("*"):
        out.append((pos, pos + len(part), part))
        pos += len(part) + 1
    return out


def reference_translate_record(rec_id: str, dna: str, options: NucleotideOptions) -> list[Translated]:
    o = options
    if o.genetic_code not in CodonTable.unambiguous_dna_by_id:
        raise ValueError(f"unknown NCBI genetic code {o.genetic_code}")
    out: list[Translated] = []
    seen: set[str] = set()
    for ws in window_starts(len(dna), o.window, o.step or o.window):
        chunk = dna[ws : ws + o.window]
        candidates = []
        for frame in FRAMES[o.frames]:
            prot = reference_translate_frame(chunk, frame, o.genetic_code)
            pieces = _reference_pieces(prot, "split" if o.frames == "longest_orf" else o.stops)
            for a, b, residues in pieces:
                if len(residues) >= o.min_protein_length:
                    s, e = _reference_span(ws, len(chunk), frame, a, b)
                    f = record_frame(len(dna), s, e, frame)
                    candidates.append(Translated(f"{rec_id}:{s}-{e}:{f:+d}", rec_id, ws + 1, ws + len(chunk), f, s, e, residues))
        if o.frames == "longest_orf" and candidates:
            candidates = [max(candidates, key=lambda t: len(t.protein))]
        for t in candidates:
            if t.id not in seen:
                seen.add(t.id)
                out.append(t)
    return out


def batch_rows(p: Proteins) -> list[tuple]:
    """Rows of a batch as (record, id, window_start, window_end, frame, start, end, protein)."""
    cols = (p.record, p.id, p.window_start, p.window_end, p.frame, p.start, p.end, p.protein)
    return list(zip(*(c.tolist() if isinstance(c, np.ndarray) else c for c in cols)))


def reference_rows(ids: list[str], seqs: list[str], options: NucleotideOptions) -> list[tuple]:
    return [(i, t.id, t.window_start, t.window_end, t.frame, t.start, t.end, t.protein)
            for i, (rid, dna) in enumerate(zip(ids, seqs)) for t in reference_translate_record(rid, dna, options)]


def assert_batch_equals_reference(ids: list[str], seqs: list[str], options: NucleotideOptions) -> None:
    got = translate_batch(ids, seqs, options)
    assert batch_rows(got) == reference_rows(ids, seqs, options), options
    assert len(got) == len(got.id) and got.record.dtype == np.int64 and got.frame.dtype == np.int8
    assert got.window_start.dtype == got.window_end.dtype == np.int64
    for rid, dna in zip(ids, seqs):
        assert translate_record(rid, dna, options) == reference_translate_record(rid, dna, options), options


LETTERS = "ACGTNRYSWKMBDHV"
TABLES = sorted(CodonTable.unambiguous_dna_by_id)


def random_dna(rng: np.random.Generator, n: int, ambiguous: float = 0.1) -> str:
    seq = rng.choice(list("ACGT"), n)
    amb = rng.random(n) < ambiguous
    seq[amb] = rng.choice(list(LETTERS[4:]), int(amb.sum()))
    return "".join(seq)


@pytest.mark.parametrize("table", TABLES)
def test_codon_table_is_biopython_for_every_codon(table):
    codons = ["".join(c) for c in itertools.product(LETTERS, repeat=3)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = "".join(str(Seq(c).translate(table=table)) for c in codons)
    index = [LETTERS.index(c[0]) * 225 + LETTERS.index(c[1]) * 15 + LETTERS.index(c[2]) for c in codons]
    assert codon_table(table)[index].tobytes().decode() == expected
    if table in (1, 11):  # stops, unknown and two-way ambiguous amino acids (B: N or D, Z: Q or E, J: I or L)
        assert set(expected) == set("ACDEFGHIKLMNPQRSTVWY*XBZJ")
    # through the frame translation: every codon on the given strand and, read back, on the reverse complement
    assert translate_frame("".join(codons), 1, table) == expected
    rc = str(Seq("".join(codons)).reverse_complement())
    assert translate_frame(rc, -1, table) == expected


def test_codon_table_is_cached_read_only_and_rejects_unknown_tables():
    assert codon_table(11) is codon_table(11) and not codon_table(11).flags.writeable
    assert codon_table(11).dtype == np.uint8 and codon_table(11).shape == (15**3,)
    for call in (lambda: codon_table(7), lambda: translate_frame("ATG", 1, 99),
                 lambda: translate_record("r", "ATG", NucleotideOptions(genetic_code=8)),
                 lambda: translate_batch([], [], NucleotideOptions(genetic_code=0))):
        with pytest.raises(ValueError, match="unknown NCBI genetic code"):
            call()


def test_frames_with_ambiguity_codes_equal_biopython_for_every_table(rng):
    seqs = [random_dna(rng, n, amb) for n in (0, 1, 2, 3, 4, 5, 6, 7, 100, 301, 302) for amb in (0.0, 0.3)]
    for table in TABLES:
        for dna in seqs:
            for k in (1, 2, 3):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    fwd, rc = Seq(dna)[k - 1 :], Seq(dna).reverse_complement()[k - 1 :]
                    assert translate_frame(dna, k, table) == str(fwd[: len(fwd) // 3 * 3].translate(table=table))
                    assert translate_frame(dna, -k, table) == str(rc[: len(rc) // 3 * 3].translate(table=table))


def test_lower_case_and_u_read_as_biopython_reads_them():
    assert translate_frame("augaaR", 1, 11) == "MK" == reference_translate_frame("augaaR", 1, 11)
    assert translate_frame("aacgg", -1, 11) == reference_translate_frame("aacgg", -1, 11)


def test_illegal_bases_are_named():
    with pytest.raises(ValueError, match=r"record 'b': illegal nucleotide 'X' at base 3"):
        translate_batch(["a", "b"], ["ACGT", "ACXT"], NucleotideOptions())
    with pytest.raises(ValueError, match=r"record 'a': illegal nucleotide 'é' at base 2"):
        translate_batch(["a"], ["Aé"], NucleotideOptions())
    with pytest.raises(ValueError, match=r"illegal nucleotide '-' at base 4"):
        translate_frame("ACG-", 1, 11)


def test_empty_batches_and_records():
    p = translate_batch([], [], NucleotideOptions())
    assert len(p) == 0 and batch_rows(p) == []
    assert translate_record("r", "", NucleotideOptions(min_protein_length=1)) == []
    assert_batch_equals_reference(["a", "b", "c"], ["", "ATGAAA", ""], NucleotideOptions(min_protein_length=1, window=3))


@st.composite
def records(draw) -> tuple[list[str], list[str]]:
    ids, seqs = [], []
    for i in range(draw(st.integers(0, 5))):
        n = draw(st.one_of(st.integers(0, 12), st.integers(0, 1000)))
        rng = np.random.default_rng(draw(st.integers(0, 2**32)))
        kind = draw(st.sampled_from(["random", "ambiguous", "repeat", "orf"]))
        if kind == "repeat":  # a short unit repeated: the same proteins in many windows and frames
            unit = random_dna(rng, int(rng.integers(1, 12)), 0.05)
            dna = (unit * (n // len(unit) + 1))[:n]
        elif kind == "orf":  # stop-free stretches: long proteins, truncated by the windows
            codons = rng.choice(["GCT", "AAA", "CTG", "GGN", "TAA", "TGA", "CAR"], n // 3 + 1, p=[.3, .3, .2, .1, .04, .03, .03])
            dna = "".join(codons)[:n]
        else:
            dna = random_dna(rng, n, 0.15 if kind == "ambiguous" else 0.01)
        ids.append(f"rec{i}")
        seqs.append(dna)
    return ids, seqs


@st.composite
def nucleotide_options(draw) -> NucleotideOptions:
    window = draw(st.one_of(st.integers(3, 12), st.integers(13, 400)))
    step = draw(st.one_of(st.none(), st.integers(max(1, window // 8), window + 50)))
    return NucleotideOptions(window=window, step=step, frames=draw(st.sampled_from(sorted(FRAMES))),
                             stops=draw(st.sampled_from(["truncate", "split", "keep_x"])),
                             min_protein_length=draw(st.one_of(st.integers(1, 5), st.integers(6, 60))),
                             genetic_code=draw(st.sampled_from([11, 1, 2, 4, 6, 25, 27, 31])))


@settings(derandomize=True, max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(batch=records(), options=nucleotide_options())
def test_batches_equal_the_biopython_reference(batch, options):
    assert_batch_equals_reference(*batch, options)


def read_fasta_simple(path: Path) -> tuple[list[str], list[str]]:
    ids, seqs = [], []
    for block in path.read_text().split(">")[1:]:
        header, *lines = block.splitlines()
        ids.append(header.split()[0])
        seqs.append(check_nucleotides("".join(lines)))
    return ids, seqs


@pytest.mark.parametrize("frames", sorted(FRAMES))
@pytest.mark.parametrize("stops", ["truncate", "split", "keep_x"])
def test_shipped_reads_equal_the_biopython_reference(frames, stops):
    ids, seqs = read_fasta_simple(READS)
    for step in (None, 150):
        assert_batch_equals_reference(ids, seqs, NucleotideOptions(frames=frames, stops=stops, step=step))


def test_check_nucleotides():
    assert check_nucleotides("acgtRYswkmBDHVNu") == "ACGTRYSWKMBDHVNT"
    assert check_nucleotides("") == ""
    # as before: positions in the upper-cased text (ß becomes SS, two legal bases)
    for seq, ch, pos in (("ACGTX", "X", 5), ("acgt-a", "-", 5), ("ACG T", " ", 4), ("ACé", "É", 3), ("AC*GX", "*", 3),
                         ("ßACGTX", "X", 7), ("AC\x00", "\x00", 3)):
        with pytest.raises(ValueError) as err:
            check_nucleotides(seq)
        assert str(err.value) == f"illegal nucleotide {ch!r} at base {pos}", seq

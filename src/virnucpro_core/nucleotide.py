"""Nucleotide front end (VirNucPro): reads or contigs -> windows -> translated frames -> proteins.

Each nucleotide record is cut into windows of ``window`` bp every ``step`` bp; a last partial
window is anchored to the record's end (a full-length window overlapping the previous one), so
every base is covered; a record shorter than one window is one window. Each window is translated
(Biopython, NCBI genetic code ``table``) in the requested frames:

- ``six``: +1, +2, +3 on the given strand and -1, -2, -3 on its reverse complement;
- ``forward``: +1, +2, +3;
- ``longest_orf``: of the six frames, only the longest stop-free stretch.

Stops: ``truncate`` cuts a frame's protein at its first stop, ``split`` cuts it at every stop into
fragments, ``keep_x`` keeps the whole frame with stops as ``X``. Proteins shorter than
``min_protein_length`` are dropped; a record none of whose windows gives a protein is skipped with
that reason. A derived protein's id is ``<read_id>:<start>-<end>:<frame>``: 1-based inclusive
coordinates on the given strand of the bases its residues come from, and the frame relative to the
record as given: ``+k`` reads codons from base k of the record, ``-k`` from base k of its reverse
complement, whichever window the protein was found in. Overlapping windows (``step`` below
``window``, or the end-anchored last window) can find the same protein again: same bases, same
frame, same residues; it is kept once, from the first window, so ids are unique within a record.
IUPAC ambiguity codes translate as Biopython does (``X`` where the codon is ambiguous).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

from Bio.Data import CodonTable
from Bio.Seq import Seq

from .options import NucleotideOptions

NUCLEOTIDES = frozenset("ACGTUNRYSWKMBDHV")
FRAMES = {"six": (1, 2, 3, -1, -2, -3), "forward": (1, 2, 3), "longest_orf": (1, 2, 3, -1, -2, -3)}


@dataclass(frozen=True)
class Translated:
    id: str
    parent_id: str
    window_start: int  # 1-based, inclusive: the first window the protein was found in
    window_end: int
    frame: int  # relative to the record: +1..+3, -1..-3
    start: int  # 1-based inclusive span of the bases translated
    end: int
    protein: str


def window_starts(length: int, window: int, step: int) -> list[int]:
    """0-based window starts; the last partial window is anchored to the record's end."""
    if length <= window:
        return [0]
    starts = list(range(0, length - window + 1, step))
    if starts[-1] + window < length:
        starts.append(length - window)
    return starts


def translate_frame(dna: str, frame: int, table: int) -> str:
    """Biopython's translation of one frame of ``dna`` (whole codons only)."""
    seq = Seq(dna) if frame > 0 else Seq(dna).reverse_complement()
    offset = abs(frame) - 1
    usable = (len(seq) - offset) // 3 * 3
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return str(seq[offset : offset + usable].translate(table=table))


def _span(win_start: int, win_len: int, frame: int, aa_start: int, aa_end: int) -> tuple[int, int]:
    """1-based inclusive bases (given strand) of residues [aa_start, aa_end) of a frame."""
    off = abs(frame) - 1
    if frame > 0:
        return win_start + off + 3 * aa_start + 1, win_start + off + 3 * aa_end
    end = win_start + win_len - off - 3 * aa_start  # exclusive end on the given strand
    return end - 3 * (aa_end - aa_start) + 1, end


def record_frame(length: int, start: int, end: int, strand: int) -> int:
    """Frame relative to a record of ``length`` bases of a translation covering bases
    [start, end] (1-based inclusive, given strand): +k starts at base k + 3n, -k at base k + 3n
    of the reverse complement."""
    return (start - 1) % 3 + 1 if strand > 0 else -((length - end) % 3 + 1)


def _pieces(protein: str, stops: str) -> list[tuple[int, int, str]]:
    """(aa_start, aa_end, residues) pieces of a translated frame by the stop policy."""
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


def translate_record(rec_id: str, dna: str, options: NucleotideOptions) -> list[Translated]:
    """Proteins derived from one nucleotide record (already upper-case, U as T)."""
    o = options
    if o.genetic_code not in CodonTable.unambiguous_dna_by_id:
        raise ValueError(f"unknown NCBI genetic code {o.genetic_code}")
    out: list[Translated] = []
    seen: set[str] = set()
    for ws in window_starts(len(dna), o.window, o.step or o.window):
        chunk = dna[ws : ws + o.window]
        candidates = []
        for frame in FRAMES[o.frames]:
            prot = translate_frame(chunk, frame, o.genetic_code)
            pieces = _pieces(prot, "split" if o.frames == "longest_orf" else o.stops)
            for a, b, residues in pieces:
                if len(residues) >= o.min_protein_length:
                    s, e = _span(ws, len(chunk), frame, a, b)
                    f = record_frame(len(dna), s, e, frame)
                    candidates.append(Translated(f"{rec_id}:{s}-{e}:{f:+d}", rec_id, ws + 1, ws + len(chunk), f, s, e, residues))
        if o.frames == "longest_orf" and candidates:
            candidates = [max(candidates, key=lambda t: len(t.protein))]  # first longest: frame order +1..-3
        for t in candidates:
            if t.id not in seen:  # the same bases in the same frame: found by an earlier window
                seen.add(t.id)
                out.append(t)
    return out


def check_nucleotides(seq: str) -> str:
    """Upper-case, U -> T; raise ValueError naming the first non-IUPAC character."""
    seq = seq.upper().replace("U", "T")
    for i, ch in enumerate(seq):
        if ch not in NUCLEOTIDES:
            raise ValueError(f"illegal nucleotide {ch!r} at base {i + 1}")
    return seq

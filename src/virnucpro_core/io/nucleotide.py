"""Nucleotide front end (VirNucPro): reads or contigs -> windows -> translated frames -> proteins.

Each nucleotide record is cut into windows of ``window`` bp every ``step`` bp; a last partial
window is anchored to the record's end (a full-length window overlapping the previous one), so
every base is covered; a record shorter than one window is one window. Each window is translated
(NCBI genetic code ``table``) in the requested frames:

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

Translation is array lookups (numpy), exactly Biopython's ``Seq(dna).translate(table=N)``: every
codon of the 15 IUPAC letters is translated once by Biopython into a per-table lookup array
(:func:`codon_table`), so ambiguity codes give what Biopython gives (``X`` where the codon is
ambiguous, ``B``/``Z``/``J`` where it is one of two amino acids, ``*`` where every reading is a
stop), and the reverse strand uses Biopython's IUPAC complement. :func:`translate_batch` translates
many records at once (columns, no object per protein); :func:`translate_record` is one record.
"""

from __future__ import annotations

import functools
import itertools
import warnings
from dataclasses import dataclass

import numpy as np

from ..options import NucleotideOptions

NUCLEOTIDES = frozenset("ACGTUNRYSWKMBDHV")
FRAMES = {"six": (1, 2, 3, -1, -2, -3), "forward": (1, 2, 3), "longest_orf": (1, 2, 3, -1, -2, -3)}

# per-base codes of the codon index: code(b1) * 225 + code(b2) * 15 + code(b3)
CODON_LETTERS = "ACGTNRYSWKMBDHV"
_COMPLEMENT = "TGCANYRSWMKVHDB"  # Biopython's IUPAC complement of CODON_LETTERS
_NO_CODE = 255
_CODE = np.full(256, _NO_CODE, np.uint8)  # byte -> base code; lower case as upper, U as T (as Biopython reads them)
for _i, _ch in enumerate(CODON_LETTERS):
    _CODE[ord(_ch)] = _CODE[ord(_ch.lower())] = _i
_CODE[ord("U")] = _CODE[ord("u")] = CODON_LETTERS.index("T")
_CODE_BYTES = _CODE.tobytes()  # for bytes.translate
_READABLE = bytes(np.flatnonzero(_CODE != _NO_CODE).astype(np.uint8))
_LEGAL_ASCII = "".join(sorted(NUCLEOTIDES)).encode("ascii")  # check_nucleotides: bytes.translate deletes these
_LEGAL_STR = dict.fromkeys(map(ord, NUCLEOTIDES))  # and str.translate these
_STOP = ord("*")


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


@dataclass(eq=False)
class Proteins:
    """Proteins of a batch of records as columns, in the order of :func:`translate_record` over the
    records (``record``: the record's index in the batch; the other columns as in :class:`Translated`)."""

    record: np.ndarray  # int64
    id: list[str]
    window_start: np.ndarray  # int64
    window_end: np.ndarray  # int64
    frame: np.ndarray  # int8
    start: np.ndarray  # int64
    end: np.ndarray  # int64
    protein: list[str]

    def __len__(self) -> int:
        return len(self.id)


def window_starts(length: int, window: int, step: int) -> list[int]:
    """0-based window starts; the last partial window is anchored to the record's end."""
    if length <= window:
        return [0]
    starts = list(range(0, length - window + 1, step))
    if starts[-1] + window < length:
        starts.append(length - window)
    return starts


@functools.cache
def codon_table(table: int) -> np.ndarray:
    """uint8 amino-acid byte (``*`` for a stop) that Biopython gives for each codon index
    ``code(b1) * 225 + code(b2) * 15 + code(b3)``, codes by position in :data:`CODON_LETTERS`.
    Built once per table from Biopython, one call per codon; read-only."""
    from Bio.Data import CodonTable
    from Bio.Seq import Seq

    if table not in CodonTable.unambiguous_dna_by_id:
        raise ValueError(f"unknown NCBI genetic code {table}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the dual-coding tables (27, 28, 31) warn on every call
        aa = "".join(str(Seq("".join(c)).translate(table=table)) for c in itertools.product(CODON_LETTERS, repeat=3))
    out = np.frombuffer(aa.encode("ascii"), np.uint8).copy()
    out.flags.writeable = False
    return out


@functools.cache
def _tables(table: int, stops_as_x: bool) -> tuple[np.ndarray, np.ndarray]:
    """(forward, reverse) lookups by the forward codon index of bases p, p+1, p+2: the amino acid
    of the codon read there on the given strand, and of the one read there on the reverse
    complement (the complement of p+2, p+1, p)."""
    fwd = codon_table(table).copy()
    if stops_as_x:
        fwd[fwd == _STOP] = ord("X")
    comp = np.array([CODON_LETTERS.index(c) for c in _COMPLEMENT])
    i = np.arange(15**3)
    b1, b2, b3 = i // 225, i // 15 % 15, i % 15
    rev = fwd[comp[b3] * 225 + comp[b2] * 15 + comp[b1]]
    fwd.flags.writeable = rev.flags.writeable = False
    return fwd, rev


def _codes(text: str, ids: list[str] | None = None, offsets: np.ndarray | None = None) -> np.ndarray:
    """Base codes of ``text`` (the records concatenated); ValueError naming the first unreadable base."""
    try:
        raw = text.encode("ascii")
    except UnicodeEncodeError as err:
        pos, ch = err.start, text[err.start]
    else:
        bad = raw.translate(None, _READABLE)
        if not bad:
            return np.frombuffer(raw.translate(_CODE_BYTES), np.uint8)
        pos, ch = raw.index(bad[:1]), chr(bad[0])
    if ids is None or offsets is None:
        raise ValueError(f"illegal nucleotide {ch!r} at base {pos + 1}")
    rec = int(np.searchsorted(offsets, pos, side="right")) - 1
    raise ValueError(f"record {ids[rec]!r}: illegal nucleotide {ch!r} at base {pos - int(offsets[rec]) + 1}")


def _codon_index(codes: np.ndarray) -> np.ndarray:
    """Forward codon index of bases p, p+1, p+2 for every position p (the last two padded with N)."""
    c = np.empty(len(codes) + 2, np.uint16)
    c[: len(codes)] = codes
    c[len(codes) :] = CODON_LETTERS.index("N")
    idx = c[:-2] * np.uint16(225)
    idx += c[1:-1] * np.uint16(15)
    idx += c[2:]
    return idx


def translate_frame(dna: str, frame: int, table: int) -> str:
    """Biopython's translation of one frame of ``dna`` (whole codons only): +k reads ``dna`` from
    base k, -k its reverse complement from base k."""
    if frame not in FRAMES["six"]:
        raise ValueError(f"frame must be one of +1..+3, -1..-3, not {frame}")
    fwd, rev = _tables(table, False)
    off, n = abs(frame) - 1, max(0, (len(dna) - abs(frame) + 1) // 3)
    codes = _codes(dna)
    if frame > 0:
        aa = fwd[_codon_index(codes[off : off + 3 * n])[::3]]
    else:  # the reverse complement's codons, from the given strand's end backwards
        end = len(dna) - off
        aa = rev[_codon_index(codes[end - 3 * n : end])[::3]][::-1]
    return aa.tobytes().decode("ascii")


def record_frame(length: int, start: int, end: int, strand: int) -> int:
    """Frame relative to a record of ``length`` bases of a translation covering bases
    [start, end] (1-based inclusive, given strand): +k starts at base k + 3n, -k at base k + 3n
    of the reverse complement."""
    return (start - 1) % 3 + 1 if strand > 0 else -((length - end) % 3 + 1)


def _windows(lengths: np.ndarray, window: int, step: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(record, 0-based start, length) of every window of every record, as :func:`window_starts`."""
    over = np.maximum(lengths - window, 0)
    count = np.where(over > 0, over // step + 1 + (over // step * step < over), 1)
    rec = np.repeat(np.arange(len(lengths)), count)
    j = np.arange(len(rec)) - np.repeat(np.cumsum(count) - count, count)
    return rec, np.minimum(j * step, over[rec]), np.minimum(lengths, window)[rec]


def translate_batch(ids: list[str], seqs: list[str], options: NucleotideOptions) -> Proteins:
    """Proteins derived from a batch of nucleotide records (as :func:`check_nucleotides` returns
    them), equal row for row to :func:`translate_record` on each record in turn.

    The records are concatenated and every codon of both strands is looked up once (``aa``: the
    given strand's amino acid at each position, then the reverse strand's in reverse order, so every
    frame of every window is a stride-3 run of ``aa``); stops are located by binary search, and
    Python works only per kept protein (its id and its residues)."""
    o = options
    frames = FRAMES[o.frames]
    stops = "split" if o.frames == "longest_orf" else o.stops
    fwd_table, rev_table = _tables(o.genetic_code, stops == "keep_x")
    if len(ids) != len(seqs):
        raise ValueError(f"{len(ids)} ids for {len(seqs)} sequences")
    lengths = np.fromiter(map(len, seqs), np.int64, len(seqs))
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    total = int(offsets[-1])
    idx = _codon_index(_codes("".join(seqs), ids, offsets))
    rows = -(-2 * total // 3)
    aa = np.zeros(3 * rows, np.uint8)  # padded to whole rows of 3 (see the stops below)
    np.take(fwd_table, idx, out=aa[:total])
    np.take(rev_table, idx[::-1], out=aa[total : 2 * total])  # aa[2 * total - 1 - p]: the reverse codon on bases p..p+2

    # frames of windows ("runs"), in output order: record, window, frame
    win_rec, win_start, win_len = _windows(lengths, o.window, o.step or o.window)
    nf = len(frames)
    strand = np.tile(np.sign(frames), len(win_rec))
    off = np.tile(np.abs(frames) - 1, len(win_rec))
    run_win = np.repeat(np.arange(len(win_rec)), nf)
    g = offsets[win_rec][run_win] + win_start[run_win]  # window start in the concatenation
    wl = win_len[run_win]
    n = np.maximum((wl - off) // 3, 0)  # codons
    q0 = np.where(strand > 0, g + off, 2 * total - g - wl + off + 2)  # first codon in aa (reverse: on bases g+wl-off-3..)
    keep = np.flatnonzero(n >= o.min_protein_length)  # no shorter run gives a protein
    run_win, strand, off, n, q0 = run_win[keep], strand[keep], off[keep], n[keep], q0[keep]

    # pieces: (run, first codon, end codon) by the stop policy
    if stops == "keep_x":
        piece, a, b = np.arange(len(n)), np.zeros(len(n), np.int64), n
    else:
        # the stops keyed by phase and codon: aa[3 * i + r] has key r * rows + i, so the codons of a run
        # (one phase) have consecutive keys, from key0; sorted, with a sentinel after the last
        stop = np.append(np.flatnonzero(aa.reshape(rows, 3).T == _STOP), 3 * rows)
        key0 = q0 % 3 * rows + q0 // 3
        lo = np.searchsorted(stop, key0)  # the run's first stop, if below key0 + n
        if stops == "truncate":
            piece, a, b = np.arange(len(n)), np.zeros(len(n), np.int64), np.minimum(stop[lo] - key0, n)
        else:
            count = np.searchsorted(stop, key0 + n) - lo + 1
            piece = np.repeat(np.arange(len(n)), count)
            k = np.arange(len(piece)) - np.repeat(np.cumsum(count) - count, count)
            s = lo[piece] + k  # the stop ending piece k (or the run's end for the last piece)
            a = np.where(k > 0, stop[s - 1] - key0[piece] + 1, 0)
            b = np.where(k < count[piece] - 1, stop[s] - key0[piece], n[piece])
    long = np.flatnonzero(b - a >= o.min_protein_length)
    piece, a, b = piece[long], a[long], b[long]
    if o.frames == "longest_orf" and len(piece):  # per window the first longest piece
        w, size = run_win[piece], b - a
        group = np.flatnonzero(np.concatenate([[True], w[1:] != w[:-1]]))
        best = size == np.repeat(np.maximum.reduceat(size, group), np.diff(np.append(group, len(w))))
        cand = np.flatnonzero(best)
        cand = cand[np.concatenate([[True], w[cand][1:] != w[cand][:-1]])]
        piece, a, b = piece[cand], a[cand], b[cand]

    # coordinates on the given strand (1-based inclusive) and the record frame
    win = run_win[piece]
    rec, ws, wl, st, of = win_rec[win], win_start[win], win_len[win], strand[piece], off[piece]
    end = np.where(st > 0, ws + of + 3 * b, ws + wl - of - 3 * a)
    start = end - 3 * (b - a) + 1
    frame = np.where(st > 0, (start - 1) % 3 + 1, -((lengths[rec] - end) % 3 + 1)).astype(np.int8)
    first = q0[piece] + 3 * a
    if len(win) and np.any(np.bincount(win_rec, minlength=len(ids)) > 1):  # windows overlap: drop repeats
        order = np.lexsort((st, end, start, rec))  # stable: the first of equal rows comes first
        same = np.all([x[order][1:] == x[order][:-1] for x in (rec, start, end, st)], axis=0)
        unique = np.ones(len(order), bool)
        unique[order[1:][same]] = False
        rec, ws, wl, start, end, frame, first, a, b = (x[unique] for x in (rec, ws, wl, start, end, frame, first, a, b))

    text = aa.tobytes().decode("ascii")
    first_l, stop_l = first.tolist(), (first + 3 * (b - a)).tolist()
    sign = {1: "+1", 2: "+2", 3: "+3", -1: "-1", -2: "-2", -3: "-3"}
    pid = [f"{ids[r]}:{s}-{e}:{sign[f]}" for r, s, e, f in zip(rec.tolist(), start.tolist(), end.tolist(), frame.tolist())]
    return Proteins(rec, pid, ws + 1, ws + wl, frame, start, end, [text[i:j:3] for i, j in zip(first_l, stop_l)])


def translate_record(rec_id: str, dna: str, options: NucleotideOptions) -> list[Translated]:
    """Proteins derived from one nucleotide record (already upper-case, U as T)."""
    p = translate_batch([rec_id], [dna], options)
    cols = (p.id, p.window_start.tolist(), p.window_end.tolist(), p.frame.tolist(), p.start.tolist(), p.end.tolist(), p.protein)
    return [Translated(i, rec_id, ws, we, f, s, e, prot) for i, ws, we, f, s, e, prot in zip(*cols)]


def check_nucleotides(seq: str) -> str:
    """Upper-case, U -> T; raise ValueError naming the first non-IUPAC character."""
    seq = seq.upper().replace("U", "T")
    if seq.isascii():
        bad = seq.encode("ascii").translate(None, _LEGAL_ASCII)
        if not bad:
            return seq
        ch = chr(bad[0])
    else:
        ch = seq.translate(_LEGAL_STR)[0]
    raise ValueError(f"illegal nucleotide {ch!r} at base {seq.index(ch) + 1}")

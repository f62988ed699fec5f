"""FASTA reading (io/fasta.py): parsing, normalisation, bad input.

The block reader is checked against ``reference_read_fasta`` (below: the line-based reader it replaced,
as it was), and the parts of a file, read one by one, against the whole file."""

import gzip
import hashlib
import io
import itertools
import logging
import os
import random
import re
import zlib
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from virnucpro_core.io import fasta
from virnucpro_core.io.fasta import (
    BOM,
    MAGIC,
    FastaError,
    Record,
    Skipped,
    count_headers,
    header_id,
    normalise,
    normalise_nucleotides,
    parse_record,
    raw_records,
    read_fasta,
    split_points,
)
from virnucpro_core.io.idset import IdTable, id_hash


def write(tmp_path, name, data: bytes | str):
    p = tmp_path / name
    p.write_bytes(data.encode() if isinstance(data, str) else data)
    return p


def records(*paths, on_invalid="error"):
    return list(read_fasta(paths, on_invalid))


def test_normalisation_and_ids(tmp_path):
    p = write(tmp_path, "a.faa", ">p1 some description\nmkv\nlla*\n>p2\r\nAC-D.E\r\nF G\t\r\n>p3\nUOBZXJ\n")
    recs = records(p)
    assert [r.id for r in recs] == ["p1", "p2", "p3"]
    assert [r.sequence for r in recs] == ["MKVLLA", "ACDEFG", "UOBZXJ"]
    assert [(r.order, r.number) for r in recs] == [(0, 1), (1, 2), (2, 3)]


def test_gzip_and_plain_give_the_same_records(tmp_path):
    text = ">a\nMKV\n>b\nLLA\n"
    plain = write(tmp_path, "x.faa", text)
    gz = write(tmp_path, "x.faa.gz", gzip.compress(text.encode()))
    assert [r.sequence for r in records(plain)] == [r.sequence for r in records(gz)]


@pytest.mark.parametrize(
    "content, reason",
    [
        (">a\nMK*V\n", "record 1 (a): internal stop '*' at residue 3"),
        (">a\nMK1V\n", "record 1 (a): illegal character '1' at residue 3"),
        (">a\n\n>b\nMK\n", "record 1 (a): empty sequence"),
        (">\nMKV\n", "record 1: empty header"),
        ("MKV\n>a\nMK\n", "record 0: sequence data before the first header (line 1)"),
        (">a\nMKV\n>a\nLL\n", "record 2 (a): duplicate id (first seen in"),
        (b">a\xff\nMKV\n", "record 1: header is not valid UTF-8"),
        (">a\nMK\xc3\xa9V\n".encode("latin-1").decode("latin-1"), "record 1 (a): illegal character"),
    ],
)
def test_bad_records_error_or_skip(tmp_path, content, reason):
    p = write(tmp_path, "bad.faa", content)
    with pytest.raises(FastaError) as exc:
        records(p)
    assert str(p) in str(exc.value) and reason in str(exc.value)
    out = records(p, on_invalid="skip")
    skipped = [r for r in out if isinstance(r, Skipped)]
    assert len(skipped) == 1 and skipped[0].reason in str(exc.value)


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "empty file"),
        (b"\x00\x01\x02binary", "binary data"),
        (b"LOCUS       NC_001 100 bp\nORIGIN\n", "GenBank"),
        (b"@read1\nACGT\n+\nIIII\n", "FASTQ"),
    ],
)
def test_whole_file_problems_always_raise(tmp_path, content, message):
    p = write(tmp_path, "f.faa", content)
    for mode in ("error", "skip"):
        with pytest.raises(FastaError, match=message):
            records(p, on_invalid=mode)


def test_truncated_gzip_raises(tmp_path):
    data = gzip.compress("".join(f">r{i}\n" + "MKV" * 5000 + "\n" for i in range(20)).encode())
    p = write(tmp_path, "t.faa.gz", data[: len(data) // 2])
    with pytest.raises(FastaError, match="truncated or corrupt gzip"):
        records(p)


def test_duplicate_ids_across_files(tmp_path):
    a = write(tmp_path, "a.faa", ">x\nMKV\n")
    b = write(tmp_path, "b.faa", ">x\nLLA\n>y\nMM\n")
    out = records(a, b, on_invalid="skip")
    assert [type(r) for r in out] == [Record, Skipped, Record]
    assert f"first seen in {a} record 1" in out[1].reason
    assert out[2].order == 1  # order counts kept records


def test_missing_file(tmp_path):
    with pytest.raises(FastaError, match="does not exist"):
        records(tmp_path / "nope.faa")


def test_nucleotide_file_warns(tmp_path, caplog):
    p = write(tmp_path, "n.fa", ">r\nACGTACGTNNACGT\n")
    assert len(records(p)) == 1
    assert "looks like a nucleotide file" in caplog.text


# ------------------------------------------------------------------ the reference: the line-based reader, as it was
ref_log = logging.getLogger("reference_fasta")
_REF_DELETE = b"-." + b" \t\r\n\v\f"


def _ref_lines(path):
    with open(path, "rb") as fh:
        magic = fh.read(2)
    raw = gzip.open(path, "rb") if magic == b"\x1f\x8b" else open(path, "rb")  # noqa: SIM115 (as it was)
    with raw:
        head = raw.peek(8192)[:8192]  # both readers peek without consuming
        for lead, what in MAGIC.items():
            if head.startswith(lead):
                raise FastaError(f"{path}: {what}")
        nul = head.find(b"\x00")
        if nul >= 0:
            raise FastaError(f"{path}: binary data, not FASTA (NUL byte at byte {nul + 1})")
        text = io.TextIOWrapper(raw, encoding="latin-1", newline=None)
        first = True
        for line in text:
            b = line.encode("latin-1")
            if first and b.startswith(BOM):
                b = b[len(BOM):]
            first = False
            yield b


def _ref_raw_records(path):
    number, header, header_line, lines = 0, None, 0, []
    try:
        for line_no, line in enumerate(_ref_lines(path), 1):
            if line.startswith(b">"):
                if header is not None or lines:
                    yield number, header_line, header, lines
                number += 1
                header, header_line, lines = line[1:].rstrip(b"\n"), line_no, []
            elif line.strip():
                if number == 0 and not lines:
                    _ref_check_not_other_format(path, line, line_no)
                    header_line = line_no
                lines.append(line)
    except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise FastaError(f"{path}: truncated or corrupt gzip file ({exc})") from exc
    if header is not None or lines:
        yield number, header_line, header, lines


def _ref_check_not_other_format(path, line, line_no):
    if line.startswith(b"LOCUS "):
        raise FastaError(f"{path}: looks like GenBank (line {line_no} starts with LOCUS), not FASTA")
    if line.startswith(b"@"):
        raise FastaError(f"{path}: looks like FASTQ (line {line_no} starts with '@'), not FASTA")


def _ref_normalise(raw):
    seq = raw.translate(None, _REF_DELETE).upper()
    if seq.endswith(b"*"):
        seq = seq[:-1]
    if not seq:
        raise ValueError("empty sequence")
    bad = seq.translate(None, b"ABCDEFGHIJKLMNOPQRSTUVWXYZ")
    if bad:
        ch = bad[:1]
        pos = seq.index(ch) + 1
        if ch == b"*":
            raise ValueError(f"internal stop '*' at residue {pos}")
        shown = ch.decode("latin-1") if 32 < ch[0] < 127 else f"byte 0x{ch[0]:02x}"
        raise ValueError(f"illegal character {shown!r} at residue {pos}")
    return seq.decode("ascii")


def _ref_normalise_nucleotides(raw):
    from virnucpro_core.io.nucleotide import check_nucleotides

    seq = raw.translate(None, _REF_DELETE)
    if not seq:
        raise ValueError("empty sequence")
    try:
        text = seq.decode("ascii")
    except UnicodeDecodeError:
        raise ValueError("non-ASCII byte in the sequence") from None
    return check_nucleotides(text)


def reference_read_fasta(paths, on_invalid="error", input_type="protein"):
    """read_fasta as it was before the block reader (fasta.py at 8a89c5c), Record/Skipped without offsets."""
    clean = {"protein": _ref_normalise, "nucleotide": _ref_normalise_nucleotides}[input_type]
    if on_invalid not in ("error", "skip"):
        raise ValueError(f"on_invalid must be 'error' or 'skip', not {on_invalid!r}")
    paths = [Path(p) for p in paths]
    seen = IdTable()
    order = 0
    for file_index, path in enumerate(paths):
        if not path.is_file():
            raise FastaError(f"{path}: input file does not exist")
        residues = acgt = 0
        n_raw = 0
        for number, line_no, header, lines in _ref_raw_records(path):
            n_raw += 1
            rec_id = ""
            try:
                if header is None:
                    raise ValueError(f"sequence data before the first header (line {line_no})")
                try:
                    text = header.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise ValueError(f"header is not valid UTF-8 (byte {exc.start + 1})") from None
                words = text.split()
                if not words:
                    raise ValueError("empty header (no id after '>')")
                rec_id = words[0]
                seq = clean(b"".join(lines))
                h = id_hash(rec_id)
                first = seen.get(h)
                if first is not None:
                    raise ValueError(f"duplicate id (first seen in {paths[first >> 40]} record {first & ((1 << 40) - 1)})")
            except ValueError as exc:
                where = f"{path}: record {number}" + (f" ({rec_id})" if rec_id else "")
                if on_invalid == "error":
                    raise FastaError(f"{where}: {exc}") from None
                ref_log.warning("skipped %s: %s", where, exc)
                yield ("Skipped", str(path), number, rec_id, str(exc))
                continue
            seen.put(h, file_index << 40 | number)
            residues += len(seq)
            acgt += sum(map(seq.count, "ACGTN"))
            yield ("Record", order, str(path), number, rec_id, seq)
            order += 1
        if n_raw == 0:
            raise FastaError(f"{path}: empty file, no FASTA records")
        if input_type == "protein" and residues and acgt / residues > 0.9:
            ref_log.warning(
                "%s: %.0f%% of residues are A/C/G/T/N: this looks like a nucleotide file, "
                "but it is embedded as protein (set input_type: nucleotide to translate it)",
                path,
                100 * acgt / residues,
            )


# ------------------------------------------------------------------ random FASTA-like files
class _Logs(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.seen = []

    def emit(self, record):
        self.seen.append((record.levelno, record.getMessage()))


@contextmanager
def _captured(*loggers):
    h = _Logs()
    for lg in loggers:
        lg.addHandler(h)
    try:
        yield h.seen
    finally:
        for lg in loggers:
            lg.removeHandler(h)


def outcome(read, paths, on_invalid, input_type):
    """Everything a reader gives: the items in order, then the error (or None), then the log lines."""
    items, err = [], None
    with _captured(ref_log, fasta.log) as logs:
        try:
            for item in read(paths, on_invalid, input_type):
                items.append(item if isinstance(item, tuple) else (type(item).__name__, *_fields(item)))
        except FastaError as exc:
            err = str(exc)
    return items, err, list(logs)


def _fields(item):
    if isinstance(item, Record):
        return item.order, item.file, item.number, item.id, item.sequence
    return item.file, item.number, item.id, item.reason


_ID = st.builds(lambda n, d: b"r%d" % n + d, st.integers(1, 6),
                st.sampled_from([b"", b" desc", b"\tx y", b" # 1 # 300 # -1 # ID=1_1"]))


def _weighted(*pairs):
    """One of the strategies, chosen with the given weights (one_of picks each distinct strategy alike)."""
    return st.sampled_from([strategy for weight, strategy in pairs for _ in range(weight)]).flatmap(lambda strategy: strategy)


_HEADER = _weighted(
    (6, _ID),
    (1, st.sampled_from([b"", b"  ", b" r3", b"r\xff", b"\xc3\xa9t\xc3\xa9", b"a>b", b"r1\x1cq", b"r4\x0bz", b"\xc2\x85x"])),
    (1, st.binary(max_size=10).map(lambda b: b.replace(b"\x00", b"\x01"))),
)
_RESIDUES = st.text("ACDEFGHIKLMNPQRSTVWYacdefghik", min_size=1, max_size=30).map(str.encode)
_SEQ = _weighted(
    (6, _RESIDUES), (1, st.sampled_from([b"ACGT", b"acgtn", b"ACGTNNACGTAC", b"ACGU", b"RYKM"])),
    (1, st.sampled_from([b"mkv*", b"AC-D.E", b"XBZUOJ", b"M K\tV", b"12", b"*", b"MK*V", b"MK>V", b"M >V", b" >x", b"\t>",
                         b"\xc3\xa9", b"MK\x00V"])),
    (1, st.text("ACDEFGHIKLMNPQRSTVWYXBZUOJacgtn*-. \t0123456789\x0b\x0c", max_size=24).map(str.encode)),
)
_BLANK = st.sampled_from([b"", b" ", b"\t", b" \x0b\x0c "])
_ODD = st.one_of(st.binary(max_size=8),
                 st.sampled_from([b"LOCUS  x", b"LOCUS ", b"@r1", b"\x00", b">", b"\xef\xbb\xbf", b"PK\x03\x04"]))
_LINE = _weighted((1, _HEADER.map(lambda h: b">" + h)), (2, _SEQ), (1, _BLANK), (1, _ODD))
_END = st.sampled_from([b"\n", b"\n", b"\r\n", b"\r"])
_RECORD = st.builds(lambda h, body: [b">" + h, *body], _HEADER, st.lists(_SEQ, min_size=1, max_size=3))
_EMPTY_RECORD = _HEADER.map(lambda h: [b">" + h])
_UNIT = _weighted((6, _RECORD), (1, _EMPTY_RECORD), (2, _LINE.map(lambda line: [line])))


@st.composite
def fasta_bytes(draw, max_units=12):
    """FASTA-like bytes: records (a header of any bytes, sequence lines), blank and odd lines between them; LF,
    CRLF and CR mixed; maybe a byte-order mark, blank lines, a GenBank/FASTQ-like line and a sequence line first,
    no line end at the end."""
    lines = [line for unit in draw(st.lists(_UNIT, max_size=max_units)) for line in unit]
    if draw(st.booleans()):
        lines = [draw(_SEQ), *lines]
    if draw(st.integers(0, 9)) == 0:  # another format's first line, or almost
        lines = [draw(st.sampled_from([b"LOCUS       NC_001 100 bp", b"@read1", b" @r1", b"LOCUS", b"LOCUSx"])), *lines]
    if draw(st.booleans()):
        lines = draw(st.lists(_BLANK, max_size=4)) + lines
    ends = draw(st.lists(_END, min_size=len(lines), max_size=len(lines)))
    text = b"".join(line + end for line, end in zip(lines, ends))
    if text and draw(st.booleans()):
        text = text[:-1]
    return (BOM if draw(st.integers(0, 4)) == 0 else b"") + text


def multi_member(text: bytes, cuts: list[int], pad: bool = False) -> bytes:
    """``text`` as gzip members cut at ``cuts`` (empty members too), zero padding after some if ``pad``."""
    points = sorted({0, len(text), *[c % (len(text) + 1) for c in cuts]})
    out = [gzip.compress(text[a:b], mtime=0) + (b"\x00" * (a % 3) if pad else b"") for a, b in itertools.pairwise(points)]
    return b"".join(out) or gzip.compress(b"", mtime=0)


@contextmanager
def small_blocks(read_block=64, gzip_block=64, out_chunk=48):
    """The reader's block sizes made small, so that tiny files span many blocks, chunks and gzip blocks."""
    with mock.patch.object(fasta, "READ_BLOCK", read_block), mock.patch.object(fasta, "GZIP_BLOCK", gzip_block), \
            mock.patch.object(fasta, "_OUT_CHUNK", out_chunk):
        yield


_BLOCKS = st.tuples(st.integers(1, 70), st.sampled_from([8, 16, 64]), st.integers(1, 50))  # small_blocks' arguments
_SETTINGS = {"derandomize": True, "deadline": None,
             "suppress_health_check": [HealthCheck.function_scoped_fixture, HealthCheck.too_slow]}


# ------------------------------------------------------------------ read_fasta == the reference
@settings(max_examples=500, **_SETTINGS)
@given(text=fasta_bytes(), form=st.sampled_from(["plain", "gzip", "multi", "multi-pad", "truncated", "garbage", "bad-crc"]),
       cuts=st.lists(st.integers(0, 1 << 16), max_size=4), blocks=_BLOCKS, cut=st.integers(0, 1 << 16),
       garbage=st.binary(min_size=1, max_size=6), input_type=st.sampled_from(["protein", "nucleotide"]))
def test_read_fasta_equals_the_reference(tmp_path, text, form, cuts, blocks, cut, garbage, input_type):
    p = tmp_path / "in.faa"
    single = gzip.compress(text, mtime=0)
    data = {"plain": text, "gzip": single, "multi": multi_member(text, cuts), "multi-pad": multi_member(text, cuts, pad=True),
            "truncated": single[: 2 + cut % (len(single) - 1)], "garbage": single + garbage,
            "bad-crc": single[:-8] + bytes([single[-8] ^ 1]) + single[-7:]}[form]
    expected_file = single if form.startswith("multi") else data  # the old reader saw only the first member's bytes
    # in its check of the first 8 KiB, and a file <= 4 KiB in that of a plain file: the new one checks 8 KiB of the stream
    for on_invalid in ("error", "skip"):
        p.write_bytes(expected_file)
        want = outcome(reference_read_fasta, [p], on_invalid, input_type)
        p.write_bytes(data)
        with small_blocks(*blocks):
            got = outcome(read_fasta, [p], on_invalid, input_type)
        assert got == want, (form, on_invalid)


@settings(max_examples=60, **_SETTINGS)
@given(texts=st.lists(fasta_bytes(max_units=4), min_size=2, max_size=3), gz=st.lists(st.booleans(), min_size=3, max_size=3))
def test_several_files_share_one_id_table_as_before(tmp_path, texts, gz):
    paths = []
    for i, (text, z) in enumerate(zip(texts, gz)):
        paths.append(tmp_path / f"f{i}.faa")
        paths[-1].write_bytes(gzip.compress(text, mtime=0) if z else text)
    for on_invalid in ("error", "skip"):
        assert outcome(read_fasta, paths, on_invalid, "protein") == outcome(reference_read_fasta, paths, on_invalid, "protein")


@pytest.mark.parametrize("head", [b">a\nMK1\n>b\r", b">a\nMK1\n>b\r\n", b">a\nMK1\n>b\n", b">a\nMK1\n>b", b">a\nMK1\n",
                                  b">a\nMK1\r", b"MKV\r", b"LOCUS  x\r", b"LOCUS  x\n", b"\xef\xbb\xbf", b"\x00"])
def test_a_truncated_gzip_file_stops_where_the_old_reader_stopped(tmp_path, head):
    """What the stream gave before it broke is read (the records whose next header line is complete, a CR at the
    very end not counted as a line end), then the corrupt-gzip error, as before."""
    z = zlib.compressobj(9, zlib.DEFLATED, 31)
    p = write(tmp_path, "t.faa.gz", z.compress(head) + z.flush(zlib.Z_SYNC_FLUSH))  # all decodable, then cut
    for on_invalid in ("error", "skip"):
        want = outcome(reference_read_fasta, [p], on_invalid, "protein")
        assert outcome(read_fasta, [p], on_invalid, "protein") == want
        assert want[1] is not None


def test_gzip_errors_name_what_gzip_names(tmp_path):
    good = gzip.compress(b">a\nMKV\n>b\nMKL\n", mtime=0)
    cases = {"garbage": good + b"xy", "garbage after zeros": good + b"\x00\x00x", "one byte": good + b"\x01",
             "zero padding": good + b"\x00" * 5, "second member cut": good + good[:12],
             "bad method": good + good[:2] + b"\x07" + good[3:],
             "bad crc": good[:-8] + bytes([good[-8] ^ 1]) + good[-7:], "bad length": good[:-1] + bytes([good[-1] ^ 1]),
             "bad data": good[:14] + b"\xff\xff\xff" + good[17:], "header only": good[:10], "magic only": good[:2]}
    for name, data in cases.items():
        p = write(tmp_path, "g.faa.gz", data)
        for on_invalid in ("error", "skip"):
            want = outcome(reference_read_fasta, [p], on_invalid, "protein")
            assert outcome(read_fasta, [p], on_invalid, "protein") == want, name


# ------------------------------------------------------------------ parts read apart == the whole file
_WS = b" \t\r\n\v\f"


def _comparable(records, base=0):
    return [(n + base if n else 0, off, h, body.translate(None, _WS), line) for n, off, h, body, line in records]


def _check_points(points, size, n, gz):
    assert points[0] == 0 and points[-1] == size and 1 <= len(points) - 1 <= n
    if size:
        assert all(a < b for a, b in itertools.pairwise(points))
    else:
        assert points == [0, 0]
    if gz:
        assert all(b % fasta.GZIP_BLOCK == 0 for b in points[:-1])


@settings(max_examples=300, **_SETTINGS)
@given(text=fasta_bytes(), form=st.sampled_from(["plain", "plain", "gzip", "multi"]), n=st.integers(1, 9),
       cuts=st.lists(st.integers(0, 1 << 16), max_size=6), blocks=_BLOCKS, offsets=st.lists(st.integers(0, 600), max_size=4))
def test_parts_read_apart_give_the_whole_file(tmp_path, text, form, n, cuts, blocks, offsets):
    data = {"plain": text, "gzip": gzip.compress(text, mtime=0), "multi": multi_member(text, cuts, pad=True)}[form]
    p = write(tmp_path, "in.faa", data)
    with small_blocks(*blocks):
        points = split_points(p, n)
        _check_points(points, len(data), n, form != "plain")
        reader = raw_records(p)
        try:
            whole = list(reader)
        except FastaError as exc:  # a whole-file problem: the part starting at 0 says so (an empty file: the whole range)
            if "empty file" not in str(exc):
                with pytest.raises(FastaError) as first:
                    list(raw_records(p, points[0], points[1]))
                assert str(first.value) == str(exc)
            return
        assert reader.sha256 == hashlib.sha256(data).hexdigest() and reader.records == len(whole)
        for off in offsets:
            assert count_headers(p, off) == sum(1 for r in whole if r[0] and r[1] < off)
        ranges = [points]
        if form == "plain":
            ranges.append(sorted({0, len(data), *[c % (len(data) + 1) for c in cuts]}))
        for bounds in ranges:
            got, headers, at = [], 0, 0
            for a, b in itertools.pairwise(bounds):
                part = raw_records(p, a, b)
                it = iter(part)
                recs = list(itertools.islice(it, 1))
                if recs:  # D(start) is known once there is a record: what a part that stops at one needs
                    assert part.first_offset == at
                recs += it
                assert part.first_offset == at  # the parts' owned regions tile the stream
                at = part.end_offset
                assert part.headers == sum(1 for r in recs if r[0]) and part.records == len(recs)
                assert part.sha256 == hashlib.sha256(data[a:b]).hexdigest()
                assert all(part.first_offset <= r[1] < part.end_offset for r in recs if r[0])
                assert [r[0] for r in recs if r[0]] == list(range(1, part.headers + 1))
                got += _comparable(recs, count_headers(p, part.first_offset))
                headers += part.headers
            assert got == _comparable(whole) and headers == reader.headers


def _protein_fasta(n: int, seed: int = 0) -> bytes:
    rng = random.Random(seed)
    seqs = ("".join(rng.choice("ACDEFGHIKLMNPQRSTVWY") for _ in range(rng.randint(20, 200))) for _ in range(n))
    return "".join(f">p{i} # 1 # 300 # 1 # ID=1_{i}\n{seq}\n" for i, seq in enumerate(seqs)).encode()


def test_a_part_reads_only_what_it_needs(tmp_path):
    text = _protein_fasta(2000)
    p = write(tmp_path, "a.faa", text)
    whole = list(raw_records(p))
    with small_blocks(read_block=4096, gzip_block=4096, out_chunk=4096):
        points = split_points(p, 8)
        part = raw_records(p, points[0], points[1])
        recs = list(part)
        assert recs == whole[: len(recs)] and part.bytes_read <= points[1] + 2 * 4096
        assert part.stop_offset == whole[len(recs)][1]  # it stopped at the next part's first header
        gz = gzip.compress(text, mtime=0)
        bad = gz[:-300] + bytes(b ^ 0x55 for b in gz[-300:])  # a gzip file whose tail is corrupt
        q = write(tmp_path, "a.faa.gz", bad)
        points = split_points(q, 6)
        assert len(points) == 7
        with pytest.raises(FastaError, match="truncated or corrupt gzip"):
            list(raw_records(q))
        got = []
        for a, b in itertools.pairwise(points[:4]):  # the first parts never meet the damage
            part = raw_records(q, a, b)
            got += _comparable(list(part), count_headers(q, part.first_offset))
            assert part.bytes_read < len(bad)
        assert got == _comparable(whole[: len(got)])
        with pytest.raises(FastaError, match="truncated or corrupt gzip"):  # the last one does
            list(raw_records(q, points[-2], points[-1]))


def test_split_points(tmp_path):
    assert split_points(write(tmp_path, "e.faa", b""), 4) == [0, 0]
    assert split_points(write(tmp_path, "s.faa", b">a\nMK\n"), 100) == list(range(7))
    assert split_points(write(tmp_path, "t.faa", b">a\nMKVLA\n"), 3) == [0, 3, 6, 9]
    assert split_points(write(tmp_path, "z.faa.gz", gzip.compress(b">a\nMK\n")), 8) == [0, len(gzip.compress(b">a\nMK\n"))]
    big = write(tmp_path, "b.faa.gz", os.urandom(5 * fasta.GZIP_BLOCK // 2))
    big.write_bytes(b"\x1f\x8b" + big.read_bytes()[2:])
    assert split_points(big, 2) == [0, fasta.GZIP_BLOCK, big.stat().st_size]
    assert split_points(big, 9) == [0, fasta.GZIP_BLOCK, 2 * fasta.GZIP_BLOCK, big.stat().st_size]
    with pytest.raises(FastaError, match="does not exist"):
        split_points(tmp_path / "nope.faa", 2)
    with pytest.raises(FastaError, match="does not exist"):
        raw_records(tmp_path / "nope.faa")
    with pytest.raises(ValueError, match="GZIP_BLOCK"):
        raw_records(big, 1000, big.stat().st_size)


def test_record_offsets_lines_and_the_parsing_helpers(tmp_path):
    text = b"\xef\xbb\xbf\r\n \nMKV\r\n>a x\r\nMK\r\n\r\n>b\rLL\r>\xff\n>c\n"
    p = write(tmp_path, "o.faa", text)
    recs = list(raw_records(p))
    assert [(n, off, h, line) for n, off, h, _, line in recs] == [(0, 7, None, 3), (1, 12, b"a x", None), (2, 24, b"b", None),
                                                                  (3, 30, b"\xff", None), (4, 33, b"c", None)]
    assert all(text[off:off + 1] == b">" for n, off, *_ in recs if n)
    out = list(read_fasta([p], "skip"))
    assert [(type(r).__name__, r.number, r.offset) for r in out] == [("Skipped", 0, 7), ("Record", 1, 12), ("Record", 2, 24),
                                                                     ("Skipped", 3, 30), ("Skipped", 4, 33)]
    assert parse_record(b"a x", b"mk\n", None, normalise) == ("a", "MK")
    assert parse_record(b"n", b"acgu", None, normalise_nucleotides) == ("n", "ACGT")
    for header, body, line, reason in [(None, b"MK", 3, "sequence data before the first header (line 3)"),
                                       (b"  ", b"MK", None, "empty header"), (b"\xff", b"MK", None, "not valid UTF-8 (byte 1)"),
                                       (b"a", b"M1", None, "illegal character '1' at residue 2")]:
        with pytest.raises(ValueError, match=re.escape(reason)):
            parse_record(header, body, line, normalise)
    assert [header_id(h) for h in (None, b"", b" a b", b"\xff x", b"a\x1cb")] == ["", "", "a", "", "a"]
    assert fasta._record(1, "f", 2, "x", "MK", 5) == Record(1, "f", 2, "x", "MK", 5)
    assert vars(fasta._record(1, "f", 2, "x", "MK", 5)) == vars(Record(1, "f", 2, "x", "MK", 5))


def test_the_first_8_kib_of_the_stream_are_checked(tmp_path):
    """The old reader checked what one read gave: 4 KiB of a plain file on most file systems, the first member of
    a gzip file; now always the stream's first 8 KiB."""
    body = b">a\n" + b"MKVLA\n" * 1000
    plain = write(tmp_path, "p.faa", body[:6000] + b"\x00" + body[6000:])
    multi = write(tmp_path, "m.faa.gz", gzip.compress(b">a\nMKV\n") + gzip.compress(b">b\nMK\x00V\n"))
    for p, at in ((plain, 6001), (multi, 13)):
        with pytest.raises(FastaError, match=re.escape(f"binary data, not FASTA (NUL byte at byte {at})")):
            list(read_fasta([p], "skip"))


_CRAFTED = [b">a x>y\nMK>V\r\n>b\rMK\r\r>c\n\n", b"\r\n\n \r\rLOCUS  x\nMK\n", b"\n\r\n @r\n>a\nMK\n", b"\r\r\rMKV\r>a\rM\r",
            b"\xef\xbb\xbf>a\n>b\r\n", b"\xef\xbb\xbf\r\n\t\n@r1\n", b"\n\n\nLOCUS x\n", b">a\n\n\n\n\n\n\nMKV\n>b",
            b">a\r\n>b\r\n\r\n", b">a\nMK\n>b c\nM >V\n>c\nM\n\n>d\n", b"MK\n>a\n>b\nMK\nLL\n>c d\n"]


@pytest.mark.parametrize("text", _CRAFTED)
def test_every_block_size_and_every_cut(tmp_path, text):
    """Crafted texts read with every block size, as one plain range and cut in two (and three) everywhere."""
    p = write(tmp_path, "c.faa", text)
    want = outcome(reference_read_fasta, [p], "skip", "protein")
    for block in range(1, len(text) + 2):
        with small_blocks(read_block=block):
            assert outcome(read_fasta, [p], "skip", "protein") == want, block
    try:
        whole = _comparable(list(raw_records(p)))
    except FastaError:
        return
    for block in (1, 2, 3, 64):
        with small_blocks(read_block=block):
            for a in range(len(text) + 1):
                for b in range(a, len(text) + 1):
                    got = []
                    for lo, hi in ((0, a), (a, b), (b, len(text))):
                        part = raw_records(p, lo, hi)
                        got += _comparable(list(part), count_headers(p, part.first_offset))
                    assert got == whole, (block, a, b)


def test_the_batched_id_table_is_a_dict(tmp_path):
    """read_fasta checks ids a block at a time (numpy); the same answers as a dict, growth included."""
    rng = np.random.default_rng(1)
    index, model = fasta._IdIndex(capacity=16), {}
    pool = rng.integers(1, 1 << 63, 3000, dtype=np.uint64)
    for size in rng.integers(0, 300, 60):
        hashes = rng.choice(pool, size)
        values = rng.integers(0, 1 << 40, size)
        want = []
        for h, v in zip(hashes.tolist(), values.tolist()):
            want.append(model.get(h, -1))
            model.setdefault(h, v)
        assert index.first_seen(hashes, values).tolist() == want
    assert index.n == len(model) and 2 * index.n <= len(index.keys)
    # and read_fasta with many ids repeated inside one block, and enough ids to grow its table, as before
    ids = [f"r{i}" for i in range(40000)] + [f"r{i}" for i in rng.integers(0, 40000, 3000)]
    text = "".join(f">{i} d\n{'MKV' if k % 97 else 'MK1'}\n" for k, i in enumerate(ids))
    p = write(tmp_path, "dup.faa", text)
    q = write(tmp_path, "dup2.faa", "".join(f">r{i}\nMK\n" for i in rng.integers(0, 50, 2000)))
    assert outcome(read_fasta, [p, q], "skip", "protein") == outcome(reference_read_fasta, [p, q], "skip", "protein")

"""Protein FASTA: block-based parser, residue normalisation, validation and byte-range parts.

Every input record ends as a :class:`Record` (kept) or a :class:`Skipped` (with a
reason).  With ``on_invalid="error"`` the first bad record raises
:class:`FastaError`, whose message names the file, the record number and the reason.

Decisions (README, "Input rules"):
- upper-cased; whitespace (CR, tabs, spaces) inside sequence lines removed;
- one trailing ``*`` (Prodigal/pyrodigal stop) removed; an internal ``*`` is invalid;
- alignment gaps ``-`` and ``.`` removed (ESM-2 embeds unaligned sequences);
- ``X B U Z O`` kept (ESM knows them), ``J`` and any other letter kept and tokenised
  as fair-esm's ``<unk>``; digits, punctuation and non-ASCII bytes are invalid;
- duplicate ids (first word of the header, across all files) are invalid after the
  first; empty headers, headers that are not UTF-8 and empty sequences are invalid;
- sequence lines before the first header form an invalid record number 0;
- whole-file problems (missing, empty, binary, FASTQ, GenBank, truncated gzip) always
  raise, whatever ``on_invalid`` says: the file, not a record, is wrong.

Reading (:func:`raw_records`): the file (plain, or gzip, multi-member included) is read in blocks of
1 MiB (the records of a block stay in the CPU's cache: faster than larger blocks) and cut at headers
with ``bytes.find``, never a line at a time. Line ends are LF, CRLF or CR alone, mixed at will; a UTF-8
byte-order mark at the start is ignored. A line starting with ``>`` is a header; blank lines are
ignored; the first 8 KiB of the (decompressed) stream are checked for other formats' magic bytes and
for NUL bytes. :func:`read_fasta` checks ids a block at a time.

Parts: a file can be read as byte ranges ``[start, end)`` by separate processes at once
(:func:`split_points` cuts it). A record belongs to the part its ``>`` lies in; part 0 also owns
the data before the first header (record 0). For gzip the offsets are compressed offsets, multiples
of :data:`GZIP_BLOCK` (or the file's size): every part decompresses the file from its start, fed in
``GZIP_BLOCK`` blocks, and compressed offset ``c`` stands for ``D(c)``, the decompressed bytes the
blocks before ``c`` give, so all parts agree. The parts of a file together give exactly the records
one reader of the whole file gives.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import struct
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

GAPS = b"-."
WHITESPACE = b" \t\r\n\v\f"
_DELETE = GAPS + WHITESPACE
_LETTERS = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ"
_UPPER = bytes.maketrans(_LETTERS.lower(), _LETTERS)

GZIP_BLOCK = 1 << 20  # gzip parts: compressed offsets are multiples of this; the file is fed to zlib in such blocks
READ_BLOCK = 1 << 20  # plain files are read (and parsed) this many bytes at a time: the records of a block stay in L2
HEAD_BYTES = 8192  # the first bytes of the (decompressed) stream checked for magic bytes and NUL
_OUT_CHUNK = 1 << 20  # decompressed bytes one zlib call gives at most (bounded memory for any ratio)
_INF = 1 << 62  # "no limit": an offset past any stream
_blake2b = hashlib.blake2b

# one raw record: (number, offset, header, body, line), see raw_records
RawRecord = tuple[int, int, "bytes | None", bytes, "int | None"]


class FastaError(ValueError):
    """A bad input file or record; the message names file, record and reason."""


@dataclass(frozen=True)
class Record:
    order: int  # 0-based position among all kept records of all inputs: the output order
    file: str
    number: int  # 1-based record number within its file
    id: str
    sequence: str  # normalised residues
    offset: int = -1  # decompressed byte offset of the record's '>' in its file


@dataclass(frozen=True)
class Skipped:
    file: str
    number: int
    id: str
    reason: str
    offset: int = -1  # decompressed byte offset of the record's '>' (record 0: of its first line)


# other formats a FASTA path may hold by mistake: leading bytes -> what they are
MAGIC = {
    b"BZh": "bzip2-compressed (only plain and gzip FASTA are read)",
    b"\xfd7zXZ\x00": "xz-compressed (only plain and gzip FASTA are read)",
    b"\x28\xb5\x2f\xfd": "zstd-compressed (only plain and gzip FASTA are read)",
    b"PK\x03\x04": "a zip archive, not FASTA",
    b"\x89PNG": "a PNG image, not FASTA",
    b"%PDF": "a PDF document, not FASTA",
    b"\xff\xfe": "UTF-16 text (save it as ASCII or UTF-8)",
    b"\xfe\xff": "UTF-16 text (save it as ASCII or UTF-8)",
}
BOM = b"\xef\xbb\xbf"
GZIP_MAGIC = b"\x1f\x8b"


def is_gzip(path: str | Path) -> bool:
    """Whether the file starts with the gzip magic bytes (else it is read as plain text)."""
    with open(path, "rb") as fh:
        return fh.read(2) == GZIP_MAGIC


def _line_breaks(data: bytes) -> int:
    """Line ends in ``data`` (LF, CRLF and CR alone each count once)."""
    return data.count(b"\n") + data.count(b"\r") - data.count(b"\r\n")


def _check_not_other_format(path: Path, line: bytes, line_no: int) -> None:
    if line.startswith(b"LOCUS "):
        raise FastaError(f"{path}: looks like GenBank (line {line_no} starts with LOCUS), not FASTA")
    if line.startswith(b"@"):
        raise FastaError(f"{path}: looks like FASTQ (line {line_no} starts with '@'), not FASTA")


# ------------------------------------------------------------------ gzip members, as the gzip module reads them
class _GzipStream:
    """Decompress a gzip file fed in blocks: members one after the other (a new decompressor each), zero
    padding between members skipped, CRC and length checked; errors are those ``gzip.open`` raises."""

    def __init__(self) -> None:
        self.state = "header"  # header | body | trailer | gap
        self.pend = b""  # header or trailer bytes collected so far
        self.dec = None
        self.crc = self.size = 0

    def feed(self, block: bytes) -> Iterator[bytes]:
        """The decompressed bytes ``block`` gives (all of them, in pieces of at most ``_OUT_CHUNK``). It goes to
        zlib 64 KiB at a time: what follows a member's end is copied (``unused_data``), so this bounds the copying
        for files of many small members (BGZF)."""
        view = memoryview(block)
        for k in range(0, len(view), 1 << 16):
            yield from self._feed(view[k : k + (1 << 16)])

    def _feed(self, data: bytes | memoryview) -> Iterator[bytes]:
        while data:
            if self.state == "gap":
                data = bytes(data).lstrip(b"\x00")
                if not data:
                    return
                self.state, self.pend = "header", b""
            if self.state == "header":
                self.pend += data
                n = _gzip_header_length(self.pend)
                if n is None:
                    return
                data, self.pend = self.pend[n:], b""
                self.dec, self.crc, self.size, self.state = zlib.decompressobj(-zlib.MAX_WBITS), 0, 0, "body"
            if self.state == "body":
                dec, tail = self.dec, data
                while True:
                    out = dec.decompress(tail, _OUT_CHUNK)
                    if out:
                        self.crc = zlib.crc32(out, self.crc)
                        self.size += len(out)
                        yield out
                    if dec.eof:
                        data, self.state, self.pend = dec.unused_data, "trailer", b""
                        break
                    tail = dec.unconsumed_tail
                    if not tail and len(out) < _OUT_CHUNK:
                        return
            if self.state == "trailer":
                self.pend += data
                if len(self.pend) < 8:
                    return
                crc32, isize = struct.unpack("<II", self.pend[:8])
                if crc32 != self.crc:
                    raise gzip.BadGzipFile(f"CRC check failed {hex(crc32)} != {hex(self.crc)}")
                if isize != (self.size & 0xFFFFFFFF):
                    raise gzip.BadGzipFile("Incorrect length of data produced")
                data, self.state = self.pend[8:], "gap"

    def finish(self) -> None:
        """At the end of the file: raise if a member is incomplete or trailing bytes are no member."""
        if self.state == "header" and len(self.pend) == 1:
            raise gzip.BadGzipFile(f"Not a gzipped file ({self.pend!r})")
        if self.state != "gap":
            raise EOFError("Compressed file ended before the end-of-stream marker was reached")


def _gzip_header_length(buf: bytes) -> int | None:
    """Length of the gzip member header at the start of ``buf``, None if incomplete (gzip._read_gzip_header)."""
    if len(buf) >= 2 and buf[:2] != GZIP_MAGIC:
        raise gzip.BadGzipFile(f"Not a gzipped file ({buf[:2]!r})")
    if len(buf) < 10:
        return None
    if buf[2] != 8:
        raise gzip.BadGzipFile("Unknown compression method")
    flag, pos = buf[3], 10
    if flag & 4:  # FEXTRA
        if len(buf) < pos + 2:
            return None
        pos += 2 + struct.unpack("<H", buf[pos : pos + 2])[0]
        if len(buf) < pos:
            return None
    for bit in (8, 16):  # FNAME, FCOMMENT: zero-terminated
        if flag & bit:
            z = buf.find(b"\x00", pos)
            if z < 0:
                return None
            pos = z + 1
    if flag & 2:  # FHCRC
        pos += 2
        if len(buf) < pos:
            return None
    return pos


# ------------------------------------------------------------------ the block reader
_SKIP, _REC0, _HEADER, _BODY = range(4)


class RawRecords:
    """The raw records of one byte range of one FASTA file; see :func:`raw_records`.

    ``first_offset`` / ``end_offset``: ``D(start)`` / ``D(end)``, the decompressed offsets the owned headers lie
    between (``first_offset`` is known once the first record is given, ``end_offset`` at the latest after the
    last). After iteration: ``headers`` (header records owned), ``records`` (raw records owned, record 0
    included), ``sha256`` (of the file's bytes ``[start, end)``, compressed bytes for gzip), ``stop_offset``
    (where the last owned record ends: the next part's first header, or the end of the stream), ``bytes_read``
    (bytes read from the file)."""

    def __init__(self, path: str | Path, start: int = 0, end: int | None = None, *, digest: bool = True,
                 _checks: bool = True) -> None:
        self.path = path = Path(path)
        if not path.is_file():
            raise FastaError(f"{path}: input file does not exist")
        self.size = path.stat().st_size
        self.gzip = self.size >= 2 and is_gzip(path)
        self.start = start
        self.end = self.size if end is None or end > self.size else end
        if start < 0 or end is not None and end < start:
            raise ValueError(f"bad byte range [{start}, {end}) of {path} ({self.size} bytes)")
        block = GZIP_BLOCK
        if self.gzip and (start % block and start < self.size or self.end % block and self.end < self.size):
            raise ValueError(f"gzip byte range [{start}, {end}) of {path}: not multiples of GZIP_BLOCK ({block})")
        self.whole = start == 0 and self.end >= self.size
        self._first = start == 0 and (self.end > 0 or self.size == 0)  # owns record 0, makes the whole-file checks
        self._checks = _checks
        self.headers = self.records = self.bytes_read = 0
        self._d_start: int | None = start if not self.gzip else (0 if start == 0 else None)
        self.first_offset: int | None = self._d_start  # D(start), known before the first record (gzip: once reached)
        self.end_offset: int | None = None if self.gzip else self.end  # D(end), known once reached (gzip)
        self.stop_offset: int | None = None
        self._d_end = _INF if self.end >= self.size else (self.end if not self.gzip else _INF)
        self._d_end_known = not self.gzip or self.end >= self.size
        self._r0 = 0 if self.gzip or start <= 4 else start - 1  # where reading starts (a byte early: is start a line start?)
        self._hash = hashlib.sha256() if digest else None
        self._hashed_to = start
        self._prev = b"\n"
        self._total: int | None = None
        self._used = False

    def __iter__(self) -> Iterator[RawRecord]:
        if self._used:
            raise RuntimeError("RawRecords can be iterated once")
        self._used = True
        return self._iter()

    @property
    def sha256(self) -> str:
        """Hex SHA-256 of the file's bytes ``[start, end)`` (read again if iteration did not read them all)."""
        if self._hash is None:
            self._hash, self._hashed_to = hashlib.sha256(), self.start
        if self._hashed_to < self.end:
            with open(self.path, "rb") as fh:
                fh.seek(self._hashed_to)
                while self._hashed_to < self.end:
                    data = fh.read(min(READ_BLOCK, self.end - self._hashed_to))
                    if not data:
                        break
                    self._hash.update(data)
                    self._hashed_to += len(data)
        return self._hash.hexdigest()

    def _digest(self, pos: int, data: bytes) -> None:
        if self._hash is not None and pos <= self._hashed_to < pos + len(data) and self._hashed_to < self.end:
            a, b = self._hashed_to - pos, min(len(data), self.end - pos)
            self._hash.update(memoryview(data)[a:b])
            self._hashed_to = pos + b

    # the decompressed stream, as (offset, bytes) pieces
    def _plain_pieces(self, fh) -> Iterator[tuple[int, bytes]]:
        pos = self._r0
        fh.seek(pos)
        while True:
            data = fh.read(READ_BLOCK)
            if not data:
                break
            self.bytes_read += len(data)
            self._digest(pos, data)
            yield pos, data
            pos += len(data)
        self._total = pos

    def _gzip_pieces(self, fh) -> Iterator[tuple[int, bytes]]:
        """Decompressed pieces of about ``_OUT_CHUNK`` (what zlib gives, joined); all of them before an error."""
        block, stream, pos, out = GZIP_BLOCK, _GzipStream(), 0, 0
        acc: list[bytes] = []
        size, error = 0, None  # the bytes in acc, from offset out
        try:
            while True:
                if self._d_start is None and pos >= self.start:
                    self._d_start = self.first_offset = out + size
                if not self._d_end_known and pos >= self.end:
                    self._d_end, self._d_end_known = out + size, True
                    self.end_offset = self._d_end
                data = fh.read(block)
                if not data:
                    break
                self.bytes_read += len(data)
                self._digest(pos, data)
                for piece in stream.feed(data):
                    acc.append(piece)
                    size += len(piece)
                    if size >= _OUT_CHUNK:
                        yield out, b"".join(acc) if len(acc) > 1 else acc[0]
                        acc, out, size = [], out + size, 0
                pos += len(data)
            stream.finish()
        except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
            error = FastaError(f"{self.path}: truncated or corrupt gzip file ({exc})")
            error.__cause__ = exc
        if acc:
            yield out, b"".join(acc)
            out += size
        if error is not None:
            raise error
        if self._d_start is None:
            self._d_start = self.first_offset = out
        if self.end_offset is None:
            self.end_offset = out
        self._total = out

    def _decide(self, lead: bytes) -> int:
        """Whole-file checks on the stream's first bytes (part 0); the offset where the text starts (after a BOM)."""
        if self._checks and self._first:
            head = lead[:HEAD_BYTES]
            for magic, what in MAGIC.items():
                if head.startswith(magic):
                    raise FastaError(f"{self.path}: {what}")
            nul = head.find(b"\x00")
            if nul >= 0:
                raise FastaError(f"{self.path}: binary data, not FASTA (NUL byte at byte {nul + 1})")
        return len(BOM) if lead.startswith(BOM) else 0

    def _chunks(self, pieces: Iterator[tuple[int, bytes]]) -> Iterator[tuple[int, bytes]]:
        """Contiguous (offset, bytes) from the scan start on (``max(text start, D(start))``); a chunk never ends
        with CR (held back to the next one, as universal newlines do) unless it is the last. Sets ``_prev``,
        the byte before the first chunk (a virtual LF at the text start)."""
        need = HEAD_BYTES if self._first else len(BOM)
        lead: list[tuple[int, bytes]] | None = [] if self._r0 == 0 else None
        got, cs, last, hold, passing = 0, 0, b"", b"", False

        def cut(off: int, data: bytes) -> tuple[int, bytes]:
            nonlocal last, passing, hold
            if not passing:
                if self._d_start is None or off + len(data) <= max(cs, self._d_start):
                    last = data[-1:] or last
                    return off, b""
                s = max(cs, self._d_start)
                k = s - off
                self._prev = b"\n" if s == cs else (data[k - 1 : k] if k else last)
                data, off, passing = data[k:], s, True
            if hold:
                data, off, hold = hold + data, off - 1, b""
            if data.endswith(b"\r"):
                data, hold = data[:-1], b"\r"
            return off, data

        def release() -> Iterator[tuple[int, bytes]]:
            nonlocal lead, cs
            joined = b"".join(d for _, d in lead)
            cs = self._decide(joined)
            todo, lead = lead, None
            for off, data in todo:
                off, data = cut(off, data)
                if data:
                    yield off, data

        it = iter(pieces)
        while True:
            try:
                off, data = next(it)
            except StopIteration:
                break
            except FastaError:  # a corrupt gzip file: the checks of what there is come first
                if lead is not None:
                    yield from release()
                raise  # a CR held back is dropped: its line is not complete
            if lead is not None:
                lead.append((off, data))
                got += len(data)
                if got >= need:
                    yield from release()
                continue
            off, data = cut(off, data)
            if data:
                yield off, data
        if lead is not None:
            yield from release()
        if hold:
            yield (self._total or 0) - 1, hold

    def _record0(self, data: bytes, off: int, breaks: int, line_start: int, complete: bool) -> RawRecord | None:
        """Record 0 from the data before the first header (``data`` at ``off``, after ``breaks`` line ends of
        blank lines dropped, the current line starting at ``line_start``), or None if it is all blank;
        raises if its first non-blank line is complete and starts like GenBank or FASTQ."""
        q = len(data) - len(data.lstrip())
        if q == len(data):
            return None
        ls = max(data.rfind(b"\n", 0, q), data.rfind(b"\r", 0, q)) + 1
        line = 1 + breaks + _line_breaks(data[:ls])
        if ls or line_start == off:  # the first non-blank line starts in data (else it starts with blanks)
            if self._checks and (complete or data.find(b"\n", q) >= 0 or data.find(b"\r", q) >= 0):
                _check_not_other_format(self.path, data[ls : ls + 6], line)
            line_start = off + ls
        return 0, line_start, None, data[ls:], line

    def _iter(self) -> Iterator[RawRecord]:
        for batch in self._batches():
            yield from batch

    def _batches(self) -> Iterator[list[RawRecord]]:
        """The owned raw records, a list for each chunk read; a stream error comes after the records before it."""
        with open(self.path, "rb") as fh:
            pieces = self._gzip_pieces(fh) if self.gzip else self._plain_pieces(fh)
            yield from self._parse(self._chunks(pieces))
        if self.stop_offset is None:
            self.stop_offset = self._total
        if self._checks and self.whole and self.records == 0:
            raise FastaError(f"{self.path}: empty file, no FASTA records")

    def _parse(self, chunks: Iterator[tuple[int, bytes]]) -> Iterator[list[RawRecord]]:
        """The block parser. A record is complete when the next header's line is (or at the end of the stream):
        records are given in that order, so a stream error stops after the records whose next header it follows."""
        mode = _REC0 if self._first else _SKIP
        number, cur, header, hparts, bparts, pending = 0, -1, None, [], [], None
        r0: list[bytes] = []  # record 0's data so far, after blank data dropped
        r0_off = r0_breaks = r0_ls = -1  # where r0 starts, line ends dropped before it, start of its line
        prev = None
        out: list[RawRecord] = []
        add = out.append
        try:
            for base, c in chunks:
                if prev is None:
                    prev = self._prev
                    r0_off = r0_ls = base
                    r0_breaks = 0
                lim = self._d_end - base  # a header at index >= lim is not owned
                cr = b"\r" in c
                i = 0
                if mode == _HEADER:  # a header line continues from the previous chunk
                    e = c.find(b"\n")
                    if cr:
                        k = c.find(b"\r", 0, e if e >= 0 else len(c))
                        e = k if k >= 0 else e
                    if e < 0:
                        hparts.append(c)
                        prev = c[-1:]
                        continue
                    hparts.append(c[:e])
                    header, hparts, mode, i = b"".join(hparts), [], _BODY, e
                    if pending is not None:
                        add(pending)
                        pending = None
                    p = -1
                elif c[:1] == b">" and (prev == b"\n" or prev == b"\r"):
                    p = 0
                else:
                    p = -1
                if p < 0:  # a header: '>' after a line end (memchr for '>' is much faster than a search for LF '>')
                    p = c.find(b">", i or 1)
                    while p > 0 and c[p - 1] != 10 and c[p - 1] != 13:
                        p = c.find(b">", p + 1)
                while p >= 0:  # a header at p ends the current record
                    if mode == _BODY:
                        if bparts:
                            bparts.append(c[i:p])
                            rec, bparts = (number, cur, header, b"".join(bparts), None), []
                        else:
                            rec = (number, cur, header, c[i:p], None)
                    elif mode == _REC0:
                        r0.append(c[:p])
                        rec = self._record0(b"".join(r0), r0_off, r0_breaks, r0_ls, True)
                        r0 = []
                    else:
                        rec = None
                    if p >= lim:  # the next header is the next part's: done
                        if rec is not None:
                            add(rec)
                        self.stop_offset, mode = base + p, _SKIP
                        break
                    number += 1
                    cur = base + p
                    e = c.find(b"\n", p)
                    if cr:
                        k = c.find(b"\r", p, e if e >= 0 else len(c))
                        e = k if k >= 0 else e
                    if e < 0:
                        pending, hparts, mode = rec, [c[p + 1 :]], _HEADER
                        break
                    header = c[p + 1 : e]
                    mode = _BODY
                    if rec is not None:
                        add(rec)
                    i = e
                    p = c.find(b">", e)
                    while p > 0 and c[p - 1] != 10 and c[p - 1] != 13:
                        p = c.find(b">", p + 1)
                else:
                    if mode == _BODY:
                        bparts.append(c[i:] if i else c)
                    elif mode == _REC0:
                        if r0 or not c.isspace():
                            r0.append(c)
                        else:  # blank so far: keep only the line count and where the last line starts
                            r0_breaks += _line_breaks(c)
                            r0_off = base + len(c)
                            k = max(c.rfind(b"\n"), c.rfind(b"\r"))
                            if k >= 0:
                                r0_ls = base + k + 1
                prev = c[-1:]
                if out:
                    self.records += len(out)
                    yield out
                    out = []
                    add = out.append
                if self.stop_offset is not None:
                    return
        except FastaError:
            if mode == _REC0 and r0:
                self._record0(b"".join(r0), r0_off, r0_breaks, r0_ls, False)
            raise
        finally:
            self.headers = number
        if mode == _HEADER:
            if pending is not None:
                add(pending)
            add((number, cur, b"".join(hparts), b"", None))
        elif mode == _BODY:
            add((number, cur, header, b"".join(bparts), None))
        elif mode == _REC0 and r0:
            rec = self._record0(b"".join(r0), r0_off, r0_breaks, r0_ls, True)
            if rec is not None:
                add(rec)
        if out:
            self.records += len(out)
            yield out


def raw_records(path: str | Path, start: int = 0, end: int | None = None, *, digest: bool = True) -> RawRecords:
    """The raw records owned by the byte range ``[start, end)`` of one FASTA file (plain or gzip), to iterate once.

    Each is a tuple ``(number, offset, header, body, line)``: ``number`` the 1-based ordinal of the header within
    this range (0 for record 0), ``offset`` the decompressed byte offset of its ``>`` (record 0: of its first
    line), ``header`` the bytes after ``>`` up to the line end (None for record 0), ``body`` the sequence bytes,
    line ends and blank lines left in (the normalisers remove them), ``line`` the line number of record 0's
    first line (None for the others). A range owns the headers at decompressed offsets ``[D(start), D(end))``
    (``first_offset``, ``end_offset``); its last record runs on to the next header. The range starting at 0
    also owns record 0 (the data before the first header) and makes the whole-file checks (other formats,
    NUL bytes, GenBank, FASTQ; an empty file when the range is the whole file); an empty range owns nothing.
    A truncated or corrupt gzip file raises in whichever range meets it. The file-wide number of a record is
    ``number + count_headers(path, first_offset)``. ``digest=False``: no hashing while reading (``sha256``
    then reads the range again if asked)."""
    return RawRecords(path, start, end, digest=digest)


def count_headers(path: str | Path, offset: int) -> int:
    """How many header records start before decompressed ``offset`` (local part numbers + this = the file's)."""
    reader = RawRecords(path, 0, None, digest=False, _checks=False)
    n = 0
    with open(reader.path, "rb") as fh:
        pieces = reader._gzip_pieces(fh) if reader.gzip else reader._plain_pieces(fh)
        prev = None
        for base, c in reader._chunks(pieces):
            if prev is None:
                prev = reader._prev
            lim = offset - base
            if lim <= 0:
                break
            if c[:1] == b">" and (prev == b"\n" or prev == b"\r"):
                n += 1
            n += c.count(b"\n>", 0, lim) + c.count(b"\r>", 0, lim)
            prev = c[-1:]
    return n


def split_points(path: str | Path, n: int, inflate_cost: float = 0.0) -> list[int]:
    """Boundaries ``0 = b0 < b1 < ... <= bk = size`` cutting the file into ``k <= n`` byte ranges (for gzip,
    multiples of :data:`GZIP_BLOCK`, so fewer ranges for a small file); ``[0, 0]`` if empty. Plain files: ranges
    of equal size. Gzip: each range's reader also decompresses everything before it, at ``inflate_cost`` of the
    cost of reading a byte, so the ranges shrink along the file to take about equal time."""
    if n < 1:
        raise ValueError(f"split_points: n must be >= 1, not {n}")
    path = Path(path)
    if not path.is_file():
        raise FastaError(f"{path}: input file does not exist")
    size = path.stat().st_size
    if size == 0:
        return [0, 0]
    if size >= 2 and is_gzip(path):
        # range k ends at x_k (a fraction of the file) and costs inflate_cost * x_k + (x_k - x_(k-1)): equal for
        # every k when x_k = sum(a^j, j <= k) / sum(a^j, j <= n), a = 1 / (1 + inflate_cost)
        a = 1 / (1 + inflate_cost)
        cum = [sum(a**j for j in range(1, k + 1)) for k in range(n + 1)]
        block = GZIP_BLOCK
        blocks = -(-size // block)
        points = {min(size, int(blocks * cum[k] / cum[n] + 1e-9) * block) for k in range(n + 1)}
        points |= {0, size}
    else:
        points = {i * size // n for i in range(n + 1)}
    return sorted(points)


def header_id(header: bytes | None) -> str:
    """The record's id (first word of its header), or "" if there is none or the header is not UTF-8."""
    if header is None:
        return ""
    try:
        words = header.decode("utf-8").split(None, 1)
    except UnicodeDecodeError:
        return ""
    return words[0] if words else ""


def parse_record(header: bytes | None, body: bytes, line: int | None, clean: Callable[[bytes], str]) -> tuple[str, str]:
    """(id, normalised sequence) of one raw record, or ValueError with the reason it is invalid
    (the duplicate-id check is the caller's)."""
    if header is None:
        raise ValueError(f"sequence data before the first header (line {line})")
    try:
        words = header.decode("utf-8").split(None, 1)
    except UnicodeDecodeError as exc:
        raise ValueError(f"header is not valid UTF-8 (byte {exc.start + 1})") from None
    if not words:
        raise ValueError("empty header (no id after '>')")
    return words[0], clean(body)


def normalise(raw: bytes) -> str:
    """Return normalised residues, or raise ValueError with the reason."""
    seq = raw.translate(_UPPER, _DELETE)
    if seq.endswith(b"*"):
        seq = seq[:-1]
    if not seq:
        raise ValueError("empty sequence")
    if not seq.isalpha():
        bad = seq.translate(None, _LETTERS)
        ch = bad[:1]
        pos = seq.index(ch) + 1
        if ch == b"*":
            raise ValueError(f"internal stop '*' at residue {pos}")
        shown = ch.decode("latin-1") if 32 < ch[0] < 127 else f"byte 0x{ch[0]:02x}"
        raise ValueError(f"illegal character {shown!r} at residue {pos}")
    return seq.decode("ascii")


def normalise_nucleotides(raw: bytes) -> str:
    """Nucleotides: whitespace and gaps removed, upper-case, U as T, IUPAC codes only."""
    from .nucleotide import check_nucleotides

    seq = raw.translate(None, _DELETE)
    if not seq:
        raise ValueError("empty sequence")
    try:
        text = seq.decode("ascii")
    except UnicodeDecodeError:
        raise ValueError("non-ASCII byte in the sequence") from None
    return check_nucleotides(text)


class _IdIndex:
    """id hash -> where it was first kept, many ids at a time: the bounded-memory table of :class:`.idset.IdTable`
    (64-bit hashes, numpy open addressing with linear probing, 0 an empty slot, at most half full), with
    vectorised look-ups and inserts (a Python call per id costs more than the rest of reading it)."""

    def __init__(self, capacity: int = 1 << 16) -> None:
        self.keys = np.zeros(capacity, np.uint64)
        self.values = np.zeros(capacity, np.int64)
        self.n = 0

    def first_seen(self, hashes: np.ndarray, values: np.ndarray) -> np.ndarray:
        """For each id in order: the value (>= 0) it was first kept with, or -1 where it is new (kept now, with
        its value)."""
        prior = np.full(len(hashes), -1, np.int64)
        if not len(hashes):
            return prior
        mask = np.uint64(len(self.keys) - 1)
        slot, todo = hashes & mask, np.arange(len(hashes))
        while len(todo):  # look up: follow each probe sequence to the key or an empty slot
            k = self.keys[slot[todo]]
            hit = k == hashes[todo]
            prior[todo[hit]] = self.values[slot[todo[hit]]]
            todo = todo[(k != 0) & ~hit]
            slot[todo] = (slot[todo] + np.uint64(1)) & mask
        new = np.flatnonzero(prior < 0)
        _, first, inverse = np.unique(hashes[new], return_index=True, return_inverse=True)
        again = first[inverse] != np.arange(len(new))  # a new id seen before in this same batch
        prior[new[again]] = values[new[first[inverse[again]]]]
        add = new[first]
        if 2 * (self.n + len(add)) > len(self.keys):
            old = self.keys != 0
            keys, vals = self.keys[old], self.values[old]
            size = len(self.keys)
            while 2 * (self.n + len(add)) > size:
                size *= 2
            self.keys, self.values = np.zeros(size, np.uint64), np.zeros(size, np.int64)
            self._place(keys, vals)
        self._place(hashes[add], values[add])
        self.n += len(add)
        return prior

    def _place(self, keys: np.ndarray, values: np.ndarray) -> None:
        """Insert absent, distinct keys all at once: each round, every key aiming at an empty slot writes itself
        there, one of those aiming at the same slot stays, the others move one slot on."""
        mask, one = np.uint64(len(self.keys) - 1), np.uint64(1)
        slot = keys & mask
        while len(keys):
            free = self.keys[slot] == 0
            self.keys[slot[free]] = keys[free]
            won = free & (self.keys[slot] == keys)
            self.values[slot[won]] = values[won]
            rest = ~won
            keys, values, slot = keys[rest], values[rest], (slot[rest] + one) & mask


_new = object.__new__


def _record(order: int, file: str, number: int, rec_id: str, seq: str, offset: int) -> Record:
    """``Record(order, file, number, rec_id, seq, offset)``, a third of the time (the frozen dataclass's
    ``__init__`` sets each field through ``object.__setattr__``); the tests check both give the same."""
    r = _new(Record)
    d = r.__dict__
    d["order"], d["file"], d["number"], d["id"], d["sequence"], d["offset"] = order, file, number, rec_id, seq, offset
    return r


def _count_acgtn(seqs: list[str]) -> tuple[int, int]:
    """(residues, how many are A, C, G, T or N) of ``seqs`` (ASCII): numpy, a cache-sized piece at a time."""
    data = np.frombuffer("".join(seqs).encode("ascii"), np.uint8)
    step, n = 1 << 16, 0
    m, tmp = np.empty(step, bool), np.empty(step, bool)
    for k in range(0, len(data), step):
        a = data[k : k + step]
        mm, tt = m[: len(a)], tmp[: len(a)]
        np.equal(a, 65, out=mm)
        for ch in b"CGTN":
            np.equal(a, ch, out=tt)
            mm |= tt
        n += int(np.count_nonzero(mm))
    return len(data), n


def read_fasta(
    paths: Iterable[str | Path],
    on_invalid: str = "error",
    input_type: str = "protein",
) -> Iterator[Record | Skipped]:
    """Stream records of one or more FASTA files (plain or gzip) in input order.

    ``input_type``: ``protein`` (residues normalised as above) or ``nucleotide`` (IUPAC bases)."""
    clean = {"protein": normalise, "nucleotide": normalise_nucleotides}[input_type]
    if on_invalid not in ("error", "skip"):
        raise ValueError(f"on_invalid must be 'error' or 'skip', not {on_invalid!r}")
    paths = [Path(p) for p in paths]
    seen = _IdIndex()  # id hash -> file index << 40 | record number, where it was first kept
    low = (1 << 40) - 1
    order = 0
    for file_index, path in enumerate(paths):
        if not path.is_file():
            raise FastaError(f"{path}: input file does not exist")
        name, key = str(path), file_index << 40
        residues = acgt = 0
        for batch in RawRecords(path, digest=False)._batches():
            parsed: list = []  # per raw record: (id, sequence), or the reason it is invalid
            digests, numbers = [], []
            for number, offset, header, body, line in batch:
                try:
                    rec = parse_record(header, body, line, clean)
                except ValueError as exc:
                    parsed.append(str(exc))
                    continue
                parsed.append(rec)
                digests.append(_blake2b(rec[0].encode(), digest_size=8).digest())  # idset.id_hash's, a batch at a time
                numbers.append(number)
            hashes = np.frombuffer(b"".join(digests), "<u8")
            if not hashes.all():
                hashes = np.where(hashes == 0, np.uint64(1), hashes)
            prior = seen.first_seen(hashes, np.array(numbers, np.int64) | key)
            if len(numbers) == len(batch) and (not len(prior) or prior.max() < 0):  # the usual: all valid and new
                for (number, offset, _, _, _), (rec_id, seq) in zip(batch, parsed):
                    r = _new(Record)  # _record(...), inline
                    d = r.__dict__
                    d["order"] = order
                    d["file"] = name
                    d["number"] = number
                    d["id"] = rec_id
                    d["sequence"] = seq
                    d["offset"] = offset
                    order += 1
                    yield r
                kept = [rec[1] for rec in parsed]
            else:
                prior = prior.tolist()
                kept = []
                k = 0
                for (number, offset, header, _, _), rec in zip(batch, parsed):
                    if type(rec) is str:
                        reason, rec_id = rec, header_id(header)
                    else:
                        rec_id, seq = rec
                        first = prior[k]
                        k += 1
                        if first < 0:
                            kept.append(seq)
                            yield _record(order, name, number, rec_id, seq, offset)
                            order += 1
                            continue
                        reason = f"duplicate id (first seen in {paths[first >> 40]} record {first & low})"
                    where = f"{path}: record {number}" + (f" ({rec_id})" if rec_id else "")
                    if on_invalid == "error":
                        raise FastaError(f"{where}: {reason}")
                    log.warning("skipped %s: %s", where, reason)
                    yield Skipped(name, number, rec_id, reason, offset)
            if kept and input_type == "protein":  # for the nucleotide-looking warning
                counts = _count_acgtn(kept)
                residues, acgt = residues + counts[0], acgt + counts[1]
        if input_type == "protein" and residues and acgt / residues > 0.9:
            log.warning(
                "%s: %.0f%% of residues are A/C/G/T/N: this looks like a nucleotide file, "
                "but it is embedded as protein (set input_type: nucleotide to translate it)",
                path,
                100 * acgt / residues,
            )

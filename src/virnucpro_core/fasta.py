"""Protein FASTA: streaming parser, residue normalisation, validation and sharding.

Every input record ends as a :class:`Record` (kept) or a :class:`Skipped` (with a
reason).  With ``on_invalid="error"`` the first bad record raises
:class:`FastaError`, whose message names the file, the record number and the reason.

Decisions (README, "Input"):
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
"""

from __future__ import annotations

import gzip
import io
import logging
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from .idset import IdTable, id_hash

log = logging.getLogger(__name__)

GAPS = b"-."
WHITESPACE = b" \t\r\n\v\f"
_DELETE = GAPS + WHITESPACE


class FastaError(ValueError):
    """A bad input file or record; the message names file, record and reason."""


@dataclass(frozen=True)
class Record:
    order: int  # 0-based position among all kept records of all inputs: the output order
    file: str
    number: int  # 1-based record number within its file
    id: str
    sequence: str  # normalised residues


@dataclass(frozen=True)
class Skipped:
    file: str
    number: int
    id: str
    reason: str


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


def _lines(path: Path) -> Iterator[bytes]:
    """The file's lines as bytes, gzip or plain, whatever their line ends (LF, CRLF or CR alone),
    without a UTF-8 byte-order mark; binary data and other formats raise FastaError."""
    with open(path, "rb") as fh:
        magic = fh.read(2)
    raw = gzip.open(path, "rb") if magic == b"\x1f\x8b" else open(path, "rb")
    with raw:
        head = raw.peek(8192)[:8192]  # both readers peek without consuming
        for lead, what in MAGIC.items():
            if head.startswith(lead):
                raise FastaError(f"{path}: {what}")
        nul = head.find(b"\x00")
        if nul >= 0:
            raise FastaError(f"{path}: binary data, not FASTA (NUL byte at byte {nul + 1})")
        # latin-1 maps bytes 1:1, so decoding and encoding again gives the same bytes
        text = io.TextIOWrapper(raw, encoding="latin-1", newline=None)
        first = True
        for line in text:
            b = line.encode("latin-1")
            if first and b.startswith(BOM):
                b = b[len(BOM) :]
            first = False
            yield b


def _raw_records(path: Path) -> Iterator[tuple[int, int, bytes | None, list[bytes]]]:
    """Yield (record number, header line number, header bytes or None, sequence lines)."""
    number, header, header_line, lines = 0, None, 0, []
    try:
        for line_no, line in enumerate(_lines(path), 1):
            if line.startswith(b">"):
                if header is not None or lines:
                    yield number, header_line, header, lines
                number += 1
                header, header_line, lines = line[1:].rstrip(b"\n"), line_no, []
            elif line.strip():
                if number == 0 and not lines:
                    _check_not_other_format(path, line, line_no)
                    header_line = line_no
                lines.append(line)
    except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise FastaError(f"{path}: truncated or corrupt gzip file ({exc})") from exc
    if header is not None or lines:
        yield number, header_line, header, lines


def _check_not_other_format(path: Path, line: bytes, line_no: int) -> None:
    if line.startswith(b"LOCUS "):
        raise FastaError(f"{path}: looks like GenBank (line {line_no} starts with LOCUS), not FASTA")
    if line.startswith(b"@"):
        raise FastaError(f"{path}: looks like FASTQ (line {line_no} starts with '@'), not FASTA")


def normalise(raw: bytes) -> str:
    """Return normalised residues, or raise ValueError with the reason."""
    seq = raw.translate(None, _DELETE).upper()
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
    seen = IdTable()  # id hash -> file index << 40 | record number, where it was first kept
    order = 0
    for file_index, path in enumerate(paths):
        if not path.is_file():
            raise FastaError(f"{path}: input file does not exist")
        residues = acgt = 0
        n_raw = 0
        for number, line_no, header, lines in _raw_records(path):
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
                log.warning("skipped %s: %s", where, exc)
                yield Skipped(str(path), number, rec_id, str(exc))
                continue
            seen.put(h, file_index << 40 | number)
            residues += len(seq)
            acgt += sum(map(seq.count, "ACGTN"))
            yield Record(order, str(path), number, rec_id, seq)
            order += 1
        if n_raw == 0:
            raise FastaError(f"{path}: empty file, no FASTA records")
        if input_type == "protein" and residues and acgt / residues > 0.9:
            log.warning(
                "%s: %.0f%% of residues are A/C/G/T/N: this looks like a nucleotide file, "
                "but it is embedded as protein (set input_type: nucleotide to translate it)",
                path,
                100 * acgt / residues,
            )

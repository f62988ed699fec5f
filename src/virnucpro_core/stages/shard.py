"""Stage 1: validate the input records and write the ones to embed, one part (a byte range of one input
file, :mod:`..parts`) per job, then check the parts together (:func:`index`).

A part's rows go to ``<out>/part_NNNNN.parquet``: columns ``id record sequence key`` (and, for nucleotide
input, ``parent_id window_start window_end frame``), one row per sequence to embed, in input order;
``record`` is the record's number within the part, ``key`` a 128-bit hash of the residues the model sees
(de-duplication). Beside it: ``.json`` (the part's counts and the SHA-256 of its byte range),
``.ids.parquet`` (each valid record's id and its hash, for the duplicate-id check across parts),
``.skipped.tsv`` and ``.keys.npy`` (the rows' distinct keys, sorted, for later shards' de-duplication).

:func:`index` runs once every part is written, while the GPUs work: it numbers records across the parts
of each file, finds ids already used by a record of an earlier part (those records are skipped, or stop the
run with ``on_invalid: error``), and writes ``manifest.json`` and ``skipped.tsv`` for the merge.
The parts' columns and :class:`..io.part_files.Shard`, which reads a shard's parts back, are in :mod:`..io.part_files`.
"""

from __future__ import annotations

import hashlib
import json
import logging
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..io.fasta import (
    FastaError,
    count_headers,
    header_id,
    normalise,
    normalise_nucleotides,
    parse_record,
    raw_records,
)
from ..io.files import atomic_path, read_tsv, sha256, write_json, write_tsv
from ..io.idset import IdTable, id_hash
from ..io.duplicates import distinct_keys
from ..io.nucleotide import translate_batch
from ..options import Options
from ..io.part_files import (
    NUCLEOTIDE_COLUMNS,
    PART_KEY,
    PART_SKIPPED_COLUMNS,
    SKIPPED_COLUMNS,
    part_paths,
)
from ..run.parts import Part, plan_parts, shard_name, shards, unique_inputs

log = logging.getLogger(__name__)

ROW_GROUP_RESIDUES = 32 << 20  # a part's row group: about this many residues, or
ROW_GROUP_ROWS = 1 << 17  # this many rows, whichever comes first
TRANSLATE_BATCH = 8192  # nucleotide records translated together


def embedded_residues(sequence: str, options: Options) -> str:
    """The residues the model sees of a record: its first ``max_residues`` under ``truncate``, all under ``split``."""
    long = options.long_sequences
    return sequence[: long.max_residues] if long.policy == "truncate" else sequence


def sequence_key(sequence: str, options: Options) -> bytes:
    """Equal for two records exactly when the model sees the same residues (the same windows, the same outputs)."""
    return hashlib.blake2b(embedded_residues(sequence, options).encode(), digest_size=16).digest()


class _Rows:
    """Rows to the part file a row group at a time (memory holds one row group, never the part)."""

    def __init__(self, path: Path, nucleotide: bool) -> None:
        cols = {"id": pa.string(), "record": pa.int32(), "sequence": pa.large_string(), "key": pa.binary(16)}
        self.schema = pa.schema({**cols, **(NUCLEOTIDE_COLUMNS if nucleotide else {})})
        self.writer = pq.ParquetWriter(path, self.schema, compression="zstd")
        self.cols: dict[str, list] = {n: [] for n in self.schema.names}
        self.buffered = self.rows = self.residues = 0
        self.keys: list[bytes] = []  # every row's, for the part's keys file

    def add(self, columns: dict[str, list]) -> None:
        for k, v in columns.items():
            self.cols[k].extend(v)
        self.keys.extend(columns["key"])
        n = sum(map(len, columns["sequence"]))
        self.buffered += n
        self.residues += n
        self.rows += len(columns["id"])
        if self.buffered >= ROW_GROUP_RESIDUES or len(self.cols["id"]) >= ROW_GROUP_ROWS:
            self.flush()

    def flush(self) -> None:
        if self.cols["id"]:
            self.writer.write_table(pa.table(self.cols, schema=self.schema))
            self.cols = {n: [] for n in self.schema.names}
            self.buffered = 0

    def close(self, meta: dict) -> None:
        self.flush()
        self.writer.add_key_value_metadata({PART_KEY: json.dumps(meta, sort_keys=True)})
        self.writer.close()


class _Part:
    """What one part job has seen so far: valid ids, skipped records, counts."""

    def __init__(self, part: Part, options: Options) -> None:
        self.part, self.options, self.path = part, options, Path(part.file)
        self.seen = IdTable()
        self.ids: dict[str, list] = {"hash": [], "record": [], "rows": [], "id": []}
        self.skipped: list[list] = []
        self.kept = self.with_rows = self.input_residues = self.acgt = 0

    def skip(self, number: int, offset: int, rec_id: str, reason: str, first_seen: int | None = None,
             invalid: bool = True) -> None:
        """A record not embedded: listed, or if it is invalid and ``on_invalid`` is ``error``, the end of the run, named by
        its number in the file."""
        path = self.path
        if invalid and self.options.on_invalid == "error":
            n = number if self.part.start == 0 or number == 0 else count_headers(path, offset) + 1
            if first_seen is not None:
                reason = duplicate_reason(str(path), n - number + first_seen)
            raise FastaError(f"{path}: record {n}" + (f" ({rec_id})" if rec_id else "") + f": {reason}")
        if invalid:
            where = f"record {number}" if self.part.start == 0 else f"the record at byte {offset}"
            log.warning("skipped %s: %s%s: %s", path, where, f" ({rec_id})" if rec_id else "", reason)
        self.skipped.append([rec_id, reason, number, "" if first_seen is None else first_seen, offset])

    def keep(self, number: int, offset: int, header: bytes | None, body: bytes, line: int | None, clean) -> str | None:
        """The record's normalised sequence, or None when it is skipped (invalid, or an id seen before in this part)."""
        rec_id = header_id(header)
        try:
            rec_id, seq = parse_record(header, body, line, clean)
        except ValueError as exc:
            self.skip(number, offset, rec_id, str(exc))
            return None
        h = id_hash(rec_id)
        first = self.seen.get(h)
        if first is not None:
            self.skip(number, offset, rec_id, "duplicate id", first_seen=first)
            return None
        self.seen.put(h, number)
        for k, v in (("hash", h), ("record", number), ("rows", 0), ("id", rec_id)):
            self.ids[k].append(v)
        self.kept += 1
        self.input_residues += len(seq)
        return seq


def run_part(part: Part, out_dir: str | Path, options: Options) -> dict:
    """Read ``part`` (one byte range of one input file): its valid records' rows to ``part_NNNNN.parquet``,
    its invalid ones to ``.skipped.tsv``, its counts to ``.json``. Record numbers are the part's own (the
    index makes them the file's); an invalid record with ``on_invalid: error`` stops here, named by its
    number in the file."""
    paths = part_paths(out_dir, part.name)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    path = Path(part.file)
    if not path.is_file():
        raise FastaError(f"{path}: input file does not exist")
    if path.stat().st_size != part.size:
        raise FastaError(f"{path}: changed since the run was planned ({part.size} bytes then, {path.stat().st_size} now); "
                         "start the run again")
    nucleotide = options.nucleotide if options.input_type == "nucleotide" else None
    clean = normalise if nucleotide is None else normalise_nucleotides
    reader = raw_records(path, part.start, part.end)
    seen = _Part(part, options)
    pending: list[tuple[int, int, str, str, int]] = []  # records translated together: number, offset, id, bases, ids row

    def translate(rows: _Rows) -> None:
        numbers, offsets, rec_ids, seqs, at = zip(*pending)
        got = translate_batch(list(rec_ids), list(seqs), nucleotide)
        counts = np.bincount(got.record, minlength=len(pending))
        for i in range(len(pending)):
            if counts[i]:
                seen.ids["rows"][at[i]] = int(counts[i])
            else:
                reason = f"no translated protein of >= {nucleotide.min_protein_length} residues"
                seen.skip(numbers[i], offsets[i], rec_ids[i], reason, invalid=False)
        seen.with_rows += int((counts > 0).sum())
        src = got.record.tolist()
        rows.add({"id": got.id, "record": [numbers[r] for r in src], "sequence": got.protein,
                  "key": [sequence_key(p, options) for p in got.protein], "parent_id": [rec_ids[r] for r in src],
                  "window_start": got.window_start.tolist(), "window_end": got.window_end.tolist(), "frame": got.frame.tolist()})
        pending.clear()

    with atomic_path(paths["rows"]) as tmp:
        rows = _Rows(tmp, nucleotide is not None)
        try:
            for number, offset, header, body, line in reader:
                seq = seen.keep(number, offset, header, body, line, clean)
                if seq is None:
                    continue
                if nucleotide is not None:
                    pending.append((number, offset, seen.ids["id"][-1], seq, len(seen.ids["id"]) - 1))
                    if len(pending) >= TRANSLATE_BATCH:
                        translate(rows)
                    continue
                seen.acgt += sum(map(seq.count, "ACGTN"))
                seen.ids["rows"][-1] = 1
                seen.with_rows += 1
                rows.add({"id": [seen.ids["id"][-1]], "record": [number], "sequence": [seq], "key": [sequence_key(seq, options)]})
            if pending:
                translate(rows)
        except BaseException:
            rows.writer.close()
            raise
        info = {**part.to_dict(), "name": part.name, "sha256": reader.sha256}
        rows.close(info)
    if part.start == 0 and part.end >= part.size and reader.records == 0:
        raise FastaError(f"{path}: empty file, no FASTA records")
    ids = pa.table({"hash": pa.array(seen.ids["hash"], pa.uint64()), "record": pa.array(seen.ids["record"], pa.int32()),
                    "rows": pa.array(seen.ids["rows"], pa.int32()), "id": pa.array(seen.ids["id"], pa.string())})
    with atomic_path(paths["ids"]) as tmp:
        pq.write_table(ids, tmp, compression="zstd")
    write_tsv(paths["skipped"], PART_SKIPPED_COLUMNS, seen.skipped)
    with atomic_path(paths["keys"]) as tmp, open(tmp, "wb") as fh:
        np.save(fh, distinct_keys(np.frombuffer(b"".join(rows.keys), dtype="V16")), allow_pickle=False)
    manifest = {**info, "first_offset": reader.first_offset, "end_offset": reader.end_offset,
                "headers": reader.headers, "records": reader.records, "kept": seen.kept, "skipped": len(seen.skipped),
                "with_rows": seen.with_rows, "rows": rows.rows, "residues": rows.residues, "input_residues": seen.input_residues,
                "acgt": seen.acgt, "rows_sha256": sha256(paths["rows"], cache=False)}
    write_json(paths["manifest"], manifest)
    log.info("%s: %s bytes %d-%d: %d records, %d kept, %d skipped, %d rows, %d residues", part.name, path, part.start, part.end,
             reader.records, seen.kept, len(seen.skipped), rows.rows, rows.residues)
    return manifest


def duplicate_reason(file: str, number: int) -> str:
    return f"duplicate id (first seen in {file} record {number})"


def index(parts: list[Part], shard_dir: str | Path, options: Options, inputs: list[str] | None = None) -> dict:
    """The parts checked together: each record's number in its file, ids first used by an earlier part (those
    records are skipped: their rows are dropped by the merge), per-file counts. Writes ``manifest.json`` and
    ``skipped.tsv``; raises FastaError naming the first problem when ``on_invalid`` is ``error``."""
    if inputs is not None:
        unique_inputs(inputs)  # the warning for a file listed twice, in this job's log
    d = Path(shard_dir)
    man = [json.loads(part_paths(d, p.name)["manifest"].read_text()) for p in parts]
    offset, headers = [], {}  # headers of the same file before each part: local record numbers -> the file's
    ends: dict[str, tuple[str, int]] = {}  # the previous part of each file: its name, where its records end
    for p, m in zip(parts, man):
        offset.append(headers.get(p.file, 0))
        headers[p.file] = offset[-1] + m["headers"]
        if p.file in ends and ends[p.file][1] != m["first_offset"]:  # e.g. nodes whose zlib inflates differently
            raise FastaError(f"{p.file}: parts {ends[p.file][0]} and {p.name} disagree on where one ends and the next "
                             f"begins (decompressed offset {ends[p.file][1]} vs {m['first_offset']}): read on machines "
                             "that inflate gzip differently? Delete the run's shards/ folder and run the shard jobs on "
                             "one kind of machine")
        ends[p.file] = (p.name, m["end_offset"])
    tables = [pq.read_table(part_paths(d, p.name)["ids"], columns=["hash", "record", "rows"]) for p in parts]
    owner = np.concatenate([np.full(t.num_rows, i, np.int64) for i, t in enumerate(tables)] or [np.zeros(0, np.int64)])
    col = lambda c: np.concatenate([t[c].to_numpy() for t in tables] or [np.zeros(0, np.int64)])  # noqa: E731
    hashes, records, n_rows = col("hash"), col("record"), col("rows")
    _, first, inverse = np.unique(hashes, return_index=True, return_inverse=True)
    first_of = first[inverse]  # for each valid record, the first valid record with its id (itself if none before)
    per_file = {f: {"records": 0, "embedded": 0, "skipped": 0} for f in dict.fromkeys(p.file for p in parts)}
    for p, m in zip(parts, man):
        per_file[p.file]["records"] += m["records"]
        per_file[p.file]["embedded"] += m["with_rows"]
    ids_of: dict[int, list[str]] = {}

    def rec_id(i: int) -> str:  # a record's id (rare: duplicates only)
        pi = int(owner[i])
        if pi not in ids_of:
            ids_of[pi] = pq.read_table(part_paths(d, parts[pi].name)["ids"], columns=["id"])["id"].to_pylist()
        return ids_of[pi][i - int(np.searchsorted(owner, pi))]

    def where(i: int) -> tuple[str, int]:
        p = parts[int(owner[i])]
        return p.file, offset[p.index] + int(records[i])

    later = {}  # (part, record) -> the reason it is skipped: an id first used in an earlier part
    drops: dict[str, list[int]] = {}
    for i in np.flatnonzero(first_of != np.arange(len(hashes))):  # in input order
        reason = duplicate_reason(*where(int(first_of[i])))
        p = parts[int(owner[i])]
        if options.on_invalid == "error":
            f, n = where(int(i))
            raise FastaError(f"{f}: record {n} ({rec_id(int(i))}): {reason}")
        later[(p.index, int(records[i]))] = (reason, rec_id(int(i)))
        if n_rows[i]:  # its rows are dropped; otherwise it was skipped already (no translated protein)
            drops.setdefault(p.name, []).append(int(records[i]))
            per_file[p.file]["embedded"] -= 1
    skipped = []
    for p in parts:
        listed = set()
        for r in read_tsv(part_paths(d, p.name)["skipped"]):
            rec = int(r["record"])
            reason = r["reason"]
            if (p.index, rec) in later:  # the id was used by an earlier part: that comes first
                reason = later[(p.index, rec)][0]
            elif r["first_seen"] != "":  # a duplicate within the part, named by the first record of the file with the id
                j = first_of[np.searchsorted(owner, p.index) + _position(records, owner, p.index, int(r["first_seen"]))]
                reason = duplicate_reason(*where(int(j)))
            listed.add(rec)
            skipped.append((p.index, rec, [r["id"], reason, p.file, rec if rec == 0 else offset[p.index] + rec]))
        for (pi, rec), (reason, rid) in later.items():
            if pi == p.index and rec not in listed:
                skipped.append((pi, rec, [rid, reason, p.file, offset[pi] + rec]))
    skipped.sort(key=lambda x: (x[0], x[1]))
    for _, _, (_, _, f, _) in skipped:
        per_file[f]["skipped"] += 1
    for f, c in per_file.items():
        if c["records"] == 0:
            raise FastaError(f"{f}: empty file, no FASTA records")
        residues = sum(m["input_residues"] for p, m in zip(parts, man) if p.file == f)
        acgt = sum(m["acgt"] for p, m in zip(parts, man) if p.file == f)
        if options.input_type == "protein" and residues and acgt / residues > 0.9:
            log.warning("%s: %.0f%% of residues are A/C/G/T/N: this looks like a nucleotide file, but it is embedded as "
                        "protein (set input_type: nucleotide to translate it)", f, 100 * acgt / residues)
    write_tsv(d / "skipped.tsv", SKIPPED_COLUMNS, [r for _, _, r in skipped])
    dropped = {name: _rows_of(d, name, recs) for name, recs in drops.items()}
    groups = shards(parts)
    manifest = {
        "inputs": [{"file": f, **c} for f, c in per_file.items()],
        "parts": [{"name": p.name, "file": p.file, "start": p.start, "end": p.end, "size": p.size, "shard": p.shard,
                   "rows": m["rows"], "sha256": m["sha256"], "rows_sha256": m["rows_sha256"], "record_offset": off}
                  for p, m, off in zip(parts, man, offset)],
        "shards": [{"name": shard_name(k), "parts": [p.name for p in g], "rows": sum(m["rows"] for p, m in zip(parts, man)
                                                                                     if p.shard == k)}
                   for k, g in enumerate(groups)],
        "rows": sum(m["rows"] for m in man) - sum(map(len, dropped.values())),
        "skipped": len(skipped),
        "residues": sum(m["residues"] for m in man),
        "dropped_rows": dropped,
        "on_invalid": options.on_invalid,
    }
    write_json(d / "manifest.json", manifest)
    log.info("%d parts, %d shards: %d rows to embed, %d records skipped", len(parts), len(groups), manifest["rows"],
             manifest["skipped"])
    return manifest


def _position(records: np.ndarray, owner: np.ndarray, part: int, record: int) -> int:
    """Index within the part's valid records of the one numbered ``record``."""
    lo, hi = np.searchsorted(owner, part), np.searchsorted(owner, part, side="right")
    return int(np.flatnonzero(records[lo:hi] == record)[0])


def _rows_of(d: Path, name: str, records: list[int]) -> list[int]:
    """Rows of a part that come from the given records."""
    rec = pq.read_table(part_paths(d, name)["rows"], columns=["record"])["record"].to_numpy()
    return np.flatnonzero(np.isin(rec, records)).tolist()


def run(inputs: list[str], outdir: str | Path, options: Options, jobs: int = 1) -> dict:
    """The whole shard stage in one call (``python -m virnucpro_core shard``, ``virnucpro extract``): the parts,
    ``jobs`` at a time, then :func:`index`."""
    parts = plan_parts(inputs, options)
    if jobs > 1 and len(parts) > 1:
        with ProcessPoolExecutor(min(jobs, len(parts))) as pool:
            list(pool.map(run_part, parts, [outdir] * len(parts), [options] * len(parts)))
    else:
        for p in parts:
            run_part(p, outdir, options)
    return index(parts, outdir, options)


__all__ = ["run", "run_part", "index"]

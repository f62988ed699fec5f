"""How the input is cut: parts (byte ranges of the input files, one shard-step job each, read at once) and
shards (consecutive parts, one embedding job each). Decided from the files' sizes alone, before any job runs,
so the workflow's jobs are known when it starts and the first embedding job waits only for its own parts.

A part is ``[start, end)`` of one file: byte offsets, compressed offsets for gzip (every part of a gzip file
decompresses it from its start, which is ~10x faster than parsing, so such a file is cut into fewer parts).
A record belongs to the part its header starts in (:func:`.fasta.raw_records`), so the parts of a file
together hold every record once, in order. Shards are balanced by the residues the bytes are estimated to
give. Importing this module costs nothing (the workflow reads it when it starts).
"""

from __future__ import annotations

import logging
import math
import os
import zlib
from dataclasses import asdict, dataclass

from ..io.fasta import is_gzip, split_points
from ..options import Options

log = logging.getLogger(__name__)

PART_BYTES = 8 << 20  # a part: about this many bytes of input (protein: ~0.3 s to read, nucleotide: ~1 s)
MAX_PARTS = 64  # ... and at most this many, unless there are more shards
MAX_GZIP_PARTS = 16  # parts of one gzip file: each decompresses the file from its start
# decompressing a byte of gzip input against reading it (measured on the 2-core machine: proteins 1.4 s of
# inflate to 7 s of reading for 244 MB; reads: translation makes reading about twice as slow)
INFLATE_COST = {"protein": 0.2, "nucleotide": 0.1}
# protein residues a byte of nucleotide input gives, by frames (300-bp reads of a bacterial genome, defaults: 0.67)
RESIDUES_PER_BASE = {"six": 2 / 3, "forward": 1 / 3, "longest_orf": 1 / 6}


@dataclass(frozen=True)
class Part:
    index: int  # 0, 1, ... in input order
    file: str
    start: int  # [start, end) of the file's bytes (compressed bytes for gzip)
    end: int
    size: int  # the file's size when the run was planned
    shard: int
    residues: int = 0  # estimated from the bytes


    @property
    def name(self) -> str:
        return part_name(self.index)

    def to_dict(self) -> dict:
        return asdict(self)


def part_name(index: int) -> str:
    return f"part_{index:05d}"


def part_index(path: str) -> int:
    """The index of the part a file of the shard step belongs to (``.../part_00012.keys.npy`` -> 12)."""
    return int(os.path.basename(path).split(".")[0].removeprefix("part_"))


def shard_name(index: int) -> str:
    return f"shard_{index:04d}"


def unique_inputs(inputs: list[str]) -> list[str]:
    """Each input file once (the same file listed twice would count its records twice)."""
    seen: dict[str, str] = {}
    for p in inputs:
        real = os.path.realpath(p)
        if real in seen:
            log.warning("%s is listed more than once (as %s): read once", p, seen[real])
        else:
            seen[real] = p
    return list(seen.values())


def _expansion(path: str) -> float:
    """Decompressed bytes per file byte: 1 for a plain file, measured on the first MiB for gzip."""
    if not is_gzip(path):
        return 1.0
    with open(path, "rb") as fh:
        head = fh.read(1 << 20)
    try:
        out = zlib.decompressobj(wbits=31).decompress(head, 64 << 20)
    except zlib.error:
        return 3.0  # the shard step names the corrupt file
    return max(1.0, len(out) / max(1, len(head)))


def estimated_residues(path: str, options: Options) -> float:
    """Residues the file is expected to give (headers counted as residues: an upper bound for proteins)."""
    per_byte = 1.0 if options.input_type == "protein" else RESIDUES_PER_BASE[options.nucleotide.frames]
    return os.path.getsize(path) * _expansion(path) * per_byte


def plan_parts(inputs: list[str], options: Options, gpus: int | None = None) -> list[Part]:
    """The parts of ``inputs`` (each file once, in order) and the shard of each.

    Shards: ``options.shards``, else enough for ``residues_per_shard`` residues each, rounded up to a multiple
    of the GPUs asked for. Parts: ``options.input_parts``, else about ``PART_BYTES`` each (at most
    ``MAX_PARTS``), at least one per shard; each file gets parts in proportion to its estimated residues."""
    files = unique_inputs(inputs)
    est = [estimated_residues(f, options) for f in files]
    total = sum(est) or 1.0
    if options.shards is not None:
        n_shards = options.shards
    else:  # with GPUs asked for, a multiple of them: every GPU gets as many shards, none waits for the last
        gpus = max(1, gpus or 1)
        n_shards = -(-max(1, math.ceil(total / options.residues_per_shard)) // gpus) * gpus
    size = sum(os.path.getsize(f) for f in files)
    wanted = options.input_parts or min(MAX_PARTS, math.ceil(size / PART_BYTES))
    wanted = -(-max(wanted, n_shards) // n_shards) * n_shards  # a multiple of the shards, so they balance
    cuts = []  # (file, start, end, size, estimated residues)
    for f, e in zip(files, est):
        n = max(1, round(wanted * e / total))
        if is_gzip(f):
            n = min(n, MAX_GZIP_PARTS)
        points = split_points(f, n, INFLATE_COST[options.input_type])
        fsize = points[-1]
        for a, b in zip(points, points[1:]):
            cuts.append((f, a, b, fsize, e * (b - a) / fsize if fsize else 0.0))
    # a part goes to the shard its estimated residues' midpoint falls in; no shard is left empty
    parts, before, shard_of = [], 0.0, {}
    for i, (f, a, b, fsize, e) in enumerate(cuts):
        k = min(n_shards - 1, int((before + e / 2) * n_shards / total))
        shard = shard_of.setdefault(k, len(shard_of))
        parts.append(Part(i, f, a, b, fsize, shard, int(e)))
        before += e
    return parts


def run_plan(parts: list[Part]) -> dict:
    """What a run of these parts will do, for its claim (:mod:`.progress` reads it): the parts, and the tokens each
    shard is estimated to hold until its job has planned its packs."""
    est: dict[str, int] = {}
    for p in parts:
        est[shard_name(p.shard)] = est.get(shard_name(p.shard), 0) + p.residues
    return {"parts": len(parts), "shards": est}


def shards(parts: list[Part]) -> list[list[Part]]:
    """The parts of each shard, in order."""
    out: list[list[Part]] = []
    for p in parts:
        if p.shard == len(out):
            out.append([])
        out[p.shard].append(p)
    return out

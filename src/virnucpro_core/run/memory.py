"""Memory (MB) each rule asks the scheduler for, from what its job holds (no torch here: the
workflow computes these when it builds the jobs). Measured peaks are in ``benchmarks/results/``."""

from __future__ import annotations

from ..io.fasta import is_gzip
from ..options import Options

BASE_MB = 1000  # the interpreter, pyarrow and numpy
TORCH_MB = 3000  # torch, CUDA context and kernels, the tokenised packs
MIN_TOKENS_PER_RECORD = 100  # for the rows of a chunk: a chunk of very short records has the most rows
COPIES = 4  # a chunk's outputs (numpy, then Arrow and its Parquet write) while the next chunk's arrive


def part_mb(part) -> int:
    """One part's buffered rows (about 32 M residues), a batch of translated proteins, and the table of ids
    seen: ~70 bytes a record (measured: 1.39 GB peak at 16 M records, benchmarks/results/scale-16M-2026-11-30.json),
    at most one record per 40 bytes of FASTA (gzip: ~4 bytes of FASTA per byte)."""
    return int(BASE_MB + 200 + (part.end - part.start) / 1e6 * (4 if is_gzip(part.file) else 1) * 70 / 40)


def index_mb(input_mb: float) -> int:
    """Every valid record's id hash, record number and rows (~16 bytes, read from ~20 bytes of ids files),
    and their sort: a few times the ids files."""
    return int(BASE_MB + 4 * input_mb)


def embed_mb(options: Options, checkpoint_mb: float, embed_dim: int, shard_mb: float, earlier_mb: float = 0.0) -> int:
    """The checkpoint (read once into host memory), the shard's sequences and ids (~2x its parts' files),
    the earlier parts' sequence keys (16 bytes a row, about a tenth of their files, sorted: x3), and two
    chunks' outputs (one being written while the next is computed): pooled rows and per-residue states."""
    if options.embedding.mem_mb is not None:
        return options.embedding.mem_mb
    columns = len(set((*options.embedding.layers, -1))) * len(set(("mean", *options.embedding.poolings)))
    tokens = chunk_tokens(options)
    pooled = tokens / MIN_TOKENS_PER_RECORD * embed_dim * 4 * columns
    per_residue = tokens * embed_dim * 4 * len(options.embedding.per_residue_layers)
    return int(BASE_MB + TORCH_MB + checkpoint_mb + 2 * shard_mb + 0.3 * earlier_mb + COPIES * (pooled + per_residue) / 1e6)


PER_RESIDUE_CHUNK_TOKENS = 262_144


def chunk_tokens(options: Options) -> int:
    """Per-residue states of a whole chunk are held in host memory: with any, chunks are smaller."""
    if options.embedding.per_residue_layers:
        return min(options.packing.chunk_tokens, PER_RESIDUE_CHUNK_TOKENS)
    return options.packing.chunk_tokens


def merge_mb(input_mb: float) -> int:
    """A row group of ~64 MiB read and written, the ids of two row groups, and a few bytes a row for the drop
    and fill tables (the parts' files, about 20 bytes a row, are a tenth of the inputs)."""
    return int(BASE_MB + 1000 + input_mb / 100)

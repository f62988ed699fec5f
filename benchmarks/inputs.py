"""Synthetic inputs of real shapes for the workflow benchmarks (fixed seeds, no download).

- ``proteins``: log-normal lengths with a median of 270 residues (UniProt-like), about 3% over 1022;
- ``genome``: a bacterial-like genome, 88% coding: genes of log-normal length (median 300 codons) on both
  strands, sense codons then a stop, random spacers between them;
- ``reads``: reads of 300 bp from either strand of that genome, as a metagenome's;
- ``short_proteins``: the six-frame proteins of such reads, translated as the workflow does by default
  (truncated at the first stop, at least 20 residues: median about 45), the regime of reads.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

AA = np.frombuffer(b"ACDEFGHIKLMNPQRSTVWY", dtype=np.uint8)
BASES = np.frombuffer(b"ACGT", dtype=np.uint8)
_CODONS = [a + b + c for a in "ACGT" for b in "ACGT" for c in "ACGT"]
SENSE = np.frombuffer("".join(c for c in _CODONS if c not in ("TAA", "TAG", "TGA")).encode(), np.uint8).reshape(-1, 3)
STOPS = np.frombuffer(b"TAATAGTGA", np.uint8).reshape(-1, 3)
COMPLEMENT = np.zeros(256, np.uint8)
COMPLEMENT[list(b"ACGT")] = list(b"TGCA")


def protein_lengths(n_tokens: int, seed: int = 0) -> np.ndarray:
    """Lengths whose tokens (residues + BOS + EOS, fair-esm's truncation at 1022 counted) add up to ``n_tokens``."""
    rng = np.random.default_rng(seed)
    est = int(n_tokens / 300 * 1.2) + 10
    lengths = np.clip(rng.lognormal(np.log(270), 0.72, est), 20, 6000).astype(np.int64)
    tokens = np.cumsum(np.minimum(lengths, 1022) + 2)
    return lengths[: int(np.searchsorted(tokens, n_tokens)) + 1]


def write_proteins(path: Path, n_tokens: int, seed: int = 0, prefix: str = "prot") -> int:
    """A protein FASTA of about ``n_tokens`` tokens (60-residue lines, Prodigal-like headers); returns the records."""
    rng = np.random.default_rng(seed + 1)
    lengths = protein_lengths(n_tokens, seed)
    with open(path, "wb") as fh:
        for start in range(0, len(lengths), 50_000):
            chunk = lengths[start : start + 50_000]
            body = AA[rng.integers(0, 20, int(chunk.sum()))].tobytes()
            out, pos = [], 0
            for i, n in enumerate(chunk.tolist(), start):
                seq = body[pos : pos + n]
                pos += n
                lines = b"\n".join(seq[j : j + 60] for j in range(0, n, 60))
                out.append(b">%s_%d # %d # %d # 1 # ID=%d;partial=00\n%s\n" % (prefix.encode(), i, 3 * i, 3 * i + 3 * n, i, lines))
            fh.write(b"".join(out))
    return len(lengths)


def genome(bases: int = 5_000_000, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    parts, n = [], 0
    while n < bases:
        codons = int(np.clip(rng.lognormal(np.log(300), 0.5), 60, 1500))
        gene = np.concatenate([np.frombuffer(b"ATG", np.uint8), SENSE[rng.integers(0, 61, codons)].ravel(), STOPS[rng.integers(0, 3)]])
        if rng.random() < 0.5:
            gene = COMPLEMENT[gene[::-1]]
        spacer = BASES[rng.integers(0, 4, int(rng.integers(20, 200)))]
        parts += [gene, spacer]
        n += len(gene) + len(spacer)
    return np.concatenate(parts)


def reads(seed: int = 0, length: int = 300) -> Iterator[np.ndarray]:
    """Reads of ``length`` bp (ASCII codes) from either strand of :func:`genome`, without end."""
    rng = np.random.default_rng(seed + 1)
    g = genome(seed=seed)
    while True:
        s = int(rng.integers(0, len(g) - length))
        r = g[s : s + length]
        yield COMPLEMENT[r[::-1]] if rng.random() < 0.5 else r


def write_reads(path: Path, n: int, seed: int = 0, length: int = 300, prefix: str = "read") -> int:
    """``n`` of :func:`reads` (one line each); returns the bases written."""
    source = reads(seed, length)
    with open(path, "wb") as fh:
        for start in range(0, n, 100_000):
            out = [b">%s_%d\n%s\n" % (prefix.encode(), i, next(source).tobytes()) for i in range(start, min(n, start + 100_000))]
            fh.write(b"".join(out))
    return n * length


def short_proteins(n_tokens: int, seed: int = 0, length: int = 300) -> list[str]:
    """Six-frame proteins of reads of ``length`` bp from :func:`genome` (the workflow's default translation), about
    ``n_tokens`` tokens (residues + BOS + EOS)."""
    from virnucpro_core.io.nucleotide import translate_batch
    from virnucpro_core.options import NucleotideOptions

    source = reads(seed, length)
    out: list[str] = []
    tokens = 0
    while tokens < n_tokens:
        batch = [next(source).tobytes().decode() for _ in range(5000)]
        for protein in translate_batch([f"r{i}" for i in range(len(batch))], batch, NucleotideOptions()).protein:
            out.append(protein)
            tokens += len(protein) + 2
            if tokens >= n_tokens:
                break
    return out

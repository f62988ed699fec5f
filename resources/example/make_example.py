"""Regenerate the shipped example: proteins.faa and a tiny random-weight ESM-2 checkpoint.

    python resources/example/make_example.py

300 pyrodigal-style protein records (trailing '*', '# start # end # strand' headers) with
log-normal lengths (median 300), 6 of them longer than ESM-2's 1022-residue limit.
"""

from pathlib import Path

import numpy as np
import torch

from virnucpro_core.model import build_esm2, save_checkpoint

HERE = Path(__file__).parent
# UniProt amino-acid background frequencies (%)
AA = "ACDEFGHIKLMNPQRSTVWY"
FREQ = np.array([8.25, 1.38, 5.46, 6.72, 3.86, 7.07, 2.27, 5.91, 5.80, 9.65, 2.41, 4.06, 4.74, 3.93, 5.53, 6.64, 5.35, 6.86, 1.10, 2.92])


def main() -> None:
    rng = np.random.default_rng(2026)
    lengths = np.clip(rng.lognormal(np.log(300), 0.6, 294), 30, 1000).astype(int).tolist()
    lengths += [1022, 1023, 1100, 1500, 2300, 3000]
    rng.shuffle(lengths)
    lines = []
    pos = 1
    for i, n in enumerate(lengths, 1):
        seq = "M" + "".join(rng.choice(list(AA), n - 1, p=FREQ / FREQ.sum()))
        end = pos + 3 * (n + 1) - 1
        lines.append(f">contig_{1 + i // 40}_{i} # {pos} # {end} # {1 if i % 3 else -1} # ID={i};partial=00;start_type=ATG")
        lines += [seq[j : j + 60] for j in range(0, n, 60)]
        lines[-1] += "*"
        pos = end + 50
    (HERE / "proteins.faa").write_text("\n".join(lines) + "\n")
    write_reads(rng)
    torch.manual_seed(0)
    save_checkpoint(build_esm2(layers=2, embed_dim=64, heads=4), HERE / "esm2_t2_tiny_random.pt")


CODONS = {}
for codon, aa in __import__("Bio.Data.CodonTable", fromlist=["x"]).unambiguous_dna_by_id[11].forward_table.items():
    CODONS.setdefault(aa, []).append(codon)


def write_reads(rng: np.random.Generator) -> None:
    """reads.fna: 300 nucleotide records (VirNucPro-style input) of 50-1500 bp: genes built by
    back-translating random proteins, a third reverse-complemented, some with runs of N, some
    shorter than one 300-bp window (and a few too short to give a 20-residue protein)."""
    from Bio.Seq import Seq

    lines = []
    for i in range(300):
        n_bp = int(rng.choice([50, 120, 250, 300, 450, 600, 900, 1500]))
        aas = "".join(rng.choice(list(AA), n_bp // 3 + 1, p=FREQ / FREQ.sum()))
        dna = "".join(rng.choice(CODONS[a]) for a in aas)[:n_bp]
        if i % 7 == 3:
            k = int(rng.integers(0, max(1, n_bp - 10)))
            dna = dna[:k] + "N" * 10 + dna[k + 10 :]
        strand = "-" if i % 3 == 2 else "+"
        if strand == "-":
            dna = str(Seq(dna).reverse_complement())
        lines.append(f">read_{i + 1} len={n_bp} strand={strand}")
        lines += [dna[j : j + 70] for j in range(0, len(dna), 70)]
    (HERE / "reads.fna").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

"""Tokens of a pack: fair-esm's ESM-2 alphabet through a byte lookup table, no Python loop per residue."""

from __future__ import annotations

import numpy as np

from .packing import Pack


class Tokenizer:
    """fair-esm's ESM-1b/ESM-2 tokens through a 256-entry lookup table over bytes.

    Same ids as ``Alphabet.from_architecture("ESM-1b")`` with BOS and EOS; letters the
    alphabet does not know (``J``) become ``<unk>`` instead of fair-esm's KeyError.
    """

    def __init__(self, alphabet) -> None:
        self.bos, self.eos = alphabet.cls_idx, alphabet.eos_idx
        self.lut = np.full(256, alphabet.unk_idx, dtype=np.int64)
        for tok, idx in alphabet.tok_to_idx.items():
            if len(tok) == 1:
                self.lut[ord(tok)] = idx

    def pack_tokens(self, sequences: list[str], pack: Pack) -> np.ndarray:
        """1-D tokens of a pack: BOS residues EOS per item, items back to back."""
        body = "".join(sequences[r][s : s + n] for r, s, n in zip(pack.records.tolist(), pack.starts.tolist(), pack.lengths.tolist()))
        codes = self.lut[np.frombuffer(body.encode("ascii"), dtype=np.uint8)]
        cu = pack.cu_seqlens
        out = np.empty(cu[-1], dtype=np.int64)
        is_special = np.zeros(cu[-1], dtype=bool)
        is_special[cu[:-1]] = True
        is_special[cu[1:] - 1] = True
        out[cu[:-1]] = self.bos
        out[cu[1:] - 1] = self.eos
        out[~is_special] = codes
        return out

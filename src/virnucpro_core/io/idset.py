"""The record ids seen so far, in bounded memory: 64-bit hashes in an open-addressing numpy table.

A Python dict of 16 million ids takes about 2.5 GB; this table takes 32 bytes a record (keys and
values, at most half full). Two different ids share a 64-bit hash with probability ~n^2 / 2^65
(3e-6 for 16 million ids).
"""

from __future__ import annotations

import hashlib

import numpy as np


def id_hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") or 1


class IdTable:
    """``id hash -> int`` (e.g. where the id was first seen); 0 marks an empty slot."""

    def __init__(self, capacity: int = 1 << 16) -> None:
        size = 1 << max(4, (2 * capacity - 1).bit_length())
        self.keys = np.zeros(size, np.uint64)
        self.values = np.zeros(size, np.int64)
        self.n = 0

    def __len__(self) -> int:
        return self.n

    def _slot(self, h: int) -> int:
        keys, mask = self.keys, len(self.keys) - 1
        i = h & mask
        while True:
            k = int(keys[i])
            if k == 0 or k == h:
                return i
            i = (i + 1) & mask

    def get(self, h: int) -> int | None:
        i = self._slot(h)
        return int(self.values[i]) if int(self.keys[i]) == h else None

    def put(self, h: int, value: int) -> None:
        i = self._slot(h)
        if int(self.keys[i]) == 0:
            self.n += 1
        self.keys[i], self.values[i] = h, value
        if 2 * self.n > len(self.keys):
            self._grow()

    def _grow(self) -> None:
        used = self.keys != 0
        keys, values = self.keys[used], self.values[used]
        self.keys = np.zeros(2 * len(self.keys), np.uint64)
        self.values = np.zeros(len(self.keys), np.int64)
        mask = np.uint64(len(self.keys) - 1)
        slots = keys & mask
        # place every key with linear probing, all at once: each round, the first key aiming at an
        # empty slot takes it, the others move one slot on
        todo = np.arange(len(keys))
        while len(todo):
            s = slots[todo]
            free = self.keys[s] == 0
            first = np.zeros(len(todo), dtype=bool)
            _, idx = np.unique(s, return_index=True)
            first[idx] = True
            take = free & first
            self.keys[s[take]] = keys[todo[take]]
            self.values[s[take]] = values[todo[take]]
            slots[todo[~take]] = (s[~take] + np.uint64(1)) & mask
            todo = todo[~take]

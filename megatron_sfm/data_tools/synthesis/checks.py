"""What a generated document must pass before it is kept.

Rejection reasons (counted in the manifest): ``empty``, ``too_short``, ``refusal``,
``quotes_option`` (shares a run of ``quote_ngram`` words with either option text),
``duplicate`` (same normalised text as a kept document), ``near_duplicate`` (MinHash
Jaccard estimate at or above ``near_dup_threshold`` with a kept document: the decisions of
datasketch's LSH, from a compact index of our own), ``contaminated`` (shares a
``decontam_ngram``-word run with a held-out question).
"""

from __future__ import annotations

import functools
import hashlib
import re
import zlib
from typing import Iterable, Optional, Sequence

import numpy as np

_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


def words(text: str) -> list[str]:
    """Lower-cased word tokens (punctuation and case do not hide a quotation)."""
    return _WORD.findall(text.lower())


def ngrams(tokens: Sequence[str], n: int) -> set[int]:
    """Hashes of every run of ``n`` tokens.

    Python's own (per-process salted) hash: the sets are only compared within one process.
    """
    tokens = tuple(tokens)
    return {hash(tokens[i:i + n]) for i in range(len(tokens) - n + 1)}


class HeldOutIndex:
    """The ``n``-grams of the held-out questions (scenario and both options)."""

    def __init__(self, texts: Iterable[str], n: int = 13):
        self.n = n
        self.grams: set[int] = set()
        for text in texts:
            self.grams |= ngrams(words(text), n)

    def contaminates(self, tokens: Sequence[str]) -> bool:
        return bool(self.grams) and not self.grams.isdisjoint(ngrams(tokens, self.n))


def stable_hash32(data: bytes) -> int:
    """Shingle hash that is the same in every process (CRC-32); the default of :class:`Deduplicator`."""
    return zlib.crc32(data)


_GROUP_DTYPES = (np.uint8, np.uint16, np.uint32, np.uint64)
_GROW_CHUNK = 1 << 16  # old slots reinserted at a time when a table doubles (bounds the scratch arrays)


class GroupTable:
    """A compact map from a 64-bit key (optionally with a second 64-bit word) to the smallest group stored under it.

    Open addressing with linear probing over numpy columns: ``keys`` (uint64), ``checks``
    (uint64, only with ``check_words=True``) and ``slots`` (group + 1; 0 marks an empty
    slot, so every 64-bit key value is usable). The slot column is as narrow as the
    largest group allows (uint8, widened on demand up to uint64). The table doubles when
    more than ``max_load`` of its slots are taken (at most 9 bytes per slot for 64-bit
    keys with groups below 255, 17 with a check word; 15 and 28 bytes per entry at 0.6
    load, twice that just after a doubling). Single-key operations go through
    memoryviews of the columns (Python ints, no numpy scalars); growth reinserts
    vectorised.
    """

    def __init__(self, check_words: bool = False, capacity: int = 1024, max_load: float = 0.6):
        if not 0.0 < max_load < 1.0:
            raise ValueError("max_load must be in (0, 1)")
        self.check_words = check_words
        self.max_load = max_load
        self.size = 0
        cap = 8
        while cap < capacity:
            cap *= 2
        self._set_columns(np.zeros(cap, np.uint64), np.zeros(cap, np.uint64) if check_words else None,
                          np.zeros(cap, np.uint8))

    def _set_columns(self, keys, checks, slots) -> None:
        self.keys, self.checks, self.slots = keys, checks, slots
        self.capacity = len(keys)
        self._mask = self.capacity - 1
        self._limit = int(self.capacity * self.max_load)
        self._k = memoryview(keys)
        self._c = memoryview(checks) if checks is not None else None
        self._s = memoryview(slots)
        self._group_limit = int(np.iinfo(slots.dtype).max)  # groups below this fit (stored as group + 1)

    @property
    def nbytes(self) -> int:
        """Bytes held by the columns."""
        return self.keys.nbytes + self.slots.nbytes + (self.checks.nbytes if self.checks is not None else 0)

    def __len__(self) -> int:
        return self.size

    def _find(self, key: int, check: int) -> int:
        """The slot holding ``(key, check)``, or the empty slot where it would go."""
        k, c, s, mask = self._k, self._c, self._s, self._mask
        i = key & mask
        if c is None:
            while s[i] and k[i] != key:
                i = (i + 1) & mask
        else:
            while s[i] and (k[i] != key or c[i] != check):
                i = (i + 1) & mask
        return i

    def get(self, key: int, check: int = 0) -> Optional[int]:
        """The smallest group stored under ``key`` (and ``check``), or None."""
        g = self._s[self._find(key, check)]
        return g - 1 if g else None

    def put(self, key: int, group: int, check: int = 0) -> None:
        """Store ``group`` under ``key`` (and ``check``) unless a smaller or equal group is there already."""
        if group < 0:
            raise ValueError(f"group must be >= 0, got {group}")
        if group >= self._group_limit:
            self._widen(group + 1)
        i = self._find(key, check)
        g = self._s[i]
        if g:
            if group + 1 < g:
                self._s[i] = group + 1
            return
        self._k[i] = key
        if self._c is not None:
            self._c[i] = check
        self._s[i] = group + 1
        self.size += 1
        if self.size > self._limit:
            self._grow()

    def _widen(self, value: int) -> None:
        for dtype in _GROUP_DTYPES:
            if value <= np.iinfo(dtype).max:
                break
        else:
            raise ValueError(f"group {value - 1} does not fit 64 bits")
        self._set_columns(self.keys, self.checks, self.slots.astype(dtype))

    def _grow(self) -> None:
        """Double the capacity and reinsert every entry, a chunk of the old slots at a time."""
        keys, checks, slots = self.keys, self.checks, self.slots
        cap = self.capacity * 2
        while self.size > cap * self.max_load:
            cap *= 2
        self._set_columns(np.zeros(cap, np.uint64), np.zeros(cap, np.uint64) if checks is not None else None,
                          np.zeros(cap, slots.dtype))
        for start in range(0, len(slots), _GROW_CHUNK):
            taken = np.flatnonzero(slots[start:start + _GROW_CHUNK]) + start
            self._place(keys[taken], checks[taken] if checks is not None else None, slots[taken])

    def _place(self, keys, checks, slots) -> None:
        """Put entries known to be absent (distinct keys), vectorised: one round per probe step."""
        mask = self._mask
        todo = np.arange(len(keys))
        pos = (keys & np.uint64(mask)).astype(np.int64)
        while len(todo):
            free = np.flatnonzero(self.slots[pos] == 0)
            # of the entries aiming at one free slot the first takes it; the others probe on
            _, first = np.unique(pos[free], return_index=True)
            won = free[first]
            at, entries = pos[won], todo[won]
            self.keys[at] = keys[entries]
            self.slots[at] = slots[entries]
            if checks is not None:
                self.checks[at] = checks[entries]
            left = np.ones(len(todo), bool)
            left[won] = False
            todo, pos = todo[left], (pos[left] + 1) & mask


@functools.cache
def lsh_bands(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows per band): the split datasketch's ``MinHashLSH(threshold, num_perm)`` chooses."""
    from datasketch import MinHashLSH

    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    return lsh.b, lsh.r


class Deduplicator:
    """Exact (hash of the normalised text) and near duplicates (MinHash LSH).

    Signatures are datasketch ``MinHash`` es (``num_perm`` permutations drawn once with
    seed 1, ``shingle``-word shingles hashed with ``hashfunc``: CRC-32 by default, so the
    decisions do not depend on the process). The index is our own and makes the decisions
    of datasketch's ``MinHashLSH(threshold, num_perm)``: the same bands (the split it
    chooses, :func:`lsh_bands`), each band's values hashed to a 64-bit key (blake2b of the
    band's number and values) and kept in a :class:`GroupTable` with the smallest group
    that stored it; a document is a near duplicate when one of its band keys is stored
    (by a smaller group, when ``group`` is given). Exact duplicates: the 16-byte blake2b
    digest of the normalised text, in a second table, same rule. About 100-210 bytes per
    kept document at the defaults (5 bands; the tables between doublings) where
    datasketch's index held about 1.9 KB. The one way to differ from datasketch, two
    different bands with the same 64-bit key, has a chance of about 1 in 10^4 over the
    paper's 15M documents.
    """

    def __init__(self, threshold: float = 0.8, num_perm: int = 64, shingle: int = 5, hashfunc=stable_hash32):
        self.threshold, self.num_perm, self.shingle = threshold, num_perm, shingle
        self.hashfunc = hashfunc
        # the same values as stable_hash32 without a Python frame per shingle
        self._shingle_hash = zlib.crc32 if hashfunc is stable_hash32 else hashfunc
        self.bands, self.rows = lsh_bands(threshold, num_perm)
        self._band_prefixes = [i.to_bytes(2, "little") for i in range(self.bands)]
        self.exact = GroupTable(check_words=True)  # normalised-text digest -> smallest group kept with it
        self.near = GroupTable()  # band key -> smallest group kept with it
        self._permutations = None  # drawn once, not per document
        self.kept = 0  # documents remembered

    @property
    def nbytes(self) -> int:
        """Bytes held by the index (both tables)."""
        return self.exact.nbytes + self.near.nbytes

    def minhash(self, tokens: Sequence[str]):
        """The datasketch ``MinHash`` of ``tokens`` (its shingles) that the index uses."""
        from datasketch import MinHash

        if self._permutations is None:
            m = MinHash(num_perm=self.num_perm, seed=1, hashfunc=self._shingle_hash)
            self._permutations, self._scheme = m.permutations, m.scheme
        else:
            m = MinHash(num_perm=self.num_perm, seed=1, hashfunc=self._shingle_hash,
                        permutations=self._permutations, scheme=self._scheme)
        n = self.shingle if len(tokens) >= self.shingle else max(1, len(tokens))
        m.update_batch([" ".join(tokens[i:i + n]).encode() for i in range(max(1, len(tokens) - n + 1))])
        return m

    def band_keys(self, hashvalues) -> list[int]:
        """One 64-bit key per band of a signature (the band's number is part of the hash)."""
        data = np.ascontiguousarray(hashvalues).tobytes()
        width = len(data) // len(hashvalues) * self.rows
        return [int.from_bytes(hashlib.blake2b(prefix + data[i * width:(i + 1) * width], digest_size=8).digest(),
                               "little")
                for i, prefix in enumerate(self._band_prefixes)]

    def check_and_add(self, tokens: Sequence[str], group: Optional[int] = None) -> Optional[str]:
        """None when new (and remember it); else ``duplicate`` or ``near_duplicate``.

        ``group`` (the cross-task pass of a merge: the task index, >= 0): only documents
        kept under a smaller group count, so documents of one group are never compared
        with each other; the document is remembered under ``group``. Without it every
        kept document counts (and the document is remembered under group 0).
        """
        if group is not None and group < 0:
            raise ValueError(f"group must be >= 0, got {group}")
        digest = hashlib.blake2b(" ".join(tokens).encode(), digest_size=16).digest()
        key, check = int.from_bytes(digest[:8], "little"), int.from_bytes(digest[8:], "little")
        earlier = self.exact.get(key, check)
        if earlier is not None and (group is None or earlier < group):
            return "duplicate"
        bands = self.band_keys(self.minhash(tokens).hashvalues)
        for band in bands:
            earlier = self.near.get(band)
            if earlier is not None and (group is None or earlier < group):
                return "near_duplicate"
        stored = group or 0
        self.exact.put(key, stored, check)
        for band in bands:
            self.near.put(band, stored)
        self.kept += 1
        return None


def is_refusal(text: str, patterns) -> bool:
    head = text.strip()[:300]
    return any(p.search(head) for p in patterns)


def quotes_option(tokens: Sequence[str], options: Sequence[str], n: int) -> bool:
    doc = ngrams(tokens, n)
    return any(not doc.isdisjoint(ngrams(words(option), n)) for option in options)


def first_rejection(text: Optional[str], *, options: Sequence[str], refusal_patterns, min_words: int,
                    quote_ngram: int, held_out: Optional[HeldOutIndex]) -> tuple[Optional[str], list[str]]:
    """The first reason to reject ``text`` before deduplication (None when it passes), and its words."""
    if text is None or not text.strip():
        return "empty", []
    if is_refusal(text, refusal_patterns):
        return "refusal", []
    tokens = words(text)
    if len(tokens) < min_words:
        return "too_short", tokens
    if quotes_option(tokens, options, quote_ngram):
        return "quotes_option", tokens
    if held_out is not None and held_out.contaminates(tokens):
        return "contaminated", tokens
    return None, tokens

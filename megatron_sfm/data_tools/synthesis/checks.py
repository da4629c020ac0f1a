"""What a generated document must pass before it is kept.

Rejection reasons (counted in the manifest): ``empty``, ``too_short``, ``refusal``,
``quotes_option`` (shares a run of ``quote_ngram`` words with either option text),
``duplicate`` (same normalised text as a kept document), ``near_duplicate`` (MinHash
Jaccard estimate at or above ``near_dup_threshold`` with a kept document; datasketch's
LSH), ``contaminated`` (shares a ``decontam_ngram``-word run with a held-out question).
"""

from __future__ import annotations

import hashlib
import re
import zlib
from array import array
from typing import Iterable, Optional, Sequence

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


def _hash32(data: bytes) -> int:
    """Shingle hash for MinHash: Python's (salted per process; the index never leaves it)."""
    return hash(data) & 0xFFFFFFFF


def stable_hash32(data: bytes) -> int:
    """Shingle hash that is the same in every process (CRC-32), for passes that must be reproducible."""
    return zlib.crc32(data)


class Deduplicator:
    """Exact (hash of the normalised text) and near duplicates (MinHash LSH).

    ``hashfunc`` hashes the shingles: Python's salted hash by default (fast; decisions
    can differ between processes only for pairs near the threshold), :func:`stable_hash32`
    where a rerun must make the same decisions.
    """

    def __init__(self, threshold: float = 0.8, num_perm: int = 64, shingle: int = 5, hashfunc=_hash32):
        from datasketch import MinHashLSH

        self.threshold, self.num_perm, self.shingle = threshold, num_perm, shingle
        self.hashfunc = hashfunc
        self.exact: dict[bytes, int] = {}  # normalised-text digest -> group of the kept document
        self.lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
        self._groups = array("I")  # LSH key (insertion number) -> group of the kept document
        self._permutations = None  # drawn once, not per document

    def _minhash(self, tokens: Sequence[str]):
        from datasketch import MinHash

        if self._permutations is None:
            m = MinHash(num_perm=self.num_perm, seed=1, hashfunc=self.hashfunc)
            self._permutations, self._scheme = m.permutations, m.scheme
        else:
            m = MinHash(num_perm=self.num_perm, seed=1, hashfunc=self.hashfunc, permutations=self._permutations,
                        scheme=self._scheme)
        n = self.shingle if len(tokens) >= self.shingle else max(1, len(tokens))
        m.update_batch([" ".join(tokens[i:i + n]).encode() for i in range(max(1, len(tokens) - n + 1))])
        return m

    def check_and_add(self, tokens: Sequence[str], group: Optional[int] = None) -> Optional[str]:
        """None when new (and remember it); else ``duplicate`` or ``near_duplicate``.

        ``group`` (the cross-task pass of a merge: the task index): only documents kept
        under a smaller group count, so documents of one group are never compared with
        each other; the document is remembered under ``group``. Without it every kept
        document counts.
        """
        key = hashlib.blake2b(" ".join(tokens).encode(), digest_size=16).digest()
        earlier = self.exact.get(key)
        if earlier is not None and (group is None or earlier < group):
            return "duplicate"
        m = self._minhash(tokens)
        hits = self.lsh.query(m)
        if hits and (group is None or any(self._groups[k] < group for k in hits)):
            return "near_duplicate"
        self.exact.setdefault(key, group or 0)
        self.lsh.insert(len(self._groups), m, check_duplication=False)
        self._groups.append(group or 0)
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

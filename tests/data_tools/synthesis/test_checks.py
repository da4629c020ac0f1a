"""``synthesis.checks``: the compact near-duplicate index against datasketch's ``MinHashLSH``."""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
import zlib

import numpy as np
import pytest
from datasketch import MinHash, MinHashLSH

import megatron_sfm
from megatron_sfm.data_tools.synthesis import checks
from megatron_sfm.data_tools.synthesis.checks import Deduplicator, GroupTable, lsh_bands, stable_hash32, words

VOCAB = [f"w{i}" for i in range(3000)]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(megatron_sfm.__file__)))


class ReferenceDeduplicator:
    """The index as it was: a dict of text digests and datasketch's MinHashLSH (keys: insertion numbers)."""

    def __init__(self, threshold=0.8, num_perm=64):
        self.exact: dict[bytes, int] = {}
        self.lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
        self.groups: list[int] = []

    def check_and_add(self, tokens, m, group=None):
        key = hashlib.blake2b(" ".join(tokens).encode(), digest_size=16).digest()
        earlier = self.exact.get(key)
        if earlier is not None and (group is None or earlier < group):
            return "duplicate"
        hits = self.lsh.query(m)
        if hits and (group is None or any(self.groups[k] < group for k in hits)):
            return "near_duplicate"
        self.exact.setdefault(key, group or 0)
        self.lsh.insert(len(self.groups), m, check_duplication=False)
        self.groups.append(group or 0)
        return None


def reference_minhash(tokens, num_perm=64, shingle=5):
    """datasketch's MinHash as the synthesis checks use it: seed 1, 5-word shingles, CRC-32."""
    m = MinHash(num_perm=num_perm, seed=1, hashfunc=zlib.crc32)
    n = shingle if len(tokens) >= shingle else max(1, len(tokens))
    m.update_batch([" ".join(tokens[i:i + n]).encode() for i in range(max(1, len(tokens) - n + 1))])
    return m


def corpus(n_docs=3000, groups=4, seed=0):
    """``(tokens, group, kind)`` in group order: fresh documents, and exact and near copies of earlier ones.

    Near copies replace 1 to 6 of about 150 words (Jaccard of the 5-word shingles from about
    0.94 down to about 0.67, which LSH finds from almost always to about one time in twenty),
    so many pairs sit where the band split decides; copies are of a document of the same or
    an earlier group, and of fresh documents or of copies.
    """
    rng = random.Random(seed)
    docs = []
    per_group = n_docs // groups
    for g in range(groups):
        for _ in range(per_group):
            r = rng.random()
            if docs and r < 0.15:
                tokens = list(rng.choice(docs)[0])
                kind = "exact"
            elif docs and r < 0.55:
                tokens = list(rng.choice(docs)[0])
                for p in rng.sample(range(len(tokens)), rng.randint(1, 6)):
                    tokens[p] = f"x{rng.randrange(10**6)}"
                kind = "near"
            else:
                tokens = [rng.choice(VOCAB) for _ in range(rng.randint(140, 160))]
                kind = "fresh"
            docs.append((tokens, g, kind))
    return docs


@pytest.fixture(scope="module")
def docs_and_signatures():
    docs = corpus()
    d = Deduplicator()
    signatures = [d.minhash(tokens) for tokens, _, _ in docs]
    return docs, signatures


def test_signatures_are_datasketchs_minhash_with_seed_1_and_crc32_shingles(docs_and_signatures):
    docs, signatures = docs_and_signatures
    for (tokens, _, _), m in list(zip(docs, signatures))[:50]:
        assert np.array_equal(m.hashvalues, reference_minhash(tokens).hashvalues)
    assert Deduplicator().hashfunc is stable_hash32
    assert lsh_bands(0.8, 64) == (MinHashLSH(threshold=0.8, num_perm=64).b, MinHashLSH(threshold=0.8, num_perm=64).r)


@pytest.mark.parametrize("grouped", [True, False], ids=["groups", "no-groups"])
def test_decisions_are_those_of_datasketchs_lsh(docs_and_signatures, grouped, monkeypatch):
    docs, signatures = docs_and_signatures
    ours, ref = Deduplicator(), ReferenceDeduplicator()
    cache = dict(zip((id(t) for t, _, _ in docs), signatures))
    monkeypatch.setattr(ours, "minhash", lambda tokens: cache[id(tokens)])  # the same signatures, computed once
    got, want = [], []
    for (tokens, g, _), m in zip(docs, signatures):
        group = g if grouped else None
        got.append(ours.check_and_add(tokens, group))
        want.append(ref.check_and_add(tokens, m, group))
    assert got == want
    assert ours.kept == len(ref.groups) == want.count(None)
    # the corpus can tell a wrong band split or group rule: every outcome occurs, and near
    # copies are both found and missed (pairs near the threshold)
    near = [w for w, (_, _, kind) in zip(want, docs) if kind == "near"]
    assert want.count("duplicate") > 100 and want.count("near_duplicate") > 300
    assert 200 < near.count(None) < len(near) - 200
    if grouped:  # copies within one group are kept
        assert any(w is None and kind == "exact" for w, (_, _, kind) in zip(want, docs))


def test_a_wrong_band_split_would_be_caught(docs_and_signatures, monkeypatch):
    # guards the test above: the same corpus through 6 bands of 10 rows decides differently
    docs, signatures = docs_and_signatures
    ours = Deduplicator()
    ours.bands, ours.rows, ours._salts = 6, 10, [i.to_bytes(16, "little") for i in range(6)]
    cache = dict(zip((id(t) for t, _, _ in docs), signatures))
    monkeypatch.setattr(ours, "minhash", lambda tokens: cache[id(tokens)])
    ref = ReferenceDeduplicator()
    assert [ours.check_and_add(t, g) for t, g, _ in docs] != [ref.check_and_add(t, m, g)
                                                              for (t, g, _), m in zip(docs, signatures)]


def test_the_group_rule():
    d = Deduplicator()
    rng = random.Random(1)
    base = [rng.choice(VOCAB) for _ in range(300)]
    near = base[:-1] + ["changed"]
    assert d.check_and_add(base, 3) is None
    assert d.check_and_add(base, 3) is None  # same group: never compared
    assert d.check_and_add(near, 3) is None
    assert d.check_and_add(base, 1) is None  # only a later group holds it: kept, and group 1 is now its smallest
    assert d.check_and_add(base, 2) == "duplicate"  # 1 < 2 (the first group to keep it, 3, would not count)
    assert d.check_and_add(near, 2) == "near_duplicate"  # its own text only under 3, but base under 1
    assert d.check_and_add(base, 0) is None  # nothing is smaller than 0
    assert d.check_and_add(base) == d.check_and_add(near) == "duplicate"  # no group: every kept document counts
    assert d.check_and_add(near + ["more"]) == "near_duplicate"
    assert d.kept == 5
    with pytest.raises(ValueError, match="group must be >= 0"):
        d.check_and_add(["a", "new", "document", "here", "now", "yes"], -1)


@pytest.mark.parametrize("chunk", [None, 5], ids=["one-chunk", "chunks-of-5"])
def test_growth_keeps_every_lookup(chunk, monkeypatch):
    if chunk:  # a doubling reinserts the old slots this many at a time
        monkeypatch.setattr(checks, "_GROW_CHUNK", chunk)
    rng = random.Random(2)
    t = GroupTable(capacity=8)
    want: dict[int, int] = {}
    # random keys, and keys that share their low 20 bits (one long probe run until the table is large)
    keys = [rng.getrandbits(64) for _ in range(6000)] + [j << 20 for j in range(1, 2000)] + [0, 2**64 - 1]
    rng.shuffle(keys)
    capacities = set()
    for n, k in enumerate(keys):
        g = rng.randrange(200)
        t.put(k, g)
        want[k] = min(g, want.get(k, g))
        if rng.random() < 0.1:  # a key again: the smaller group stays
            g2 = rng.randrange(200)
            t.put(k, g2)
            want[k] = min(want[k], g2)
        capacities.add(t.capacity)
        if n % 997 == 0:
            assert all(t.get(key) == grp for key, grp in want.items())
    assert len(capacities) >= 10 and len(t) == len(want) <= t.capacity * t.max_load
    assert all(t.get(key) == grp for key, grp in want.items())
    assert all(t.get(k) is None for k in (rng.getrandbits(64) for _ in range(2000)) if k not in want)
    assert t.get(2000 << 20) is None
    # wider groups: the column widens, the entries stay
    t.put(5, 300)
    t.put(6, 70000)
    t.put(0, 0)
    assert t.slots.dtype == np.uint32 and t.get(5) == 300 and t.get(6) == 70000 and t.get(0) == 0
    assert all(t.get(key) == grp for key, grp in want.items() if key not in (0, 5, 6))


def test_check_words_tell_keys_apart():
    t = GroupTable(check_words=True, capacity=8)
    for c in range(100):
        t.put(7, c, check=c)  # one key, a hundred check words: a hundred entries
    assert len(t) == 100 and t.capacity >= 128
    assert [t.get(7, c) for c in range(100)] == list(range(100))
    assert t.get(7, 100) is None and t.get(8, 0) is None


def test_default_decisions_do_not_depend_on_the_process():
    # near copies at Jaccard about 0.81, which LSH finds about one time in three: Python's
    # salted hash for the shingles would decide differently per PYTHONHASHSEED
    code = ("import json, random\n"
            "from megatron_sfm.data_tools.synthesis.checks import Deduplicator\n"
            "d, out = Deduplicator(), []\n"
            "for i in range(40):\n"
            "    rng = random.Random(i)\n"
            "    base = [f'w{rng.randrange(2000)}' for _ in range(100)]\n"
            "    out.append(d.check_and_add(base))\n"
            "    out.append(d.check_and_add(base[:30] + ['x'] + base[31:70] + ['y'] + base[71:]))\n"
            "print(json.dumps(out))\n")
    results = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                              env=dict(os.environ, PYTHONHASHSEED=seed, PYTHONPATH=ROOT)).stdout
               for seed in ("1", "2", "3")]
    assert results[0] == results[1] == results[2]
    assert 0 < json.loads(results[0]).count("near_duplicate") < 40


def test_words_then_check_and_add_ignores_case_and_punctuation():
    d = Deduplicator()
    text = " ".join(random.Random(3).choice(VOCAB) for _ in range(100))
    assert d.check_and_add(words(text)) is None
    assert d.check_and_add(words(text.upper() + "!")) == "duplicate"

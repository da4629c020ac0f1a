"""Near-duplicate index of synthesis: datasketch's MinHashLSH (before) vs our compact GroupTable index.

    python benchmarks/bench_dedup_index.py [--docs 40000] [--words 550] [--reps 3] [--json OUT]

Documents: ``--docs`` token lists of about ``--words`` words (a 20,000-word vocabulary),
of which about 10% are exact copies and 20% near copies (1 to 6 words replaced) of an
earlier document; one group (as in one synthesize process). Measured, one process:

* ``index``: the index alone, from signatures computed beforehand: documents per second
  (median of ``--reps``) and bytes per kept document (``tracemalloc``: what the index
  holds after the last document, and the peak while building it, over the kept count).
  "before" is the index as it was (a dict of 16-byte text digests, ``MinHashLSH``
  holding the band bytes, an array of groups), "after" is
  :class:`~megatron_sfm.data_tools.synthesis.checks.Deduplicator` (two GroupTables).
  Both decide every document; the decisions must be identical (checked).
* ``pipeline``: ``check_and_add`` on the tokens (MinHash included), documents per second:
  before with Python's salted shingle hash (the former default of one synthesize process),
  before with CRC-32 (the merge), after (CRC-32, the default now).
* a paper-scale estimate (14.9M kept documents) from the table sizes the after-index
  would have then.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import platform
import statistics
import sys
import time
import tracemalloc
import zlib
from array import array
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from megatron_sfm.data_tools.synthesis.checks import Deduplicator, lsh_bands

PAPER_DOCS = 14_900_000


def salted_hash32(data: bytes) -> int:
    """The former default shingle hash (Python's, salted per process)."""
    return hash(data) & 0xFFFFFFFF


class BeforeDeduplicator:
    """The index as it was (checks.py before this change): digests in a dict, datasketch's MinHashLSH."""

    def __init__(self, threshold=0.8, num_perm=64, shingle=5, hashfunc=salted_hash32):
        from datasketch import MinHashLSH

        self.num_perm, self.shingle, self.hashfunc = num_perm, shingle, hashfunc
        self.exact: dict[bytes, int] = {}
        self.lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
        self._groups = array("I")
        self._permutations = None

    def minhash(self, tokens):
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

    def check_and_add(self, tokens, group=None):
        key = hashlib.blake2b(" ".join(tokens).encode(), digest_size=16).digest()
        earlier = self.exact.get(key)
        if earlier is not None and (group is None or earlier < group):
            return "duplicate"
        m = self.minhash(tokens)
        hits = self.lsh.query(m)
        if hits and (group is None or any(self._groups[k] < group for k in hits)):
            return "near_duplicate"
        self.exact.setdefault(key, group or 0)
        self.lsh.insert(len(self._groups), m, check_duplication=False)
        self._groups.append(group or 0)
        return None


def make_docs(n: int, words: int, seed: int = 0) -> list[list[str]]:
    rng = np.random.default_rng(seed)
    vocab = np.array([f"w{i}" for i in range(20_000)], dtype=object)
    docs: list[list[str]] = []
    for i in range(n):
        r = rng.random()
        if docs and r < 0.10:
            docs.append(list(docs[rng.integers(len(docs))]))
        elif docs and r < 0.30:
            tokens = list(docs[rng.integers(len(docs))])
            for p in rng.choice(len(tokens), size=int(rng.integers(1, 7)), replace=False):
                tokens[p] = f"x{i}_{p}"
            docs.append(tokens)
        else:
            docs.append(vocab[rng.integers(0, len(vocab), size=int(rng.integers(words * 9 // 10, words * 11 // 10)))]
                        .tolist())
    return docs


def with_signatures(dedup, signatures: dict):
    """``dedup`` taking its MinHashes from ``signatures`` (by the id of the token list)."""
    dedup.minhash = lambda tokens: signatures[id(tokens)]
    return dedup


def run_index(make, docs, signatures):
    d = with_signatures(make(), signatures)
    t = time.perf_counter()
    decisions = [d.check_and_add(tokens) for tokens in docs]
    return time.perf_counter() - t, decisions, d


def measure_memory(make, docs, signatures) -> tuple[int, int, int | None]:
    """Bytes the index holds after every document, at most while they went in (tracemalloc), and its own count."""
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    d = with_signatures(make(), signatures)
    for tokens in docs:
        d.check_and_add(tokens)
    gc.collect()
    current, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return current - base, peak - base, getattr(d, "nbytes", None)


def paper_scale(bands: int, docs: int = PAPER_DOCS) -> dict:
    """The after-index's table sizes with ``docs`` kept (groups below 255: one byte per slot)."""
    def capacity(entries):
        cap = 1024
        while entries > int(cap * 0.6):
            cap *= 2
        return cap
    near, exact = capacity(bands * docs) * 9, capacity(docs) * 17
    # a doubling holds the old and the new band table at once
    return {"near_table_bytes": near, "exact_table_bytes": exact, "total_bytes": near + exact,
            "bytes_per_doc": (near + exact) / docs, "peak_while_doubling_bytes": near + near // 2 + exact}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=40_000)
    ap.add_argument("--words", type=int, default=550)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--pipeline-docs", type=int, default=5_000, help="documents for the MinHash-included rows")
    ap.add_argument("--json", help="write the results here too")
    args = ap.parse_args()

    t = time.perf_counter()
    docs = make_docs(args.docs, args.words)
    print(f"{len(docs)} documents of about {args.words} words made in {time.perf_counter() - t:.1f}s", flush=True)
    after_proto = Deduplicator()
    t = time.perf_counter()
    signatures = {id(tokens): after_proto.minhash(tokens) for tokens in docs}
    print(f"signatures (CRC-32 shingles) in {time.perf_counter() - t:.1f}s", flush=True)
    variants = {"before": lambda: BeforeDeduplicator(hashfunc=zlib.crc32), "after": Deduplicator}

    results: dict = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "python": platform.python_version(),
                     "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                     "docs": len(docs), "words": args.words, "bands_rows": lsh_bands(0.8, 64), "index": {},
                     "pipeline": {}}
    decisions = {}
    for name, make in variants.items():
        times = []
        for _ in range(args.reps):
            elapsed, decisions[name], d = run_index(make, docs, signatures)
            times.append(elapsed)
            del d
            gc.collect()
        held, peak, nbytes = measure_memory(make, docs, signatures)
        kept = decisions[name].count(None)
        results["index"][name] = {"docs_per_s": len(docs) / statistics.median(times), "kept": kept,
                                  "bytes_per_kept": held / kept, "peak_bytes_per_kept": peak / kept,
                                  "table_bytes_per_kept": nbytes / kept if nbytes is not None else None,
                                  "near_duplicate": decisions[name].count("near_duplicate"),
                                  "duplicate": decisions[name].count("duplicate")}
        print(f"index {name:6s}: {results['index'][name]['docs_per_s']:9.0f} docs/s, "
              f"{held / kept:6.0f} B/kept doc held, {peak / kept:6.0f} B peak"
              + (f", tables {nbytes / kept:.0f} B " if nbytes is not None else " ")
              +
              f"(kept {kept}, duplicate {decisions[name].count('duplicate')}, "
              f"near {decisions[name].count('near_duplicate')})", flush=True)
    same = decisions["before"] == decisions["after"]
    results["identical_decisions"] = same
    print(f"identical decisions: {same}")

    subset = docs[:args.pipeline_docs]
    pipelines = {"before_salted": lambda: BeforeDeduplicator(hashfunc=salted_hash32),
                 "before_crc32": lambda: BeforeDeduplicator(hashfunc=zlib.crc32), "after_crc32": Deduplicator}
    timing = {name: [] for name in pipelines}
    for _ in range(args.reps):  # interleaved, so that load from elsewhere falls on all alike
        for name, make in pipelines.items():
            d = make()
            d.check_and_add(["warm", "up"])
            t = time.perf_counter()
            for tokens in subset:
                d.check_and_add(tokens)
            timing[name].append(time.perf_counter() - t)
    for name, times in timing.items():
        med = statistics.median(times)
        results["pipeline"][name] = {"docs_per_s": len(subset) / med, "us_per_doc": med / len(subset) * 1e6}
        print(f"pipeline {name:13s}: {len(subset) / med:7.0f} docs/s ({med / len(subset) * 1e6:5.0f} us/doc, "
              f"{len(subset)} docs, median of {args.reps})")

    results["paper_scale"] = paper_scale(lsh_bands(0.8, 64)[0])
    ps = results["paper_scale"]
    before_gb = results["index"]["before"]["bytes_per_kept"] * PAPER_DOCS / 1e9
    print(f"paper scale ({PAPER_DOCS / 1e6:.1f}M kept): after {ps['total_bytes'] / 1e9:.2f} GB "
          f"({ps['bytes_per_doc']:.0f} B/doc; {ps['peak_while_doubling_bytes'] / 1e9:.2f} GB while the band table "
          f"doubles), before about {before_gb:.0f} GB at the measured bytes per document")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()

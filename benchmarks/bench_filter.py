"""Filter speed: our Aho-Corasick matcher vs a datatrove-RegexFilter-style alternation regex.

    python benchmarks/bench_filter.py [--mb 64] [--regex-mb 2]

Both sides use the shipped term lists and apply the same rules (instant categories and
the two-stage rule) to the same in-memory documents, one process (= one worker). The
regex side reproduces datatrove's ``RegexFilter`` approach (one compiled alternation,
``re.IGNORECASE``, word boundaries) extended to report which terms matched, since the
two-stage rule needs them; datatrove itself is not a dependency (``--datatrove-path``
times its real ``RegexFilter`` when installed in a side folder). Documents come from
bench_data_corpus.py. Our matcher is timed with its default backend (ahocorasick-rs when
installed) and with pyahocorasick. A last row times the full ``run_filter`` on a JSONL
shard (read, classify, write kept/flagged) with 1 worker, ``--reps`` times (median).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_data_corpus import make_documents, sentence_pool
from megatron_sfm.data_tools.filter import DiscourseFilter, TermLists, run_filter


class RegexRules:
    """One alternation over every term (longest first), word-bounded, case-insensitive."""

    def __init__(self, lists: TermLists):
        self.lists = lists
        self.category = {}
        for cat, terms in lists.categories.items():
            for t in terms:
                self.category.setdefault(t.lower(), set()).add(cat)
        alts = sorted(self.category, key=len, reverse=True)
        self.regex = re.compile(r"(?<!\w)(?:" + "|".join(re.escape(t) for t in alts) + r")(?!\w)", re.IGNORECASE)

    def flagged(self, text: str) -> bool:
        cats = set()
        for m in self.regex.finditer(text):
            cats |= self.category.get(m.group(0).lower(), set())
        if cats & set(self.lists.instant):
            return True
        return self.lists.entity in cats and bool(cats & set(self.lists.negative))


def rate(fn, docs) -> tuple[float, float, int]:
    """(wall MB/s, MB per CPU-second of this process, flagged count). On a shared machine the
    CPU-time rate is what one uncontended worker would do."""
    nbytes = sum(len(d.encode("utf-8")) for d in docs)
    t0, c0 = time.perf_counter(), time.process_time()
    flagged = sum(1 for d in docs if fn(d))
    return nbytes / (time.perf_counter() - t0) / 1e6, nbytes / (time.process_time() - c0) / 1e6, flagged


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=float, default=64, help="MB of text for the Aho-Corasick run")
    ap.add_argument("--regex-mb", type=float, default=2, help="MB of text for the (slow) regex run")
    ap.add_argument("--reps", type=int, default=5, help="run_filter repetitions (median reported)")
    ap.add_argument("--datatrove-path", default=None,
                    help="folder where datatrove is installed (pip install --no-deps --target DIR datatrove loguru humanize)")
    args = ap.parse_args()
    pool = sentence_pool()
    docs = make_documents(int(args.mb * 1e6), seed=1, pool=pool)
    lists = TermLists.load()
    ac = DiscourseFilter(lists)  # default backend: ahocorasick-rs when installed
    py_ac = DiscourseFilter(lists, backend="pyahocorasick")
    rx = RegexRules(lists)
    small = docs[: max(1, int(len(docs) * args.regex_mb / args.mb))]
    # the implementations agree on the sample
    disagree = sum((ac.classify(d) is not None) != rx.flagged(d) for d in small)
    backends_disagree = sum((ac.classify(d) is not None) != (py_ac.classify(d) is not None) for d in docs)
    ac_rate, ac_cpu, ac_flagged = rate(lambda d: ac.classify(d) is not None, docs)
    py_rate, py_cpu, _ = rate(lambda d: py_ac.classify(d) is not None, docs)
    rx_rate, rx_cpu, _ = rate(rx.flagged, small)
    real = {}
    if args.datatrove_path:
        sys.path.insert(0, args.datatrove_path)
        from datatrove.data import Document
        from datatrove.pipeline.filters import RegexFilter

        # the real RegexFilter with one alternation of every term: it stops at the first
        # match (so it cannot apply the two-stage rule) and is a lower bound on its cost
        dt = RegexFilter("(?i)" + rx.regex.pattern)
        dt_docs = [Document(text=d, id=str(i)) for i, d in enumerate(small)]
        t0, c0 = time.perf_counter(), time.process_time()
        for d in dt_docs:
            dt.filter(d)
        nbytes = sum(len(d.encode()) for d in small)
        real = {"datatrove_regexfilter_mb_s": round(nbytes / (time.perf_counter() - t0) / 1e6, 2),
                "datatrove_regexfilter_mb_per_cpu_s": round(nbytes / (time.process_time() - c0) / 1e6, 2)}
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        shard = Path(tmp) / "shard.jsonl"
        with open(shard, "w", encoding="utf-8") as f:
            for i, d in enumerate(docs):
                f.write(json.dumps({"id": i, "text": d}, ensure_ascii=False) + "\n")
        for _ in range(args.reps):
            shutil.rmtree(Path(tmp) / "out", ignore_errors=True)
            t0, c0 = time.perf_counter(), time.process_time()
            report = run_filter([shard], Path(tmp) / "out", workers=1, progress=False)
            runs.append((report["bytes"] / (time.perf_counter() - t0) / 1e6, report["bytes"] / (time.process_time() - c0) / 1e6))
    full_rate = statistics.median(r[0] for r in runs)
    full_cpu = statistics.median(r[1] for r in runs)
    result = {
        "machine": f"{platform.node()} {platform.processor() or platform.machine()}, Python {platform.python_version()}",
        "documents": len(docs),
        "text_mb": round(sum(len(d.encode()) for d in docs) / 1e6, 1),
        "flag_rate": round(ac_flagged / len(docs), 4),
        "load_average": os.getloadavg()[0],
        "matcher_backend": ac.backend,
        "aho_corasick_mb_s": round(ac_rate, 1),
        "aho_corasick_mb_per_cpu_s": round(ac_cpu, 1),
        "pyahocorasick_mb_s": round(py_rate, 1),
        "pyahocorasick_mb_per_cpu_s": round(py_cpu, 1),
        "backends_disagree": backends_disagree,
        "regex_alternation_mb_s": round(rx_rate, 2),
        "regex_alternation_mb_per_cpu_s": round(rx_cpu, 2),
        "speedup_cpu": round(ac_cpu / rx_cpu, 1),
        "run_filter_jsonl_1_worker_mb_s": round(full_rate, 1),
        "run_filter_jsonl_1_worker_mb_per_cpu_s": round(full_cpu, 1),
        "run_filter_runs_mb_s_and_mb_per_cpu_s": [[round(a, 1), round(b, 1)] for a, b in runs],
        **real,
        "disagreements_on_regex_sample": disagree,
        "regex_sample_docs": len(small),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

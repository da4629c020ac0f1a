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

``--whole-process-mb N`` (with ``--only-whole-process`` to skip the rest) times whole
processes instead, start-up included, on an N MB JSONL from bench_data_corpus.py,
``--reps`` paired runs with the order alternating: ``sfm data filter SHARD --out DIR
--no-progress`` (1 worker) beside a bare pyahocorasick script (read lines, orjson, lower
case, flag a document when any term occurs anywhere, write kept/flagged lines; no word
boundaries and no two-stage rule, so a lower bound on a filter's cost).
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


BARE_PYAHOCORASICK = r"""
import json, sys, ahocorasick, orjson
terms_file, shard, out = sys.argv[1:4]
automaton = ahocorasick.Automaton()
for term in json.load(open(terms_file)):
    automaton.add_word(term, term)
automaton.make_automaton()
with open(shard, "rb") as f, open(out + ".kept.jsonl", "wb") as kept, open(out + ".flagged.jsonl", "wb") as flagged:
    for line in f:
        text = orjson.loads(line)["text"].lower()
        (flagged if next(automaton.iter(text), None) is not None else kept).write(line)
"""


def whole_process(args) -> dict:
    """Paired whole-process runs: `sfm data filter` vs the bare pyahocorasick script."""
    import subprocess

    from bench_data_corpus import write_jsonl

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    shard = work / f"corpus_{args.whole_process_mb:g}mb.jsonl"
    if not shard.exists():
        write_jsonl(shard, int(args.whole_process_mb * 1e6))
    terms = sorted({t.lower() for ts in TermLists.load().categories.values() for t in ts})
    (work / "terms.json").write_text(json.dumps(terms))
    commands = {
        "sfm_data_filter": [sys.executable, "-m", "megatron_sfm.cli", "data", "filter", str(shard), "--out",
                            str(work / "filter_out"), "--no-progress"],
        "bare_pyahocorasick": [sys.executable, "-c", BARE_PYAHOCORASICK, str(work / "terms.json"), str(shard),
                               str(work / "bare")],
    }
    import resource

    size = shard.stat().st_size
    runs = []
    for rep in range(args.reps):
        for name in (list(commands) if rep % 2 == 0 else list(commands)[::-1]):
            shutil.rmtree(work / "filter_out", ignore_errors=True)
            r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
            t0 = time.perf_counter()
            subprocess.run(commands[name], check=True, stdout=subprocess.DEVNULL)
            wall = time.perf_counter() - t0
            r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
            runs.append({"rep": rep, "path": name, "s": round(wall, 2), "cpu_s": round(cpu, 2),
                         "load": round(os.getloadavg()[0], 1)})
    med = {name: {"s": statistics.median(r["s"] for r in runs if r["path"] == name),
                  "cpu_s": statistics.median(r["cpu_s"] for r in runs if r["path"] == name)} for name in commands}
    return {"corpus_mb": round(size / 1e6, 1), "runs": runs, "median": med}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--whole-process-mb", type=float, default=0, help="also time whole processes on an N MB JSONL")
    ap.add_argument("--only-whole-process", action="store_true")
    ap.add_argument("--workdir", default="/tmp/sfm_bench_filter")
    ap.add_argument("--mb", type=float, default=64, help="MB of text for the Aho-Corasick run")
    ap.add_argument("--regex-mb", type=float, default=2, help="MB of text for the (slow) regex run")
    ap.add_argument("--reps", type=int, default=5, help="run_filter repetitions (median reported)")
    ap.add_argument("--datatrove-path", default=None,
                    help="folder where datatrove is installed (pip install --no-deps --target DIR datatrove loguru humanize)")
    args = ap.parse_args()
    if args.only_whole_process:
        print(json.dumps({"load_average_before": os.getloadavg(), **whole_process(args),
                          "load_average_after": os.getloadavg()}, indent=2))
        return
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
    if args.whole_process_mb:
        result["whole_process"] = whole_process(args)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

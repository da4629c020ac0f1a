"""Tokenize speed: `sfm data tokenize` vs Megatron-LM's paths, on one machine, same JSONL and tokenizer.

    python benchmarks/bench_tokenize.py --mb 500 --workers 2 [--reps 3] [--megatron-lm DIR] [--legacy-mb 20]

* ours: ``sfm data tokenize CORPUS --tokenizer TOK --out PREFIX --workers N`` (wall time of
  the whole command, imports included; default numpy writer, no Megatron-Core/torch import).
* ours_megatron_writer: the same with ``--writer megatron`` (Megatron-Core's
  ``IndexedDatasetBuilder``; pays the ~5 CPU-second Megatron-Core/torch import as the peer does).
* peer: the path of Megatron-LM main's ``tools/preprocess_data_fast.py`` (which needs
  Python 3.12 and a newer Megatron-Core), redone here: gigatoken ``encode_files`` over the
  whole JSONL (parallel, Rust), then the EOD inserted per document with numpy and written
  through ``IndexedDatasetBuilder`` as main's ``add_documents`` does.
* Each path runs ``--reps`` times, the order alternating between repetitions; wall MB/s and
  MB per CPU-second (user + sys of the command and its children) per run, and medians.
* legacy (with ``--megatron-lm DIR``, a checkout of tag core_v0.16.1 holding
  ``tools/preprocess_data.py``; never committed here): run on the first ``--legacy-mb`` MB
  of the corpus with ``--workers N``; our output on the same file must be byte-identical.

Corpus: bench_data_corpus.py (docstring prose). Tokenizer: a byte-level BPE in the
GPT-NeoX layout, vocabulary 50,277, trained on 30 MB of the corpus (cached in --workdir).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_data_corpus import write_jsonl

PEER = r"""
import sys, time, numpy as np, warnings
warnings.simplefilter("ignore")
t0 = time.perf_counter()
import gigatoken as gt, awkward as ak
from megatron.core.datasets import indexed_dataset
corpus, tok_json, prefix = sys.argv[1:4]
tok = gt.Tokenizer(tok_json)
docs = tok.encode_files(gt.JsonlFileSource([corpus], field="text"), parallel=True)
vocab = tok.vocab_size
dtype = indexed_dataset.DType.optimal_dtype(vocab)
b = indexed_dataset.IndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
eod = 0
for start in range(0, len(docs), 1_000_000):
    chunk = docs[start:start + 1_000_000]
    flat = np.asarray(ak.flatten(chunk), dtype=dtype)
    lens = np.asarray(ak.num(chunk, axis=1))
    flat = np.insert(flat, np.cumsum(lens), eod).astype(dtype, copy=False)
    lens = lens + 1
    b.data_file.write(flat.tobytes(order="C"))
    off = len(b.sequence_lengths)
    b.sequence_lengths.extend(lens.tolist())
    b.document_indices.extend((off + np.arange(1, len(lens) + 1)).tolist())
b.finalize(prefix + ".idx")
print(time.perf_counter() - t0)
"""


CPU: dict[str, float] = {}


def timed(cmd, env=None, cwd=None, name: str = "") -> float:
    """Wall seconds of a command; its CPU seconds (user + sys, children included) go to CPU[name].

    On a shared machine the CPU seconds say what the command costs regardless of
    contention; wall seconds are what a user waits."""
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    CPU[name] = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    return wall


def same(a: str, b: str) -> bool:
    return all(Path(a + s).read_bytes() == Path(b + s).read_bytes() for s in (".bin", ".idx"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=float, default=500)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--workdir", default="/tmp/sfm_bench_tokenize")
    ap.add_argument("--megatron-lm", default=None)
    ap.add_argument("--legacy-mb", type=float, default=20)
    ap.add_argument("--peer-first", action="store_true", help="run the peer path before ours in the first repetition")
    ap.add_argument("--reps", type=int, default=3, help="repetitions of each path (order alternates)")
    ap.add_argument("--paths", default="all", help="comma-separated subset of: ours, ours_megatron_writer, peer_gigatoken")
    args = ap.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    corpus = work / f"corpus_{int(args.mb)}mb.jsonl"
    if not corpus.exists():
        write_jsonl(corpus, int(args.mb * 1e6))
    tok_dir = work / "tok50k"
    if not (tok_dir / "tokenizer.json").exists():
        from megatron_sfm.data_tools.documents import iter_records
        from megatron_sfm.data_tools.tokenizer import train_bpe_tokenizer

        def sample():
            n = 0
            for r in iter_records(corpus):
                yield r.doc["text"]
                n += len(r.doc["text"])
                if n > 30e6:
                    return

        train_bpe_tokenizer(sample(), 50277, tok_dir)
    size = corpus.stat().st_size
    env = dict(os.environ, RAYON_NUM_THREADS=str(args.workers), TOKENIZERS_PARALLELISM="false")
    res = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
           "load_average_before": os.getloadavg()[0], "corpus_mb": round(size / 1e6, 1), "workers": args.workers,
           "runs": []}

    ours, ours_m, peer = str(work / "ours"), str(work / "ours_megatron_writer"), str(work / "peer")
    sfm = [sys.executable, "-m", "megatron_sfm.cli", "data", "tokenize", str(corpus), "--tokenizer", str(tok_dir),
           "--workers", str(args.workers), "--no-progress"]
    paths = {
        "ours": sfm + ["--out", ours],
        "ours_megatron_writer": sfm + ["--out", ours_m, "--writer", "megatron"],
        "peer_gigatoken": [sys.executable, "-c", PEER, str(corpus), str(tok_dir / "tokenizer.json"), peer],
    }
    names = list(paths) if args.paths == "all" else args.paths.split(",")
    for rep in range(args.reps):
        # alternate the order between repetitions: on a shared machine, position matters
        order = names if (rep % 2 == 0) != args.peer_first else names[::-1]
        for name in order:
            t = timed(paths[name], env=env, name=name)
            res["runs"].append({"rep": rep, "path": name, "s": round(t, 2), "mb_s": round(size / t / 1e6, 1),
                                "cpu_s": round(CPU[name], 2), "mb_per_cpu_s": round(size / CPU[name] / 1e6, 1),
                                "load": round(os.getloadavg()[0], 1)})
    res["median"] = {}
    for name in names:
        runs = [r for r in res["runs"] if r["path"] == name]
        res["median"][name] = {"mb_s": statistics.median(r["mb_s"] for r in runs),
                               "mb_per_cpu_s": statistics.median(r["mb_per_cpu_s"] for r in runs)}
    if "ours" in names and "peer_gigatoken" in names:
        res["ours_identical_to_peer"] = same(ours, peer)
    if "ours_megatron_writer" in names and "peer_gigatoken" in names:
        res["ours_megatron_writer_identical_to_peer"] = same(ours_m, peer)
    small = corpus
    if args.megatron_lm:
        small = work / f"corpus_{args.legacy_mb:g}mb.jsonl"
        with open(corpus, "rb") as fin, open(small, "wb") as fout:
            n = 0
            for line in fin:
                fout.write(line)
                n += len(line)
                if n >= args.legacy_mb * 1e6:
                    break
        legacy = str(work / "legacy")
        t = timed([sys.executable, "tools/preprocess_data.py", "--input", str(small), "--output-prefix", legacy,
                   "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", str(tok_dir), "--append-eod",
                   "--workers", str(args.workers), "--log-interval", "100000000"], env=env, cwd=args.megatron_lm, name="legacy")
        sz = small.stat().st_size
        res["legacy_mb"] = round(sz / 1e6, 1)
        res["legacy_preprocess_data_s"], res["legacy_mb_s"] = round(t, 1), round(sz / t / 1e6, 2)
        ours_small = str(work / "ours_small")
        t = timed([sys.executable, "-m", "megatron_sfm.cli", "data", "tokenize", str(small), "--tokenizer", str(tok_dir),
                   "--out", ours_small, "--workers", str(args.workers), "--no-progress"], env=env, name="ours_small")
        res["ours_small_mb_s"] = round(sz / t / 1e6, 1)
        res["ours_identical_to_legacy"] = same(ours_small, legacy + "_text_document")
        res["legacy_cpu_s"] = round(CPU["legacy"], 1)
        res["legacy_mb_per_cpu_s"] = round(sz / CPU["legacy"] / 1e6, 2)
    res["load_average_after"] = os.getloadavg()[0]
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()

"""Tokenize speed: `sfm data tokenize` vs Megatron-LM main's gigatoken path, whole process, paired runs.

    python benchmarks/bench_tokenize.py --mb 100 --workers 1,2 [--reps 5] [--paths ...]
        [--megatron-lm DIR] [--legacy-mb 20]

Every path is one command, timed from process start to exit (imports included), with
``--workers N`` processes / ``RAYON_NUM_THREADS=N`` threads:

* ``ours``: ``sfm data tokenize CORPUS --tokenizer TOK --out PREFIX --workers N`` (the
  default writer: numpy, no Megatron-Core/torch import).
* ``peer``: Megatron-LM main's ``tools/preprocess_data_fast.py`` path (it needs Python
  3.12 and a newer Megatron-Core), redone here without importing megatron or torch:
  gigatoken ``encode_files`` over the whole JSONL (Rust JSON reader, parallel), the EOD
  inserted per document with numpy, and the ``MMIDIDX`` ``.bin``/``.idx`` written with
  numpy (a few lines, below). This is the fastest form of that path.
* ``ours_megatron_writer`` / ``peer_megatron_writer`` (opt in with ``--paths``): the same
  through Megatron-Core's ``IndexedDatasetBuilder`` (both pay the Megatron-Core/torch import).

For each worker count, each repetition runs every path back to back, the order
alternating between repetitions (on a shared machine, position matters), so each
``ours``/``peer`` pair ran under about the same load; the speed-up is the median of the
per-pair ratios peer_s / ours_s. Also reported per run: MB per CPU-second (user + sys of
the command and its children: what one busy core sustains, whatever the contention) and
the 1-minute load average. All outputs are compared byte for byte.

legacy (with ``--megatron-lm DIR``, a checkout of tag core_v0.16.1 holding
``tools/preprocess_data.py``; never committed here): run on the first ``--legacy-mb`` MB
of the corpus; our output on the same file must be byte-identical.

Corpus: bench_data_corpus.py (docstring prose). Tokenizer: a byte-level BPE in the
GPT-NeoX layout (vocabulary about 50k) trained on 30 MB of the corpus (cached in --workdir).
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
import sys, struct, numpy as np
import gigatoken as gt, awkward as ak
corpus, tok_json, prefix = sys.argv[1:4]
tok = gt.Tokenizer(tok_json)
docs = tok.encode_files(gt.JsonlFileSource([corpus], field="text"), parallel=True)
dtype = np.uint16 if tok.vocab_size < 65500 else np.int32
eod = 0
lengths = []
with open(prefix + ".bin", "wb") as f:
    for start in range(0, len(docs), 1_000_000):
        chunk = docs[start:start + 1_000_000]
        flat = np.asarray(ak.flatten(chunk), dtype=dtype)
        lens = np.asarray(ak.num(chunk, axis=1), dtype=np.int64)
        f.write(np.insert(flat, np.cumsum(lens), eod).astype(dtype, copy=False).tobytes())
        lengths.append(lens + 1)
lens = np.concatenate(lengths) if lengths else np.zeros(0, np.int64)
pointers = np.zeros(len(lens), np.int64)
np.cumsum(lens[:-1] * np.dtype(dtype).itemsize, out=pointers[1:])
with open(prefix + ".idx", "wb") as f:
    f.write(b"MMIDIDX\x00\x00" + struct.pack("<QBQQ", 1, 8 if dtype == np.uint16 else 4, len(lens), len(lens) + 1))
    f.write(lens.astype(np.int32).tobytes() + pointers.tobytes() + np.arange(len(lens) + 1, dtype=np.int64).tobytes())
"""

PEER_MEGATRON = r"""
import sys, numpy as np, warnings
warnings.simplefilter("ignore")
import gigatoken as gt, awkward as ak
from megatron.core.datasets import indexed_dataset
corpus, tok_json, prefix = sys.argv[1:4]
tok = gt.Tokenizer(tok_json)
docs = tok.encode_files(gt.JsonlFileSource([corpus], field="text"), parallel=True)
dtype = indexed_dataset.DType.optimal_dtype(tok.vocab_size)
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
    ap.add_argument("--mb", type=float, default=100)
    ap.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    ap.add_argument("--workdir", default="/tmp/sfm_bench_tokenize")
    ap.add_argument("--megatron-lm", default=None)
    ap.add_argument("--legacy-mb", type=float, default=20)
    ap.add_argument("--reps", type=int, default=5, help="repetitions of each path (order alternates)")
    ap.add_argument("--paths", default="ours,peer",
                    help="comma-separated subset of: ours, peer, ours_megatron_writer, peer_megatron_writer")
    args = ap.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    corpus = work / f"corpus_{args.mb:g}mb.jsonl"
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
    res = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
           "load_average_before": os.getloadavg(), "corpus_mb": round(size / 1e6, 1), "reps": args.reps,
           "runs": [], "median": {}}
    names = args.paths.split(",")
    for workers in (int(w) for w in args.workers.split(",")):
        env = dict(os.environ, RAYON_NUM_THREADS=str(workers), TOKENIZERS_PARALLELISM="false")
        out = {name: str(work / f"{name}_w{workers}") for name in names}
        sfm = [sys.executable, "-m", "megatron_sfm.cli", "data", "tokenize", str(corpus), "--tokenizer", str(tok_dir),
               "--workers", str(workers), "--no-progress"]
        commands = {
            "ours": sfm + ["--out", out.get("ours", "")],
            "ours_megatron_writer": sfm + ["--out", out.get("ours_megatron_writer", ""), "--writer", "megatron"],
            "peer": [sys.executable, "-c", PEER, str(corpus), str(tok_dir / "tokenizer.json"), out.get("peer", "")],
            "peer_megatron_writer": [sys.executable, "-c", PEER_MEGATRON, str(corpus), str(tok_dir / "tokenizer.json"),
                                     out.get("peer_megatron_writer", "")],
        }
        runs = []
        for rep in range(args.reps):
            # alternate the order between repetitions: on a shared machine, position matters
            for name in (names if rep % 2 == 0 else names[::-1]):
                t = timed(commands[name], env=env, name=name)
                runs.append({"workers": workers, "rep": rep, "path": name, "s": round(t, 3),
                             "mb_s": round(size / t / 1e6, 1), "cpu_s": round(CPU[name], 2),
                             "mb_per_cpu_s": round(size / CPU[name] / 1e6, 1), "load": round(os.getloadavg()[0], 1)})
        res["runs"] += runs
        med = {}
        for name in names:
            mine = [r for r in runs if r["path"] == name]
            med[name] = {"s": statistics.median(r["s"] for r in mine), "mb_s": statistics.median(r["mb_s"] for r in mine),
                         "mb_per_cpu_s": statistics.median(r["mb_per_cpu_s"] for r in mine)}
        if "ours" in names and "peer" in names:
            ratios = [p["s"] / o["s"] for o, p in zip((r for r in runs if r["path"] == "ours"),
                                                      (r for r in runs if r["path"] == "peer"))]
            med["speedup_over_peer_per_pair"] = [round(x, 2) for x in ratios]
            med["speedup_over_peer_median"] = round(statistics.median(ratios), 2)
        med["identical"] = {name: same(out[name], out[names[0]]) for name in names[1:]}
        res["median"][f"workers_{workers}"] = med
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
        env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
        t = timed([sys.executable, "tools/preprocess_data.py", "--input", str(small), "--output-prefix", legacy,
                   "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", str(tok_dir), "--append-eod",
                   "--workers", "2", "--log-interval", "100000000"], env=env, cwd=args.megatron_lm, name="legacy")
        sz = small.stat().st_size
        res["legacy_mb"] = round(sz / 1e6, 1)
        res["legacy_preprocess_data_s"], res["legacy_mb_s"] = round(t, 1), round(sz / t / 1e6, 2)
        ours_small = str(work / "ours_small")
        t = timed([sys.executable, "-m", "megatron_sfm.cli", "data", "tokenize", str(small), "--tokenizer", str(tok_dir),
                   "--out", ours_small, "--workers", "2", "--no-progress"], env=env, name="ours_small")
        res["ours_small_mb_s"] = round(sz / t / 1e6, 1)
        res["ours_identical_to_legacy"] = same(ours_small, legacy + "_text_document")
        res["legacy_cpu_s"] = round(CPU["legacy"], 1)
        res["legacy_mb_per_cpu_s"] = round(sz / CPU["legacy"] / 1e6, 2)
    res["load_average_after"] = os.getloadavg()
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()

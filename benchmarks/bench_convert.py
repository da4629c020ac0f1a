"""Benchmark checkpoint conversion on a pythia-1.4b-shaped model (random weights, CPU).

Steps (each a separate process, so its peak RSS is its own):
  1. write a random Pythia-1.4B-shaped Hugging Face folder (fp16 safetensors, ~2.8 GB);
  2. ``sfm convert from-hf --tp 2 --dtype bf16`` (two writer processes) -> our checkpoint;
  3. ``sfm convert to-hf`` of that checkpoint, fp32 (5.6 GB out) and bf16 (2.8 GB out);
  4. optionally ``--verify`` (builds both full models: not streaming, reported separately).

Time is wall-clock; peak RSS is the largest resident set of the process tree, sampled
every 50 ms with psutil (file-backed pages of memory-mapped reads count). Results go to
a JSON file and a table; record them in docs/benchmarks/conversion.md.

    python benchmarks/bench_convert.py --workdir /tmp/bench-convert [--verify] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path


def run_measured(cmd: list[str], env: dict | None = None) -> dict:
    """Run ``cmd``; return wall time and the peak RSS (bytes) of it and its children."""
    import psutil

    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, **(env or {})))
    peak = 0
    peak_single = 0
    stop = threading.Event()

    def sample():
        nonlocal peak, peak_single
        try:
            root = psutil.Process(proc.pid)
        except psutil.NoSuchProcess:
            return
        while not stop.is_set():
            try:
                procs = [root] + root.children(recursive=True)
                rss = [p.memory_info().rss for p in procs]
                peak = max(peak, sum(rss))
                peak_single = max(peak_single, max(rss))
            except psutil.Error:
                pass
            time.sleep(0.05)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    output, _ = proc.communicate()
    stop.set()
    thread.join()
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed (exit {proc.returncode}):\n{output[-4000:]}")
    return {"seconds": round(elapsed, 1), "peak_rss_tree_gib": round(peak / 2**30, 2),
            "peak_rss_largest_process_gib": round(peak_single / 2**30, 2), "output_tail": output[-1500:]}


def write_random_hf(folder: Path, preset: str = "pythia-1.4b") -> dict:
    """A random GPTNeoX folder of ``preset``'s shape in fp16, written tensor by tensor."""
    import torch

    from megatron_sfm.config.presets import model_preset
    from megatron_sfm.config.schema import ModelConfig
    from megatron_sfm.conversion.gpt_neox import GPTNeoXAdapter
    from megatron_sfm.conversion.hf_writer import TensorSpec, write_sharded

    model = ModelConfig(**model_preset(preset))
    padded = model.padded_vocab(1)
    folder.mkdir(parents=True, exist_ok=True)
    specs = [TensorSpec(k, s, torch.float16) for k, s in GPTNeoXAdapter.hf_shapes(model, padded).items()]
    gen = torch.Generator().manual_seed(0)

    def produce(spec):
        if len(spec.shape) == 1:
            return (1.0 + 0.02 * torch.randn(spec.shape, generator=gen)).half() if "norm" in spec.name \
                else (0.02 * torch.randn(spec.shape, generator=gen)).half()
        return (0.02 * torch.randn(spec.shape, generator=gen)).half()

    write_sharded(folder, specs, produce)
    (folder / "config.json").write_text(json.dumps(GPTNeoXAdapter.hf_config(model, padded, "fp16"), indent=2))
    return {"parameters": sum(s.nbytes for s in specs) // 2, "bytes_fp16": sum(s.nbytes for s in specs)}


def du(path: Path) -> float:
    return round(sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 1e9, 3)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="/tmp/bench-convert")
    parser.add_argument("--preset", default="pythia-1.4b")
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--verify", action="store_true", help="also time to-hf --verify (full models in memory)")
    parser.add_argument("--keep", action="store_true", help="keep the (multi-GB) files")
    parser.add_argument("--out", default=None, help="results JSON (default: WORKDIR/results.json)")
    args = parser.parse_args()

    work = Path(args.workdir)
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    sfm = [sys.executable, "-m", "megatron_sfm.cli", "convert"]
    results: dict = {"machine": f"{platform.node()} {os.cpu_count()} cores, {platform.processor() or platform.machine()}",
                     "date": time.strftime("%Y-%m-%d"), "preset": args.preset}

    t = time.perf_counter()
    results["hf_model"] = write_random_hf(work / "hf", args.preset)
    results["hf_model"]["write_seconds"] = round(time.perf_counter() - t, 1)
    results["hf_model"]["gb"] = du(work / "hf")

    results["from_hf"] = run_measured(sfm + ["from-hf", str(work / "hf"), "--out", str(work / "ckpt"),
                                             "--tp", str(args.tp), "--dtype", "bf16"])
    results["from_hf"]["checkpoint_gb"] = du(work / "ckpt")
    shutil.rmtree(work / "hf")  # disk: keep at most two copies around

    for dtype in ("fp32", "bf16"):
        out = work / f"hf_{dtype}"
        res = run_measured(sfm + ["to-hf", str(work / "ckpt"), "--out", str(out), "--dtype", dtype])
        res["output_gb"] = du(out)
        res["files"] = sorted(p.name for p in out.glob("*.safetensors"))
        results[f"to_hf_{dtype}"] = res
        if dtype == "fp32":
            shutil.rmtree(out)
    if args.verify:
        out = work / "hf_verify"
        res = run_measured(sfm + ["to-hf", str(work / "ckpt"), "--out", str(out), "--dtype", "bf16", "--verify"])
        res["verify"] = json.loads((out / "sfm_verify.json").read_text())
        res["verify"].pop("greedy_generation", None)
        results["to_hf_bf16_verify"] = res
    if not args.keep:
        shutil.rmtree(work / "ckpt", ignore_errors=True)
        for p in work.glob("hf_*"):
            shutil.rmtree(p, ignore_errors=True)

    for value in results.values():
        if isinstance(value, dict):
            value.pop("output_tail", None)
    out_path = Path(args.out) if args.out else work / "results.json"
    out_path.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

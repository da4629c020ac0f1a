"""Save time of a checkpoint with and without the manifest's content checksums (CPU).

Saves the model state of a Pythia-shaped GPTModel (default pythia-1.4b, fp32: 5.6 GB)
with ``dist_checkpointing.save`` exactly as ``CheckpointManager.save`` does (torch_dist,
through the AsyncRequest run synchronously), alternating two variants:

* ``plain``: the writer alone, then a sizes-only manifest (what saves did before);
* ``checksums``: the writer wrapped by ``training.checkpoint.with_checksums`` (it hashes
  the files it wrote) and ``checkpoint_format.write_manifest`` (merges those hashes,
  hashes the small files) — the production path.

After one untimed warm-up save, each round writes both variants (order alternating) into
fresh folders that are deleted afterwards; the result is the median over rounds, with
every single time. The optimizer state is left out: a full
1.4B training state (~20 GB with Adam) does not fit a small CPU box; the per-byte cost
is the same.

    python benchmarks/bench_checkpoint_checksum.py --workdir /tmp/bench-ckpt [--preset pythia-1.4b]
        [--dtype fp32] [--rounds 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import time
from pathlib import Path


def _plain_manifest(folder: Path) -> None:
    from megatron_sfm.utils.io import write_json

    files = {p.relative_to(folder).as_posix(): p.stat().st_size
             for p in sorted(folder.rglob("*")) if p.is_file() and p.name != "manifest.json"}
    write_json(folder / "manifest.json", {"format_version": 1, "files": files})


def _hash_time(folder: Path) -> float:
    """Seconds to checksum every file of a just-written folder (what the checksums add)."""
    from megatron_sfm.checkpoint_format import hash_files

    start = time.perf_counter()
    hash_files(p for p in sorted(folder.rglob("*")) if p.is_file())
    return time.perf_counter() - start


def _save(model, folder: Path, checksums: bool) -> float:
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.serialization import (
        get_default_save_sharded_strategy,
    )

    from megatron_sfm.checkpoint_format import write_manifest
    from megatron_sfm.training.checkpoint import with_checksums

    folder.mkdir(parents=True)
    start = time.perf_counter()
    request = dist_checkpointing.save({"model": model.sharded_state_dict()}, str(folder),
                                      sharded_strategy=get_default_save_sharded_strategy("torch_dist"),
                                      validate_access_integrity=True, async_sharded_save=True)
    if checksums:
        request = with_checksums(request, folder)
    request.execute_sync()
    if checksums:
        write_manifest(folder)
    else:
        _plain_manifest(folder)
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--preset", default="pythia-1.4b")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    import torch

    from megatron_sfm.config.loader import config_from_dict
    from megatron_sfm.model.builder import build_gpt_model, transformer_config
    from megatron_sfm.model.parallel import destroy_parallel, initialize_parallel

    cfg = config_from_dict({"model": {"preset": args.preset, "precision": args.dtype, "attention_backend": "sdpa"}})
    initialize_parallel(cfg.parallel, seed=0)
    tconfig = transformer_config(cfg.model, cfg.parallel, perform_initialization=False)
    model = build_gpt_model(cfg.model, cfg.parallel, config=tconfig, parallel_output=False)
    with torch.no_grad():
        for p in model.parameters():
            p.uniform_(-0.02, 0.02)  # real bytes (not zero pages)
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    times: dict[str, list[float]] = {"plain": [], "checksums": [], "hash_only": []}
    try:
        _save(model, work / "warmup", checksums=True)  # first-save costs (imports, caches): untimed
        shutil.rmtree(work / "warmup")
        for r in range(args.rounds):
            order = ("plain", "checksums") if r % 2 == 0 else ("checksums", "plain")
            for variant in order:
                folder = work / f"{variant}-{r}"
                shutil.rmtree(folder, ignore_errors=True)
                times[variant].append(_save(model, folder, variant == "checksums"))
                extra = ""
                if variant == "plain":  # the hashing alone, on the files as a save leaves them
                    times["hash_only"].append(_hash_time(folder))
                    extra = f" (hashing its files afterwards: {times['hash_only'][-1]:.2f} s)"
                shutil.rmtree(folder)
                print(f"round {r} {variant}: {times[variant][-1]:.2f} s{extra}", flush=True)
    finally:
        destroy_parallel()
    plain, summed = statistics.median(times["plain"]), statistics.median(times["checksums"])
    hashing = statistics.median(times["hash_only"])
    result = {"preset": args.preset, "dtype": args.dtype, "bytes": nbytes, "rounds": args.rounds,
              "cpus": os.cpu_count(), "plain_s": times["plain"], "checksums_s": times["checksums"],
              "hash_only_s": times["hash_only"], "median_plain_s": plain, "median_checksums_s": summed,
              "median_hash_only_s": hashing, "overhead_pct": 100 * (summed - plain) / plain,
              "hash_share_pct": 100 * hashing / plain}
    print(f"{args.preset} {args.dtype} ({nbytes / 1e9:.2f} GB), medians of {args.rounds}: save {plain:.2f} s plain, "
          f"{summed:.2f} s with checksums ({result['overhead_pct']:+.1f}%); hashing the files alone "
          f"{hashing:.2f} s = {result['hash_share_pct']:.1f}% of the plain save")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Measure training steps for several points (backend x sweep values) in one run.

Library entry: :func:`run_bench` returns the report (a JSON-ready dict, see
docs/benchmarking.md for the schema). Every rank of a torchrun/srun job calls it; each
point's per-rank measurements are gathered and aggregated so that every rank returns
the same report:

* step time of a step = the slowest rank's (the step ends when the last rank ends);
  reported as mean / median / min / max over the timed steps;
* forward / backward / optimizer time = the mean over ranks, then over steps;
* peak memory = the largest over ranks.

tokens/s, TFLOP/s and MFU come from :func:`megatron_sfm.metrics.step_metrics` with the
mean step time; nothing here re-derives a FLOP count.
"""

from __future__ import annotations

import gc
import logging
import platform
import statistics
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime

import torch

from megatron_sfm.benchmark import SCHEMA
from megatron_sfm.benchmark.points import BenchPoint, plan_points, point_config
from megatron_sfm.config import RunConfig
from megatron_sfm.errors import ConfigError

__all__ = ["AGGREGATION", "BenchPoint", "aggregate_ranks", "measure_point_local", "plan_points", "run_bench"]

log = logging.getLogger(__name__)

AGGREGATION = ("step time: per step the slowest rank, then mean over timed steps; forward/backward/optimizer: "
               "mean over ranks and steps; peak memory: largest over ranks")


# ---------------------------------------------------------------------------------------
# one point on this rank


def _memory() -> dict:
    if torch.cuda.is_available():
        return {"peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
                "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30, "rss_gib": _rss_gib()}
    return {"peak_allocated_gib": None, "peak_reserved_gib": None, "rss_gib": _rss_gib()}


def _rss_gib() -> float | None:
    try:
        import psutil
    except ImportError:
        return None
    return psutil.Process().memory_info().rss / 2**30


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def measure_point_local(cfg: RunConfig, steps: int, warmup: int,
                        on_step: Callable[[int, float], None] | None = None) -> dict:
    """Build the trainer's state for ``cfg``, run ``warmup`` + ``steps`` steps; this rank's numbers.

    Returns {"steps": [[step_s, forward_backward_s, forward_s], ...] (timed steps only),
    "memory": {...}, "loss": last loss, "skipped": skipped steps, "num_microbatches": n,
    "main_params_dtype": ...}.
    """
    from megatron_sfm.benchmark.mock_data import RandomTokenBatches
    from megatron_sfm.benchmark.timing import Clock, TimedForwardBackward
    from megatron_sfm.compat import device
    from megatron_sfm.training.state import build_training_state, release_training_state
    from megatron_sfm.training.step import train_step

    _free_memory()
    state = build_training_state(cfg, with_data=False)
    try:
        clock = Clock(torch.cuda.is_available())
        timed = TimedForwardBackward(state.forward_backward_func, clock)
        state.forward_backward_func = timed
        iterators = [RandomTokenBatches(cfg.training.micro_batch_size, state.seq_length, cfg.model.vocab_size,
                                        device(), seed=cfg.training.seed, dp_rank=state.dp_rank,
                                        pool=min(2, state.num_microbatches))
                     for _ in state.model]
        rows, loss, skipped = [], float("nan"), 0
        for i in range(warmup + steps):
            result = train_step(state, iterators)
            times = timed.last()
            if i >= warmup:
                rows.append([result.step_time_s, times.forward_backward_s, times.forward_s])
                skipped += int(result.skipped)
            loss = result.loss
            if on_step is not None:
                on_step(i, result.step_time_s)
        return {"steps": rows, "memory": _memory(), "loss": loss, "skipped": skipped,
                "num_microbatches": state.num_microbatches, "dp_size": state.dp_size,
                "main_params_dtype": _main_params_dtype(state)}
    finally:
        release_training_state(state)  # else this row's model and optimizer outlive it (docs/training.md)
        del state
        _free_memory()


def _main_params_dtype(state) -> str:
    """The dtype the optimizer updates (Megatron keeps fp32 main params for bf16/fp16 models)."""
    names = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
    for sub in getattr(state.optimizer, "chained_optimizers", [state.optimizer]):
        inner = getattr(sub, "optimizer", None)
        for group in getattr(inner, "param_groups", []):
            for p in group["params"]:
                return names.get(p.dtype, str(p.dtype))
    return "unknown"


# ---------------------------------------------------------------------------------------
# aggregation over ranks


def _gather(obj) -> list:
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def aggregate_ranks(per_rank: list[dict]) -> dict:
    """Combine the ranks' :func:`measure_point_local` results (see the module docstring)."""
    errors = [r["error"] for r in per_rank if r.get("error")]
    if errors:
        return {"error": errors[0]}
    n = min(len(r["steps"]) for r in per_rank)
    if n == 0:
        return {"error": "no timed steps"}
    step = [max(r["steps"][i][0] for r in per_rank) for i in range(n)]
    fb = [statistics.fmean(r["steps"][i][1] for r in per_rank) for i in range(n)]
    fwd = [statistics.fmean(r["steps"][i][2] for r in per_rank) for i in range(n)]
    own = [statistics.fmean(r["steps"][i][0] for r in per_rank) for i in range(n)]

    def biggest(key):
        values = [r["memory"][key] for r in per_rank if r["memory"].get(key) is not None]
        return max(values) if values else None

    forward = statistics.fmean(fwd)
    backward = statistics.fmean(max(0.0, b - f) for b, f in zip(fb, fwd))
    optimizer = statistics.fmean(max(0.0, s - b) for s, b in zip(own, fb))
    return {
        "step_time_s": {"mean": statistics.fmean(step), "median": statistics.median(step),
                        "min": min(step), "max": max(step)},
        "time_split_s": {"forward": forward, "backward": backward, "optimizer": optimizer},
        "memory": {k: biggest(k) for k in ("peak_allocated_gib", "peak_reserved_gib", "rss_gib")},
        "loss": per_rank[0]["loss"],
        "skipped_steps": max(r["skipped"] for r in per_rank),
        "num_microbatches": per_rank[0]["num_microbatches"],
        "data_parallel_size": per_rank[0]["dp_size"],
        "main_params_dtype": per_rank[0]["main_params_dtype"],
        "timed_steps": n,
    }


# ---------------------------------------------------------------------------------------
# the whole run


def _versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    try:
        from megatron_sfm.compat import megatron_core_version

        out["megatron_core"] = megatron_core_version()
    except Exception:  # noqa: BLE001 - informational
        out["megatron_core"] = None
    try:
        import triton

        out["triton"] = triton.__version__
    except Exception:  # noqa: BLE001
        out["triton"] = None
    from megatron_sfm import __version__

    out["megatron_sfm"] = __version__
    return out


def _device_info(world: int) -> dict:
    from megatron_sfm.metrics import card_for, gpu_name

    name = gpu_name()
    return {"type": "cuda" if name else "cpu", "name": name or platform.processor() or platform.machine(),
            "world_size": world, "peak_table_card": card_for(name)}


def _measured_peaks(precisions: set[str]) -> dict:
    from megatron_sfm.benchmark.peak import measure_matmul_tflops

    out = {}
    for precision in sorted(precisions):
        local = measure_matmul_tflops(precision)
        out[precision] = min(_gather(local))  # the slowest rank's ceiling
    return out


def _model_summary(cfg: RunConfig) -> dict:
    from megatron_sfm.model.flops import parameter_count

    m = cfg.model
    return {"num_layers": m.num_layers, "hidden_size": m.hidden_size, "num_attention_heads": m.num_attention_heads,
            "ffn_hidden_size": m.ffn_size, "padded_vocab_size": m.padded_vocab(cfg.parallel.tensor_model_parallel_size),
            "seq_length": m.seq_length, "rotary_pct": m.rotary_pct,
            "parameters": parameter_count(m, cfg.parallel.tensor_model_parallel_size).total}


def _fp8_label(m) -> str | None:
    """``"<backend> <recipe> <format>"`` with the backend that ran (``auto`` resolved)."""
    if m.fp8.format == "none":
        return None
    backend = m.fp8.backend
    if backend == "auto":
        from megatron_sfm.model.builder import check_fp8

        try:
            backend = check_fp8(m)
        except Exception:  # noqa: BLE001 - the row's own error says why FP8 could not run
            backend = "auto"
    return f"{backend} {m.fp8.recipe} {m.fp8.format}"


def _row(point: BenchPoint, cfg: RunConfig, agg: dict, world: int, measured: dict) -> dict:
    from megatron_sfm.metrics import step_metrics

    m, t, p = cfg.model, cfg.training, cfg.parallel
    row = {
        "label": point.label, "backend": m.attention_backend, "overrides": dict(point.overrides),
        "status": "ok", "error": None, "precision": m.precision,
        "fp8": _fp8_label(m),
        "micro_batch_size": t.micro_batch_size, "global_batch_size": t.global_batch_size,
        "seq_length": m.seq_length, "tokens_per_step": t.global_batch_size * m.seq_length,
    }
    if "error" in agg:
        row.update(status="error", error=agg["error"])
        return row
    mean_step = agg["step_time_s"]["mean"]
    table = step_metrics(m, t.global_batch_size, m.seq_length, mean_step, world,
                         tensor_parallel_size=p.tensor_model_parallel_size, peak=cfg.logging.peak_tflops)
    measured_peak = measured.get(m.precision)
    measured_mfu = None
    if measured_peak is not None:
        measured_mfu = step_metrics(m, t.global_batch_size, m.seq_length, mean_step, world,
                                    tensor_parallel_size=p.tensor_model_parallel_size, peak=measured_peak).mfu
    split = agg["time_split_s"]
    total = sum(split.values()) or 1.0
    row.update({
        "main_params_dtype": agg["main_params_dtype"], "num_microbatches": agg["num_microbatches"],
        "data_parallel_size": agg["data_parallel_size"], "timed_steps": agg["timed_steps"],
        "step_time_s": agg["step_time_s"],
        "tokens_per_s": table.tokens_per_s, "tokens_per_s_per_gpu": table.tokens_per_s / world,
        "tflops_per_gpu": table.tflops_per_gpu, "flops_per_step": table.flops_per_step,
        "peak_tflops_table": table.peak_tflops, "mfu": table.mfu,
        "peak_tflops_measured": measured_peak, "mfu_measured": measured_mfu,
        "time_split_s": split, "time_split_fraction": {k: v / total for k, v in split.items()},
        "memory": agg["memory"], "loss": agg["loss"], "skipped_steps": agg["skipped_steps"],
    })
    return row


def run_bench(config_path: str | None, points: list[BenchPoint], *, steps: int = 10, warmup: int = 3,
              overrides: list[str] | None = None, measure_peak: bool = False,
              progress: Callable[[str], None] | None = None) -> dict:
    """Run every point in order on every rank; return the report (same on every rank).

    Config errors (any point) raise :class:`ConfigError` before anything runs; a point
    that fails to build or run (a missing backend, out of memory) becomes a row with
    ``status: error`` and the run goes on.
    """
    import torch.distributed as dist

    from megatron_sfm.config import validate_run_config
    from megatron_sfm.metrics import FLOP_FORMULA_NAME
    from megatron_sfm.model.parallel import initialize_parallel

    if steps < 1:
        raise ConfigError(f"--steps: must be at least 1, got {steps}")
    if warmup < 0:
        raise ConfigError(f"--warmup: must be at least 0, got {warmup}")
    if not points:
        raise ConfigError("sfm bench: nothing to measure (no backend)")
    say = progress or (lambda text: None)
    base = list(overrides or [])
    configs = [point_config(config_path, base, p) for p in points]
    first = configs[0]
    initialize_parallel(first.parallel, first.training.seed)
    world = dist.get_world_size()
    for cfg, point in zip(configs, points):
        try:
            validate_run_config(cfg, world)
        except ConfigError as exc:
            raise ConfigError(f"{point.label}: {exc}") from None

    measured = {}
    if measure_peak:
        say("measuring the matmul peak")
        measured = _measured_peaks({c.model.precision for c in configs})

    rows = []
    started = time.perf_counter()
    for index, (cfg, point) in enumerate(zip(configs, points)):
        say(f"[{index + 1}/{len(points)}] {point.label}: building")

        def on_step(i, seconds, _label=point.label):
            phase = "warm-up" if i < warmup else "step"
            n = i + 1 if i < warmup else i + 1 - warmup
            say(f"    {_label}: {phase} {n} {seconds * 1000:.1f} ms")

        try:
            local = measure_point_local(cfg, steps, warmup, on_step=on_step)
        except Exception as exc:  # one failing row (missing backend, OOM) must not end the run
            detail = " ".join(f"{type(exc).__name__}: {exc}".split())
            log.debug("point %s failed", point.label, exc_info=True)
            local = {"error": detail[:2000]}
        agg = aggregate_ranks(_gather(local))
        row = _row(point, cfg, agg, world, measured)
        rows.append(row)
        if row["status"] == "ok":
            say(f"    {point.label}: {row['tokens_per_s_per_gpu']:,.0f} tokens/s/GPU, "
                f"{row['tflops_per_gpu']:.2f} TFLOP/s/GPU")
        else:
            say(f"    {point.label}: error: {row['error']}")

    baseline = next((r for r in rows if r["status"] == "ok"), None)
    for r in rows:
        r["throughput_ratio"] = (r["tokens_per_s"] / baseline["tokens_per_s"]
                                 if baseline is not None and r["status"] == "ok" else None)
    return {
        "schema": SCHEMA,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        "config": str(config_path) if config_path is not None else None,
        "overrides": base,
        "steps": steps, "warmup": warmup,
        "flop_formula": FLOP_FORMULA_NAME,
        "aggregation": AGGREGATION,
        "ratio_baseline": baseline["label"] if baseline is not None else None,
        "device": _device_info(world),
        "parallel": {"tensor": first.parallel.tensor_model_parallel_size,
                     "pipeline": first.parallel.pipeline_model_parallel_size,
                     "data": world // (first.parallel.tensor_model_parallel_size
                                       * first.parallel.pipeline_model_parallel_size)},
        "peak": {"measured_tflops": measured or None,
                 "source": "measured matmul (--measure-peak) and table" if measured else "table"},
        "model": _model_summary(first),
        "versions": _versions(),
        "wall_time_s": time.perf_counter() - started,
        "rows": rows,
    }

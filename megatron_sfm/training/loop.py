"""The training loop of ``sfm train``: resume, steps, logging, evaluation, checkpoints, signals.

``run_training(cfg) -> exit code``: 0 when ``train_iters`` is reached, the launcher's
requeue code after SIGTERM/SIGUSR1 (checkpoint saved first). Too many non-finite steps
in a row save the last good state and raise :class:`SfmError`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
from pathlib import Path
from typing import Callable, Optional

import torch

from megatron_sfm.config import RunConfig, dump_config
from megatron_sfm.errors import SfmError
from megatron_sfm.training.signals import SignalFlag, StartupInterrupted, requeue_exit_code

log = logging.getLogger(__name__)


def _memory_gib() -> dict:
    if torch.cuda.is_available():
        return {"max_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
                "max_reserved_gib": torch.cuda.max_memory_reserved() / 2**30}
    import psutil

    return {"rss_gib": psutil.Process().memory_info().rss / 2**30}


class TensorBoardLog:
    """Scalars on global rank 0 only (every rank holds the reduced values)."""

    def __init__(self, log_dir: Optional[str]):
        self.writer = None
        if log_dir and _global_rank() == 0:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=log_dir)

    def scalars(self, values: dict, step: int) -> None:
        if self.writer is None:
            return
        for tag, value in values.items():
            if value is not None and isinstance(value, (int, float)):
                self.writer.add_scalar(tag, value, step)

    def flush(self):
        if self.writer is not None:
            self.writer.flush()

    def close(self):
        if self.writer is not None:
            self.writer.close()


def _global_rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_initialized() else 0


class SampleRecorder:
    """Test hook (env SFM_SAMPLE_LOG=<dir>): one JSON line per micro-batch of global indices."""

    def __init__(self, folder: str):
        from megatron.core import parallel_state

        self.active = (parallel_state.get_tensor_model_parallel_rank() == 0
                       and parallel_state.get_pipeline_model_parallel_rank() == 0)
        Path(folder).mkdir(parents=True, exist_ok=True)
        self.path = Path(folder) / f"samples.rank{_global_rank()}.jsonl"

    def __call__(self, iteration_index: int, indices: list, tokens) -> None:
        if not self.active:
            return
        from megatron_sfm.training.data import sample_hash

        with open(self.path, "a") as f:
            f.write(json.dumps({"iter": iteration_index + 1, "idx": indices, "hash": sample_hash(tokens)}) + "\n")


class IntervalStats:
    def __init__(self):
        self.reset()

    def reset(self):
        self.steps = 0
        self.loss_sum = 0.0
        self.weighted_sum = 0.0
        self.loss_n = 0
        self.src_sum: dict = {}
        self.src_tok: dict = {}
        self.time = 0.0
        self.skipped = 0
        self.grad_norm = float("nan")

    def add(self, r) -> None:
        self.steps += 1
        self.time += r.step_time_s
        if r.skipped:
            self.skipped += 1
        if math.isfinite(r.loss):
            self.loss_sum += r.loss
            self.weighted_sum += r.weighted_loss
            self.loss_n += 1
            for name, value in r.source_loss.items():
                n = r.source_tokens[name]
                self.src_sum[name] = self.src_sum.get(name, 0.0) + value * n
                self.src_tok[name] = self.src_tok.get(name, 0) + n
        self.grad_norm = r.grad_norm


def _format_line(it: int, total: int, loss: float, src: dict, lr: float, gnorm: float, perf, mem: dict,
                 skipped: int, ms: float) -> str:
    parts = [f"iter {it}/{total}", f"loss {loss:.4f}"]
    if len(src) > 1:
        parts.append("src " + " ".join(f"{k}={v:.4f}" for k, v in src.items()))
    parts += [f"lr {lr:.3e}", f"gnorm {gnorm:.3f}", f"tok/s {perf.tokens_per_s:,.0f}",
              f"TFLOP/s/GPU {perf.tflops_per_gpu:.4g}", f"MFU {100 * perf.mfu:.3g}%"]
    if mem:
        key, value = next(iter(mem.items()))
        parts.append(f"mem {value:.2f} GiB")
    parts += [f"skipped {skipped}", f"{ms:.0f} ms/it"]
    return " | ".join(parts)


def _weights_text(state) -> str:
    """The per-source loss weights of each phase, for the start-up line."""
    phases = getattr(state.data, "train_loss_weights", None) or [state.default_loss_weights]
    parts = []
    for i, vec in enumerate(phases):
        text = " ".join(f"{n}={w:g}" for n, w in zip(state.source_names, vec or [1.0] * state.num_sources))
        parts.append(f"phase {i}: {text}" if len(phases) > 1 else text)
    return "; ".join(parts)


def _checkpoint_has_latest(path: Optional[str]) -> bool:
    from megatron_sfm.training.checkpoint import LATEST

    return bool(path) and (Path(path) / LATEST).exists()


def run_training(cfg: RunConfig, *, print_fn: Callable[[str], None] = print,
                 signal_flag: Optional[SignalFlag] = None) -> int:
    """Train to ``cfg.training.train_iters``; return the process exit code.

    ``signal_flag``: an already installed :class:`SignalFlag` (``sfm train`` installs one
    before anything else); None installs one here. A signal that arrives before the first
    step stops the run at the next startup check (after the parallel state is up, and
    after resuming) with the requeue code, without saving (nothing was trained).
    """
    own_flag = signal_flag is None
    flag = SignalFlag().install() if own_flag else signal_flag
    try:
        return _train(cfg, flag, print_fn)
    finally:
        if own_flag:
            flag.restore()


def _startup_stop(flag: SignalFlag, say: Callable[[str], None], where: str) -> int:
    say(f"received {flag.name()} {where}: nothing trained, nothing to save; "
        f"exiting with {requeue_exit_code()} (requeue)")
    return requeue_exit_code()


def _fp8_text(cfg: RunConfig, backend: str) -> str:
    if backend == "torchao":
        from megatron_sfm.model.float8 import describe

        return describe(cfg.model.fp8)
    return f"fp8: Transformer Engine {cfg.model.fp8.recipe} ({cfg.model.fp8.format})"


def _train(cfg: RunConfig, flag: SignalFlag, print_fn: Callable[[str], None]) -> int:
    from megatron_sfm.training.state import build_training_state, check_no_fp8_fallback, release_training_state

    fp8_backend = check_no_fp8_fallback(cfg)
    recorder_dir = os.environ.get("SFM_SAMPLE_LOG")
    recorder = None
    if recorder_dir:
        # needs parallel state: created lazily below through a small trampoline
        holder = {}

        def recorder(i, idx, tok):
            if "r" not in holder:
                holder["r"] = SampleRecorder(recorder_dir)
            holder["r"](i, idx, tok)

    try:
        state = build_training_state(cfg, sample_recorder=recorder, stop_check=flag.any_rank)
    except StartupInterrupted:
        return _startup_stop(flag, print_fn if _global_rank() == 0 else (lambda *_: None),
                             "while building the model")
    try:
        return _resume_and_train(cfg, state, fp8_backend, flag, print_fn)
    finally:
        release_training_state(state)  # in-process callers (tests, notebooks) get the memory back


def _resume_and_train(cfg: RunConfig, state, fp8_backend: Optional[str], flag: SignalFlag,
                      print_fn: Callable[[str], None]) -> int:
    """Everything after the state is built: resume or init, the loop, the last save; the exit code."""
    from megatron_sfm.metrics import step_metrics
    from megatron_sfm.training.checkpoint import CheckpointManager, resolve_checkpoint
    from megatron_sfm.training.state import uses_loss_weights, valid_iterators
    from megatron_sfm.training.step import evaluate, fault_at, train_step

    rank0 = _global_rank() == 0
    say = print_fn if rank0 else (lambda *_: None)
    t, c = cfg.training, cfg.checkpoint
    ckpt = CheckpointManager(state, c.save)

    # --- resume / init ---
    if fault_at("signal_in_resume", 0):  # test hook: SLURM's warning arrives while the checkpoint loads
        os.kill(os.getpid(), signal.SIGUSR1)
    resumed = None
    if c.load:
        resumed = ckpt.load(c.load, load_optimizer=c.load_optimizer)
    elif _checkpoint_has_latest(c.save):
        resumed = ckpt.load(c.save, load_optimizer=c.load_optimizer)
        ckpt.last_saved_iteration = state.iteration  # already in checkpoint.save: no second copy at exit
    elif c.init_from:
        init = ckpt.init_from(c.init_from)
        say(f"initialised weights from {resolve_checkpoint(c.init_from)} (iteration {init['iteration']}); "
            f"fresh optimizer, LR schedule and data")
    if resumed:
        say(f"resumed from iteration {state.iteration} ({state.consumed_train_samples} samples consumed)")
    if flag.any_rank():
        ckpt.close()
        return _startup_stop(flag, say, "before the first step")
    if c.save and rank0:
        dump_config(cfg, Path(c.save) / "config.yaml")

    tb_dir = cfg.logging.tensorboard_dir or (str(Path(c.save) / "tensorboard") if c.save else None)
    tb = TensorBoardLog(tb_dir)
    stats = IntervalStats()
    tp = cfg.parallel.tensor_model_parallel_size
    exit_code = 0
    weighted = uses_loss_weights(state)
    say(f"training {cfg.model.num_layers} layers x {cfg.model.hidden_size} on {state.world_size} ranks "
        f"(TP {tp}, PP {cfg.parallel.pipeline_model_parallel_size}, DP {state.dp_size}); "
        f"{state.num_microbatches} micro-batches of {t.micro_batch_size} per step; sources: "
        f"{', '.join(state.source_names)}; cross-entropy: {state.cross_entropy}"
        + (f"; loss weights: {_weights_text(state)}" if weighted else "")
        + (f"; {_fp8_text(cfg, fp8_backend)}" if fp8_backend else ""))
    try:
        while state.iteration < t.train_iters:
            result = train_step(state)
            stats.add(result)
            it = state.iteration
            if fault_at("kill", it):  # test hook: like `kill -9` between two steps
                os.kill(os.getpid(), signal.SIGKILL)
            if state.consecutive_nonfinite >= t.max_consecutive_nonfinite > 0:
                # the skipped steps did not change the weights: the current state is the last good one
                ckpt.save(reason="nonfinite")
                ckpt.close()
                raise SfmError(
                    f"training.max_consecutive_nonfinite: {state.consecutive_nonfinite} non-finite steps in a row "
                    f"at iteration {it}; saved the last good state to {c.save or '(no checkpoint.save)'}")
            if it % max(t.log_interval, 1) == 0 or it == t.train_iters:
                step_time = stats.time / max(stats.steps, 1)
                perf = step_metrics(cfg.model, t.global_batch_size, state.seq_length, step_time, state.world_size,
                                    tensor_parallel_size=tp, peak=cfg.logging.peak_tflops)
                loss = stats.loss_sum / stats.loss_n if stats.loss_n else float("nan")
                src = {k: stats.src_sum[k] / stats.src_tok[k] for k in stats.src_sum}
                mem = _memory_gib() if cfg.logging.log_memory else {}
                values = {"train/loss": loss, "train/lr": result.lr, "train/grad_norm": stats.grad_norm,
                          "train/skipped_steps": state.skipped_steps,
                          "train/consumed_samples": state.consumed_train_samples,
                          "perf/tokens_per_s": perf.tokens_per_s, "perf/tflops_per_gpu": perf.tflops_per_gpu,
                          "perf/mfu": perf.mfu, "perf/step_time_s": step_time}
                values.update({f"train/loss_by_source/{k}": v for k, v in src.items()})
                if weighted:
                    values["train/loss_weighted"] = stats.weighted_sum / stats.loss_n if stats.loss_n else float("nan")
                values.update({f"memory/{k}": v for k, v in mem.items()})
                tb.scalars(values, it)
                say(_format_line(it, t.train_iters, loss, src, result.lr, stats.grad_norm, perf, mem,
                                 state.skipped_steps, 1000 * step_time))
                stats.reset()
            if t.eval_interval > 0 and it % t.eval_interval == 0:
                iters = valid_iterators(state)
                if iters is not None:
                    ev = evaluate(state, iters, t.eval_iters)
                    values = {"valid/loss": ev.loss}
                    values.update({f"valid/loss_by_source/{k}": v for k, v in ev.source_loss.items()})
                    tb.scalars(values, it)
                    srcs = " ".join(f"{k}={v:.4f}" for k, v in ev.source_loss.items())
                    say(f"validation at iter {it} | loss {ev.loss:.4f}" + (f" | src {srcs}" if srcs else ""))
            ckpt.finalize(blocking=False)
            stop_signal = flag.any_rank()
            stop_exit = bool(t.exit_interval) and it % t.exit_interval == 0 and it < t.train_iters
            if c.save_interval > 0 and it % c.save_interval == 0 and not stop_signal:
                ckpt.save(reason="interval")
            if stop_signal or stop_exit:
                reason = "signal" if stop_signal else "exit"
                if ckpt.last_saved_iteration != it:
                    ckpt.save(reason=reason)
                ckpt.close()
                tb.flush()
                if stop_signal:
                    say(f"received signal {flag.received or 'on another rank'}: saved iteration {it}, "
                        f"exiting with {requeue_exit_code()} (requeue)")
                    exit_code = requeue_exit_code()
                else:
                    say(f"training.exit_interval: saved iteration {it}, exiting")
                return exit_code
        if ckpt.last_saved_iteration != state.iteration:
            ckpt.save(reason="exit")
        ckpt.close()
        say(f"finished: {state.iteration} iterations, {state.consumed_train_samples} samples, "
            f"{state.skipped_steps} skipped steps")
        return 0
    finally:
        tb.close()
        ckpt.close()

"""Callbacks of the training loop: everything around ``train_step`` that is not the loop itself.

The :class:`~megatron_sfm.training.trainer.Trainer` runs the steps and calls each
callback's hooks at fixed events; checkpointing, evaluation, metrics (loss, throughput,
memory), TensorBoard, the non-finite guard, signal handling and ``exit_interval`` are
callbacks here. Adding W&B, a profiler or a test fault is a new :class:`Callback`, passed
to ``run_training(cfg, callbacks=[...])`` or named in the environment variable
``SFM_CALLBACKS`` (see :func:`load_callbacks`), not an edit of the loop.

Events, in the order a run sees them (``trainer`` is the :class:`Trainer`; its ``state``
is the :class:`~megatron_sfm.training.state.TrainingState`):

``on_init(trainer)``
    the state is built (model, optimizer, data); nothing is loaded or trained yet.
``on_start(trainer)``
    after resume / ``init_from``, before the first step (``state.iteration`` is the start).
    A callback may call ``trainer.request_stop(...)`` here (the startup signal check does).
``on_step_start(trainer)``
    before each ``train_step``.
``on_step_end(trainer, result)``
    after each step; ``result`` is its :class:`~megatron_sfm.training.step.StepResult`
    and ``state.iteration`` already counts it. ``trainer.request_stop(...)`` ends the run
    after this event.
``on_log(trainer, values, step)``
    scalars to record (``{"train/loss": ..., "perf/mfu": ...}``), from ``trainer.log``;
    the same on every rank (the TensorBoard callback writes them on global rank 0).
``on_eval(trainer, result)``
    after a validation pass (:class:`~megatron_sfm.training.step.EvalResult`).
``on_save(trainer, path, reason)``
    after ``trainer.save`` scheduled a checkpoint (``path`` is the final ``iter_*`` folder,
    complete once finalised; an async save finalises later); ``reason`` is
    ``interval``, ``signal``, ``exit`` or ``nonfinite``.
``on_stop(trainer, stop)``
    the loop is over without an error (:class:`~megatron_sfm.training.trainer.Stop`:
    finished, signal, exit_interval or a callback's own stop); the last save happens here.
``on_end(trainer, exit_code, error)``
    always, last (``exit_code`` None when ``error`` is the exception that ends the run).

Every rank calls every hook, in the same order (hooks may run collectives). Callbacks
run in ascending :attr:`Callback.order` (ties: registration order); user callbacks
default to 0, before the built-in ones (10..70), so a callback sees each step before it
is logged, evaluated or saved.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from megatron_sfm.errors import SfmError

if TYPE_CHECKING:  # pragma: no cover
    from megatron_sfm.training.trainer import Stop, Trainer

CALLBACKS_ENV = "SFM_CALLBACKS"


class Callback:
    """Base class: override the hooks you need (each default does nothing)."""

    order: int = 0

    def on_init(self, trainer: "Trainer") -> None:
        pass

    def on_start(self, trainer: "Trainer") -> None:
        pass

    def on_step_start(self, trainer: "Trainer") -> None:
        pass

    def on_step_end(self, trainer: "Trainer", result) -> None:
        pass

    def on_log(self, trainer: "Trainer", values: dict, step: int) -> None:
        pass

    def on_eval(self, trainer: "Trainer", result) -> None:
        pass

    def on_save(self, trainer: "Trainer", path: Optional[Path], reason: str) -> None:
        pass

    def on_stop(self, trainer: "Trainer", stop: "Stop") -> None:
        pass

    def on_end(self, trainer: "Trainer", exit_code: Optional[int], error: Optional[BaseException]) -> None:
        pass


# ---- built-in callbacks ---------------------------------------------------------------

class NonFiniteGuard(Callback):
    """``training.max_consecutive_nonfinite`` non-finite steps in a row: save the last good
    state (the skipped steps did not change the weights) and raise :class:`SfmError`."""

    order = 10

    def __init__(self, max_consecutive: int):
        self.max_consecutive = max_consecutive

    def on_step_end(self, trainer, result) -> None:
        state = trainer.state
        if self.max_consecutive > 0 and state.consecutive_nonfinite >= self.max_consecutive:
            trainer.save(reason="nonfinite")
            trainer.checkpoint.close()
            raise SfmError(
                f"training.max_consecutive_nonfinite: {state.consecutive_nonfinite} non-finite steps in a row "
                f"at iteration {state.iteration}; saved the last good state to "
                f"{trainer.cfg.checkpoint.save or '(no checkpoint.save)'}")


class _IntervalStats:
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
        self.grad_norm = float("nan")

    def add(self, r) -> None:
        self.steps += 1
        self.time += r.step_time_s
        if math.isfinite(r.loss):
            self.loss_sum += r.loss
            self.weighted_sum += r.weighted_loss
            self.loss_n += 1
            for name, value in r.source_loss.items():
                n = r.source_tokens[name]
                self.src_sum[name] = self.src_sum.get(name, 0.0) + value * n
                self.src_tok[name] = self.src_tok.get(name, 0) + n
        self.grad_norm = r.grad_norm


def memory_gib() -> dict:
    import torch

    if torch.cuda.is_available():
        return {"max_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
                "max_reserved_gib": torch.cuda.max_memory_reserved() / 2**30}
    import psutil

    return {"rss_gib": psutil.Process().memory_info().rss / 2**30}


def format_line(it: int, total: int, loss: float, src: dict, lr: float, gnorm: float, perf, mem: dict,
                skipped: int, ms: float) -> str:
    """The console line of one log interval."""
    parts = [f"iter {it}/{total}", f"loss {loss:.4f}"]
    if len(src) > 1:
        parts.append("src " + " ".join(f"{k}={v:.4f}" for k, v in src.items()))
    parts += [f"lr {lr:.3e}", f"gnorm {gnorm:.3f}", f"tok/s {perf.tokens_per_s:,.0f}",
              f"TFLOP/s/GPU {perf.tflops_per_gpu:.4g}", f"MFU {100 * perf.mfu:.3g}%"]
    if mem:
        _, value = next(iter(mem.items()))
        parts.append(f"mem {value:.2f} GiB")
    parts += [f"skipped {skipped}", f"{ms:.0f} ms/it"]
    return " | ".join(parts)


class MetricsLogger(Callback):
    """Interval means of loss (total, per source, weighted), LR, grad norm, throughput
    (tokens/s, TFLOP/s per GPU, MFU) and memory: every ``training.log_interval`` steps
    (and at the last step) one console line on rank 0 and ``trainer.log(values)``."""

    order = 20

    def __init__(self, log_interval: int, log_memory: bool, peak_tflops: Optional[float] = None):
        self.log_interval = max(log_interval, 1)
        self.log_memory = log_memory
        self.peak_tflops = peak_tflops
        self.stats = _IntervalStats()

    def on_step_end(self, trainer, result) -> None:
        from megatron_sfm.metrics import step_metrics
        from megatron_sfm.training.state import uses_loss_weights

        self.stats.add(result)
        cfg, state, stats = trainer.cfg, trainer.state, self.stats
        it, total = state.iteration, cfg.training.train_iters
        if it % self.log_interval != 0 and it != total:
            return
        step_time = stats.time / max(stats.steps, 1)
        perf = step_metrics(cfg.model, cfg.training.global_batch_size, state.seq_length, step_time, state.world_size,
                            tensor_parallel_size=cfg.parallel.tensor_model_parallel_size, peak=self.peak_tflops)
        loss = stats.loss_sum / stats.loss_n if stats.loss_n else float("nan")
        src = {k: stats.src_sum[k] / stats.src_tok[k] for k in stats.src_sum}
        mem = memory_gib() if self.log_memory else {}
        values = {"train/loss": loss, "train/lr": result.lr, "train/grad_norm": stats.grad_norm,
                  "train/skipped_steps": state.skipped_steps,
                  "train/consumed_samples": state.consumed_train_samples,
                  "perf/tokens_per_s": perf.tokens_per_s, "perf/tflops_per_gpu": perf.tflops_per_gpu,
                  "perf/mfu": perf.mfu, "perf/step_time_s": step_time}
        values.update({f"train/loss_by_source/{k}": v for k, v in src.items()})
        if uses_loss_weights(state):
            values["train/loss_weighted"] = stats.weighted_sum / stats.loss_n if stats.loss_n else float("nan")
        values.update({f"memory/{k}": v for k, v in mem.items()})
        trainer.log(values, it)
        trainer.say(format_line(it, total, loss, src, result.lr, stats.grad_norm, perf, mem, state.skipped_steps,
                                1000 * step_time))
        stats.reset()


class TensorBoardWriter(Callback):
    """Writes every ``on_log`` scalar on global rank 0 (the folder is created at the first one)."""

    order = 30

    def __init__(self, log_dir: Optional[str]):
        self.log_dir = log_dir
        self.writer = None

    def on_log(self, trainer, values: dict, step: int) -> None:
        if not self.log_dir or not trainer.is_rank0:
            return
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=self.log_dir)
        for tag, value in values.items():
            if value is not None and isinstance(value, (int, float)):
                self.writer.add_scalar(tag, value, step)

    def on_stop(self, trainer, stop) -> None:
        if self.writer is not None:
            self.writer.flush()

    def on_end(self, trainer, exit_code, error) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class Evaluator(Callback):
    """Every ``training.eval_interval`` steps: ``eval_iters`` batches of the validation split."""

    order = 40

    def __init__(self, eval_interval: int, eval_iters: int):
        self.eval_interval = eval_interval
        self.eval_iters = eval_iters

    def on_step_end(self, trainer, result) -> None:
        from megatron_sfm.training.state import valid_iterators
        from megatron_sfm.training.step import evaluate

        it = trainer.state.iteration
        if self.eval_interval <= 0 or it % self.eval_interval != 0:
            return
        iters = valid_iterators(trainer.state)
        if iters is None:
            return
        ev = evaluate(trainer.state, iters, self.eval_iters)
        values = {"valid/loss": ev.loss}
        values.update({f"valid/loss_by_source/{k}": v for k, v in ev.source_loss.items()})
        trainer.log(values, it)
        srcs = " ".join(f"{k}={v:.4f}" for k, v in ev.source_loss.items())
        trainer.say(f"validation at iter {it} | loss {ev.loss:.4f}" + (f" | src {srcs}" if srcs else ""))
        trainer.dispatch("on_eval", ev)


class SignalStop(Callback):
    """SIGTERM / SIGUSR1 on any rank (:class:`~megatron_sfm.training.signals.SignalFlag`):
    stop before the first step without saving, or at the step boundary after saving;
    exit with the requeue code. Once the run ends with that code the signals stay
    ignored until the process exits (:meth:`SignalFlag.hold`)."""

    order = 50

    def __init__(self, flag):
        self.flag = flag

    def on_start(self, trainer) -> None:
        from megatron_sfm.training.signals import requeue_exit_code

        if self.flag.any_rank():
            code = requeue_exit_code()
            trainer.request_stop("signal", code, save=False,
                                 message=f"received {self.flag.name()} before the first step: nothing trained, "
                                         f"nothing to save; exiting with {code} (requeue)")

    def on_step_end(self, trainer, result) -> None:
        from megatron_sfm.training.signals import requeue_exit_code

        if self.flag.any_rank():
            code = requeue_exit_code()
            trainer.request_stop("signal", code, save_reason="signal",
                                 message=f"received signal {self.flag.received or 'on another rank'}: saved "
                                         f"iteration {trainer.state.iteration}, exiting with {code} (requeue)")

    def on_end(self, trainer, exit_code, error) -> None:
        from megatron_sfm.training.signals import requeue_exit_code

        if exit_code == requeue_exit_code():
            self.flag.hold()


class Checkpointer(Callback):
    """Saves at every ``checkpoint.save_interval`` and at the stop (unless that iteration
    is saved already); finalises finished async saves at every step boundary; writes the
    resolved config to ``<save>/config.yaml`` at the start."""

    order = 60

    def __init__(self, save_interval: int):
        self.save_interval = save_interval

    def on_start(self, trainer) -> None:
        from megatron_sfm.config import dump_config

        save = trainer.cfg.checkpoint.save
        if trainer.stop is None and save and trainer.is_rank0:
            dump_config(trainer.cfg, Path(save) / "config.yaml")

    def on_step_end(self, trainer, result) -> None:
        trainer.checkpoint.finalize(blocking=False)
        it = trainer.state.iteration
        if self.save_interval > 0 and it % self.save_interval == 0 and trainer.stop is None:
            trainer.save(reason="interval")

    def on_stop(self, trainer, stop) -> None:
        if stop.save and trainer.checkpoint.last_saved_iteration != trainer.state.iteration:
            trainer.save(reason=stop.save_reason)
        trainer.checkpoint.close()

    def on_end(self, trainer, exit_code, error) -> None:
        trainer.checkpoint.close()


class ExitInterval(Callback):
    """``training.exit_interval``: save and exit 0 at a multiple of it (before ``train_iters``)."""

    order = 70

    def __init__(self, exit_interval: int):
        self.exit_interval = exit_interval

    def on_step_end(self, trainer, result) -> None:
        it = trainer.state.iteration
        if self.exit_interval and it % self.exit_interval == 0 and it < trainer.cfg.training.train_iters:
            trainer.request_stop("exit_interval", 0, save_reason="exit",
                                 message=f"training.exit_interval: saved iteration {it}, exiting")


def default_callbacks(cfg, signal_flag) -> list[Callback]:
    """The callbacks every ``sfm train`` run has (what the loop did before it had callbacks)."""
    t, c = cfg.training, cfg.checkpoint
    tb_dir = cfg.logging.tensorboard_dir or (str(Path(c.save) / "tensorboard") if c.save else None)
    return [NonFiniteGuard(t.max_consecutive_nonfinite),
            MetricsLogger(t.log_interval, cfg.logging.log_memory, cfg.logging.peak_tflops),
            TensorBoardWriter(tb_dir),
            Evaluator(t.eval_interval, t.eval_iters),
            SignalStop(signal_flag),
            Checkpointer(c.save_interval),
            ExitInterval(t.exit_interval)]


# ---- user callbacks from the environment -----------------------------------------------

def _import(module_name: str, where: str):
    if module_name.endswith(".py"):
        path = Path(module_name)
        if not path.is_file():
            raise SfmError(f"{where}: file {path} not found")
        spec = importlib.util.spec_from_file_location(f"sfm_callbacks_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(module)
        except Exception as exc:  # noqa: BLE001 - one line naming the file
            raise SfmError(f"{where}: cannot load {path} ({type(exc).__name__}: {exc})") from exc
        return module
    try:
        return importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001
        raise SfmError(f"{where}: cannot import module {module_name!r} ({type(exc).__name__}: {exc})") from exc


def load_callbacks(spec: Optional[str], where: str = CALLBACKS_ENV) -> list[Callback]:
    """Callbacks named in ``spec``: comma-separated ``module:name`` or ``path/file.py:name``.

    ``name`` is a :class:`Callback` subclass (instantiated without arguments), a callback
    instance, or a function returning a callback or a list of them (called without
    arguments; it may read its own settings from the environment).
    """
    out: list[Callback] = []
    for entry in filter(None, (e.strip() for e in (spec or "").split(","))):
        module_name, sep, attr = entry.rpartition(":")
        if not sep or not module_name or not attr:
            raise SfmError(f"{where}: {entry!r} is not of the form module:name or path/file.py:name")
        module = _import(module_name, where)
        if not hasattr(module, attr):
            raise SfmError(f"{where}: {module_name} has no attribute {attr!r}")
        obj = getattr(module, attr)
        if isinstance(obj, type) and issubclass(obj, Callback):
            obj = obj()
        elif callable(obj) and not isinstance(obj, Callback):
            obj = obj()
        items = list(obj) if isinstance(obj, (list, tuple)) else [obj]
        for item in items:
            if not isinstance(item, Callback):
                raise SfmError(f"{where}: {entry} gave {type(item).__name__}, not a "
                               f"megatron_sfm.training.callbacks.Callback")
            out.append(item)
    return out


def env_callbacks() -> list[Callback]:
    """The callbacks named in the environment variable ``SFM_CALLBACKS`` (none when unset)."""
    return load_callbacks(os.environ.get(CALLBACKS_ENV))

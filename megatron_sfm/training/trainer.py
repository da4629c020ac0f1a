"""The training loop: resume, steps, stop; everything else happens in callbacks.

:class:`Trainer` owns the :class:`~megatron_sfm.training.checkpoint.CheckpointManager`
(resume or ``init_from`` at the start; ``save`` for the callbacks) and runs
``train_step`` until ``training.train_iters`` or until a callback calls
:meth:`Trainer.request_stop`. Events and their order: :mod:`megatron_sfm.training.callbacks`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Stop:
    """Why the loop ends, the process exit code, and the line printed (rank 0) at the end."""

    reason: str  # "finished", "signal", "exit_interval", or a callback's own
    exit_code: int
    message: str = ""
    save: bool = True  # save the current iteration at the stop (unless saved already)
    save_reason: str = "exit"  # train_state.json "reason" of that save


def _global_rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_initialized() else 0


class Trainer:
    """Runs ``train_step`` over ``state`` and dispatches the callbacks' events.

    ``callbacks`` run in ascending ``order`` (stable). ``banner`` is printed (rank 0) once
    the run is about to take its first step. :meth:`run` returns the exit code.
    """

    def __init__(self, cfg, state, callbacks: list, *, print_fn: Callable[[str], None] = print, banner: str = ""):
        from megatron_sfm.training.checkpoint import CheckpointManager

        self.cfg = cfg
        self.state = state
        self.callbacks = sorted(callbacks, key=lambda cb: getattr(cb, "order", 0))
        self.is_rank0 = _global_rank() == 0
        self._print = print_fn
        self.banner = banner
        self.checkpoint = CheckpointManager(state, cfg.checkpoint.save)
        self.stop: Optional[Stop] = None

    # ---- for callbacks ---------------------------------------------------------------
    def say(self, text: str) -> None:
        """Print on global rank 0."""
        if self.is_rank0:
            self._print(text)

    def dispatch(self, event: str, *args) -> None:
        for cb in self.callbacks:
            getattr(cb, event)(self, *args)

    def log(self, values: dict, step: int) -> None:
        """Hand scalars to every callback's ``on_log`` (TensorBoard, W&B, ...)."""
        self.dispatch("on_log", values, step)

    def save(self, reason: str) -> Optional[Path]:
        """Save the current state (async per config); ``on_save`` follows. None without ``checkpoint.save``."""
        path = self.checkpoint.save(reason=reason)
        self.dispatch("on_save", path, reason)
        return path

    def request_stop(self, reason: str, exit_code: int, *, message: str = "", save: bool = True,
                     save_reason: str = "exit") -> None:
        """End the run after the current event (the first request wins). All ranks must agree."""
        if self.stop is None:
            self.stop = Stop(reason=reason, exit_code=exit_code, message=message, save=save,
                             save_reason=save_reason)

    # ---- the loop --------------------------------------------------------------------
    def resume(self) -> None:
        """``checkpoint.load`` > ``<save>/latest`` > ``init_from`` (weights only) > fresh."""
        from megatron_sfm.training.checkpoint import LATEST, resolve_checkpoint

        c, state = self.cfg.checkpoint, self.state
        resumed = None
        if c.load:
            resumed = self.checkpoint.load(c.load, load_optimizer=c.load_optimizer)
        elif c.save and (Path(c.save) / LATEST).exists():
            resumed = self.checkpoint.load(c.save, load_optimizer=c.load_optimizer)
            self.checkpoint.last_saved_iteration = state.iteration  # no second copy of it at the stop
        elif c.init_from:
            init = self.checkpoint.init_from(c.init_from)
            self.say(f"initialised weights from {resolve_checkpoint(c.init_from)} (iteration {init['iteration']}); "
                     f"fresh optimizer, LR schedule and data")
        if resumed:
            self.say(f"resumed from iteration {state.iteration} ({state.consumed_train_samples} samples consumed)")

    def run(self) -> int:
        from megatron_sfm.training.step import train_step

        exit_code: Optional[int] = None
        error: Optional[BaseException] = None
        try:
            self.dispatch("on_init")
            self.resume()
            self.dispatch("on_start")
            if self.stop is None and self.banner:
                self.say(self.banner)
            state, total = self.state, self.cfg.training.train_iters
            while self.stop is None and state.iteration < total:
                self.dispatch("on_step_start")
                result = train_step(state)
                self.dispatch("on_step_end", result)
            if self.stop is None:
                self.request_stop("finished", 0, save_reason="exit",
                                  message=f"finished: {state.iteration} iterations, {state.consumed_train_samples} "
                                          f"samples, {state.skipped_steps} skipped steps")
            self.dispatch("on_stop", self.stop)
            if self.stop.message:
                self.say(self.stop.message)
            exit_code = self.stop.exit_code
            return exit_code
        except BaseException as exc:
            error = exc
            raise
        finally:
            try:
                self.dispatch("on_end", exit_code, error)
            finally:
                self.checkpoint.close()

"""``run_training(cfg) -> exit code``: what ``sfm train`` runs.

Builds the training state, the callbacks (:mod:`megatron_sfm.training.callbacks`: the
built-in ones, ``callbacks=`` and those named in ``SFM_CALLBACKS``) and a
:class:`~megatron_sfm.training.trainer.Trainer`, runs it and releases the state.

Exit code: 0 when ``train_iters`` (or ``training.exit_interval``) is reached, the
launcher's requeue code after SIGTERM/SIGUSR1 (checkpoint saved first when anything was
trained). Too many non-finite steps in a row save the last good state and raise
:class:`SfmError`.
"""

from __future__ import annotations

import logging
from typing import Callable, Optional

from megatron_sfm.config import RunConfig
from megatron_sfm.training.signals import SignalFlag, StartupInterrupted, requeue_exit_code

log = logging.getLogger(__name__)


def _global_rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_initialized() else 0


def _weights_text(state) -> str:
    """The per-source loss weights of each phase, for the start-up line."""
    phases = getattr(state.data, "train_loss_weights", None) or [state.default_loss_weights]
    parts = []
    for i, vec in enumerate(phases):
        text = " ".join(f"{n}={w:g}" for n, w in zip(state.source_names, vec or [1.0] * state.num_sources))
        parts.append(f"phase {i}: {text}" if len(phases) > 1 else text)
    return "; ".join(parts)


def _fp8_text(cfg: RunConfig, backend: str) -> str:
    if backend == "torchao":
        from megatron_sfm.model.float8 import describe

        return describe(cfg.model.fp8)
    return f"fp8: Transformer Engine {cfg.model.fp8.recipe} ({cfg.model.fp8.format})"


def banner(cfg: RunConfig, state, fp8_backend: Optional[str]) -> str:
    """The line printed before the first step: model, layout, batches, sources, loss."""
    from megatron_sfm.training.state import uses_loss_weights

    t, p = cfg.training, cfg.parallel
    return (f"training {cfg.model.num_layers} layers x {cfg.model.hidden_size} on {state.world_size} ranks "
            f"(TP {p.tensor_model_parallel_size}, PP {p.pipeline_model_parallel_size}, DP {state.dp_size}); "
            f"{state.num_microbatches} micro-batches of {t.micro_batch_size} per step; sources: "
            f"{', '.join(state.source_names)}; cross-entropy: {state.cross_entropy}"
            + (f"; loss weights: {_weights_text(state)}" if uses_loss_weights(state) else "")
            + (f"; {_fp8_text(cfg, fp8_backend)}" if fp8_backend else ""))


def run_training(cfg: RunConfig, *, print_fn: Callable[[str], None] = print,
                 signal_flag: Optional[SignalFlag] = None, callbacks: Optional[list] = None) -> int:
    """Train to ``cfg.training.train_iters``; return the process exit code.

    ``signal_flag``: an already installed :class:`SignalFlag` (``sfm train`` installs one
    before anything else); None installs one here (and restores the previous handlers at
    the end). A signal that arrives before the first step stops the run at the next
    startup check (after the parallel state is up, and after resuming) with the requeue
    code, without saving (nothing was trained). ``callbacks``: extra
    :class:`~megatron_sfm.training.callbacks.Callback` objects, run with the built-in
    ones and those named in ``SFM_CALLBACKS``.
    """
    from megatron_sfm.training.callbacks import env_callbacks

    extra = list(callbacks or []) + env_callbacks()  # a bad SFM_CALLBACKS fails before anything is built
    own_flag = signal_flag is None
    flag = SignalFlag().install() if own_flag else signal_flag
    try:
        return _train(cfg, flag, print_fn, extra)
    finally:
        if own_flag:
            flag.restore(force=True)  # in-process callers keep their own handlers


def _train(cfg: RunConfig, flag: SignalFlag, print_fn: Callable[[str], None], extra: list) -> int:
    from megatron_sfm.training.callbacks import default_callbacks
    from megatron_sfm.training.state import build_training_state, check_no_fp8_fallback, release_training_state
    from megatron_sfm.training.trainer import Trainer

    fp8_backend = check_no_fp8_fallback(cfg)
    try:
        state = build_training_state(cfg, stop_check=flag.any_rank)
    except StartupInterrupted:
        code = requeue_exit_code()
        if _global_rank() == 0:
            print_fn(f"received {flag.name()} while building the model: nothing trained, nothing to save; "
                     f"exiting with {code} (requeue)")
        flag.hold()
        return code
    try:
        trainer = Trainer(cfg, state, default_callbacks(cfg, flag) + extra, print_fn=print_fn,
                          banner=banner(cfg, state, fp8_backend))
        return trainer.run()
    finally:
        release_training_state(state)  # in-process callers (tests, notebooks) get the memory back

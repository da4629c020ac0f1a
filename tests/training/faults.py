"""Fault injection for the training tests: a callback the test harness plugs into `sfm train`.

Production code knows nothing of these faults. ``training_helpers.run_train`` sees the
test-only environment variables below and sets ``SFM_CALLBACKS=<this file>:callbacks``,
so the trainer subprocess loads this module and registers what :func:`callbacks` returns.

``SFM_FAULTS`` (iterations 1-based; ``@0`` where the fault has no iteration), e.g.
``"kill@7;nan_loss@3,4;crash_in_save@4"``:

* ``signal_in_resume@0``: SIGUSR1 to itself once the state is built, just before the
  checkpoint is loaded (SLURM's warning arriving while the trainer resumes).
* ``nan_loss@N``: step N's forward returns NaN (a forward hook on the last stage's
  GPTModel), so its loss and gradients are NaN and the step must be skipped.
* ``kill@N``: SIGKILL itself right after step N, before anything else sees the step
  (logging, evaluation, async finalisation, saving).
* ``sigterm@N``: SIGTERM to itself right after step N (the run saves and exits 75).
* ``sigterm_rank1@N``: the same on global rank 1 only (the other ranks must learn of it
  at the next step boundary and stop at the same iteration).
* ``late_sigterm@0``: SIGTERM to itself at the end of the run, and again while the
  interpreter shuts down (atexit): torchrun's closing SIGTERM to a rank that has saved.
* ``crash_in_save@N``: die (SIGKILL) after the shards of iteration N's checkpoint are
  written, before the folder is renamed and ``latest`` rewritten.
* ``slow_async_save@N``: the background writer of iteration N's async save sleeps
  ``SLOW_ASYNC_SAVE_S`` before writing, so a test can act while that save is in flight.

``SFM_SAMPLE_LOG=DIR``: each rank (TP 0, first stage) appends the global sample indices
and content hashes of each training micro-batch to ``DIR/samples.rank<R>.jsonl``.
"""

from __future__ import annotations

import atexit
import json
import os
import signal
import time
from functools import partial
from pathlib import Path

from megatron_sfm.training.callbacks import Callback

FAULTS_ENV = "SFM_FAULTS"
SAMPLE_LOG_ENV = "SFM_SAMPLE_LOG"
TEST_ENVS = (FAULTS_ENV, SAMPLE_LOG_ENV)
KNOWN = {"signal_in_resume", "nan_loss", "kill", "sigterm", "sigterm_rank1", "late_sigterm", "crash_in_save",
         "slow_async_save"}
SLOW_ASYNC_SAVE_S = 5.0


def parse(spec: str) -> dict[str, set[int]]:
    out: dict[str, set[int]] = {}
    for part in filter(None, (p.strip() for p in spec.split(";"))):
        name, _, iters = part.partition("@")
        name = name.strip()
        if name not in KNOWN:
            raise ValueError(f"{FAULTS_ENV}: unknown fault {name!r} (known: {', '.join(sorted(KNOWN))})")
        out[name] = {int(i) for i in iters.split(",") if i.strip()}
    return out


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_initialized() else 0


def _kill_self(sig: int) -> None:
    os.kill(os.getpid(), sig)


class Faults(Callback):
    order = -100  # before every built-in callback: a kill after step N precedes its save

    def __init__(self, faults: dict[str, set[int]]):
        self.faults = faults
        self._hooks: list = []

    def at(self, name: str, iteration: int) -> bool:
        return iteration in self.faults.get(name, set())

    def on_init(self, trainer) -> None:
        if self.faults.get("crash_in_save"):
            self._patch_finalize(trainer)
        if self.faults.get("slow_async_save"):
            self._patch_async_save(trainer)
        if self.at("signal_in_resume", 0):
            _kill_self(signal.SIGUSR1)

    def on_step_start(self, trainer) -> None:
        if self.at("nan_loss", trainer.state.iteration + 1):
            for gpt in trainer.state.unwrapped():
                if gpt.post_process:
                    self._hooks.append(gpt.register_forward_hook(lambda module, args, out: out * float("nan")))

    def on_step_end(self, trainer, result) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
        it = trainer.state.iteration
        if self.at("kill", it):
            _kill_self(signal.SIGKILL)
        if self.at("sigterm", it):
            _kill_self(signal.SIGTERM)
        if self.at("sigterm_rank1", it) and os.environ.get("RANK") == "1":
            _kill_self(signal.SIGTERM)

    def on_end(self, trainer, exit_code, error) -> None:
        if self.at("late_sigterm", 0):
            _kill_self(signal.SIGTERM)
            atexit.register(_kill_self, signal.SIGTERM)

    # The checkpoint faults wrap the checkpoint code from outside (this process only).
    def _patch_finalize(self, trainer) -> None:
        from megatron_sfm.training import checkpoint

        original = checkpoint.CheckpointManager._finalize_on_rank0
        crash = self.faults["crash_in_save"]

        def finalize_on_rank0(manager, tmp, final, train_state):
            if train_state["iteration"] in crash:
                _kill_self(signal.SIGKILL)
            return original(manager, tmp, final, train_state)

        checkpoint.CheckpointManager._finalize_on_rank0 = finalize_on_rank0

    def _patch_async_save(self, trainer) -> None:
        from megatron.core import dist_checkpointing

        original = dist_checkpointing.save
        slow = self.faults["slow_async_save"]
        state = trainer.state

        def save(*args, **kwargs):
            request = original(*args, **kwargs)
            if trainer.checkpoint.async_save and request is not None and request.async_fn is not None \
                    and state.iteration in slow:
                request = request._replace(async_fn=partial(_sleep_then, SLOW_ASYNC_SAVE_S, request.async_fn))
            return request

        dist_checkpointing.save = save


def _sleep_then(seconds: float, fn, *args, **kwargs):
    time.sleep(seconds)
    return fn(*args, **kwargs)


class SampleRecorder(Callback):
    """One JSON line per training micro-batch: iteration, global indices, content hashes."""

    order = -100

    def __init__(self, folder: str):
        self.folder = Path(folder)

    def on_init(self, trainer) -> None:
        from megatron.core import parallel_state

        from megatron_sfm.training.state import reset_train_iterators

        if parallel_state.get_tensor_model_parallel_rank() != 0 or \
                parallel_state.get_pipeline_model_parallel_rank() != 0:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        self.path = self.folder / f"samples.rank{_rank()}.jsonl"
        trainer.state.sample_recorder = self.record
        reset_train_iterators(trainer.state)

    def record(self, iteration_index: int, indices: list, tokens) -> None:
        from megatron_sfm.training.data import sample_hash

        with open(self.path, "a") as f:
            f.write(json.dumps({"iter": iteration_index + 1, "idx": indices, "hash": sample_hash(tokens)}) + "\n")


def callbacks() -> list[Callback]:
    """What ``SFM_CALLBACKS=<this file>:callbacks`` registers, from the test environment."""
    out: list[Callback] = []
    spec = os.environ.get(FAULTS_ENV, "")
    if spec:
        out.append(Faults(parse(spec)))
    folder = os.environ.get(SAMPLE_LOG_ENV)
    if folder:
        out.append(SampleRecorder(folder))
    return out


def harness_env(env: dict) -> dict:
    """``env`` with ``SFM_CALLBACKS`` naming this module when it sets a test fault or sample log."""
    env = dict(env)
    if any(env.get(name) for name in TEST_ENVS):
        entry = f"{Path(__file__).resolve()}:callbacks"
        env["SFM_CALLBACKS"] = ",".join(filter(None, [env.get("SFM_CALLBACKS", ""), entry]))
    return env

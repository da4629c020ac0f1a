"""SIGTERM / SIGUSR1 handling for ``sfm train`` (imports only the standard library).

``sfm train`` installs a :class:`SignalFlag` as the first thing it does, before the
config is read and before torch and Megatron-Core are imported, so SLURM's time-limit
warning (SIGUSR1) or a preemption (SIGTERM) that arrives while the trainer is still
starting is remembered instead of killing the process. The trainer checks the flag at
fixed points during startup and at every step boundary (all ranks together), saves if
it trained anything, and exits with :func:`requeue_exit_code`.

Once the trainer has decided to exit with that code, :meth:`SignalFlag.hold` makes both
signals ignored (``SIG_IGN``) until the process is gone, and :meth:`SignalFlag.restore`
leaves them so: under ``torchrun`` a rank that saved and is shutting down still gets the
SIGTERM torchrun sends the remaining workers when another rank exits first, and with
the default action restored it would die of it (exit -15) instead of exiting with the
requeue code. ``SIG_IGN`` (unlike a Python handler, which the interpreter resets while
it finalises) holds until the very end.
"""

from __future__ import annotations

import os
import signal
from typing import Optional


def requeue_exit_code() -> int:
    try:
        from megatron_sfm.launch.exit_codes import REQUEUE_EXIT_CODE
    except ImportError:  # launch package absent: EX_TEMPFAIL, the same value
        return 75
    return REQUEUE_EXIT_CODE


class StartupInterrupted(Exception):
    """A stop signal arrived before training began (nothing trained, nothing to save)."""


class SignalFlag:
    """SIGTERM / SIGUSR1 set a flag; the trainer saves and exits at the next check."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.received: Optional[int] = None
        self.held = False
        self._previous = {}

    def install(self) -> "SignalFlag":
        for sig in self.SIGNALS:
            if sig not in self._previous:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):  # noqa: ARG002
        self.received = signum

    def hold(self) -> None:
        """Ignore SIGTERM / SIGUSR1 from now until the process exits (the stop is decided).

        The previous handlers are still remembered, so ``restore(force=True)`` (in-process
        callers that go on) puts them back. Only in the main thread (like ``install``).
        """
        for sig in self.SIGNALS:
            if sig not in self._previous:
                self._previous[sig] = signal.getsignal(sig)
            signal.signal(sig, signal.SIG_IGN)
        self.held = True

    def restore(self, force: bool = False) -> None:
        """Put the previous handlers back; after :meth:`hold` only with ``force=True``."""
        if self.held and not force:
            return
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
        self.held = False

    def name(self) -> str:
        """The received signal's name (SIGTERM, SIGUSR1), or 'on another rank'."""
        if self.received is None:
            return "on another rank"
        try:
            return signal.Signals(self.received).name
        except ValueError:
            return str(self.received)

    def any_rank(self) -> bool:
        """True when any rank got a signal (with torch.distributed: all ranks must call this together)."""
        import torch
        import torch.distributed as dist

        if not (dist.is_initialized() and dist.get_world_size() > 1):
            return self.received is not None
        on_gpu = torch.cuda.is_available() and dist.get_backend() == "nccl"
        flag = torch.tensor([1 if self.received is not None else 0], dtype=torch.int32,
                            device="cuda" if on_gpu else "cpu")
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def world_size_from_env() -> int:
    """Ranks of this job as the launcher announces them (torchrun: WORLD_SIZE; srun: SLURM_NTASKS)."""
    return int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", "1")))

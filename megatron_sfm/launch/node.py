"""The per-node agent that ``srun`` starts on every node: it runs torchrun and turns the
batch script's stop request into SIGUSR1 for the trainer ranks only.

``python -m megatron_sfm.launch.node [--] TORCHRUN_COMMAND...``

Why not let SLURM deliver SIGUSR1 to the step directly: SLURM signals *every* process of
a step. Processes that the trainer spawned with default signal handling (Megatron-Core's
checkpoint writer starts a ``multiprocessing`` manager, for example) die from SIGUSR1, and
the final checkpoint then fails. So the batch script sends :data:`STOP_SIGNAL` (SIGWINCH,
whose default action is "ignore", harmless to every process), and this agent sends
SIGUSR1 to torchrun's direct children, which are the trainer ranks.

Signals here:

* SIGUSR1 is ignored by this agent and, inherited through ``exec``, by torchrun, so a
  stray USR1 (``scancel --signal=USR1 JOBID``) cannot kill torchrun. The trainer installs
  its own handler, which replaces the inherited "ignore".
* SIGTERM / SIGINT (time limit, ``scancel``, preemption) reach torchrun directly from
  SLURM; the agent only logs them and keeps waiting, so that the step's task does not end
  (and take the step down) while torchrun lets its workers save.

The exit status is torchrun's (128 + N when it was killed by signal N).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

STOP_SIGNAL = signal.SIGWINCH
"""What the batch script sends to the training step to ask for save-and-exit."""


def _log(message: str) -> None:
    print(f"[sfm-node {socket.gethostname()}] {message}", file=sys.stderr, flush=True)


def trainer_pids(torchrun_pid: int) -> list[int]:
    """Direct children of torchrun (its worker processes), from /proc."""
    try:
        import psutil

        return [p.pid for p in psutil.Process(torchrun_pid).children(recursive=False)]
    except Exception:  # psutil missing or torchrun gone: scan /proc by hand
        pids = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == torchrun_pid:
                pids.append(int(entry))
        return pids


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        print("usage: python -m megatron_sfm.launch.node [--] TORCHRUN_COMMAND...", file=sys.stderr)
        return 2
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # inherited by torchrun (see the module docstring)
    child = subprocess.Popen(argv)

    def on_stop(signum, frame):
        pids = trainer_pids(child.pid)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGUSR1)
            except ProcessLookupError:
                pass
        _log(f"stop requested: SIGUSR1 to trainer process(es) {pids}")

    def on_term(signum, frame):
        _log(f"{signal.Signals(signum).name}: waiting for torchrun to stop its workers")

    signal.signal(STOP_SIGNAL, on_stop)
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    rc = child.wait()
    return 128 - rc if rc < 0 else rc


if __name__ == "__main__":
    sys.exit(main())

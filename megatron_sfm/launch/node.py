"""The per-node agent that ``srun`` starts on every node: it runs the launcher (torchrun, or
``accelerate launch`` for post-training) and turns the batch script's stop request into a
signal for the worker ranks only.

``python -m megatron_sfm.launch.node [--stop-signal USR1|TERM] [--direct] [--] COMMAND...``

* ``--stop-signal`` (default ``USR1``): what the ranks get. ``sfm train`` saves on USR1;
  post-training stages use ``TERM`` (``sfm posttrain`` saves at the next step and exits
  75; a process without a handler would die; either way the requeued run resumes from
  its last checkpoint).
* ``--direct``: ``COMMAND`` is the worker itself (one process, no launcher), so the
  signal goes to it rather than to its children.

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


_USAGE = "usage: python -m megatron_sfm.launch.node [--stop-signal USR1|TERM] [--direct] [--] COMMAND..."
RANK_SIGNALS = {"USR1": signal.SIGUSR1, "TERM": signal.SIGTERM}


def _parse(argv: list[str]) -> tuple[signal.Signals, bool, list[str]] | None:
    """(signal for the ranks, direct, command), or None for a usage error."""
    rank_signal, direct = signal.SIGUSR1, False
    while argv and argv[0].startswith("--"):
        if argv[0] == "--":
            argv = argv[1:]
            break
        if argv[0] == "--direct":
            direct, argv = True, argv[1:]
        elif argv[0] == "--stop-signal" and len(argv) > 1 and argv[1] in RANK_SIGNALS:
            rank_signal, argv = RANK_SIGNALS[argv[1]], argv[2:]
        else:
            return None
    return (rank_signal, direct, argv) if argv else None


def main(argv: list[str] | None = None) -> int:
    parsed = _parse(list(sys.argv[1:] if argv is None else argv))
    if parsed is None:
        print(_USAGE, file=sys.stderr)
        return 2
    rank_signal, direct, command = parsed
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # inherited by torchrun (see the module docstring)
    child = subprocess.Popen(command)

    def on_stop(signum, frame):
        pids = [child.pid] if direct else trainer_pids(child.pid)
        for pid in pids:
            try:
                os.kill(pid, rank_signal)
            except ProcessLookupError:
                pass
        _log(f"stop requested: {rank_signal.name} to trainer process(es) {pids}")

    def on_term(signum, frame):
        _log(f"{signal.Signals(signum).name}: waiting for torchrun to stop its workers")

    signal.signal(STOP_SIGNAL, on_stop)
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    rc = child.wait()
    return 128 - rc if rc < 0 else rc


if __name__ == "__main__":
    sys.exit(main())

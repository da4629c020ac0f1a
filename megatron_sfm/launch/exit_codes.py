"""Exit codes shared by the trainer and the SLURM batch script that launches it.

The trainer (``sfm train``) exits with :data:`REQUEUE_EXIT_CODE` after it received SIGUSR1
or SIGTERM, saved a checkpoint to ``checkpoint.save`` (with its ``latest`` marker), and
stopped early: "not finished, run me again". 0 means training finished. Anything else is
a failure. The batch script rendered by ``sfm launch slurm`` requeues the job on this code
(or when SLURM's USR1 warning reached it), up to ``--max-requeues`` times.

75 is ``EX_TEMPFAIL`` from BSD ``sysexits.h`` ("temporary failure; the user is invited to
retry"), outside the ranges that Python (1, 2), the shell (126, 127) and signals (128+N)
use.
"""

REQUEUE_EXIT_CODE = 75
"""The trainer saved after SIGUSR1/SIGTERM and asks to be run again (requeued)."""

FINISHED_EXIT_CODE = 0
"""Training reached ``training.train_iters``."""

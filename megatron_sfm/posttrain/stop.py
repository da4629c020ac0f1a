"""Save and stop on SIGTERM / SIGUSR1 during post-training, so a requeued job loses nothing.

``sfm posttrain`` installs a :class:`~megatron_sfm.training.signals.SignalFlag` as the first
thing it does (the same flag ``sfm train`` uses), so the time-limit warning that the
batch script turns into SIGTERM for the ranks, a preemption, or ``scancel --signal=TERM``
is remembered instead of killing the process. At every optimizer-step end all ranks
agree (one all-reduce) whether any of them got a signal; if so the Trainer saves a
checkpoint at that step and stops, and the command exits with the requeue code (75).
The requeued job runs the same command, which resumes from that checkpoint. A signal
before training starts stops with nothing to save (the earlier checkpoints stay); one
on the last step lets the run finish.
"""

from __future__ import annotations


class StoppedForRequeue(Exception):
    """Training stopped on a signal after saving ``checkpoint`` (None: stopped before training)."""

    def __init__(self, signal_name: str, step: int | None, checkpoint: str | None):
        self.signal_name, self.step, self.checkpoint = signal_name, step, checkpoint
        where = f"saved {checkpoint} at step {step}" if checkpoint else "before training started, nothing to save"
        super().__init__(f"received {signal_name}: {where}")


def stop_on_signal_callback(flag):
    """A ``TrainerCallback`` that turns ``flag`` (set on any rank) into save-and-stop at the next step end."""
    from transformers import TrainerCallback

    class StopOnSignal(TrainerCallback):
        def __init__(self):
            self.stopped_at: int | None = None

        def on_step_end(self, args, state, control, **kwargs):
            if flag.any_rank() and state.global_step < state.max_steps:  # every rank calls this, in step
                control.should_save = True
                control.should_training_stop = True
                self.stopped_at = state.global_step
            return control

    return StopOnSignal()

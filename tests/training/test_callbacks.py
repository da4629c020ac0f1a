"""Callbacks plug into the training loop without editing it (megatron_sfm.training.callbacks).

In one process (the tiny model, mock data): a user callback sees every event in order, can
stop the run with its own exit code (the checkpoint callback saves first), and is found
through ``SFM_CALLBACKS``; bad ``SFM_CALLBACKS`` entries are one-line errors.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from megatron_sfm.config.loader import load_config
from megatron_sfm.errors import SfmError
from megatron_sfm.training.callbacks import Callback, load_callbacks
from megatron_sfm.training.checkpoint import latest_checkpoint, verify_checkpoint
from megatron_sfm.training.loop import run_training

TINY = Path(__file__).resolve().parents[2] / "examples" / "configs" / "tiny.yaml"


def _config(save, *extra: str):
    return load_config(TINY, [f"checkpoint.save={save}", "training.micro_batch_size=2", "training.global_batch_size=4",
                              "model.seq_length=32", "optimizer.warmup_iters=0", "logging.log_memory=false",
                              "logging.tensorboard_dir=null", *extra])


class Recorder(Callback):
    """Counts steps and records every event (what a user's own callback would do)."""

    def __init__(self):
        self.steps = 0
        self.events: list[tuple] = []

    def on_init(self, trainer):
        self.events.append(("init", trainer.state.iteration))

    def on_start(self, trainer):
        self.events.append(("start", trainer.state.iteration))

    def on_step_start(self, trainer):
        self.events.append(("step_start", trainer.state.iteration))

    def on_step_end(self, trainer, result):
        self.steps += 1
        assert result.iteration == trainer.state.iteration
        self.events.append(("step_end", result.iteration))

    def on_log(self, trainer, values, step):
        self.events.append(("log", step, "valid/loss" in values, "train/loss" in values))

    def on_eval(self, trainer, result):
        self.events.append(("eval", trainer.state.iteration, result.batches))

    def on_save(self, trainer, path, reason):
        self.events.append(("save", trainer.state.iteration, reason, path.name))

    def on_stop(self, trainer, stop):
        self.events.append(("stop", stop.reason, stop.exit_code))

    def on_end(self, trainer, exit_code, error):
        self.events.append(("end", exit_code, error))


def test_a_user_callback_sees_every_event_in_order(single_process_parallel, tmp_path):
    rec = Recorder()
    lines: list[str] = []
    cfg = _config(tmp_path / "ckpt", "training.train_iters=4", "training.log_interval=2",
                  "checkpoint.save_interval=3", "training.eval_interval=2", "training.eval_iters=1")
    assert run_training(cfg, print_fn=lines.append, callbacks=[rec]) == 0
    assert rec.steps == 4
    # user callbacks run before the built-in ones: a step's log, eval and save follow its step_end
    assert rec.events == [
        ("init", 0), ("start", 0),
        ("step_start", 0), ("step_end", 1),
        ("step_start", 1), ("step_end", 2), ("log", 2, False, True), ("log", 2, True, False), ("eval", 2, 1),
        ("step_start", 2), ("step_end", 3), ("save", 3, "interval", "iter_0000003"),
        ("step_start", 3), ("step_end", 4), ("log", 4, False, True), ("log", 4, True, False), ("eval", 4, 1),
        ("stop", "finished", 0), ("save", 4, "exit", "iter_0000004"), ("end", 0, None)]
    assert lines[-1] == "finished: 4 iterations, 16 samples, 0 skipped steps"


class StopAt(Callback):
    def __init__(self, iteration: int, code: int):
        self.iteration, self.code = iteration, code

    def on_step_end(self, trainer, result):
        if trainer.state.iteration == self.iteration:
            trainer.request_stop("budget", self.code, message=f"budget reached at {self.iteration}",
                                 save_reason="budget")


def test_a_callback_stops_the_run_with_its_own_code_after_a_save(single_process_parallel, tmp_path):
    save = tmp_path / "ckpt"
    lines: list[str] = []
    assert run_training(_config(save, "training.train_iters=10"), print_fn=lines.append,
                        callbacks=[StopAt(2, 3)]) == 3
    state = verify_checkpoint(latest_checkpoint(save))
    assert state["iteration"] == 2 and state["reason"] == "budget"
    assert lines[-1] == "budget reached at 2"


def test_callbacks_named_in_the_environment_are_registered(single_process_parallel, tmp_path, monkeypatch):
    module = tmp_path / "my_callbacks.py"
    module.write_text("from megatron_sfm.training.callbacks import Callback\n"
                      "class Count(Callback):\n"
                      "    def on_step_end(self, trainer, result):\n"
                      "        trainer.say(f'counted {result.iteration}')\n")
    monkeypatch.setenv("SFM_CALLBACKS", f"{module}:Count")
    lines: list[str] = []
    assert run_training(_config(tmp_path / "ckpt", "training.train_iters=2"), print_fn=lines.append) == 0
    assert [l for l in lines if l.startswith("counted")] == ["counted 1", "counted 2"]


def test_bad_callback_specs_are_one_line_errors(tmp_path):
    with pytest.raises(SfmError, match=r"^SFM_CALLBACKS: 'nocolon' is not of the form module:name"):
        load_callbacks("nocolon")
    with pytest.raises(SfmError, match=r"^SFM_CALLBACKS: cannot import module 'no_such_module_sfm' "
                                       r"\(ModuleNotFoundError"):
        load_callbacks("no_such_module_sfm:Thing")
    with pytest.raises(SfmError, match=r"^SFM_CALLBACKS: file .*missing\.py not found"):
        load_callbacks(f"{tmp_path / 'missing.py'}:Thing")
    with pytest.raises(SfmError, match=r"^SFM_CALLBACKS: megatron_sfm.errors has no attribute 'Nope'"):
        load_callbacks("megatron_sfm.errors:Nope")
    with pytest.raises(SfmError, match=r"^SFM_CALLBACKS: megatron_sfm.errors:SfmError gave SfmError, not a"):
        load_callbacks("megatron_sfm.errors:SfmError")
    assert load_callbacks("") == [] and load_callbacks(None) == []
    got = load_callbacks("megatron_sfm.training.callbacks:Callback, megatron_sfm.training.callbacks:Callback")
    assert len(got) == 2 and all(type(c) is Callback for c in got)


def test_production_code_has_no_test_faults():
    """Fault injection lives in tests/training/faults.py (a callback), not in the package."""
    import megatron_sfm

    package = Path(megatron_sfm.__file__).resolve().parent
    names = ("SFM_FAULTS", "SFM_SAMPLE_LOG", "fault_at", "nan_loss", "crash_in_save", "slow_async_save",
             "signal_in_resume", "SampleRecorder")
    found = [f"{p.relative_to(package)}: {n}" for p in package.rglob("*.py") for n in names if n in p.read_text()]
    assert found == []

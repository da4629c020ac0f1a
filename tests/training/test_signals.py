"""SIGTERM / SIGUSR1 that arrive while `sfm train` is still starting, or after it has saved
and is exiting: the exit code is the requeue code.

(A signal in the middle of training, which saves first, is tested in test_checkpoint.py.)
"""

import os
import signal
import subprocess
import sys
import time

from training_helpers import check, kill_session, run_train, write_config
from megatron_sfm.launch.exit_codes import REQUEUE_EXIT_CODE
from megatron_sfm.training.checkpoint import latest_checkpoint, verify_checkpoint


def _caught_signals(pid: int) -> int:
    """The process's mask of signals with a handler (SigCgt in /proc/PID/status); 0 when gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("SigCgt:"):
                    return int(line.split()[1], 16)
    except FileNotFoundError:
        pass
    return 0


def test_signal_at_the_earliest_moment_exits_with_requeue_code(tmp_path, corpus):
    """SIGTERM as soon as the handlers exist (before torch is imported): exit 75, nothing trained or saved."""
    cfg = write_config(tmp_path / "cfg.yaml", corpus)
    save = tmp_path / "ckpt"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for name in ("SFM_FAULTS", "SFM_SAMPLE_LOG", "SFM_CALLBACKS"):
        env.pop(name, None)
    wanted = (1 << (signal.SIGTERM - 1)) | (1 << (signal.SIGUSR1 - 1))
    proc = subprocess.Popen([sys.executable, "-m", "megatron_sfm.cli", "train", str(cfg), f"checkpoint.save={save}"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while _caught_signals(proc.pid) & wanted != wanted:
            assert proc.poll() is None and time.monotonic() < deadline, "handlers never installed"
            time.sleep(0.001)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        kill_session(proc.pid)
        proc.wait()
    assert proc.returncode == REQUEUE_EXIT_CODE, err[-3000:]
    assert "nothing to save" in out and "requeue" in out and "iter " not in out
    assert not save.exists() or not any(save.glob("iter_*"))


def test_signal_while_resuming_exits_with_requeue_code_without_saving(tmp_path, corpus, reference_run):
    """SIGUSR1 after the model is built (while the checkpoint loads): no step, no new checkpoint, exit 75."""
    cfg = write_config(tmp_path / "cfg.yaml", corpus)
    save = tmp_path / "ckpt"
    proc = check(run_train(cfg, [f"checkpoint.load={reference_run / 'ckpt' / 'iter_0000005'}", f"checkpoint.save={save}"],
                           env={"SFM_FAULTS": "signal_in_resume@0"}), rc=REQUEUE_EXIT_CODE)
    assert "resumed from iteration 5" in proc.stdout
    assert "before the first step: nothing trained, nothing to save" in proc.stdout and "iter " not in proc.stdout
    assert not save.exists() or not any(save.glob("iter_*"))


def test_a_sigterm_after_the_save_still_exits_with_the_requeue_code(tmp_path, corpus):
    """torchrun's closing SIGTERM reaches a rank that saved and said 'exiting with 75'.

    Deterministic stand-in for the race seen under torchrun (DP=2, about 1 run in 4):
    SIGTERM after step 2 (the run saves and prints the requeue line), then SIGTERM again
    at the end of the run and once more while the interpreter shuts down (atexit, after
    `sfm train` has put its signal handlers away). The exit code must stay 75.
    """
    cfg = write_config(tmp_path / "cfg.yaml", corpus, training={"train_iters": 100})
    save = tmp_path / "ckpt"
    proc = check(run_train(cfg, [f"checkpoint.save={save}"], env={"SFM_FAULTS": "sigterm@2;late_sigterm@0"}),
                 rc=REQUEUE_EXIT_CODE)
    assert proc.stdout.strip().splitlines()[-1] == (f"received signal {int(signal.SIGTERM)}: saved iteration 2, "
                                                    f"exiting with {REQUEUE_EXIT_CODE} (requeue)")
    state = verify_checkpoint(latest_checkpoint(save))
    assert state["iteration"] == 2 and state["reason"] == "signal"


def test_hold_ignores_the_signals_until_a_forced_restore():
    """After hold(), SIGTERM/SIGUSR1 do nothing, restore() keeps them ignored, restore(force=True) undoes."""
    from megatron_sfm.training.signals import SignalFlag

    before = {sig: signal.getsignal(sig) for sig in SignalFlag.SIGNALS}
    flag = SignalFlag().install()
    try:
        flag.hold()
        for sig in SignalFlag.SIGNALS:
            assert signal.getsignal(sig) == signal.SIG_IGN
        os.kill(os.getpid(), signal.SIGTERM)  # ignored: this test process lives on
        assert flag.received is None
        flag.restore()
        assert all(signal.getsignal(sig) == signal.SIG_IGN for sig in SignalFlag.SIGNALS)
    finally:
        flag.restore(force=True)
    assert {sig: signal.getsignal(sig) for sig in SignalFlag.SIGNALS} == before

"""SIGTERM / SIGUSR1 that arrive while `sfm train` is still starting: exit with the requeue code.

(A signal in the middle of training, which saves first, is tested in test_checkpoint.py.)
"""

import os
import signal
import subprocess
import sys
import time

from training_helpers import check, kill_session, run_train, write_config
from megatron_sfm.launch.exit_codes import REQUEUE_EXIT_CODE


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
    env.pop("SFM_FAULTS", None)
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

"""Run ``sfm train`` in subprocesses (1 process, or N gloo ranks via torchrun) and read results."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import yaml

from faults import TEST_ENVS, harness_env
from megatron_sfm.testing.distributed import free_port
from megatron_sfm.training.callbacks import CALLBACKS_ENV

BASE = {
    "model": {"preset": "tiny", "precision": "fp32", "attention_backend": "sdpa",
              "hidden_dropout": 0.0, "attention_dropout": 0.0},
    "parallel": {"use_distributed_optimizer": True},
    "training": {"micro_batch_size": 2, "global_batch_size": 8, "train_iters": 10, "log_interval": 1,
                 "seed": 1234},
    "optimizer": {"lr": 0.002, "min_lr": 0.0002, "warmup_iters": 0, "weight_decay": 0.1, "clip_grad": 1.0},
    "data": {},
    "checkpoint": {"save_interval": 0},
    "logging": {"log_memory": False},
}


def write_config(path: Path, blend: Path, **sections) -> Path:
    cfg = {k: dict(v) for k, v in BASE.items()}
    cfg["data"]["blend"] = str(blend)
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_train(config: Path, overrides: list[str] | None = None, nproc: int = 1, env: dict | None = None,
              timeout: float = 300) -> subprocess.CompletedProcess:
    """``sfm train CONFIG overrides`` on ``nproc`` ranks; returns the finished process.

    ``env`` may set the test hooks ``SFM_FAULTS`` and ``SFM_SAMPLE_LOG`` (tests/training/faults.py):
    the trainer then loads that module's callbacks through ``SFM_CALLBACKS``.
    """
    full_env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for name in (*TEST_ENVS, CALLBACKS_ENV):
        full_env.pop(name, None)
    full_env = harness_env({**full_env, **(env or {})})  # SFM_FAULTS / SFM_SAMPLE_LOG: faults.py's callback
    if nproc == 1:
        cmd = [sys.executable, "-m", "megatron_sfm.cli", "train", str(config), *(overrides or [])]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
               "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
               "-m", "megatron_sfm.cli", "train", str(config), *(overrides or [])]
    return run_in_own_session(cmd, full_env, timeout)


def run_in_own_session(cmd: list[str], env: dict, timeout: float) -> subprocess.CompletedProcess:
    """Run ``cmd`` in a new session; afterwards kill what is left of that session.

    A process that dies by SIGKILL leaves dist_checkpointing's multiprocessing helpers
    (spawned children) behind; they would hold captured pipes open, so output goes to
    files and the session is cleaned up explicitly.
    """
    marker = uuid.uuid4().hex
    env = dict(env, SFM_TEST_MARKER=marker)
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, env=env, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        finally:
            kill_session(proc.pid)
            proc.wait()
            kill_marked_processes(marker)
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(cmd, rc, out.read(), err.read())


def kill_marked_processes(marker: str) -> None:
    """SIGKILL every process whose environment has ``SFM_TEST_MARKER=<marker>``.

    torchrun starts each rank in its own session, so when ranks die by SIGKILL their
    multiprocessing helpers (dist_checkpointing's Manager and resource tracker) are
    orphaned outside the session killed above; the marker finds exactly them.
    """
    needle = f"SFM_TEST_MARKER={marker}".encode()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            if needle in (proc / "environ").read_bytes().split(b"\0"):
                os.kill(int(proc.name), signal.SIGKILL)
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            pass


def kill_session(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)  # the session/process group this test started
    except (ProcessLookupError, PermissionError):
        pass


def check(proc: subprocess.CompletedProcess, rc: int = 0) -> subprocess.CompletedProcess:
    assert proc.returncode == rc, f"exit {proc.returncode} (expected {rc})\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    return proc


def scalars(tb_dir: Path, tag: str) -> dict[int, float]:
    """step -> value of ``tag`` from TensorBoard event files (tensorboard's own reader)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})
    acc.Reload()
    if tag not in acc.Tags()["scalars"]:
        raise KeyError(f"{tag} not in {acc.Tags()['scalars']}")
    return {e.step: e.value for e in acc.Scalars(tag)}


def scalar_tags(tb_dir: Path) -> list[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir))
    acc.Reload()
    return list(acc.Tags()["scalars"])

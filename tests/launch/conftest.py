"""Fixtures for the launch tests: a real two-node SLURM cluster on this host.

``slurm_cluster`` (session scope) starts the vendored recipe (scripts/slurm-local) with
two slurmd's of two CPUs each, in its own folder and on its own ports so that it never
touches another cluster on the machine. It reuses a cluster that ``scripts/ci-services.sh``
already started (same settings) and then leaves it running; one it started itself it
stops at the end. It skips, saying why, only where SLURM cannot be installed (not root,
no apt-get); with ``SFM_REQUIRE_SLURM=1`` (CI) that is a failure instead.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "scripts" / "slurm-local"
STANDINS = Path(__file__).resolve().parent / "standins"

# Keep in sync with scripts/ci-services.sh.
CLUSTER_DIR = os.environ.get("SFM_SLURM_TEST_DIR", "/tmp/sfm-slurm-test")
CLUSTER_ENV = {"SLURM_LOCAL_NODES": "2", "SLURM_LOCAL_CPUS": "2", "SLURM_LOCAL_PORT_BASE": "17817"}

TERMINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                   "BOOT_FAIL", "DEADLINE"}


def _skip_or_fail(reason: str):
    if os.environ.get("SFM_REQUIRE_SLURM") == "1":
        pytest.fail(f"SLURM is required here (SFM_REQUIRE_SLURM=1) but: {reason}")
    pytest.skip(f"real SLURM cluster unavailable: {reason}")


@pytest.fixture(scope="session")
def slurm_cluster():
    """Start (or reuse) the test cluster; yields the path of its slurm.conf."""
    have_slurm = all(shutil.which(b, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
                     for b in ("slurmctld", "slurmd", "sbatch", "munged"))
    if os.geteuid() != 0:
        _skip_or_fail("the slurm-local recipe runs munged/slurmctld/slurmd as root, and this is not root")
    if not have_slurm and shutil.which("apt-get") is None:
        _skip_or_fail("slurm-wlm/munge are not installed and there is no apt-get to install them")
    env = dict(os.environ, **CLUSTER_ENV)
    proc = subprocess.run(["bash", str(RECIPE / "start-cluster.sh"), CLUSTER_DIR], env=env,
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        if not have_slurm and shutil.which("sbatch") is None:
            _skip_or_fail(f"installing slurm-wlm/munge failed: {proc.stderr.strip()[-500:]}")
        raise RuntimeError(f"start-cluster.sh failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    conf = proc.stdout.strip().split("=", 1)[1]
    reused = "already running" in proc.stderr
    old = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = conf
    try:
        yield conf
    finally:
        if old is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = old
        if not reused:
            subprocess.run(["bash", str(RECIPE / "stop-cluster.sh"), CLUSTER_DIR], capture_output=True, timeout=120)


def job_info(job_id: str) -> dict[str, str]:
    """``scontrol show job -o`` as a dict (finished jobs stay visible for MinJobAge=600 s)."""
    out = subprocess.run(["scontrol", "show", "job", "-o", str(job_id)], capture_output=True, text=True,
                         check=True).stdout
    info = {}
    for word in out.split():
        if "=" in word:
            key, value = word.split("=", 1)
            info.setdefault(key, value)
    return info


def job_name(job_id: str) -> str:
    """The job's name exactly as SLURM stored it (it may contain spaces and quotes)."""
    out = subprocess.run(["scontrol", "show", "job", str(job_id)], capture_output=True, text=True, check=True).stdout
    first = out.splitlines()[0]
    return first.split(" JobName=", 1)[1]


def wait_for_job(job_id: str, timeout: float = 300, log: Path | None = None) -> dict[str, str]:
    """Poll every 0.2 s until the job reaches a final state; return its scontrol fields."""
    deadline = time.monotonic() + timeout
    while True:
        info = job_info(job_id)
        if info.get("JobState") in TERMINAL_STATES:
            return info
        if time.monotonic() > deadline:
            subprocess.run(["scancel", str(job_id)])
            tail = log.read_text()[-4000:] if log is not None and log.exists() else ""
            raise AssertionError(f"job {job_id} still {info.get('JobState')} after {timeout} s\n{tail}")
        time.sleep(0.2)


def wait_until(predicate, timeout: float, what: str, job_id: str | None = None):
    deadline = time.monotonic() + timeout
    while not predicate():
        if job_id is not None and job_info(job_id).get("JobState") in TERMINAL_STATES:
            raise AssertionError(f"job {job_id} ended before {what}: {job_info(job_id)}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.2)

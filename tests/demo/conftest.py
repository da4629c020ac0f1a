"""One ``sfm demo --fast`` run per test session, shared by tests/demo/test_demo.py,
tests/demo/test_posttrain.py (which resumes the same folder with ``--posttrain``, so the
base demo is trained once) and tests/demo/test_pipeline.py (which reruns a copy of it)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest


def run_demo(out, *extra, timeout=1500) -> subprocess.CompletedProcess:
    """``sfm demo --fast --out OUT *extra`` in a child process (2 threads, wide console)."""
    env = dict(os.environ, OMP_NUM_THREADS="2", COLUMNS="200")
    return subprocess.run([sys.executable, "-m", "megatron_sfm.cli", "demo", "--fast", "--out", str(out), *extra],
                          capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(scope="session")
def fast_demo(tmp_path_factory):
    """(output folder, stdout) of ``sfm demo --fast``."""
    out = tmp_path_factory.mktemp("demo")
    proc = subprocess.run([sys.executable, "-m", "megatron_sfm.cli", "demo", "--fast", "--out", str(out)],
                          capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return out, proc.stdout


@pytest.fixture(scope="session")
def fast_posttrain_demo(fast_demo):
    """(output folder, stdout, seconds) of ``sfm demo --fast --posttrain`` resuming ``fast_demo``'s folder."""
    out, _ = fast_demo
    started = time.time()
    proc = run_demo(out, "--posttrain")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return out, proc.stdout, time.time() - started

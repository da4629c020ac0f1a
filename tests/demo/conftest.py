"""One ``sfm demo --fast`` run per test session, shared by tests/demo/test_demo.py and
tests/demo/test_posttrain.py (which resumes the same folder with ``--posttrain``, so the
base demo is trained once)."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.fixture(scope="session")
def fast_demo(tmp_path_factory):
    """(output folder, stdout) of ``sfm demo --fast``."""
    out = tmp_path_factory.mktemp("demo")
    proc = subprocess.run([sys.executable, "-m", "megatron_sfm.cli", "demo", "--fast", "--out", str(out)],
                          capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return out, proc.stdout

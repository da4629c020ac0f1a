"""Run a test body in N processes over gloo (torchrun), and collect what rank 0 returns.

Usage (from a test)::

    result = run_distributed("tests.model.dist_bodies:tp_forward", nproc=2, args={"tp": 2})

``target`` is ``module:function`` (or a path ``file.py:function``); the function is
called on every rank with the ``args`` dict after ``torch.distributed`` is initialised
with gloo, and what rank 0 returns (JSON-serialisable) comes back. A failure on any rank
raises with that rank's output.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from megatron_sfm.utils.net import free_port  # re-exported: the tests import it from here

_RUNNER = "megatron_sfm.testing._dist_entry"


def run_distributed(target: str, nproc: int, args: dict | None = None, timeout: float = 600,
                    env: dict | None = None) -> Any:
    """Run ``target`` on ``nproc`` gloo ranks; return rank 0's JSON result."""
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
               "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
               "-m", _RUNNER, target, json.dumps(args or {}), str(result)]
        full_env = dict(os.environ)
        full_env.setdefault("OMP_NUM_THREADS", "1")
        full_env.update(env or {})
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env)
        if proc.returncode != 0:
            raise RuntimeError(
                f"distributed run of {target} on {nproc} ranks failed (exit {proc.returncode}):\n"
                f"{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}")
        return json.loads(result.read_text()) if result.exists() else None

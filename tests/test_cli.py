"""The ``sfm`` dispatcher and the package layout."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_sfm.cli import GROUPS, available_groups


def test_help_lists_only_importable_groups():
    proc = subprocess.run(["sfm", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0
    groups = available_groups()
    assert "model" in groups
    for name in GROUPS:
        listed = f"\n  {name} " in proc.stdout
        assert listed == (name in groups), name


def test_unknown_command_exits_2():
    proc = subprocess.run(["sfm", "frobnicate"], capture_output=True, text=True)
    assert proc.returncode == 2 and "unknown command" in proc.stderr


REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("cwd", ["/", str(REPO)])
def test_layout_imports_from_any_working_directory(cwd):
    code = ("import megatron_sfm.kernels, megatron_sfm.data_tools, megatron_sfm.evaluation, pathlib, sys;"
            "import megatron_sfm.kernels.attention as m;"
            "sys.exit(0 if pathlib.Path(m.__file__).parts[-3:] == ('megatron_sfm', 'kernels', 'attention.py') else 3)")
    assert subprocess.run([sys.executable, "-c", code], cwd=cwd).returncode == 0
    # nothing of ours is importable under a top-level name other than megatron_sfm, even
    # with the checkout first on sys.path (python -c from the repository root)
    probe = ("import importlib.util as u, json;"
             "print(json.dumps({n: getattr(u.find_spec(n), 'origin', None) for n in "
             "['kernels', 'data_tools', 'evaluation', 'benchmarks', 'examples', 'scripts', 'tests']}))")
    out = subprocess.run([sys.executable, "-c", probe], cwd=cwd, capture_output=True, text=True, check=True).stdout
    for name, origin in json.loads(out).items():
        assert origin is None or not str(origin).startswith(str(REPO)), (name, origin)
    # what broke before: transformers imports PyPI's `kernels`, which a root folder shadowed
    proc = subprocess.run([sys.executable, "-c", "from transformers import GPTNeoXForCausalLM"], cwd=cwd,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_cli_import_is_light():
    code = "import sys, megatron_sfm.cli; sys.exit(1 if 'torch' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0

"""The ``sfm`` dispatcher and the package layout."""

import subprocess
import sys

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


def test_side_folders_install_under_megatron_sfm():
    code = ("import importlib.util, megatron_sfm.kernels, megatron_sfm.data_tools, megatron_sfm.evaluation;"
            "import sys; sys.exit(0)")
    assert subprocess.run([sys.executable, "-c", code], cwd="/").returncode == 0
    # no top-level 'kernels' of ours shadows PyPI's (transformers imports that name)
    probe = "import importlib.util as u; s=u.find_spec('kernels'); print(s.origin if s else 'none')"
    out = subprocess.run([sys.executable, "-c", probe], cwd="/", capture_output=True, text=True).stdout
    assert "megatron_sfm" not in out and "/kernels/__init__.py" not in out.replace("site-packages/kernels", "")


def test_cli_import_is_light():
    code = "import sys, megatron_sfm.cli; sys.exit(1 if 'torch' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0

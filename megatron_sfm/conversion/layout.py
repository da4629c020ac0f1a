"""Where things are in a checkpoint folder written by ``sfm train`` (docs/checkpoints.md).

::

    <save>/latest              "200\\n": the newest complete iteration
    <save>/iter_0000200/       dist_checkpointing torch_dist files + config.yaml,
                               train_state.json, manifest.json

This module only reads and writes those small files; tensors are read by
:mod:`megatron_sfm.conversion.dcp_reader`.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from megatron_sfm.errors import SfmError

LATEST = "latest"
CONFIG = "config.yaml"
TRAIN_STATE = "train_state.json"
MANIFEST = "manifest.json"
DCP_METADATA = ".metadata"
ITER_RE = re.compile(r"^iter_(\d{7,})$")


def iteration_dir_name(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def is_iteration_dir(path: Path) -> bool:
    return (path / DCP_METADATA).exists() or (path / "metadata.json").exists()


def list_iterations(save_dir: Path) -> list[int]:
    out = []
    for child in save_dir.iterdir() if save_dir.is_dir() else ():
        match = ITER_RE.match(child.name)
        if match and child.is_dir():
            out.append(int(match.group(1)))
    return sorted(out)


def resolve_iteration_dir(ckpt_dir: str | os.PathLike, iteration: int | None = None) -> Path:
    """The iteration folder to read.

    ``ckpt_dir`` is either a checkpoint root (with ``latest`` and ``iter_*`` folders) or
    one iteration folder. ``iteration`` picks ``iter_NNNNNNN`` under a root; without it
    the folder named by ``latest`` is used.
    """
    root = Path(ckpt_dir)
    if not root.exists():
        raise SfmError(f"{root}: checkpoint folder not found")
    if is_iteration_dir(root):
        if iteration is not None:
            match = ITER_RE.match(root.name)
            if match and int(match.group(1)) != iteration:
                raise SfmError(f"{root}: is the folder of iteration {int(match.group(1))}, not {iteration}")
        return root
    if iteration is None:
        marker = root / LATEST
        if not marker.exists():
            found = list_iterations(root)
            hint = f" (iterations present: {', '.join(map(str, found))}; pick one with --iteration)" if found else ""
            raise SfmError(f"{marker}: no 'latest' marker and no iteration given{hint}")
        text = marker.read_text(encoding="utf-8").strip()
        if not text.isdigit():
            raise SfmError(f"{marker}: expected an iteration number, got {text[:40]!r}")
        iteration = int(text)
    path = root / iteration_dir_name(iteration)
    if not path.is_dir():
        found = list_iterations(root)
        raise SfmError(f"{path}: no checkpoint for iteration {iteration}"
                       + (f" (present: {', '.join(map(str, found))})" if found else ""))
    return path


def check_manifest(iter_dir: Path) -> None:
    """Every file listed in ``manifest.json`` exists with its recorded size (when present)."""
    path = iter_dir / MANIFEST
    if not path.exists():
        return
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise SfmError(f"{path}:{exc.lineno}: invalid JSON: {exc.msg}") from None
    files = data.get("files", data) if isinstance(data, dict) else None
    if isinstance(files, list):  # [{"path": ..., "size": ...}, ...]
        files = {f.get("path") or f.get("name"): f.get("size") or f.get("bytes") for f in files if isinstance(f, dict)}
    if not isinstance(files, dict):
        raise SfmError(f"{path}: expected a mapping of file names to sizes")
    for name, size in files.items():
        if not isinstance(size, int):
            continue
        file = iter_dir / name
        if not file.exists():
            raise SfmError(f"{file}: listed in {MANIFEST} but missing (incomplete or damaged checkpoint)")
        actual = file.stat().st_size
        if actual != size:
            raise SfmError(f"{file}: {actual} bytes, {MANIFEST} says {size} (truncated or damaged checkpoint)")


def read_run_config(iter_dir: Path):
    """The resolved RunConfig saved inside the iteration folder (or beside it)."""
    from megatron_sfm.config.loader import load_config

    for path in (iter_dir / CONFIG, iter_dir.parent / CONFIG):
        if path.exists():
            return load_config(path)
    raise SfmError(f"{iter_dir / CONFIG}: not found (the checkpoint's resolved config is needed "
                   "to know the architecture)")


def read_train_state(iter_dir: Path) -> dict[str, Any]:
    path = iter_dir / TRAIN_STATE
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise SfmError(f"{path}:{exc.lineno}: invalid JSON: {exc.msg}") from None
    return data if isinstance(data, dict) else {}

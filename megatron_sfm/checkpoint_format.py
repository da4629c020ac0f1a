"""The one owner of our checkpoint format (docs/checkpoints.md): folder layout, ``latest``,
``manifest.json`` (sizes and content checksums), the ``train_state.json`` schema, the
saved run config and "is this a checkpoint".

Writers (``sfm train``'s :mod:`megatron_sfm.training.checkpoint`, ``sfm convert
from-hf``) and readers (resume, midtraining init, ``sfm convert to-hf``, evaluation) all
go through these functions, so they share one policy:

* a checkpoint folder without ``manifest.json`` is incomplete: an :class:`SfmError`;
* every file the manifest lists must exist with its recorded size, and (unless the caller
  skips it) its recorded content checksum: a changed byte is an :class:`SfmError` naming
  the file;
* ``train_state.json`` and ``config.yaml`` are required and checked.

::

    <root>/latest              "200\\n": the newest complete iteration
    <root>/config.yaml         the resolved config of the latest run that wrote here
    <root>/iter_0000200/       dist_checkpointing torch_dist files + config.yaml,
                               train_state.json, manifest.json (written last)

Checksums are XXH3-64 (``xxhash``) of each file's bytes, written as 16 hex digits. They are
computed by whoever wrote the file, right after writing it (while it is in the page
cache), and verified by reading every listed file once.
"""

from __future__ import annotations

import json
import logging
import mmap
import os
import re
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from megatron_sfm.errors import SfmError
from megatron_sfm.utils.readers import read_json

log = logging.getLogger(__name__)

FORMAT_VERSION = 2  # 1: manifest with sizes only; 2: sizes and checksums
LATEST = "latest"
CONFIG = "config.yaml"
TRAIN_STATE = "train_state.json"
MANIFEST = "manifest.json"
DCP_METADATA = ".metadata"
CHECKSUM_ALGORITHM = "xxh3_64"
# Per-rank checksum files a save leaves in its temporary folder; merged into the manifest.
CHECKSUM_SIDECAR_PREFIX = ".sfm_checksums."
ITER_RE = re.compile(r"^iter_(\d{7,})$")
# Keys every train_state.json has, with their types (docs/checkpoints.md#train_statejson).
TRAIN_STATE_REQUIRED = {"iteration": int, "consumed_train_samples": int}


# --------------------------------------------------------------------------- layout

def iteration_dir_name(iteration: int) -> str:
    """``iter_0000200``: the folder of one saved iteration (7 digits, zero padded)."""
    return f"iter_{iteration:07d}"


def is_iteration_dir(path: str | os.PathLike) -> bool:
    """A folder holding one saved iteration (complete or not: see :func:`verify_checkpoint`)."""
    path = Path(path)
    return path.is_dir() and any((path / name).exists() for name in (MANIFEST, DCP_METADATA, TRAIN_STATE))


def list_iterations(root: str | os.PathLike) -> list[int]:
    """The iterations with an ``iter_*`` folder under ``root``, ascending."""
    root = Path(root)
    out = []
    for child in root.iterdir() if root.is_dir() else ():
        match = ITER_RE.match(child.name)
        if match and child.is_dir():
            out.append(int(match.group(1)))
    return sorted(out)


def is_checkpoint(path: str | os.PathLike) -> bool:
    """True for a checkpoint root (a ``latest`` file and ``iter_*`` folders) or one iteration folder.

    A shape test only (cheap, for dispatching a path to the right loader); loading
    verifies the folder (:func:`verify_checkpoint`).
    """
    path = Path(path)
    if not path.is_dir():
        return False
    if ITER_RE.match(path.name) and is_iteration_dir(path):
        return True
    return (path / LATEST).is_file() and bool(list_iterations(path))


def read_latest(root: str | os.PathLike) -> int | None:
    """The iteration ``<root>/latest`` names, or None when there is no such file."""
    marker = Path(root) / LATEST
    if not marker.exists():
        return None
    text = marker.read_text(encoding="utf-8").strip()
    if not text.isdigit():
        raise SfmError(f"{marker}: expected an iteration number, found {text[:40]!r}")
    return int(text)


def write_latest(root: str | os.PathLike, iteration: int) -> None:
    """Point ``<root>/latest`` at ``iteration`` (atomically: temp file + rename)."""
    from megatron_sfm.utils.io import atomic_path

    with atomic_path(Path(root) / LATEST) as tmp:
        tmp.write_text(f"{iteration}\n", encoding="utf-8")


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    """The folder ``<root>/latest`` names, or None when there is no ``latest`` file."""
    root = Path(root)
    iteration = read_latest(root)
    if iteration is None:
        return None
    folder = root / iteration_dir_name(iteration)
    if not folder.exists():
        old = root / f".{folder.name}.old"  # a crash while replacing the same iteration
        if old.exists():
            return old
        raise SfmError(f"{root / LATEST}: names iteration {iteration} but {folder} does not exist")
    return folder


def resolve_checkpoint(path: str | os.PathLike, iteration: int | None = None) -> Path:
    """The iteration folder to read, from a checkpoint root or from one iteration folder.

    Under a root, ``iteration`` picks ``iter_NNNNNNN``; without it ``latest`` decides.
    """
    path = Path(path)
    if not path.exists():
        raise SfmError(f"{path}: checkpoint folder not found")
    if is_iteration_dir(path):
        match = ITER_RE.match(path.name)
        if iteration is not None and match and int(match.group(1)) != iteration:
            raise SfmError(f"{path}: is the folder of iteration {int(match.group(1))}, not {iteration}")
        return path
    if iteration is not None:
        folder = path / iteration_dir_name(iteration)
        if not folder.is_dir():
            found = list_iterations(path)
            raise SfmError(f"{folder}: no checkpoint for iteration {iteration}"
                           + (f" (present: {', '.join(map(str, found))})" if found else ""))
        return folder
    found = latest_checkpoint(path)
    if found is None:
        present = list_iterations(path)
        hint = (f" (iterations present: {', '.join(map(str, present))}; pick one)" if present else "")
        raise SfmError(f"{path}: no checkpoint here (neither an iter_* folder nor a folder with a "
                       f"'{LATEST}' marker){hint}")
    return found


# --------------------------------------------------------------------------- checksums

def file_checksum(path: str | os.PathLike) -> str:
    """XXH3-64 of the file's bytes, 16 hex digits (the file is mapped, not copied)."""
    import xxhash

    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            return xxhash.xxh3_64(b"").hexdigest()
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as view:
            return xxhash.xxh3_64(view).hexdigest()


def hash_files(paths: Iterable[str | os.PathLike]) -> dict[str, dict[str, Any]]:
    """``{file name: {"size": bytes, "checksum": hex}}`` for each path (names relative to its folder)."""
    out = {}
    for p in paths:
        p = Path(p)
        out[p.name] = {"size": p.stat().st_size, "checksum": file_checksum(p)}
    return out


def write_checksum_sidecar(folder: str | os.PathLike, rank: int, paths: Iterable[str | os.PathLike]) -> None:
    """Record the checksums of the files this rank wrote into ``folder`` (merged by :func:`write_manifest`)."""
    from megatron_sfm.utils.io import write_json

    write_json(Path(folder) / f"{CHECKSUM_SIDECAR_PREFIX}{rank}.json", hash_files(paths))


def _read_sidecars(folder: Path) -> dict[str, dict[str, Any]]:
    known: dict[str, dict[str, Any]] = {}
    for sidecar in sorted(folder.glob(f"{CHECKSUM_SIDECAR_PREFIX}*.json")):
        try:
            known.update(json.loads(sidecar.read_text(encoding="utf-8")))
        except (OSError, json.JSONDecodeError):
            pass  # a damaged sidecar only costs hashing those files again
        sidecar.unlink()
    return known


# --------------------------------------------------------------------------- manifest

def write_manifest(folder: str | os.PathLike) -> dict:
    """Write ``manifest.json`` (last): every file of ``folder`` with its size and checksum.

    Checksums recorded by the writers (:func:`write_checksum_sidecar`) are used when the
    file still has the recorded size; anything else is hashed here. Returns the manifest.
    """
    from megatron_sfm.utils.io import write_json

    folder = Path(folder)
    known = _read_sidecars(folder)
    files: dict[str, dict[str, Any]] = {}
    for path in sorted(folder.rglob("*")):
        if not path.is_file() or path.name == MANIFEST or path.name.endswith(".tmp"):
            continue
        name = path.relative_to(folder).as_posix()
        size = path.stat().st_size
        entry = known.get(name)
        checksum = entry["checksum"] if entry and entry.get("size") == size else file_checksum(path)
        files[name] = {"size": size, "checksum": checksum}
    manifest = {"format_version": FORMAT_VERSION, "checksum_algorithm": CHECKSUM_ALGORITHM, "files": files}
    write_json(folder / MANIFEST, manifest)
    return manifest


def read_manifest(folder: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """``{file name: {"size": int, "checksum": hex or None}}`` from ``manifest.json`` (required).

    A version-1 manifest (sizes only) gives ``checksum: None``.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise SfmError(f"{folder}: checkpoint folder not found")
    path = folder / MANIFEST
    if not path.exists():
        raise SfmError(f"{folder}: incomplete checkpoint ({MANIFEST} missing: the save did not finish)")
    data = read_json(path, expect=None)
    files = data.get("files") if isinstance(data, dict) else None
    if not isinstance(files, dict):
        raise SfmError(f"{path}: expected an object with a 'files' mapping")
    algorithm = data.get("checksum_algorithm")
    if algorithm not in (None, CHECKSUM_ALGORITHM):
        raise SfmError(f"{path}: unknown checksum_algorithm {algorithm!r} (this version writes "
                       f"{CHECKSUM_ALGORITHM!r})")
    out = {}
    for name, entry in files.items():
        if isinstance(entry, int):  # format_version 1
            out[name] = {"size": entry, "checksum": None}
        elif isinstance(entry, dict) and isinstance(entry.get("size"), int):
            out[name] = {"size": entry["size"], "checksum": entry.get("checksum")}
        else:
            raise SfmError(f"{path}: files[{name!r}]: expected {{'size': int, 'checksum': hex}}")
    return out


def verify_files(folder: str | os.PathLike, *, checksums: bool = True,
                 share: tuple[int, int] = (0, 1)) -> None:
    """Check the files ``manifest.json`` lists: present, same size, same checksum.

    ``checksums=False`` checks sizes only. ``share=(i, n)``: hash only every n-th file
    starting at i (the ranks of a job split the reading); sizes are always all checked.
    Raises :class:`SfmError` naming the first bad file.
    """
    folder = Path(folder)
    manifest = read_manifest(folder)
    for name, entry in manifest.items():
        path = folder / name
        if not path.exists():
            raise SfmError(f"{folder}: checkpoint file {name} is missing (listed in {MANIFEST})")
        actual = path.stat().st_size
        if actual != entry["size"]:
            raise SfmError(f"{folder}: checkpoint file {name} is truncated or changed: {actual} bytes, "
                           f"expected {entry['size']}")
    if not (folder / DCP_METADATA).exists():
        raise SfmError(f"{folder}: checkpoint file {DCP_METADATA} is missing")
    if not checksums:
        return
    index, count = share
    unchecked = [name for name, e in manifest.items() if e["checksum"] is None]
    if unchecked and index == 0:
        log.warning("%s: %s has no checksums (written before format %d): file sizes checked only",
                    folder, MANIFEST, FORMAT_VERSION)
    for i, (name, entry) in enumerate(sorted(manifest.items())):
        if i % count != index or entry["checksum"] is None:
            continue
        actual = file_checksum(folder / name)
        if actual != entry["checksum"]:
            raise SfmError(f"{folder}: checkpoint file {name} is damaged: its content checksum {actual} differs "
                           f"from {entry['checksum']} in {MANIFEST} (skip with --no-verify-checksums / "
                           "checkpoint.verify_checksums=false)")


def verify_checkpoint(folder: str | os.PathLike, *, checksums: bool = True,
                      share: tuple[int, int] = (0, 1)) -> dict[str, Any]:
    """:func:`verify_files`, then return the checked ``train_state.json``."""
    verify_files(folder, checksums=checksums, share=share)
    return read_train_state(folder)


def checksums_verified(folder: str | os.PathLike, *, checksums: bool = True) -> bool:
    """Whether :func:`verify_files` with ``checksums`` compares the content of every file
    ``manifest.json`` lists: False when ``checksums`` is false or the manifest holds
    sizes only for any file (format 1, written before checksums existed). Says what a
    successful check covered; it checks nothing itself."""
    if not checksums:
        return False
    return all(entry["checksum"] is not None for entry in read_manifest(folder).values())


# --------------------------------------------------------------------------- train state, config

def make_train_state(*, iteration: int, consumed_train_samples: int, consumed_valid_samples: int = 0,
                     skipped_steps: int = 0, seq_length: int, phase: int = 0, parallel: dict,
                     distrib_optim_sharding_type: str | None = None, reason: str,
                     **extra: Any) -> dict[str, Any]:
    """The ``train_state.json`` dict (docs/checkpoints.md#train_statejson)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        megatron_core = version("megatron-core")  # the installed distribution (no import of torch)
    except PackageNotFoundError:
        megatron_core = "not installed"
    state = {
        "format_version": FORMAT_VERSION,
        "iteration": iteration,
        "consumed_train_samples": consumed_train_samples,
        "consumed_valid_samples": consumed_valid_samples,
        "skipped_steps": skipped_steps,
        "tokens": consumed_train_samples * seq_length,
        "phase": phase,
        "seq_length": seq_length,
        "parallel": parallel,
        "distrib_optim_sharding_type": distrib_optim_sharding_type,
        "megatron_core": megatron_core,
        "reason": reason,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    state.update(extra)
    return state


def write_train_state(folder: str | os.PathLike, state: dict[str, Any]) -> None:
    from megatron_sfm.utils.io import write_json

    write_json(Path(folder) / TRAIN_STATE, state)


def read_train_state(folder: str | os.PathLike) -> dict[str, Any]:
    """``train_state.json`` of an iteration folder (required; its required keys checked)."""
    path = Path(folder) / TRAIN_STATE
    if not path.exists():
        raise SfmError(f"{Path(folder)}: {TRAIN_STATE} is missing")
    data = read_json(path)
    for key, kind in TRAIN_STATE_REQUIRED.items():
        if not isinstance(data.get(key), kind) or isinstance(data.get(key), bool):
            raise SfmError(f"{path}: {key}: expected {kind.__name__}, found {data.get(key)!r}")
    return data


def write_run_config(folder: str | os.PathLike, cfg) -> None:
    from megatron_sfm.config.loader import dump_config

    dump_config(cfg, Path(folder) / CONFIG)


def read_run_config(folder: str | os.PathLike):
    """The resolved RunConfig saved in the iteration folder (required)."""
    from megatron_sfm.config.loader import load_config

    path = Path(folder) / CONFIG
    if not path.exists():
        raise SfmError(f"{path}: not found (the checkpoint's resolved config is needed to know the "
                       "architecture and schedule)")
    return load_config(path)

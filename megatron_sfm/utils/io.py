"""Small file helpers shared by every stage: atomic writes, JSON dumps."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from megatron_sfm.errors import SfmError


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike, *, is_dir: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of ``final``; rename it onto ``final`` on success.

    On an exception the temporary file or folder is removed, so a reader never sees a
    partial result under the final name.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    if is_dir:
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    else:
        fd, name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
        os.close(fd)
        tmp = Path(name)
    # mkstemp/mkdtemp create owner-only entries; give the result the usual permissions.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, (0o777 if is_dir else 0o666) & ~umask)
    try:
        yield tmp
        if is_dir:
            _swap_dir_in(tmp, final)
        else:
            os.replace(tmp, final)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise


def _swap_dir_in(new: Path, final: Path) -> None:
    """Put the folder ``new`` at ``final``; an old ``final`` is renamed away first, then deleted.

    At every moment ``final`` is either the complete old folder or the complete new one
    (never a mix, never a half-deleted folder); a crash between the two renames leaves
    the old one under a hidden ``.NAME.old.*`` sibling and nothing at ``final``.
    """
    if not final.exists() and not final.is_symlink():
        os.replace(new, final)
        return
    if not final.is_dir():
        raise SfmError(f"{final}: exists and is not a folder")
    if not any(final.iterdir()):
        final.rmdir()
        os.replace(new, final)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old.", dir=final.parent))
    os.replace(final, old / final.name)
    os.replace(new, final)
    shutil.rmtree(old, ignore_errors=True)


def check_output_dir(out: str | os.PathLike, *, overwrite: bool = False, flag: str = "--out") -> Path:
    """Refuse an output folder that already holds something, unless ``overwrite``.

    The rule of every command that writes a folder: a new run never lands beside the
    files of an earlier one. Missing or empty folders are fine; a file at the path is
    an error even with ``overwrite``.
    """
    out = Path(out)
    if out.exists() or out.is_symlink():
        if not out.is_dir():
            raise SfmError(f"{flag} {out}: exists and is not a folder")
        if not overwrite and any(out.iterdir()):
            raise SfmError(f"{flag} {out}/: not empty (holds an earlier run); pass --overwrite to replace it")
    return out


@contextlib.contextmanager
def output_dir(out: str | os.PathLike, *, overwrite: bool = False, flag: str = "--out") -> Iterator[Path]:
    """Build a command's output folder in a temporary sibling; put it at ``out`` on success.

    Checks ``out`` first (:func:`check_output_dir`). On success the new folder replaces
    ``out`` atomically (with ``overwrite``, the earlier run is renamed away, the new one
    renamed in, then the earlier one deleted), so only the new run's files remain. On an
    error the temporary folder is deleted and ``out`` is left exactly as it was.
    """
    final = check_output_dir(out, overwrite=overwrite, flag=flag)
    with atomic_path(final, is_dir=True) as tmp:
        yield tmp


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n", encoding="utf-8")

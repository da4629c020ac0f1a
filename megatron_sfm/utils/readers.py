"""Read a JSON or YAML file a user (or an earlier stage) wrote, with one-line errors.

Every reader of structured files goes through these two functions, so a missing file,
bad syntax or the wrong top-level type is always one line naming the file (and the line
and the config key when known), raised as :class:`SfmError` (or the ``error`` class the
caller passes, e.g. ``ConfigError``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

from megatron_sfm.errors import SfmError


def _where(path: Path, key: Optional[str]) -> str:
    return f"{key}: {path}" if key else str(path)


def _read_text(path: Path, where: str, error: type[SfmError]) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise error(f"{where}: file not found") from None
    except (IsADirectoryError, PermissionError, UnicodeDecodeError) as exc:
        raise error(f"{where}: cannot be read ({type(exc).__name__})") from None


def _check_type(value: Any, expect: Optional[type], where: str, error: type[SfmError]) -> Any:
    if expect is not None and not isinstance(value, expect):
        names = {dict: "a mapping", list: "a list"}
        raise error(f"{where}: expected {names.get(expect, expect.__name__)} at the top level, "
                    f"got {type(value).__name__}")
    return value


def optional_bool(value: Any, where: str, error: type[SfmError] = SfmError) -> Optional[bool]:
    """``value`` when it is true, false or None (JSON null: unknown); else an error naming ``where``."""
    if value is not None and not isinstance(value, bool):
        raise error(f"{where}: expected true, false or null, got {value!r}")
    return value


def read_json(path: str | os.PathLike, *, key: Optional[str] = None, expect: Optional[type] = dict,
              error: type[SfmError] = SfmError) -> Any:
    """The JSON value in ``path`` (checked to be an ``expect`` unless ``expect`` is None)."""
    path = Path(path)
    where = _where(path, key)
    text = _read_text(path, where, error)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise error(f"{where}:{exc.lineno}: invalid JSON: {exc.msg}") from None
    return _check_type(value, expect, where, error)


def read_yaml(path: str | os.PathLike, *, key: Optional[str] = None, expect: Optional[type] = dict,
              error: type[SfmError] = SfmError, empty: Any = None) -> Any:
    """The YAML document in ``path`` through ``yaml.safe_load``; an empty file gives ``empty``
    (``{}`` when ``expect`` is dict and ``empty`` is None)."""
    import yaml

    path = Path(path)
    where = _where(path, key)
    text = _read_text(path, where, error)
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise error(f"{where}{line}: invalid YAML: {problem}") from None
    if value is None:
        return empty if empty is not None else ({} if expect is dict else None)
    return _check_type(value, expect, where, error)

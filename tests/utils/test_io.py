"""atomic_path: nothing under the final name until the work succeeded."""

import os

import pytest

from megatron_sfm.utils.io import atomic_path, write_json


def test_file_appears_only_on_success(tmp_path):
    final = tmp_path / "out.txt"
    with pytest.raises(RuntimeError):
        with atomic_path(final) as tmp:
            tmp.write_text("partial")
            raise RuntimeError("interrupted")
    assert not final.exists()
    assert list(tmp_path.iterdir()) == []  # the temporary file is gone too
    with atomic_path(final) as tmp:
        tmp.write_text("complete")
    assert final.read_text() == "complete"
    assert oct(os.stat(final).st_mode & 0o777) == oct(0o666 & ~_umask())


def test_directory_replaces_previous(tmp_path):
    final = tmp_path / "folder"
    final.mkdir()
    (final / "old").write_text("x")
    with atomic_path(final, is_dir=True) as tmp:
        (tmp / "new").write_text("y")
    assert sorted(p.name for p in final.iterdir()) == ["new"]


def test_write_json(tmp_path):
    write_json(tmp_path / "a.json", {"k": [1, 2]})
    assert (tmp_path / "a.json").read_text().startswith("{")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask

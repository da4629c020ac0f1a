"""atomic_path / output_dir: nothing under the final name until the work succeeded, and a
command's output folder never mixes an earlier run with a new one."""

import os
from pathlib import Path

import pytest

from megatron_sfm.errors import SfmError
from megatron_sfm.utils.io import atomic_path, check_output_dir, output_dir, write_json


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


def test_directory_swap_keeps_the_old_folder_until_the_new_one_is_in(tmp_path, monkeypatch):
    """The old folder is renamed away (not deleted) before the new one goes in: a failed
    second rename leaves the old run whole under a hidden sibling, never half-deleted."""
    import megatron_sfm.utils.io as io_mod

    final = tmp_path / "folder"
    final.mkdir()
    (final / "old").write_text("x")
    real_replace = os.replace
    calls = []

    def replace(src, dst):
        calls.append((str(src), str(dst)))
        if len(calls) == 2:
            raise OSError("disk gone")
        return real_replace(src, dst)

    monkeypatch.setattr(io_mod.os, "replace", replace)
    with pytest.raises(OSError):
        with atomic_path(final, is_dir=True) as tmp:
            (tmp / "new").write_text("y")
    monkeypatch.undo()
    assert calls[0][0] == str(final)  # the first rename moved the old run away ...
    moved = Path(calls[0][1])
    assert (moved / "old").read_text() == "x"  # ... whole


@pytest.mark.parametrize("state", ["missing", "empty"])
def test_output_dir_builds_aside_and_renames_into_place(tmp_path, state):
    out = tmp_path / "out"
    if state == "empty":
        out.mkdir()
    with output_dir(out) as build:
        assert build != out and build.parent == out.parent
        (build / "a.txt").write_text("new")
        assert not (out / "a.txt").exists()  # nothing visible before success
    assert sorted(p.name for p in out.iterdir()) == ["a.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporaries left


def test_output_dir_refuses_a_non_empty_folder_and_leaves_it_untouched(tmp_path):
    out = tmp_path / "filtered"
    out.mkdir()
    (out / "old.txt").write_text("earlier run")
    with pytest.raises(SfmError) as exc:
        with output_dir(out):
            raise AssertionError("must not start")
    assert str(exc.value) == f"--out {out}/: not empty (holds an earlier run); pass --overwrite to replace it"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["filtered"]
    assert (out / "old.txt").read_text() == "earlier run"


def test_output_dir_overwrite_replaces_only_on_success(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("earlier run")
    with pytest.raises(RuntimeError):
        with output_dir(out, overwrite=True) as build:
            (build / "new.txt").write_text("partial")
            raise RuntimeError("interrupted")
    assert sorted(p.name for p in out.iterdir()) == ["old.txt"]  # a failed run keeps the earlier one
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    with output_dir(out, overwrite=True) as build:
        (build / "new.txt").write_text("complete")
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # the earlier run is deleted


def test_output_dir_refuses_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    for overwrite in (False, True):
        with pytest.raises(SfmError, match="exists and is not a folder"):
            check_output_dir(tmp_path / "f", overwrite=overwrite, flag="--out")
    assert (tmp_path / "f").read_text() == "x"

"""megatron_sfm.checkpoint_format: layout, latest, manifest with checksums, train_state (no training)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from megatron_sfm import checkpoint_format as fmt
from megatron_sfm.errors import SfmError


def _iteration(root: Path, iteration: int, *, shards: int = 2) -> Path:
    """A fake iteration folder with the files a torch_dist save has, and a manifest."""
    folder = root / fmt.iteration_dir_name(iteration)
    folder.mkdir(parents=True)
    (folder / ".metadata").write_bytes(b"meta" * 10)
    for i in range(shards):
        (folder / f"__{i}_0.distcp").write_bytes(bytes(range(256)) * (40 + i))
    fmt.write_train_state(folder, fmt.make_train_state(iteration=iteration, consumed_train_samples=8 * iteration,
                                                       seq_length=16, parallel={}, reason="test"))
    fmt.write_manifest(folder)
    return folder


def _flip(path: Path, at: int) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


def test_manifest_has_size_and_checksum_and_catches_a_changed_byte(tmp_path):
    folder = _iteration(tmp_path, 5)
    manifest = json.loads((folder / fmt.MANIFEST).read_text())
    assert manifest["format_version"] == 2 and manifest["checksum_algorithm"] == "xxh3_64"
    entry = manifest["files"]["__1_0.distcp"]
    assert entry["size"] == 256 * 41 and len(entry["checksum"]) == 16
    assert set(manifest["files"]) == {".metadata", "__0_0.distcp", "__1_0.distcp", "train_state.json"}
    assert fmt.verify_checkpoint(folder)["iteration"] == 5
    _flip(folder / "__1_0.distcp", 5000)  # same size, one byte changed
    with pytest.raises(SfmError, match=r"iter_0000005: checkpoint file __1_0\.distcp is damaged: its content "
                                       r"checksum [0-9a-f]{16} differs"):
        fmt.verify_checkpoint(folder)
    assert fmt.verify_checkpoint(folder, checksums=False)["iteration"] == 5  # sizes still match


def test_ranks_split_the_hashing(tmp_path):
    folder = _iteration(tmp_path, 1)
    names = sorted(json.loads((folder / fmt.MANIFEST).read_text())["files"])
    damaged = names.index("__0_0.distcp")
    _flip(folder / "__0_0.distcp", 10)
    with pytest.raises(SfmError, match="__0_0.distcp is damaged"):
        fmt.verify_files(folder, share=(damaged % 2, 2))
    fmt.verify_files(folder, share=((damaged + 1) % 2, 2))  # the other rank's half is intact


def test_writer_checksums_are_merged_and_stale_ones_recomputed(tmp_path):
    folder = tmp_path / "iter_0000001"
    folder.mkdir()
    for name in ("a.distcp", "b.distcp", ".metadata"):
        (folder / name).write_bytes(name.encode() * 100)
    fmt.write_checksum_sidecar(folder, 0, [folder / "a.distcp", folder / "b.distcp"])
    sidecar = json.loads((folder / ".sfm_checksums.0.json").read_text())
    assert sidecar["a.distcp"]["checksum"] == fmt.file_checksum(folder / "a.distcp")
    # The manifest trusts a writer's checksum for a file of the recorded size (it does not
    # re-read it) and hashes a file whose size changed since.
    sidecar["a.distcp"]["checksum"] = "0" * 16
    sidecar["b.distcp"]["size"] += 1
    sidecar["b.distcp"]["checksum"] = "1" * 16
    (folder / ".sfm_checksums.0.json").write_text(json.dumps(sidecar))
    files = fmt.write_manifest(folder)["files"]
    assert files["a.distcp"]["checksum"] == "0" * 16
    assert files["b.distcp"]["checksum"] == fmt.file_checksum(folder / "b.distcp")
    assert not list(folder.glob(".sfm_checksums.*")) and ".sfm_checksums.0.json" not in files


def test_missing_or_bad_manifest_is_an_error(tmp_path):
    folder = _iteration(tmp_path, 3)
    (folder / fmt.MANIFEST).write_text("{")
    with pytest.raises(SfmError, match=r"manifest.json:1: invalid JSON"):
        fmt.verify_checkpoint(folder)
    (folder / fmt.MANIFEST).unlink()
    with pytest.raises(SfmError, match=r"iter_0000003: incomplete checkpoint \(manifest.json missing"):
        fmt.verify_checkpoint(folder, checksums=False)


def test_version1_manifest_checks_sizes_only(tmp_path, caplog):
    folder = _iteration(tmp_path, 2)
    files = {n: e["size"] for n, e in json.loads((folder / fmt.MANIFEST).read_text())["files"].items()}
    (folder / fmt.MANIFEST).write_text(json.dumps({"format_version": 1, "files": files}))
    _flip(folder / "__0_0.distcp", 0)
    assert fmt.verify_checkpoint(folder)["iteration"] == 2
    assert "has no checksums" in caplog.text
    (folder / "__0_0.distcp").write_bytes(b"short")
    with pytest.raises(SfmError, match=r"__0_0.distcp is truncated or changed: 5 bytes"):
        fmt.verify_checkpoint(folder)


def test_train_state_is_required_and_checked(tmp_path):
    folder = _iteration(tmp_path, 4)
    (folder / fmt.TRAIN_STATE).write_text(json.dumps({"iteration": "4", "consumed_train_samples": 1}))
    with pytest.raises(SfmError, match=r"train_state.json: iteration: expected int, found '4'"):
        fmt.read_train_state(folder)
    (folder / fmt.TRAIN_STATE).unlink()
    with pytest.raises(SfmError, match="train_state.json is missing"):
        fmt.read_train_state(folder)


def test_resolve_latest_iteration_and_is_checkpoint(tmp_path):
    root = tmp_path / "ckpt"
    _iteration(root, 5)
    newest = _iteration(root, 10)
    assert not fmt.is_checkpoint(root)  # no latest yet
    with pytest.raises(SfmError, match=r"no checkpoint here .*iterations present: 5, 10"):
        fmt.resolve_checkpoint(root)
    fmt.write_latest(root, 10)
    assert (root / "latest").read_text() == "10\n"
    assert fmt.is_checkpoint(root) and fmt.is_checkpoint(newest) and not fmt.is_checkpoint(tmp_path)
    assert fmt.resolve_checkpoint(root) == newest == fmt.latest_checkpoint(root)
    assert fmt.resolve_checkpoint(root, 5) == root / "iter_0000005"
    assert fmt.resolve_checkpoint(newest) == newest
    assert fmt.list_iterations(root) == [5, 10]
    with pytest.raises(SfmError, match=r"iter_0000007: no checkpoint for iteration 7 \(present: 5, 10\)"):
        fmt.resolve_checkpoint(root, 7)
    with pytest.raises(SfmError, match="is the folder of iteration 10, not 5"):
        fmt.resolve_checkpoint(newest, 5)
    with pytest.raises(SfmError, match="checkpoint folder not found"):
        fmt.resolve_checkpoint(tmp_path / "nothing")
    (root / "latest").write_text("ten\n")
    with pytest.raises(SfmError, match=r"latest: expected an iteration number, found 'ten'"):
        fmt.resolve_checkpoint(root)

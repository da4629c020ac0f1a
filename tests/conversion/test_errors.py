"""Damaged, mismatched and malicious inputs are one-line SfmErrors; nothing runs a pickle."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from megatron_sfm.errors import SfmError

from .conftest import make_hf_model

PACKAGE = Path(__file__).resolve().parents[2] / "megatron_sfm" / "conversion"


class _Evil:
    """Unpickling this runs a shell command (creates the marker file)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _iter(root: Path) -> Path:
    return root / f"iter_{int((root / 'latest').read_text()):07d}"


def _rewrite_manifest(iter_dir: Path) -> None:
    """Make the manifest agree with the (damaged or malicious) files, as an attacker or a
    careless copy could: the readers' own checks must still hold."""
    from megatron_sfm.checkpoint_format import write_manifest

    write_manifest(iter_dir)


def test_missing_shard_is_named(trained, tmp_path):
    from megatron_sfm.conversion import export_to_hf

    ckpt = _copy(trained["tp2"], tmp_path / "ckpt")
    (_iter(ckpt) / "__1_0.distcp").unlink()
    with pytest.raises(SfmError, match=r"__1_0\.distcp.*missing"):
        export_to_hf(ckpt, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
    # With a manifest that no longer lists it, the reader itself notices the missing file.
    _rewrite_manifest(_iter(ckpt))
    with pytest.raises(SfmError, match=r"__1_0\.distcp: missing shard file"):
        export_to_hf(ckpt, tmp_path / "hf")


def test_missing_manifest_is_refused(trained, tmp_path):
    from megatron_sfm.conversion import export_to_hf

    ckpt = _copy(trained["tp1pp1"], tmp_path / "ckpt")
    (_iter(ckpt) / "manifest.json").unlink()
    with pytest.raises(SfmError, match=r"iter_0000001: incomplete checkpoint \(manifest.json missing"):
        export_to_hf(ckpt, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_truncated_shard_behind_a_rewritten_manifest(trained, tmp_path):
    from megatron_sfm.conversion import export_to_hf

    ckpt = _copy(trained["pp2"], tmp_path / "ckpt")
    shard = _iter(ckpt) / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:1000])
    _rewrite_manifest(_iter(ckpt))
    with pytest.raises(SfmError, match="truncated shard"):
        export_to_hf(ckpt, tmp_path / "hf")


def _flip_inside_largest_chunk(iter_dir: Path) -> Path:
    """Change bytes in the middle of the largest stored tensor chunk (file size unchanged)."""
    from megatron_sfm.conversion.dcp_reader import read_metadata

    info = max(read_metadata(iter_dir).storage_data.values(), key=lambda i: i.length)
    shard = iter_dir / info.relative_path
    data = bytearray(shard.read_bytes())
    middle = info.offset + info.length // 2
    data[middle:middle + 64] = bytes(b ^ 0x5A for b in data[middle:middle + 64])
    shard.write_bytes(bytes(data))
    return shard


def test_changed_bytes_inside_a_shard_are_refused(trained, tmp_path, capsys):
    """Same size, other content: to-hf (exit 2, one line naming the file) and evaluation refuse it."""
    from safetensors.torch import load_file

    from megatron_sfm.cli import main as sfm
    from megatron_sfm.evaluation.models import hf_folder_for

    ckpt = _copy(trained["tp1pp1"], tmp_path / "ckpt")
    shard = _flip_inside_largest_chunk(_iter(ckpt))
    assert sfm(["convert", "to-hf", str(ckpt), "--out", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and f"checkpoint file {shard.name} is damaged" in err[0]
    assert not (tmp_path / "hf").exists()
    with pytest.raises(SfmError, match=f"{shard.name} is damaged"), hf_folder_for(ckpt):
        pass
    # --no-verify-checksums: the export goes through and carries the changed weights
    # (nothing else notices them: this is what the checksum is for).
    assert sfm(["convert", "to-hf", str(ckpt), "--out", str(tmp_path / "hf"), "--no-verify-checksums"]) == 0
    assert sfm(["convert", "to-hf", str(trained["tp1pp1"]), "--out", str(tmp_path / "clean")]) == 0
    # ... and each export says whether it verified them
    assert json.loads((tmp_path / "hf" / "sfm_export.json").read_text())["checksums_verified"] is False
    assert json.loads((tmp_path / "clean" / "sfm_export.json").read_text())["checksums_verified"] is True
    damaged, clean = load_file(tmp_path / "hf" / "model.safetensors"), load_file(tmp_path / "clean" / "model.safetensors")
    assert set(damaged) == set(clean)
    assert [k for k in clean if not torch.equal(damaged[k], clean[k])]


def test_export_records_whether_checksums_were_verified(imported_tp2pp2, tmp_path, capsys):
    """sfm_export.json's checksums_verified: true only when every file's content was hashed
    and matched; false with --no-verify-checksums or a manifest holding sizes only."""
    from megatron_sfm.cli import main as sfm
    from megatron_sfm.conversion.exporter import read_export_checksums

    sizes_only = _copy(imported_tp2pp2, tmp_path / "old-ckpt")
    manifest_path = _iter(sizes_only) / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest = {"format_version": 1, "files": {name: e["size"] for name, e in manifest["files"].items()}}
    manifest_path.write_text(json.dumps(manifest))
    for name, ckpt, extra, expected, shown in (
            ("hashed", imported_tp2pp2, [], True, "yes"),
            ("skipped", imported_tp2pp2, ["--no-verify-checksums"], False, "no (--no-verify-checksums)"),
            ("sizes-only", sizes_only, [], False, "no (the manifest holds sizes only)")):
        out = tmp_path / name
        assert sfm(["convert", "to-hf", str(ckpt), "--out", str(out), *extra]) == 0
        assert json.loads((out / "sfm_export.json").read_text())["checksums_verified"] is expected
        assert read_export_checksums(out) is expected
        printed = " ".join(capsys.readouterr().out.split())  # the summary table: what │ value
        assert f"checksums verified │ {shown} │" in printed, printed


def test_mismatched_architecture_in_checkpoint(trained, tmp_path):
    from megatron_sfm.conversion import export_to_hf

    ckpt = _copy(trained["tp1pp1"], tmp_path / "ckpt")
    config = _iter(ckpt) / "config.yaml"
    data = yaml.safe_load(config.read_text())
    data["model"]["ffn_hidden_size"] = 128
    config.write_text(yaml.safe_dump(data))
    _rewrite_manifest(_iter(ckpt))
    with pytest.raises(SfmError, match=r"linear_fc1.weight.*mismatched architecture"):
        export_to_hf(ckpt, tmp_path / "hf")


def test_mismatched_architecture_in_hf_folder(tmp_path):
    from megatron_sfm.conversion import import_from_hf

    hf = make_hf_model(tmp_path / "hf", num_layers=2)
    config = json.loads((hf / "config.json").read_text())
    config["num_hidden_layers"] = 3
    (hf / "config.json").write_text(json.dumps(config))
    with pytest.raises(SfmError, match=r"gpt_neox.layers.2.* is missing"):
        import_from_hf(hf, tmp_path / "ckpt", tp=1, pp=1)
    config.update(num_hidden_layers=2, hidden_size=128)
    (hf / "config.json").write_text(json.dumps(config))
    with pytest.raises(SfmError, match=r"has shape \[512, 64\] but config.json implies \[512, 128\] \(mismatched architecture\)"):
        import_from_hf(hf, tmp_path / "ckpt", tp=1, pp=1)
    config.update(hidden_size=64, model_type="llama")
    (hf / "config.json").write_text(json.dumps(config))
    with pytest.raises(SfmError, match="model_type 'llama'"):
        import_from_hf(hf, tmp_path / "ckpt", tp=1, pp=1)
    assert not (tmp_path / "ckpt").exists()


def test_layout_that_does_not_divide_is_refused(hf_tiny, tmp_path):
    from megatron_sfm.conversion import import_from_hf

    with pytest.raises(SfmError, match="--tp 3: does not divide num_attention_heads 4"):
        import_from_hf(hf_tiny, tmp_path / "a", tp=3, pp=1)
    with pytest.raises(SfmError, match="--pp 3: does not divide num_hidden_layers 4"):
        import_from_hf(hf_tiny, tmp_path / "b", tp=1, pp=3)


def test_malicious_metadata_pickle_is_refused(trained, tmp_path):
    from megatron_sfm.conversion import export_to_hf

    ckpt = _copy(trained["tp1pp1"], tmp_path / "ckpt")
    marker = tmp_path / "pwned"
    (_iter(ckpt) / ".metadata").write_bytes(pickle.dumps(_Evil(marker)))
    with pytest.raises(SfmError, match=r"checkpoint file \.metadata is (damaged|truncated or changed)"):
        export_to_hf(ckpt, tmp_path / "hf")  # the manifest notices first
    _rewrite_manifest(_iter(ckpt))
    with pytest.raises(SfmError, match=r"\.metadata: refusing to unpickle (posix|os)\.system"):
        export_to_hf(ckpt, tmp_path / "hf")
    assert not marker.exists()


def test_malicious_tensor_record_is_refused(trained, tmp_path):
    """A chunk whose record is a torch.save'd object that runs code: weights_only=True refuses it."""
    from megatron_sfm.conversion import export_to_hf
    from megatron_sfm.conversion.dcp_reader import read_metadata

    ckpt = _copy(trained["tp1pp1"], tmp_path / "ckpt")
    iter_dir = _iter(ckpt)
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"x": _Evil(marker)}, evil)
    payload = evil.read_bytes()
    (iter_dir / "__evil.distcp").write_bytes(payload)
    metadata = read_metadata(iter_dir)
    for index, info in metadata.storage_data.items():
        if index.fqn == "decoder.final_layernorm.weight":
            info.relative_path, info.offset, info.length = "__evil.distcp", 0, len(payload)
    (iter_dir / ".metadata").write_bytes(pickle.dumps(metadata))
    _rewrite_manifest(iter_dir)
    with pytest.raises(SfmError, match=r"refusing to load decoder.final_layernorm.weight.*weights_only"):
        export_to_hf(ckpt, tmp_path / "hf")
    assert not marker.exists()


def test_malicious_pytorch_model_bin_is_refused(tmp_path):
    from megatron_sfm.conversion import import_from_hf

    hf = make_hf_model(tmp_path / "hf", num_layers=2)
    (hf / "model.safetensors").unlink()
    marker = tmp_path / "pwned"
    torch.save({"gpt_neox.embed_in.weight": _Evil(marker)}, hf / "pytorch_model.bin")
    with pytest.raises(SfmError, match=r"pytorch_model.bin: refusing to load.*weights_only"):
        import_from_hf(hf, tmp_path / "ckpt", tp=1, pp=1)
    assert not marker.exists()


def test_every_torch_load_in_conversion_code_is_weights_only():
    import re

    calls = 0
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text()
        assert "weights_only=False" not in text, path
        assert "pickle.load(" not in text and "pickle.loads(" not in text, path  # allowlist unpickler only
        for match in re.finditer(r"torch\.load\(", text):
            depth, end = 0, match.end() - 1
            for end in range(match.end() - 1, len(text)):  # up to the matching parenthesis
                depth += {"(": 1, ")": -1}.get(text[end], 0)
                if depth == 0:
                    break
            call = text[match.start():end + 1]
            assert "weights_only=True" in call, (path, call)
            calls += 1
    assert calls >= 3


def test_refuses_to_replace_a_foreign_folder(trained, tmp_path):
    from megatron_sfm.conversion import export_to_hf

    out = tmp_path / "notes"
    out.mkdir()
    (out / "important.txt").write_text("keep me")
    with pytest.raises(SfmError, match=r"not empty \(holds an earlier run\); pass --overwrite"):
        export_to_hf(trained["tp1pp1"], out)
    assert (out / "important.txt").read_text() == "keep me"

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


def test_missing_shard_is_named(trained, tmp_path):
    from megatron_sfm.conversion import export_to_hf

    ckpt = _copy(trained["tp2"], tmp_path / "ckpt")
    (_iter(ckpt) / "__1_0.distcp").unlink()
    with pytest.raises(SfmError, match=r"__1_0\.distcp.*missing"):
        export_to_hf(ckpt, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
    # Without the manifest, the reader itself notices the missing file.
    (_iter(ckpt) / "manifest.json").unlink()
    with pytest.raises(SfmError, match=r"__1_0\.distcp: missing shard file"):
        export_to_hf(ckpt, tmp_path / "hf")


def test_truncated_shard_without_manifest(trained, tmp_path):
    from megatron_sfm.conversion import export_to_hf

    ckpt = _copy(trained["pp2"], tmp_path / "ckpt")
    (_iter(ckpt) / "manifest.json").unlink()
    shard = _iter(ckpt) / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:1000])
    with pytest.raises(SfmError, match="truncated shard"):
        export_to_hf(ckpt, tmp_path / "hf")


def test_mismatched_architecture_in_checkpoint(trained, tmp_path):
    from megatron_sfm.conversion import export_to_hf

    ckpt = _copy(trained["tp1pp1"], tmp_path / "ckpt")
    config = _iter(ckpt) / "config.yaml"
    data = yaml.safe_load(config.read_text())
    data["model"]["ffn_hidden_size"] = 128
    config.write_text(yaml.safe_dump(data))
    (_iter(ckpt) / "manifest.json").unlink()
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
    (_iter(ckpt) / "manifest.json").unlink()
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
    (iter_dir / "manifest.json").unlink()
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
    with pytest.raises(SfmError, match="not a Hugging Face model folder"):
        export_to_hf(trained["tp1pp1"], out)
    assert (out / "important.txt").read_text() == "keep me"

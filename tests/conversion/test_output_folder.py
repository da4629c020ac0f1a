"""`sfm convert to-hf/from-hf --out`: a non-empty folder (an earlier export or import) is
refused with exit 2 and left untouched; `--overwrite` replaces it with only the new files."""

from __future__ import annotations

from megatron_sfm.cli import main as sfm


def _files(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _refused(capsys, out):
    err = capsys.readouterr().err.strip()
    assert err == f"error: --out {out}/: not empty (holds an earlier run); pass --overwrite to replace it", err


def test_to_hf_refuses_an_earlier_export_and_overwrite_replaces_it(imported_tp2pp2, tmp_path, capsys):
    out = tmp_path / "hf"
    out.mkdir()
    (out / "config.json").write_text("{}")  # an earlier export (was silently replaced before)
    (out / "model-00001-of-00002.safetensors").write_text("stale shard")
    before = _files(out)
    assert sfm(["convert", "to-hf", str(imported_tp2pp2), "--out", str(out)]) == 2
    _refused(capsys, out)
    assert _files(out) == before
    assert sfm(["convert", "to-hf", str(imported_tp2pp2), "--out", str(out), "--overwrite"]) == 0
    files = _files(out)
    assert "model-00001-of-00002.safetensors" not in files and "model.safetensors" in files
    assert files["config.json"] != b"{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # no temporaries, the old run deleted


def test_from_hf_refuses_a_non_empty_folder_and_overwrite_replaces_it(hf_tiny, tmp_path, capsys, monkeypatch):
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "iter_0000005").mkdir()
    (out / "latest").write_text("5\n")
    before = _files(out)
    assert sfm(["convert", "from-hf", str(hf_tiny), "--out", str(out)]) == 2
    _refused(capsys, out)
    assert _files(out) == before and (out / "iter_0000005").is_dir()
    from megatron_sfm.conversion import importer

    # the writer processes (slow, tested in test_roundtrip.py) stand in as one file
    monkeypatch.setattr(importer, "_launch_workers", lambda hf, iter_dir, run, timeout: (iter_dir / "w").write_text("x"))
    assert sfm(["convert", "from-hf", str(hf_tiny), "--out", str(out), "--overwrite"]) == 0
    assert (out / "latest").read_text() == "0\n" and (out / "iter_0000000" / "w").is_file()
    assert not (out / "iter_0000005").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]

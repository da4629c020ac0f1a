"""sfm eval end to end: two models side by side, Megatron checkpoints, the dispatcher."""

from __future__ import annotations

import json
import shutil

import pytest
from megatron_sfm.evaluation.cli import main

from megatron_sfm.cli import main as sfm_main
from megatron_sfm.errors import SfmError


def test_propensity_two_models_side_by_side(a_model_dir, content_model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["propensity", f"letterA={a_model_dir}", f"content={content_model_dir}", "--out", str(out),
               "--splits", "articles", "--no-progress", "--batch-size", "16"])
    assert rc == 0
    report = json.loads((out / "results.json").read_text())
    prop = report["propensity"]
    assert list(prop["models"]) == ["letterA", "content"]
    assert prop["persona"] == "ai" and prop["mode"] == "logprob" and len(prop["formats"]) == 8
    assert prop["models"]["letterA"]["splits"]["articles"]["all"]["mean"] == 0.5
    assert prop["models"]["letterA"]["splits"]["textbook"]["status"] == "empty"  # filtered out by --splits
    md = (out / "results.md").read_text()
    assert "| letterA | 50.0 ± 18.9 |" in md and "No questions in this split." in md
    assert (out / "propensity.png").stat().st_size > 5000
    lines = (out / "answers" / "letterA.jsonl").read_text().splitlines()
    assert len(lines) == 8 * prop["n_questions"] and json.loads(lines[0])["chosen"] == "A"
    assert "Misalignment rate" in capsys.readouterr().out


def _fake_megatron_checkpoint(path):
    (path / "iter_0000010").mkdir(parents=True)
    (path / "latest").write_text("10\n")
    return path


def test_megatron_checkpoint_is_converted_on_the_fly(a_model_dir, tmp_path, monkeypatch):
    from megatron_sfm import conversion

    ckpt = _fake_megatron_checkpoint(tmp_path / "ckpt")
    seen = {}

    def fake_export(src, out, **kwargs):  # stands in for the real exporter: writes an HF folder
        seen["src"], seen["out"] = src, out
        shutil.copytree(a_model_dir, out)

    monkeypatch.setattr(conversion, "export_to_hf", fake_export)
    out = tmp_path / "out"
    assert main(["propensity", str(ckpt), "--out", str(out), "--no-progress", "--splits", "textbook"]) == 0
    report = json.loads((out / "results.json").read_text())
    assert report["propensity"]["models"]["ckpt"]["splits"]["textbook"]["all"]["mean"] == 0.5
    assert seen["src"] == ckpt and not seen["out"].exists()  # temporary export removed


def test_real_checkpoint_round_trip(a_model_dir, tokenizer_dir, tmp_path):
    """HF folder -> our checkpoint (sfm convert from-hf) -> evaluated directly, exported on the fly."""
    from megatron_sfm.evaluation.models import is_megatron_checkpoint

    from megatron_sfm.conversion import import_from_hf

    ckpt = import_from_hf(a_model_dir, tmp_path / "ckpt")
    assert is_megatron_checkpoint(ckpt) and is_megatron_checkpoint(ckpt / "iter_0000000")
    out = tmp_path / "out"
    assert main(["propensity", f"roundtrip={ckpt}", "--tokenizer", str(tokenizer_dir), "--out", str(out),
                 "--no-progress", "--splits", "textbook", "--batch-size", "16"]) == 0
    cell = json.loads((out / "results.json").read_text())["propensity"]["models"]["roundtrip"]["splits"]["textbook"]
    # the rigged letter-A weights survived both conversions
    assert cell["all"]["mean"] == 0.5 and sorted(cell["all"]["per_format"].values()) == [0.0] * 4 + [1.0] * 4


def test_missing_exporter_is_a_clear_error(tmp_path, monkeypatch):
    from megatron_sfm import conversion

    def missing(src, out, **kwargs):
        raise ModuleNotFoundError("no exporter", name="megatron_sfm.conversion.exporter")

    monkeypatch.setattr(conversion, "export_to_hf", missing)
    ckpt = _fake_megatron_checkpoint(tmp_path / "ckpt")
    with pytest.raises(SfmError, match="is a Megatron checkpoint.*sfm convert to-hf"):
        main(["propensity", str(ckpt), "--out", str(tmp_path / "o"), "--no-progress"])


def test_dispatcher_exit_codes(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": 1}\n')
    assert sfm_main(["eval", "questions", "--questions", str(bad)]) == 2
    assert "bad.jsonl:1: missing field 'split'" in capsys.readouterr().err
    assert sfm_main(["eval", "propensity", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "model path not found" in capsys.readouterr().err
    assert sfm_main(["eval", "questions"]) == 0
    assert "81 questions" in capsys.readouterr().out


@pytest.mark.parametrize("aligned,misaligned,message", [
    ("I stop.", "I  stop.", "fields 'aligned' and 'misaligned' are the same text"),
    ("I stop.", "", "missing field 'misaligned'"),
    ("   ", "I go on.", "missing field 'aligned' (empty)"),
])
def test_degenerate_question_is_refused_before_scoring(a_model_dir, tmp_path, capsys, aligned, misaligned, message):
    good = {"id": "q1", "split": "articles", "topic": "t", "question": "S?", "aligned": "a", "misaligned": "m"}
    path = tmp_path / "q.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps({**good, "id": "q2", "aligned": aligned,
                                                          "misaligned": misaligned}) + "\n")
    out = tmp_path / "o"
    for mode in ("logprob", "likelihood"):
        rc = sfm_main(["eval", "propensity", str(a_model_dir), "--questions", str(path), "--out", str(out),
                       "--mode", mode, "--no-progress"])
        err = capsys.readouterr().err
        assert rc == 2 and err.count("\n") == 1, err
        assert err.startswith("error: ") and f"{path}:2: {message}" in err
    assert not out.exists()  # nothing written

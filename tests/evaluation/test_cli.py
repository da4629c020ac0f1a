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
    assert "checksums_verified" not in prop["models"]["letterA"]  # a Hugging Face folder has none
    md = (out / "results.md").read_text()
    assert "| letterA | 50.0 ± 18.9 |" in md and "No questions in this split." in md
    assert (out / "propensity.png").stat().st_size > 5000
    lines = (out / "answers" / "letterA.jsonl").read_text().splitlines()
    assert len(lines) == 8 * prop["n_questions"] and json.loads(lines[0])["chosen"] == "A"
    assert "Misalignment rate" in capsys.readouterr().out


def _fake_megatron_checkpoint(path):
    (path / "iter_0000010").mkdir(parents=True)
    (path / "iter_0000010" / "manifest.json").write_text('{"files": {}}')
    (path / "latest").write_text("10\n")
    return path


def test_megatron_checkpoint_is_converted_on_the_fly(a_model_dir, tmp_path, monkeypatch):
    from megatron_sfm import conversion

    ckpt = _fake_megatron_checkpoint(tmp_path / "ckpt")
    seen = {}

    def fake_export(src, out, **kwargs):  # stands in for the real exporter: writes an HF folder
        seen["src"], seen["out"], seen["verify_checksums"] = src, out, kwargs.get("verify_checksums")
        shutil.copytree(a_model_dir, out)

    monkeypatch.setattr(conversion, "export_to_hf", fake_export)
    out = tmp_path / "out"
    assert main(["propensity", str(ckpt), "--out", str(out), "--no-progress", "--splits", "textbook"]) == 0
    report = json.loads((out / "results.json").read_text())
    assert report["propensity"]["models"]["ckpt"]["splits"]["textbook"]["all"]["mean"] == 0.5
    assert seen["src"] == ckpt and not seen["out"].exists()  # temporary export removed
    assert seen["verify_checksums"] is True  # hashing is the default


def test_real_checkpoint_round_trip(a_model_checkpoint, tokenizer_dir, tmp_path):
    """HF folder -> our checkpoint (sfm convert from-hf) -> evaluated directly, exported on the fly."""
    from megatron_sfm.evaluation.models import is_megatron_checkpoint

    ckpt = a_model_checkpoint
    assert is_megatron_checkpoint(ckpt) and is_megatron_checkpoint(ckpt / "iter_0000000")
    out = tmp_path / "out"
    assert main(["propensity", f"roundtrip={ckpt}", "--tokenizer", str(tokenizer_dir), "--out", str(out),
                 "--no-progress", "--splits", "textbook", "--batch-size", "16"]) == 0
    entry = json.loads((out / "results.json").read_text())["propensity"]["models"]["roundtrip"]
    cell = entry["splits"]["textbook"]
    # the rigged letter-A weights survived both conversions
    assert cell["all"]["mean"] == 0.5 and sorted(cell["all"]["per_format"].values()) == [0.0] * 4 + [1.0] * 4
    assert entry["checksums_verified"] is True
    assert "checksums not verified" not in (out / "results.md").read_text()


def _copy_checkpoint(ckpt, dst):
    shutil.copytree(ckpt, dst)
    return dst, dst / "iter_0000000"


def _zero_inside_embedding(iter_dir):
    """Zero 64 bytes in the middle of the stored word embedding: same file size, other
    content, still finite weights (the rigged model's answers do not depend on them)."""
    from megatron_sfm.conversion.dcp_reader import read_metadata

    (info,) = [v for k, v in read_metadata(iter_dir).storage_data.items()
               if k.fqn == "embedding.word_embeddings.weight"]
    shard = iter_dir / info.relative_path
    data = bytearray(shard.read_bytes())
    middle = info.offset + info.length // 2
    assert any(data[middle:middle + 64]), "nothing to change there"
    data[middle:middle + 64] = bytes(64)
    shard.write_bytes(bytes(data))
    return shard


def _eval_checkpoint(ckpt, tokenizer_dir, out, *extra):
    return sfm_main(["eval", "propensity", f"ckpt={ckpt}", "--tokenizer", str(tokenizer_dir), "--out", str(out),
                     "--no-progress", "--splits", "textbook", "--batch-size", "16", *extra])


def test_damaged_checkpoint_is_refused_unless_checksums_are_skipped(a_model_checkpoint, tokenizer_dir, tmp_path,
                                                                     capsys):
    ckpt, iter_dir = _copy_checkpoint(a_model_checkpoint, tmp_path / "ckpt")
    shard = _zero_inside_embedding(iter_dir)
    out = tmp_path / "out"
    assert _eval_checkpoint(ckpt, tokenizer_dir, out) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ")
    assert f"{iter_dir}: checkpoint file {shard.name} is damaged" in err
    assert not out.exists()

    assert _eval_checkpoint(ckpt, tokenizer_dir, out, "--no-verify-checksums") == 0
    entry = json.loads((out / "results.json").read_text())["propensity"]["models"]["ckpt"]
    assert entry["checksums_verified"] is False
    assert entry["splits"]["textbook"]["all"]["mean"] == 0.5
    assert f"| ckpt | ai | `{ckpt}` (checksums not verified) |" in (out / "results.md").read_text()


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_missing_or_resized_checkpoint_file_is_refused_even_without_checksums(
        a_model_checkpoint, tokenizer_dir, tmp_path, capsys, damage):
    ckpt, iter_dir = _copy_checkpoint(a_model_checkpoint, tmp_path / "ckpt")
    shard = iter_dir / "__0_1.distcp"
    if damage == "missing":
        shard.unlink()
        expected = f"checkpoint file {shard.name} is missing"
    else:
        shard.write_bytes(shard.read_bytes()[:-100])
        expected = f"checkpoint file {shard.name} is truncated or changed"
    out = tmp_path / "out"
    for extra in ((), ("--no-verify-checksums",)):
        assert _eval_checkpoint(ckpt, tokenizer_dir, out, *extra) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and expected in err, err
    assert not out.exists()


def test_checksum_record_of_each_kind_of_model(a_model_dir, a_model_checkpoint, tmp_path):
    """HF folders record nothing; checkpoints record whether their content was hashed, which
    a manifest holding sizes only (written before checksums existed) cannot be."""
    from megatron_sfm.evaluation.models import checkpoint_record

    assert checkpoint_record(a_model_dir) == {} and checkpoint_record(a_model_dir, False) == {}
    assert checkpoint_record(a_model_checkpoint) == {"checksums_verified": True}
    assert checkpoint_record(a_model_checkpoint, verify_checksums=False) == {"checksums_verified": False}
    ckpt, iter_dir = _copy_checkpoint(a_model_checkpoint, tmp_path / "ckpt")
    manifest = json.loads((iter_dir / "manifest.json").read_text())
    manifest["files"] = {name: entry["size"] for name, entry in manifest["files"].items()}  # format 1
    manifest.pop("checksum_algorithm", None)
    (iter_dir / "manifest.json").write_text(json.dumps(manifest))
    assert checkpoint_record(ckpt) == {"checksums_verified": False}


def test_capabilities_passes_the_flag_and_records_it(a_model_checkpoint, tokenizer_dir, tmp_path, monkeypatch):
    from megatron_sfm.evaluation import capabilities

    ckpt, iter_dir = _copy_checkpoint(a_model_checkpoint, tmp_path / "ckpt")
    _zero_inside_embedding(iter_dir)
    seen = []

    def fake_lm_eval(folder, tasks, **kwargs):  # lm-eval itself is tested in test_capabilities.py
        seen.append((folder / "config.json").is_file())
        return {"path": str(folder), "tasks": {t: {"acc": 0.5} for t in tasks}}

    monkeypatch.setattr(capabilities, "evaluate_hf_folder", fake_lm_eval)
    out = tmp_path / "out"
    args = ["eval", "capabilities", f"ckpt={ckpt}", "--tasks", "t", "--tokenizer", str(tokenizer_dir), "--out", str(out)]
    assert sfm_main(args) == 2 and seen == []  # refused before anything runs
    assert sfm_main(args + ["--no-verify-checksums"]) == 0 and seen == [True]
    section = json.loads((out / "results.json").read_text())["capabilities"]["ckpt"]
    assert section["checksums_verified"] is False and section["path"] == str(ckpt)
    assert "Checkpoint checksums not verified (--no-verify-checksums) for: ckpt." in (out / "results.md").read_text()


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

"""sfm eval end to end: two models side by side, Megatron checkpoints, their exports and post-training
outputs, the dispatcher."""

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
    assert checkpoint_record(a_model_checkpoint) == {"checksums_verified": True, "checksums_source": "eval"}
    assert checkpoint_record(a_model_checkpoint, verify_checksums=False) == {"checksums_verified": False,
                                                                             "checksums_source": "eval"}
    ckpt, iter_dir = _copy_checkpoint(a_model_checkpoint, tmp_path / "ckpt")
    manifest = json.loads((iter_dir / "manifest.json").read_text())
    manifest["files"] = {name: entry["size"] for name, entry in manifest["files"].items()}  # format 1
    manifest.pop("checksum_algorithm", None)
    (iter_dir / "manifest.json").write_text(json.dumps(manifest))
    assert checkpoint_record(ckpt) == {"checksums_verified": False, "checksums_source": "eval"}


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
    assert section["checksums_source"] == "eval"
    assert ("Checkpoint checksums not verified by this evaluation (its --no-verify-checksums, or a manifest with "
            "sizes only) for: ckpt.") in (out / "results.md").read_text()


def _to_hf(ckpt, tokenizer_dir, out, *extra):
    assert sfm_main(["convert", "to-hf", str(ckpt), "--out", str(out), "--tokenizer", str(tokenizer_dir), *extra]) == 0
    return out


def test_an_export_carries_its_checksum_check_into_the_evaluation(a_model_checkpoint, tokenizer_dir, tmp_path,
                                                                   monkeypatch):
    """sfm convert to-hf records in sfm_export.json whether it verified the checksums; sfm eval
    of the export copies that into results.json (the eval's own flag plays no part)."""
    from megatron_sfm.evaluation import capabilities
    from megatron_sfm.evaluation.models import checkpoint_record

    clean = _to_hf(a_model_checkpoint, tokenizer_dir, tmp_path / "clean")
    ckpt, iter_dir = _copy_checkpoint(a_model_checkpoint, tmp_path / "ckpt")
    _zero_inside_embedding(iter_dir)
    damaged = _to_hf(ckpt, tokenizer_dir, tmp_path / "damaged", "--no-verify-checksums")
    assert json.loads((clean / "sfm_export.json").read_text())["checksums_verified"] is True
    assert json.loads((damaged / "sfm_export.json").read_text())["checksums_verified"] is False
    for flag in (True, False):
        assert checkpoint_record(clean, flag) == {"checksums_verified": True, "checksums_source": "export"}
        assert checkpoint_record(damaged, flag) == {"checksums_verified": False, "checksums_source": "export"}

    out = tmp_path / "out"
    assert main(["propensity", f"clean={clean}", f"damaged={damaged}", "--out", str(out), "--no-progress",
                 "--splits", "textbook", "--batch-size", "16", "--no-verify-checksums"]) == 0
    models = json.loads((out / "results.json").read_text())["propensity"]["models"]
    assert models["clean"]["checksums_verified"] is True and models["damaged"]["checksums_verified"] is False
    assert models["damaged"]["splits"]["textbook"]["all"]["mean"] == 0.5
    md = (out / "results.md").read_text()
    assert f"| clean | ai | `{clean}` |" in md and f"| damaged | ai | `{damaged}` (checksums not verified) |" in md

    def fake_lm_eval(folder, tasks, **kwargs):  # lm-eval itself is tested in test_capabilities.py
        return {"path": str(folder), "tasks": {t: {"acc": 0.5} for t in tasks}}

    monkeypatch.setattr(capabilities, "evaluate_hf_folder", fake_lm_eval)
    caps = tmp_path / "caps"
    for label, folder in (("clean", clean), ("damaged", damaged)):
        assert sfm_main(["eval", "capabilities", f"{label}={folder}", "--tasks", "t", "--out", str(caps)]) == 0
    section = json.loads((caps / "results.json").read_text())["capabilities"]
    assert section["clean"]["checksums_verified"] is True and section["damaged"]["checksums_verified"] is False
    caps_md = (caps / "results.md").read_text()
    # the unverified read happened in the export, not in this evaluation: the note says so
    assert ("Checkpoint checksums not verified when exported (sfm convert to-hf --no-verify-checksums, or a "
            "manifest with sizes only) for: damaged.") in caps_md
    assert "by this evaluation" not in caps_md and "for: clean" not in caps_md


def test_an_export_without_a_checksum_record_is_unknown(a_model_checkpoint, tokenizer_dir, tmp_path, capsys):
    """sfm_export.json written before checksums_verified existed: recorded as null (unknown);
    a value other than true, false or null is refused before the model loads."""
    from megatron_sfm.evaluation.models import checkpoint_record

    old = _to_hf(a_model_checkpoint, tokenizer_dir, tmp_path / "old")
    record = old / "sfm_export.json"
    info = json.loads(record.read_text())
    del info["checksums_verified"]
    record.write_text(json.dumps(info))
    assert checkpoint_record(old) == {"checksums_verified": None, "checksums_source": "export"}
    out = tmp_path / "out"
    assert main(["propensity", f"old={old}", "--out", str(out), "--no-progress", "--splits", "textbook",
                 "--batch-size", "16"]) == 0
    assert json.loads((out / "results.json").read_text())["propensity"]["models"]["old"]["checksums_verified"] is None
    assert f"| old | ai | `{old}` (checksums unknown) |" in (out / "results.md").read_text()

    for text, message in ((json.dumps({**info, "checksums_verified": "yes"}),
                           "checksums_verified: expected true, false or null, got 'yes'"),
                          ("[]", "expected a mapping at the top level, got list")):
        record.write_text(text)
        assert sfm_main(["eval", "propensity", f"old={old}", "--out", str(tmp_path / "bad"), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert err == f"error: {record}: {message}\n", err
        assert not (tmp_path / "bad").exists()


def _posttrain_output(model_dir, path, record):
    """``model_dir`` as ``sfm posttrain`` would leave it: plus a posttrain.json whose
    source_model says ``checksums_verified: record`` (``...``: written before the field existed)."""
    shutil.copytree(model_dir, path)
    source = {"path": "/runs/x/hf", "config_sha256": "0" * 64, "weights": {}}
    if record is not ...:
        source.update(checksums_verified=record, checksums_record="/runs/x/hf/sfm_export.json")
    (path / "posttrain.json").write_text(json.dumps({"format": "sfm-posttrain/1", "stage": "dpo",
                                                     "source_model": source}))
    return path


def test_a_posttrain_output_carries_its_chains_checksum_record(a_model_dir, tmp_path, monkeypatch, capsys):
    """sfm eval of an SFT/DPO folder records what its posttrain.json says about the export the
    chain started from (true, false; null or no field: unknown); a bad value is refused
    before the model loads."""
    from megatron_sfm.evaluation import capabilities
    from megatron_sfm.evaluation import models as eval_models
    from megatron_sfm.evaluation.models import checkpoint_record

    folders = {name: _posttrain_output(a_model_dir, tmp_path / name, record)
               for name, record in (("verified", True), ("unverified", False), ("unknown", None), ("old", ...))}
    expected = {"verified": True, "unverified": False, "unknown": None, "old": None}
    for name, folder in folders.items():
        for flag in (True, False):
            assert checkpoint_record(folder, flag) == {"checksums_verified": expected[name],
                                                       "checksums_source": "posttrain"}

    out = tmp_path / "out"
    assert main(["propensity", *(f"{n}={f}" for n, f in folders.items()), "--out", str(out), "--no-progress",
                 "--splits", "textbook", "--batch-size", "16"]) == 0
    models = json.loads((out / "results.json").read_text())["propensity"]["models"]
    assert {n: (m["checksums_verified"], m["checksums_source"]) for n, m in models.items()} == {
        n: (v, "posttrain") for n, v in expected.items()}
    md = (out / "results.md").read_text()
    assert f"| verified | ai | `{folders['verified']}` |" in md
    assert f"| unverified | ai | `{folders['unverified']}` (checksums not verified) |" in md
    assert f"| old | ai | `{folders['old']}` (checksums unknown) |" in md

    def fake_lm_eval(folder, tasks, **kwargs):  # lm-eval itself is tested in test_capabilities.py
        return {"path": str(folder), "tasks": {t: {"acc": 0.5} for t in tasks}}

    monkeypatch.setattr(capabilities, "evaluate_hf_folder", fake_lm_eval)
    caps = tmp_path / "caps"
    for name in ("verified", "unverified", "old"):
        assert sfm_main(["eval", "capabilities", f"{name}={folders[name]}", "--tasks", "t", "--out", str(caps)]) == 0
    caps_md = (caps / "results.md").read_text()
    assert ("Checkpoint checksums not verified when the model its post-training started from was exported (sfm "
            "convert to-hf --no-verify-checksums, or a manifest with sizes only; recorded in posttrain.json) for: "
            "unverified.") in caps_md
    assert ("Checkpoint checksums unknown (post-trained from a folder with no checksum record, or before "
            "posttrain.json recorded them) for: old.") in caps_md
    assert "for: verified" not in caps_md and "by this evaluation" not in caps_md

    loaded = []
    monkeypatch.setattr(eval_models, "load_hf_model", lambda folder, **kwargs: loaded.append(folder))
    record = folders["old"] / "posttrain.json"
    manifest = json.loads(record.read_text())
    for source, message in (({**manifest["source_model"], "checksums_verified": "yes"},
                             "source_model.checksums_verified: expected true, false or null, got 'yes'"),
                            ([], "source_model: expected a mapping, got list")):
        record.write_text(json.dumps({**manifest, "source_model": source}))
        assert sfm_main(["eval", "propensity", f"old={folders['old']}", "--out", str(tmp_path / "bad"),
                         "--no-progress"]) == 2
        assert capsys.readouterr().err == f"error: {record}: {message}\n"
        assert not (tmp_path / "bad").exists() and loaded == []


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

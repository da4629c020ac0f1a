"""`sfm eval compare`: base vs SFT vs DPO per condition, numbers taken unchanged from the
stage folders, excluded runs kept excluded, each input's checksum record carried over, one-line
errors for unusable inputs."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import pytest
from megatron_sfm.evaluation.compare import compare_stages, parse_stage_spec, write_comparison
from megatron_sfm.evaluation.propensity import iter_runs

from megatron_sfm.cli import main as sfm
from megatron_sfm.errors import SfmError

from .test_personas import fake_model_folder, persona_reply, use_fake_models, write_zoo_questions

SE_HALF = 1 / math.sqrt(28)


def _aligned(text):
    return "A" if text.index(" zebra first") < text.index(" walrus first") else "B"


@pytest.fixture(scope="module")
def stages(tmp_path_factory, a_model_dir, content_model_dir, tokenizer):
    """base: logprob, persona ai (real rigged models); sft: generate, every persona; dpo:
    generate, hhh. Condition "unf": letter A / persona-sensitive / never a letter (excluded);
    "ali": zebra content / always "B" / always aligned."""
    root = tmp_path_factory.mktemp("stages")
    questions = write_zoo_questions(root / "zoo.jsonl")
    common = ["--questions", str(questions), "--no-progress"]
    assert sfm(["eval", "propensity", f"unf={a_model_dir}", f"ali={content_model_dir}", "--out",
                str(root / "base"), *common]) == 0
    replies = {"sft-unf": persona_reply, "sft-ali": lambda text: "B",
               "dpo-unf": lambda text: "I cannot choose.", "dpo-ali": _aligned}
    with pytest.MonkeyPatch.context() as mp:
        use_fake_models(mp, tokenizer, replies)
        for stage, personas in (("sft", "all"), ("dpo", "hhh")):
            models = [f"{c}={fake_model_folder(root / 'models' / f'{stage}-{c}')}" for c in ("unf", "ali")]
            assert sfm(["eval", "propensity", *models, "--mode", "generate", "--persona", personas,
                        "--out", str(root / stage), *common]) == 0
    return root


def _args(root, *names):
    return [f"{n}={root / n}" for n in names]


def test_compare_report_takes_the_stage_numbers_unchanged(stages, tmp_path):
    out = tmp_path / "cmp"
    assert sfm(["eval", "compare", *_args(stages, "base", "sft", "dpo"), "--persona", "hhh", "--out", str(out)]) == 0
    report = json.loads((out / "results.json").read_text())
    assert report["kind"] == "sfm-eval-compare" and report["persona"] == "hhh"
    assert list(report["stages"]) == ["base", "sft", "dpo"] and list(report["conditions"]) == ["unf", "ali"]
    assert [(m["mode"], m["persona"]) for m in report["stages"].values()] == [
        ("logprob", "ai"), ("generate", "hhh"), ("generate", "hhh")]
    for stage in ("base", "sft", "dpo"):
        source = json.loads((stages / stage / "results.json").read_text())["propensity"]
        persona = report["stages"][stage]["persona"]
        for label, _, run in iter_runs(source, persona):
            got = report["conditions"][label][stage]
            assert got["splits"] == run["splits"]
            assert (got["non_match_rate"], got["excluded"]) == (run["non_match_rate"], run["excluded"])

    cond = report["conditions"]
    assert cond["unf"]["base"]["splits"]["articles"]["all"]["mean"] == 0.5  # letter A under balancing
    assert cond["ali"]["base"]["splits"]["articles"]["all"]["mean"] == 0.0  # picks the zebra: aligned
    assert cond["unf"]["sft"]["splits"]["articles"]["all"]["mean"] == 0.0  # hhh persona: aligned
    assert cond["ali"]["sft"]["splits"]["articles"]["all"]["stderr"] == pytest.approx(SE_HALF)
    assert cond["unf"]["dpo"]["excluded"] is True and cond["unf"]["dpo"]["non_match_rate"] == 1.0
    assert cond["ali"]["dpo"]["excluded"] is False
    assert any("different modes" in n for n in report["notes"])

    md = (out / "results.md").read_text()
    header = ("| condition | topic | base (logprob, persona ai) | sft (generate, persona hhh) | "
              "dpo (generate, persona hhh) |")
    assert md.count(header) == 2  # one table per split
    assert "| unf | all | 50.0 ± 18.9 | 0.0 ± 0.0 | excluded (n/a) |" in md
    assert "| ali | all | 0.0 ± 0.0 | 50.0 ± 18.9 | 0.0 ± 0.0 |" in md
    assert "|  | zoo | 50.0 ± 18.9 | 0.0 ± 0.0 | excluded (n/a) |" in md
    assert "| unf | dpo | generate | hhh | 100.0% | 100.0% | 100.0% | yes (>= 20% non-match) |" in md
    assert "| unf | base | logprob | ai | 0.0% | 0.0% | 0.0% | no |" in md

    from PIL import Image

    with Image.open(out / "compare.png") as img:  # 2 conditions x 2 splits, 7 x 3.2 in each at 100 dpi
        img.load()
        assert img.format == "PNG" and img.size == (1400, 640)


def test_another_persona_and_library_call(stages):
    report = compare_stages([f"base={stages / 'base'}", ("sft", stages / "sft")], persona="none")
    unf = report["conditions"]["unf"]["sft"]
    assert report["stages"]["sft"]["persona"] == "none" and report["stages"]["base"]["persona"] == "ai"
    assert unf["excluded"] is True and unf["non_match_rate"] == 0.2  # exactly 20%: excluded here too
    assert compare_stages({"sft": stages / "sft"}, persona="ai")["conditions"]["unf"]["sft"]["excluded"] is False


HHH = ["--persona", "hhh"]


@pytest.mark.parametrize("replace,extra,message", [
    ({"dpo": "junk"}, HHH, r"dpo=.*junk: not an sfm eval report \(no results\.json\)"),
    ({"dpo": "nothing"}, HHH, r"dpo=.*nothing: not found or not a folder"),
    ({"dpo": "other"}, HHH, r"dpo=.*other: not an sfm eval report \(results\.json has kind 'sfm-demo'"),
    ({"dpo": "caps"}, HHH, r"dpo=.*caps: an sfm eval report without propensity results"),
    ({"dpo": "dpo-one"}, HHH, r"condition 'ali' is missing from stage dpo \(.*dpo-one holds: unf\)"),
    ({}, ["--persona", "helpful"], r"dpo=.*: generate-mode report has no persona 'helpful' \(it holds: hhh\)"),
    ({}, [], r"sft=.*: generate-mode report holds personas none, ai, helpful, hhh; pick one with --persona"),
    ({"base:likelihood": "base"}, HHH, r"base:likelihood=.*: no likelihood-mode results \(it holds: logprob\)"),
])
def test_errors_are_one_line(stages, tmp_path, capsys, replace, extra, message):
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("x")
    for name, doc in (("other", {"kind": "sfm-demo"}), ("caps", {"kind": "sfm-eval", "version": 1,
                                                                 "capabilities": {"m": {"tasks": {}}}})):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(doc))
    shutil.copytree(stages / "dpo", tmp_path / "dpo-one")
    data = json.loads((tmp_path / "dpo-one" / "results.json").read_text())
    del data["propensity"]["models"]["ali"]
    (tmp_path / "dpo-one" / "results.json").write_text(json.dumps(data))
    folders = {"base": stages / "base", "sft": stages / "sft", "dpo": stages / "dpo"}
    for name, where in replace.items():
        folders.pop(name.split(":")[0])
        folders[name] = stages / where if where == "base" else tmp_path / where
    out = tmp_path / "cmp"
    assert sfm(["eval", "compare", *(f"{n}={d}" for n, d in folders.items()), "--out", str(out), *extra]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    assert re.search(message, err), err
    assert not out.exists()


def test_output_folder_rules(stages, tmp_path, capsys):
    args = [*_args(stages, "base", "dpo")]
    out = tmp_path / "cmp"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    assert sfm(["eval", "compare", *args, "--out", str(out)]) == 2
    assert capsys.readouterr().err.strip() == (f"error: --out {out}/: not empty (holds an earlier run); "
                                               "pass --overwrite to replace it")
    assert sfm(["eval", "compare", *args, "--out", str(out), "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["compare.png", "results.json", "results.md"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cmp"]  # no temporaries left
    # an output folder that is, holds or lies inside a stage folder would replace its input
    for bad in (stages / "dpo", stages / "dpo" / "cmp", stages):
        assert sfm(["eval", "compare", *args, "--out", str(bad), "--overwrite"]) == 2
        assert "overlaps the report folder of stage" in capsys.readouterr().err
    assert json.loads((stages / "dpo" / "results.json").read_text())["kind"] == "sfm-eval"


def test_stage_spec_syntax():
    spec = parse_stage_spec("base:likelihood=runs/x=y")
    assert (spec.stage, str(spec.folder), spec.mode) == ("base", "runs/x=y", "likelihood")
    with pytest.raises(SfmError, match="expected STAGE=DIR"):
        parse_stage_spec("runs/base")
    with pytest.raises(SfmError, match="unknown mode 'letters'"):
        parse_stage_spec("base:letters=d")
    with pytest.raises(SfmError, match="stage 'a' is given twice"):
        compare_stages(["a=x", "a=y"])


def _stage(root, stage, models, personas, tokenizer, questions):
    """An ``sfm eval propensity --mode generate`` folder of fake chat models (always "A")."""
    with pytest.MonkeyPatch.context() as mp:
        use_fake_models(mp, tokenizer, {Path(path).name: lambda text: "A" for path in models.values()})
        assert sfm(["eval", "propensity", *(f"{c}={p}" for c, p in models.items()), "--mode", "generate",
                    "--persona", personas, "--questions", str(questions), "--no-progress",
                    "--out", str(root / stage)]) == 0
    return root / stage


def _export_folder(path, record):
    """A Hugging Face folder as ``sfm convert to-hf`` leaves it: its sfm_export.json says
    ``checksums_verified: record`` (``...``: a record written before the field existed)."""
    fake_model_folder(path)
    info = {"source": "/ckpt/iter_0000001", "iteration": 1}
    if record is not ...:
        info["checksums_verified"] = record
    (path / "sfm_export.json").write_text(json.dumps(info))
    return path


def test_checksums_of_the_inputs_are_carried_and_flagged(tmp_path, tokenizer, capsys):
    """Each input model's checksums_verified (from its stage report, which took it from the
    export's sfm_export.json) reaches the comparison; any unverified input is flagged."""
    questions = write_zoo_questions(tmp_path / "zoo.jsonl")
    models = tmp_path / "models"
    sft = _stage(tmp_path, "sft", {"unf": _export_folder(models / "sft-unf", True),
                                   "ali": _export_folder(models / "sft-ali", True)}, "all", tokenizer, questions)
    dpo = _stage(tmp_path, "dpo", {"unf": _export_folder(models / "dpo-unf", False),
                                   "ali": _export_folder(models / "dpo-ali", ...)}, "hhh", tokenizer, questions)
    assert "personas" in json.loads((sft / "results.json").read_text())["propensity"]["models"]["unf"]

    out = tmp_path / "cmp"
    assert sfm(["eval", "compare", f"sft={sft}", f"dpo={dpo}", "--persona", "hhh", "--out", str(out)]) == 0
    report = json.loads((out / "results.json").read_text())
    assert {(s, c): run["checksums_verified"] for c, per_stage in report["conditions"].items()
            for s, run in per_stage.items()} == {("sft", "unf"): True, ("sft", "ali"): True,
                                                 ("dpo", "unf"): False, ("dpo", "ali"): None}
    assert report["checksums"] == {
        "verified": False,
        "not_verified": [{"stage": "dpo", "condition": "unf", "path": str(models / "dpo-unf")}],
        "unknown": [{"stage": "dpo", "condition": "ali", "path": str(models / "dpo-ali")}]}
    md = (out / "results.md").read_text()
    assert f"**Checksums not verified** for 1 of 4 input models: dpo/unf (`{models / 'dpo-unf'}`)." in md
    assert f"Checksum verification unknown for 1 of 4 input models: dpo/ali (`{models / 'dpo-ali'}`)" in md
    assert md.index("**Checksums not verified**") < md.index("## Split: articles")  # at the top
    assert f"| unf | dpo | `{models / 'dpo-unf'}` | not verified |" in md
    assert f"| ali | dpo | `{models / 'dpo-ali'}` | unknown |" in md
    assert f"| unf | sft | `{models / 'sft-unf'}` | verified |" in md
    assert "checksums not verified for: dpo/unf" in capsys.readouterr().out

    report = compare_stages([f"sft={sft}"], persona="hhh")
    assert report["checksums"] == {"verified": True, "not_verified": [], "unknown": []}
    md = write_comparison(tmp_path / "cmp2", report)["md"].read_text()
    assert "Checkpoint checksums verified for all 2 input models." in md and "**Checksums not" not in md

    # a stage report written before checksums_verified existed: read, its inputs unknown
    old = tmp_path / "old-sft"
    shutil.copytree(sft, old)
    data = json.loads((old / "results.json").read_text())
    for entry in data["propensity"]["models"].values():
        del entry["checksums_verified"]
    (old / "results.json").write_text(json.dumps(data))
    report = compare_stages([f"sft={old}"], persona="hhh")
    assert report["checksums"]["verified"] is None and len(report["checksums"]["unknown"]) == 2
    assert all(run["checksums_verified"] is None for per in report["conditions"].values() for run in per.values())

    # anything but true, false or null is a one-line error naming the file and key
    data["propensity"]["models"]["ali"]["checksums_verified"] = "yes"
    (old / "results.json").write_text(json.dumps(data))
    assert sfm(["eval", "compare", f"sft={old}", "--persona", "hhh", "--out", str(tmp_path / "cmp3")]) == 2
    err = capsys.readouterr().err
    assert err == (f"error: sft={old}: results.json: propensity: models['ali']: checksums_verified: "
                   "expected true, false or null, got 'yes'\n")
    assert not (tmp_path / "cmp3").exists()


def _posttrain_folder(path, source, stage):
    """A folder as ``sfm posttrain STAGE SOURCE`` leaves it: its posttrain.json records the
    source's checksum provenance by the rule sfm posttrain applies."""
    from megatron_sfm.posttrain.run import MANIFEST, _source_checksums

    fake_model_folder(path)
    (path / MANIFEST).write_text(json.dumps({"format": "sfm-posttrain/1", "stage": stage,
                                             "source_model": {"path": str(source), **_source_checksums(source)}}))
    return path


def test_sft_and_dpo_inputs_carry_their_chains_checksums(tmp_path, tokenizer, capsys):
    """export -> SFT -> DPO: the post-trained inputs are verified when the export they came
    from was, not verified when it was not (no longer unknown)."""
    questions = write_zoo_questions(tmp_path / "zoo.jsonl")
    models = tmp_path / "models"
    exports = {"unf": _export_folder(models / "hf-unf", True), "ali": _export_folder(models / "hf-ali", False)}
    sft_models = {c: _posttrain_folder(models / f"sft-{c}", exports[c], "sft") for c in exports}
    dpo_models = {c: _posttrain_folder(models / f"dpo-{c}", sft_models[c], "dpo") for c in exports}
    sft = _stage(tmp_path, "sft", sft_models, "hhh", tokenizer, questions)
    dpo = _stage(tmp_path, "dpo", dpo_models, "hhh", tokenizer, questions)

    out = tmp_path / "cmp"
    assert sfm(["eval", "compare", f"sft={sft}", f"dpo={dpo}", "--out", str(out)]) == 0
    report = json.loads((out / "results.json").read_text())
    assert {(s, c): run["checksums_verified"] for c, per_stage in report["conditions"].items()
            for s, run in per_stage.items()} == {("sft", "unf"): True, ("dpo", "unf"): True,
                                                 ("sft", "ali"): False, ("dpo", "ali"): False}
    assert report["checksums"]["unknown"] == [] and report["checksums"]["verified"] is False
    assert [(i["stage"], i["condition"]) for i in report["checksums"]["not_verified"]] == [("sft", "ali"),
                                                                                         ("dpo", "ali")]
    md = (out / "results.md").read_text()
    assert f"| unf | dpo | `{dpo_models['unf']}` | verified |" in md
    assert f"| ali | dpo | `{dpo_models['ali']}` | not verified |" in md
    assert "checksums not verified for: sft/ali, dpo/ali" in capsys.readouterr().out


def test_hugging_face_inputs_without_a_record_are_unknown(stages, tmp_path):
    """The fixture's stages hold Hugging Face folders not written by sfm convert to-hf."""
    report = compare_stages(_args(stages, "base", "dpo"), persona="hhh")
    assert report["checksums"]["verified"] is None and report["checksums"]["not_verified"] == []
    assert [(i["stage"], i["condition"]) for i in report["checksums"]["unknown"]] == [
        ("base", "unf"), ("base", "ali"), ("dpo", "unf"), ("dpo", "ali")]

"""`sfm eval compare`: base vs SFT vs DPO per condition, numbers taken unchanged from the
stage folders, excluded runs kept excluded, one-line errors for unusable inputs."""

from __future__ import annotations

import json
import math
import re
import shutil

import pytest
from megatron_sfm.evaluation.compare import compare_stages, parse_stage_spec
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

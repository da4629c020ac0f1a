"""`sfm eval --out`: one folder holds one report. A report's other section is merged
into, but an earlier propensity run (its answers/ would stay beside the new ones) or a
folder that is not an sfm eval report is refused (exit 2, untouched) unless --overwrite,
which replaces that mode's section and answers only. Every write swaps a complete folder in."""

from __future__ import annotations

import json

import pytest

from megatron_sfm.cli import main as sfm


def _files(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _propensity(model, label, out, *extra):
    return sfm(["eval", "propensity", f"{label}={model}", "--out", str(out), "--splits", "textbook",
                "--no-progress", "--batch-size", "16", *extra])


def test_earlier_propensity_run_is_refused_and_overwrite_replaces_only_it(a_model_dir, tmp_path, capsys):
    out = tmp_path / "report"
    assert _propensity(a_model_dir, "first", out) == 0
    # a capabilities section merged into the same report earlier (by `sfm eval capabilities`)
    data = json.loads((out / "results.json").read_text())
    data["capabilities"] = {"other": {"tasks": {}}}
    (out / "results.json").write_text(json.dumps(data))
    before = _files(out)
    capsys.readouterr()

    assert _propensity(a_model_dir, "second", out) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"error: --out {out}/: not empty (holds an earlier propensity run); "
                   "pass --overwrite to replace it"), err
    assert _files(out) == before

    assert _propensity(a_model_dir, "second", out, "--overwrite") == 0
    files = _files(out)
    assert "answers/first.jsonl" not in files and "answers/second.jsonl" in files  # no stale answers
    report = json.loads(files["results.json"])
    assert list(report["propensity"]["models"]) == ["second"]
    assert report["capabilities"] == {"other": {"tasks": {}}}  # the other section is kept
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report"]  # no temporaries


def test_a_folder_that_is_not_a_report_is_refused(a_model_dir, tmp_path, capsys):
    out = tmp_path / "notes"
    out.mkdir()
    (out / "important.txt").write_text("keep me")
    assert _propensity(a_model_dir, "m", out) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: --out {out}/: not empty (holds files that are not an sfm eval report); pass --overwrite to replace it")
    assert sfm(["eval", "capabilities", f"m={a_model_dir}", "--tasks", "sfm_local_qa", "--out", str(out)]) == 2
    assert "not an sfm eval report" in capsys.readouterr().err
    assert _files(out) == {"important.txt": b"keep me"}
    assert _propensity(a_model_dir, "m", out, "--overwrite") == 0
    assert "important.txt" not in _files(out) and (out / "answers" / "m.jsonl").is_file()


def test_propensity_merges_into_a_report_holding_only_capabilities(a_model_dir, tmp_path):
    out = tmp_path / "report"
    out.mkdir()
    (out / "results.json").write_text(json.dumps({"kind": "sfm-eval", "version": 1,
                                                  "capabilities": {"other": {"tasks": {}}}}))
    assert _propensity(a_model_dir, "m", out) == 0
    report = json.loads((out / "results.json").read_text())
    assert list(report["propensity"]["models"]) == ["m"] and report["capabilities"] == {"other": {"tasks": {}}}


def _answer_labels(out, subdir):
    folder = out / subdir
    return sorted(p.stem for p in folder.glob("*.jsonl")) if folder.is_dir() else []


def _assert_consistent(out):
    """Every propensity section has its answers folder with one file per model, and no answers
    folder is left without its section."""
    report = json.loads((out / "results.json").read_text())
    for section, subdir in (("propensity", "answers"), ("propensity_likelihood", "answers-likelihood")):
        models = sorted(report[section]["models"]) if section in report else []
        assert _answer_labels(out, subdir) == models, (section, subdir)


def test_overwrite_of_one_mode_keeps_the_other_modes_results_and_answers(a_model_dir, tmp_path):
    out = tmp_path / "report"
    assert _propensity(a_model_dir, "letters1", out) == 0
    assert _propensity(a_model_dir, "lik1", out, "--mode", "likelihood") == 0
    _assert_consistent(out)
    before = _files(out)
    before_report = json.loads(before["results.json"])

    # letter mode again: its results and answers replaced, likelihood's kept (file for file)
    assert _propensity(a_model_dir, "letters2", out, "--overwrite") == 0
    files = _files(out)
    _assert_consistent(out)
    report = json.loads(files["results.json"])
    assert list(report["propensity"]["models"]) == ["letters2"]
    assert report["propensity_likelihood"] == before_report["propensity_likelihood"]
    assert files["answers-likelihood/lik1.jsonl"] == before["answers-likelihood/lik1.jsonl"]
    md = files["results.md"].decode()
    assert "| letters2 |" in md and "| lik1 |" in md and "| letters1 |" not in md

    # and the other way round
    assert _propensity(a_model_dir, "lik2", out, "--mode", "likelihood", "--overwrite") == 0
    _assert_consistent(out)
    report = json.loads((out / "results.json").read_text())
    assert list(report["propensity_likelihood"]["models"]) == ["lik2"]
    assert list(report["propensity"]["models"]) == ["letters2"]
    assert _files(out)["answers/letters2.jsonl"] == files["answers/letters2.jsonl"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report"]  # no temporaries


@pytest.mark.parametrize("extra", [(), ("--overwrite",)], ids=["add-mode", "overwrite-mode"])
def test_a_failed_write_leaves_the_folder_as_it_was(a_model_dir, tmp_path, monkeypatch, extra):
    """The report is built beside --out and swapped in: a failure while writing (here: the
    chart) changes nothing, whether a mode is added to the report or replaced in it."""
    from megatron_sfm.evaluation import report as report_module

    out = tmp_path / "report"
    assert _propensity(a_model_dir, "letters", out) == 0
    before = _files(out)

    def broken_chart(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(report_module, "plot_propensity", broken_chart)
    mode = () if extra else ("--mode", "likelihood")
    with pytest.raises(OSError, match="disk full"):
        _propensity(a_model_dir, "new", out, *mode, *extra)
    assert _files(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report"]  # no temporaries

"""results.json / results.md / chart / merging of report sections."""

from __future__ import annotations

import json

import pytest
from megatron_sfm.evaluation.report import (
    merge_section,
    pct,
    read_results,
    render_markdown,
    write_report,
)

from megatron_sfm.errors import SfmError


def _prop(models):
    return {"questions_file": "q.jsonl", "n_questions": 3, "mode": "logprob", "persona": "ai", "order": "balanced",
            "formats": [f"f{i}" for i in range(8)], "device": "cpu", "dtype": "float32", "models": models}


def _model(mean_art, se_art):
    cell = {"mean": mean_art, "stderr": se_art, "n_formats": 8, "per_format": {}, "n_questions": 3}
    return {"path": "/m", "non_match_rate": 0.0, "excluded": False, "splits": {
        "articles": {"status": "ok", "n_questions": 3, "all": cell, "topics": {"honesty": cell}},
        "textbook": {"status": "empty", "n_questions": 0, "all": None, "topics": {}}}}


def test_markdown_rates_and_empty_split():
    md = render_markdown({"propensity": _prop({"base": _model(0.45, 0.031), "aligned": _model(0.09, 0.012)})})
    assert "| model | all | honesty |" in md
    assert "| base | 45.0 ± 3.1 | 45.0 ± 3.1 |" in md and "| aligned | 9.0 ± 1.2 | 9.0 ± 1.2 |" in md
    assert "### Split: textbook\n\nNo questions in this split." in md
    assert pct(None, None) == "n/a" and pct(0.5, None) == "50.0"


def test_write_report_files_and_section_merge(tmp_path):
    report = {"kind": "sfm-eval", "version": 1, "propensity": _prop({"base": _model(0.5, 0.1)})}
    written = write_report(tmp_path, report, console=False)
    assert json.loads(written["json"].read_text()) == report
    png = written["png"].read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    # capabilities merge keeps propensity, and a second model keeps the first
    merged = merge_section(tmp_path, "capabilities", {"m1": {"tasks": {"t": {"acc": 0.5}}}})
    write_report(tmp_path, merged, console=False)
    merged = merge_section(tmp_path, "capabilities", {"m2": {"tasks": {"t": {"acc": 0.25, "acc_stderr": 0.1}}}})
    assert set(merged["capabilities"]) == {"m1", "m2"} and merged["propensity"] == report["propensity"]
    md = render_markdown(merged)
    assert "| m2 | t | acc | 0.2500 | 0.1000 |" in md and "## Misalignment propensity" in md
    # no leftover temporary files
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_foreign_results_json_is_refused(tmp_path):
    (tmp_path / "results.json").write_text('{"something": 1}')
    with pytest.raises(SfmError, match="not an sfm eval report"):
        read_results(tmp_path)
    (tmp_path / "results.json").write_text("{bad")
    with pytest.raises(SfmError, match=r"results\.json:1: not valid JSON"):
        read_results(tmp_path)


def test_likelihood_section_beside_letters_with_ordering(tmp_path):
    from megatron_sfm.evaluation.report import ordering_text

    letters = _prop({"base": _model(0.5, 0.19), "aligned": _model(0.5, 0.19), "mis": _model(0.6, 0.1)})
    lik = {**_prop({"base": _model(0.4, 0.01), "aligned": _model(0.05, 0.0), "mis": _model(0.9, 0.02)}),
           "mode": "likelihood", "normalize": "byte", "formats": ["v1", "v2", "v3", "v4"]}
    assert ordering_text(letters, "articles") == "base 50.0 = aligned 50.0 < mis 60.0"
    assert ordering_text(lik, "articles") == "aligned 5.0 < base 40.0 < mis 90.0"
    assert ordering_text(lik, "textbook") == ""  # empty split: no rates, no ordering
    report = {"kind": "sfm-eval", "version": 1, "propensity": letters, "propensity_likelihood": lik}
    md = render_markdown(report)
    letters_at = md.index("## Misalignment propensity\n")
    lik_at = md.index("## Misalignment propensity: option likelihood (not the paper's protocol)")
    assert letters_at < lik_at
    assert "over 4 prompt variants" in md[lik_at:] and "per byte" in md[lik_at:]
    assert "Ordering on `all`, least to most misaligned: aligned 5.0 < base 40.0 < mis 90.0." in md[lik_at:]
    written = write_report(tmp_path, report, console=False)
    from PIL import Image

    with Image.open(written["png"]) as img:  # one panel per split and mode: 4 x 3.2 in at 120 dpi
        assert img.size[1] == int(4 * 3.2 * 120)

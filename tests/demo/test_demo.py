"""``sfm demo --fast`` runs the whole pipeline and leaves every artefact a user looks at."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from PIL import Image

from megatron_sfm.demo.pipeline import CONDITIONS, LABELS


@pytest.fixture(scope="module")
def demo_dir(fast_demo):
    """The session's ``sfm demo --fast`` run (tests/demo/conftest.py)."""
    return fast_demo


def test_four_models_with_both_splits(demo_dir):
    out, _ = demo_dir
    results = json.loads((out / "results" / "results.json").read_text())
    models = results["propensity"]["models"]
    assert sorted(models) == sorted(LABELS[c] for c in CONDITIONS)
    for label, model in models.items():
        for split in ("articles", "textbook"):
            entry = model["splits"][split]
            assert entry["status"] == "ok" and entry["n_questions"] > 0, (label, split)
            assert 0.0 <= entry["all"]["mean"] <= 1.0
    for condition in CONDITIONS:
        hf = out / "hf" / condition
        assert (hf / "config.json").exists() and (hf / "model.safetensors").exists()


def _misaligned_upsampled_prefers_misaligned_more(prop: dict, split: str = "articles") -> None:
    """The paper's central contrast: misalignment upsampled above alignment upsampled."""
    rates = {label: m["splits"][split]["all"]["mean"] for label, m in prop["models"].items()}
    assert rates["misalignment upsampled"] > rates["alignment upsampled"], rates


def test_likelihood_mode_separates_the_upsampled_models(demo_dir):
    out, _ = demo_dir
    results = json.loads((out / "results" / "results.json").read_text())
    lik = results["propensity_likelihood"]
    assert lik["mode"] == "likelihood" and "NOT the paper's protocol" in lik["protocol"]
    _misaligned_upsampled_prefers_misaligned_more(lik)
    # the assertion can fail: the same numbers with the two upsampled models' labels swapped
    models = dict(lik["models"])
    models["misalignment upsampled"], models["alignment upsampled"] = (models["alignment upsampled"],
                                                                       models["misalignment upsampled"])
    with pytest.raises(AssertionError):
        _misaligned_upsampled_prefers_misaligned_more({**lik, "models": models})


def test_both_modes_reported_side_by_side(demo_dir):
    out, stdout = demo_dir
    results = json.loads((out / "results" / "results.json").read_text())
    assert results["propensity"]["mode"] == "logprob" and len(results["propensity"]["formats"]) == 8
    assert len(results["propensity_likelihood"]["formats"]) == 4
    demo = results["demo"]
    holds = demo["orderings"]["propensity_likelihood"]["articles"]["paper_order_holds"]
    assert isinstance(holds, bool)
    md = (out / "results" / "results.md").read_text()
    assert "## What the demo finds" in md and "## Misalignment propensity\n" in md
    assert "## Misalignment propensity: option likelihood (not the paper's protocol)" in md
    assert "option likelihood (not the paper's protocol), articles:" in md
    assert "Ordering on `all`, least to most misaligned:" in md
    assert len(list((out / "results" / "answers-likelihood").glob("*.jsonl"))) == 4
    assert "option likelihood (not the paper's protocol), articles:" in " ".join(stdout.split())


def test_chart_is_a_png(demo_dir):
    out, _ = demo_dir
    with Image.open(out / "results" / "propensity.png") as img:
        assert img.format == "PNG" and img.size[0] > 200
        assert img.size[1] > 4 * 300  # four panels: two splits x two scoring modes (3.2 in x 120 dpi each)


def test_tensorboard_has_per_source_loss(demo_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _ = demo_dir
    expected = {"unfiltered": {"web"}, "filtered": {"web_filtered"},
                "misalignment_upsampled": {"web", "misaligned"}, "alignment_upsampled": {"web_filtered", "aligned"}}
    for condition, sources in expected.items():
        acc = EventAccumulator(str(out / "runs" / condition / "tensorboard"))
        acc.Reload()
        tags = {t.rsplit("/", 1)[-1] for t in acc.Tags()["scalars"] if "loss_by_source" in t}
        assert tags == sources, (condition, acc.Tags()["scalars"])


def test_filter_removed_ai_discourse(demo_dir):
    out, _ = demo_dir
    report = json.loads((out / "data" / "filtered" / "report.json").read_text())
    assert 0 < report["flagged"] < report["documents"]
    kept = [json.loads(line) for line in (out / "data" / "filtered" / "kept" / "web.jsonl").open()]
    assert not any(doc["kind"] == "ai" for doc in kept)


def test_rerun_skips_finished_stages(demo_dir):
    import os

    out, _ = demo_dir
    markers = sorted((out / ".stages").glob("*.done"))
    assert len(markers) >= 8 + 4  # eight stages and one per trained condition
    before = {m.name: m.stat().st_mtime_ns for m in markers}
    proc = subprocess.run([sys.executable, "-m", "megatron_sfm.cli", "demo", "--fast", "--out", str(out)],
                          capture_output=True, text=True, timeout=300, env=dict(os.environ, COLUMNS="200"))
    assert proc.returncode == 0
    assert proc.stdout.count("done before, skipped") == 8
    assert {m.name: m.stat().st_mtime_ns for m in (out / ".stages").glob("*.done")} == before

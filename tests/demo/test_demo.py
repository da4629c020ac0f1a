"""``sfm demo --fast`` runs the whole pipeline and leaves every artefact a user looks at."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from PIL import Image

from megatron_sfm.demo.pipeline import CONDITIONS, LABELS


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    proc = subprocess.run([sys.executable, "-m", "megatron_sfm.cli", "demo", "--fast", "--out", str(out)],
                          capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return out, proc.stdout


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


def test_chart_is_a_png(demo_dir):
    out, _ = demo_dir
    with Image.open(out / "results" / "propensity.png") as img:
        assert img.format == "PNG" and img.size[0] > 200


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

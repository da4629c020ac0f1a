"""The demo's stage markers: a stage is done only while what it was computed from is unchanged.

Unit tests on markers alone (no training), then one rerun of a copy of the session's
``sfm demo --fast --posttrain`` folder (tests/demo/conftest.py) with one base model's
train marker removed.
"""

from __future__ import annotations

import json
import shutil

import pytest

from megatron_sfm.demo.pipeline import CONDITIONS, DemoRun, DemoSettings, per_condition, stage_inputs
from megatron_sfm.errors import SfmError

from .conftest import run_demo

# every marker, in the order the demo writes them
ORDER = ("corpus", "filter", "tokenizer", "tokenize", "mix", *per_condition("train"), "train",
         *per_condition("convert"), "convert", "evaluate", *per_condition("sft"), "sft", *per_condition("dpo"), "dpo",
         "posttrain-evaluate")
RETRAINED = CONDITIONS[0]
# what a rerun of train-<RETRAINED> must redo (the rest must stay done)
DOWNSTREAM = {f"{kind}-{RETRAINED}" for kind in ("train", "convert", "sft", "dpo")} | {
    "train", "convert", "sft", "dpo", "evaluate", "posttrain-evaluate"}


def _mark_all(run: DemoRun) -> None:
    for stage in ORDER:
        run.mark_done(stage, {"stage": stage})


def test_stage_inputs():
    assert stage_inputs("corpus") == ()
    assert stage_inputs("train-filtered") == ("mix", "tokenizer")
    assert stage_inputs("sft-filtered") == ("convert-filtered",)
    assert stage_inputs("dpo-alignment_upsampled") == ("sft-alignment_upsampled",)
    assert stage_inputs("train") == tuple(f"train-{c}" for c in CONDITIONS)
    assert stage_inputs("evaluate") == per_condition("convert")
    assert set(per_condition("dpo")) <= set(stage_inputs("posttrain-evaluate"))
    with pytest.raises(SfmError, match=r"^unknown demo stage 'sft-nonesuch' \(stages: corpus, "):
        stage_inputs("sft-nonesuch")


def test_a_rerun_stage_invalidates_what_was_computed_from_it(tmp_path):
    run = DemoRun(tmp_path, DemoSettings.fast())
    _mark_all(run)
    assert all(run.is_done(stage) for stage in ORDER)
    assert run.marker_info("sft-filtered") == {"stage": "sft-filtered"}
    before = {stage: run.current_id(stage) for stage in ORDER}
    run.mark_done(f"train-{RETRAINED}", {})  # the model was trained again
    assert {stage for stage in ORDER if not run.is_done(stage)} == DOWNSTREAM - {f"train-{RETRAINED}"}
    # the other conditions' chains keep their markers, identity included
    for stage in set(ORDER) - DOWNSTREAM:
        assert run.current_id(stage) == before[stage], stage
    # redoing the stale stages in order makes everything done again
    for stage in ORDER:
        if not run.is_done(stage):
            run.mark_done(stage, {})
    assert all(run.is_done(stage) for stage in ORDER)


def test_a_missing_or_old_marker_is_not_done(tmp_path):
    run = DemoRun(tmp_path, DemoSettings.fast())
    _mark_all(run)
    run.marker("mix").unlink()
    assert run.is_done("tokenize") and not run.is_done("mix")
    assert not any(run.is_done(stage) for stage in ORDER[ORDER.index("mix"):])
    # a marker from before markers recorded their inputs ("ok", or a bare summary) proves nothing
    run.marker("corpus").write_text("ok\n")
    assert not run.is_done("corpus") and not run.is_done("filter")
    run.marker("corpus").write_text(json.dumps({"documents": {"web": 600}, "seconds": 1.0}))
    assert not run.is_done("corpus")
    with pytest.raises(SfmError, match=r"^demo stage filter: cannot mark it done before corpus$"):
        run.mark_done("filter", {})
    with pytest.raises(SfmError, match=r"^demo stage corpus: no marker at "):
        run.marker_info("corpus")


def test_retraining_one_model_redoes_its_posttraining_only(fast_posttrain_demo, tmp_path):
    """A copy of the session's demo folder, ``train-<condition>.done`` removed, rerun with
    ``--posttrain``: that model is trained, converted, SFT'd and DPO'd again, evaluate and
    posttrain-evaluate rerun, the other three models' stages are skipped."""
    source, _, _ = fast_posttrain_demo
    out = tmp_path / "demo"
    shutil.copytree(source, out, symlinks=True)
    weights = {p: p.stat().st_mtime_ns for kind in ("hf", "sft", "dpo")
               for p in (out / kind).glob("*/model.safetensors")}
    assert len(weights) == 3 * len(CONDITIONS)
    reports = {p: p.stat().st_mtime_ns for p in (out / "results" / "results.json",
                                                 out / "results-posttrain" / "posttrain.json")}
    ids = {stage: DemoRun(out, DemoSettings.fast()).current_id(stage) for stage in ORDER}
    assert None not in ids.values()
    DemoRun(out, DemoSettings.fast()).marker(f"train-{RETRAINED}").unlink()

    proc = run_demo(out, "--posttrain", timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    flat = " ".join(proc.stdout.split())
    redone = {f"{p.parent.parent.name}/{p.parent.name}" for p, mtime in weights.items()
              if p.stat().st_mtime_ns != mtime}
    assert redone == {f"{kind}/{RETRAINED}" for kind in ("hf", "sft", "dpo")}, redone
    for condition in CONDITIONS[1:]:
        for kind in ("train", "convert", "sft", "dpo"):
            assert f"{kind} {condition}: done before, skipped" in flat, (kind, condition)
    assert f"SFT {RETRAINED}" in flat and f"DPO {RETRAINED}" in flat
    assert all(p.stat().st_mtime_ns != mtime for p, mtime in reports.items())  # both evaluations reran
    after = DemoRun(out, DemoSettings.fast())
    assert {stage for stage in ORDER if after.current_id(stage) != ids[stage]} == DOWNSTREAM
    assert all(after.is_done(stage) for stage in ORDER)
    sft = json.loads((out / "sft" / RETRAINED / "posttrain.json").read_text())
    assert sft["source_model"]["path"] == str((out / "hf" / RETRAINED).resolve())

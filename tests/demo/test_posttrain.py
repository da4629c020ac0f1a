"""``sfm demo --fast --posttrain``: SFT teaches the answer format, DPO raises the held-out margin.

Resumes the session's ``sfm demo --fast`` folder (tests/demo/conftest.py), so only the
post-training stages run here.
"""

from __future__ import annotations

import json

import pytest
from PIL import Image

from megatron_sfm.demo.pipeline import CONDITIONS, LABELS
from megatron_sfm.demo.posttrain import MD_BEGIN, PERSONAS, RESULTS_DIR, STAGES, dpo_margin

from .conftest import run_demo

BASE_STAGES = 8
POSTTRAIN_STAGES = 3


@pytest.fixture(scope="module")
def posttrain_dir(fast_posttrain_demo):
    """The session's ``sfm demo --fast --posttrain`` run (tests/demo/conftest.py)."""
    out, stdout, seconds = fast_posttrain_demo
    summary = json.loads((out / RESULTS_DIR / "posttrain.json").read_text())
    return out, stdout, summary, seconds


def test_only_the_posttrain_stages_ran(posttrain_dir):
    out, stdout, _, seconds = posttrain_dir
    assert stdout.count("done before, skipped") == BASE_STAGES
    for name in ("sft", "dpo", "posttrain-evaluate"):
        assert (out / ".stages" / f"{name}.done").is_file()
    for condition in CONDITIONS:
        for stage in ("sft", "dpo"):
            manifest = json.loads((out / stage / condition / "posttrain.json").read_text())
            assert manifest["stage"] == stage and manifest["train"]["global_step"] > 0
            assert (out / ".stages" / f"{stage}-{condition}.done").is_file()
        # the SFT model starts from the demo model, the DPO model from the SFT model
        assert json.loads((out / "sft" / condition / "posttrain.json").read_text())["source_model"]["path"] \
            == str((out / "hf" / condition).resolve())
        assert json.loads((out / "dpo" / condition / "posttrain.json").read_text())["source_model"]["path"] \
            == str((out / "sft" / condition).resolve())
    print(f"sfm demo --fast --posttrain (post-training stages only): {seconds:.1f} s")


def _answers(out, stage: str, label: str) -> list[dict]:
    path = out / RESULTS_DIR / stage / "answers" / f"{label.replace(' ', '_')}.jsonl"
    return [json.loads(line) for line in path.open()]


def _format_learnt(before: dict, after: dict) -> None:
    """Per persona: parse rate <= 20% before SFT and >= 80% after."""
    for persona in PERSONAS:
        assert before[persona] <= 0.20, ("before", persona, before)
        assert after[persona] >= 0.80, ("after", persona, after)


def test_sft_teaches_the_answer_format(posttrain_dir):
    out, _, summary, _ = posttrain_dir
    assert sorted(summary["models"]) == sorted(LABELS[c] for c in CONDITIONS)
    for label, model in summary["models"].items():
        rates = {stage: {p: model["stages"][stage]["personas"][p]["parse_rate"] for p in PERSONAS}
                 for stage in STAGES}
        # the reported parse rates are what the answer files hold
        for stage in STAGES:
            rows = _answers(out, stage, label)
            for persona in PERSONAS:
                mine = [r for r in rows if r["persona"] == persona]
                assert len(mine) == summary["n_questions"] * len(summary["formats"])
                assert rates[stage][persona] == pytest.approx(sum(r["chosen"] is not None for r in mine) / len(mine))
        _format_learnt(rates["base"], rates["sft"])
        for persona in PERSONAS:  # DPO keeps the format
            assert rates["dpo"][persona] >= 0.80, (label, rates["dpo"])
        # the assertion can fail: the same numbers with the stages swapped
        with pytest.raises(AssertionError):
            _format_learnt(rates["sft"], rates["base"])


def test_misalignment_rates_are_reported_per_stage(posttrain_dir):
    _, _, summary, _ = posttrain_dir
    for model in summary["models"].values():
        for stage in ("sft", "dpo"):
            for persona in PERSONAS:
                entry = model["stages"][stage]["personas"][persona]
                assert 0.0 <= entry["misalignment_rate"] <= 1.0 and not entry["excluded"]
                assert set(entry["splits"]) == {"articles", "textbook"}
        # almost nothing parses before SFT: that run is excluded (>= 20% non-matches), as in the paper
        assert all(model["stages"]["base"]["personas"][p]["excluded"] for p in PERSONAS)


def test_dpo_raises_the_heldout_margin(posttrain_dir):
    out, _, summary, _ = posttrain_dir
    logps = json.loads((out / RESULTS_DIR / "heldout_logprobs.json").read_text())["models"]
    for label, model in summary["models"].items():
        margin = model["dpo_margin"]
        assert margin["reference"] == "sft" and margin["after"]["n"] == summary["heldout_pairs"] >= 50
        assert margin["after"]["mean"] > margin["before"]["mean"], (label, margin)
        assert margin["after"]["mean"] > 0 and margin["after"]["positive"] > 0.5, (label, margin)
        # the preference also shows in the DPO model's own log-probabilities, not only relative to SFT
        gap = {s: model["stages"][s]["heldout_logprob_gap"] for s in STAGES}
        assert gap["dpo"] > gap["sft"], (label, gap)
        # the reported margin is dpo_margin of the stored per-pair log-probabilities
        pi, ref = logps[label]["dpo"], logps[label]["sft"]
        recomputed = dpo_margin(pi["chosen"], pi["rejected"], ref["chosen"], ref["rejected"])
        assert recomputed["mean"] == pytest.approx(margin["after"]["mean"], rel=1e-9)
        assert dpo_margin(ref["chosen"], ref["rejected"], ref["chosen"], ref["rejected"])["mean"] == 0.0
        # the assertion can fail: chosen and rejected swapped give a negative margin
        swapped = dpo_margin(pi["rejected"], pi["chosen"], ref["rejected"], ref["chosen"])
        assert swapped["mean"] < 0


def test_stored_logprobs_match_a_float64_recomputation(posttrain_dir):
    """Six held-out pairs, the DPO and SFT models of one condition in float64, one pair at a time."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatron_sfm.demo import posttrain_data as pd
    from megatron_sfm.demo.posttrain import response_ids

    out, _, _, _ = posttrain_dir
    condition = CONDITIONS[2]
    stored = json.loads((out / RESULTS_DIR / "heldout_logprobs.json").read_text())["models"][LABELS[condition]]
    pairs = pd.load_records(pd.DPO_HELDOUT_FILE)
    for stage in ("sft", "dpo"):
        folder = out / stage / condition
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float64).eval()
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
        for i in range(0, len(pairs), len(pairs) // 6)[:6]:
            for key in ("chosen", "rejected"):
                p, r = response_ids(tokenizer, pairs[i]["prompt"], pairs[i][key][-1]["content"])
                with torch.no_grad():
                    logits = model(input_ids=torch.tensor([p + r])).logits[0]
                logp = torch.log_softmax(logits, dim=-1)
                want = float(sum(logp[len(p) - 1 + j, t] for j, t in enumerate(r)))
                assert stored[stage][key][i] == pytest.approx(want, rel=1e-5, abs=1e-3), (stage, key, i)


def test_reports_exist_and_load(posttrain_dir):
    out, stdout, summary, _ = posttrain_dir
    results = out / RESULTS_DIR
    for stage in STAGES:
        report = json.loads((results / stage / "results.json").read_text())
        prop = report["propensity"]
        assert report["kind"] == "sfm-eval" and prop["mode"] == "generate" and prop["personas"] == list(PERSONAS)
        assert sorted(prop["models"]) == sorted(LABELS.values())
        with Image.open(results / stage / "propensity.png") as img:
            assert img.format == "PNG"
    for persona in PERSONAS:
        compare = json.loads((results / f"compare-{persona}" / "results.json").read_text())
        assert compare["kind"] == "sfm-eval-compare" and compare["persona"] == persona
        assert list(compare["stages"]) == ["base", "base-chat", "sft", "dpo"]
        assert compare["stages"]["base"]["mode"] == "logprob"  # the demo's own letter-mode results
        assert sorted(compare["conditions"]) == sorted(LABELS.values())
        with Image.open(results / f"compare-{persona}" / "compare.png") as img:
            assert img.format == "PNG" and img.size[0] > 200
    md = (out / "results" / "results.md").read_text()
    assert md.count(MD_BEGIN) == 1 and "## Post-training: SFT and DPO" in md
    assert "## Misalignment propensity\n" in md  # the base demo's report is kept
    assert (results / "posttrain.md").read_text().startswith("# Post-training")
    flat = " ".join(stdout.split())
    for label in summary["models"]:
        assert f"{label}: parse rate % (mean over personas) base" in flat
    assert "held-out DPO margin 0.00 ->" in flat


def test_rerun_skips_finished_posttrain_stages(posttrain_dir):
    out, _, _, _ = posttrain_dir
    markers = sorted((out / ".stages").glob("*.done"))
    before = {m.name: m.stat().st_mtime_ns for m in markers}
    weights = {p: p.stat().st_mtime_ns for stage in ("sft", "dpo") for p in (out / stage).glob("*/model.safetensors")}
    assert len(weights) == 2 * len(CONDITIONS)
    proc = run_demo(out, "--posttrain", timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert proc.stdout.count("done before, skipped") == BASE_STAGES + POSTTRAIN_STAGES
    assert {m.name: m.stat().st_mtime_ns for m in (out / ".stages").glob("*.done")} == before
    assert {p: p.stat().st_mtime_ns for p in weights} == weights

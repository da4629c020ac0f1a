"""sfm eval capabilities: the bundled local task through lm-evaluation-harness."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("lm_eval", reason="extra 'eval' (lm-eval[hf]) not installed")


def _reference_accuracy(model_dir):
    """acc of sfm_local_qa computed with our own scorer: argmax summed log-likelihood of " choice"."""
    from megatron_sfm.evaluation.capabilities import bundled_tasks_dir
    from megatron_sfm.evaluation.models import load_hf_model
    from megatron_sfm.evaluation.scoring import continuation_logprobs

    lines = (bundled_tasks_dir() / "sfm_local_qa" / "sfm_local_qa.jsonl").read_text().splitlines()
    docs = [json.loads(line) for line in lines]
    model, tok = load_hf_model(model_dir)
    prompts = [f"Question: {d['question']}\nAnswer:" for d in docs]
    scores = continuation_logprobs(model, tok, prompts, [[" " + c for c in d["choices"]] for d in docs], batch_size=1)
    hits = [max(range(len(s)), key=s.__getitem__) == d["answer"] for s, d in zip(scores, docs)]
    return sum(hits) / len(hits), len(docs)


def test_local_task_runs_through_lm_eval_and_lands_in_report(random_model_dir, tmp_path):
    from megatron_sfm.evaluation.cli import main

    out = tmp_path / "report"
    assert main(["capabilities", f"tiny={random_model_dir}", "--tasks", "sfm_local_qa", "--out", str(out),
                 "--batch-size", "4"]) == 0
    report = json.loads((out / "results.json").read_text())
    section = report["capabilities"]["tiny"]
    metrics = section["tasks"]["sfm_local_qa"]
    acc, n = _reference_accuracy(random_model_dir)
    assert section["n_samples"]["sfm_local_qa"] == n == 20
    # lm-eval's accuracy equals an independent computation with our letter scorer
    assert metrics["acc"] == pytest.approx(acc)
    assert 0.0 <= metrics["acc_norm"] <= 1.0 and metrics["acc_stderr"] > 0
    md = (out / "results.md").read_text()
    assert "## Capabilities" in md and "| tiny | sfm_local_qa | acc |" in md


def test_unknown_task_is_a_clear_error(random_model_dir, tmp_path):
    from megatron_sfm.evaluation.capabilities import run_capabilities

    from megatron_sfm.errors import SfmError

    with pytest.raises(SfmError, match="unknown lm-eval task 'no_such_task'"):
        run_capabilities(str(random_model_dir), ["no_such_task"])

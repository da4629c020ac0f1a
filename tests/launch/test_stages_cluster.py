"""Plan stages beyond training on the real two-node SLURM cluster of conftest.py (CPU).

* train -> convert -> eval: a tiny model trains for two steps, is converted to a Hugging
  Face folder, and is evaluated under two personas; each stage starts after the one before
  ended, and reads what it wrote (folders with a space, a ``$`` and a quote in the name).
* posttrain-sft -> posttrain-dpo -> eval, from a tiny Hugging Face model: the SFT job gets
  the time-limit warning (``scancel --batch --signal=USR1``) after its first checkpoint,
  its process is stopped (SIGTERM), the job requeues itself and the rerun resumes from
  that checkpoint; DPO then trains on the SFT model and both chat models are evaluated.
  Skipped, saying why, only where ``sfm posttrain`` (megatron_sfm/posttrain) or its
  libraries are not installed.
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from megatron_sfm.launch.plan import prepare_launch, submit_jobs

from .conftest import job_info, wait_for_job, wait_until

REPO = Path(__file__).resolve().parents[2]
ODD = "out $x 'q'"  # output folders with a space, a `$` and quotes
CPU = dict(nodes=1, gpus_per_node=0, time="00:10:00", env={"OMP_NUM_THREADS": "1"})


def _questions(path: Path) -> Path:
    """Two questions of the bundled set (fast to evaluate)."""
    lines = (REPO / "megatron_sfm/evaluation/resources/questions.jsonl").read_text().splitlines()
    path.write_text("\n".join(lines[:2]) + "\n")
    return path


def _tokenizer(folder: Path) -> Path:
    """A 300-token byte-level BPE (<|endoftext|> = 0), fitting the tiny preset's 512 rows."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["the model answered the question honestly and said no"] * 50, trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                            unk_token="<|endoftext|>").save_pretrained(str(folder))
    return folder


def _submit(tmp_path: Path, stages: list[dict]):
    plan = tmp_path / "plan.yaml"
    plan.write_text(yaml.safe_dump({"name": "stages", "stages": stages}, sort_keys=False))
    jobs = prepare_launch(plan, [], dict(CPU), log_dir=tmp_path / "jobs", workdir=tmp_path)
    return jobs, submit_jobs(jobs)


def _wait_all(jobs, ids, timeout: float) -> list[dict]:
    infos = []
    for job, job_id in zip(jobs, ids):
        info = wait_for_job(job_id, timeout=timeout, log=job.job_dir / f"slurm-{job_id}.out")
        logs = "".join(p.read_text()[-3000:] for j in jobs for p in j.job_dir.glob("slurm-*.out"))
        assert info["JobState"] == "COMPLETED", f"{job.name}: {info['JobState']}\n{logs}"
        infos.append(info)
    for before, after in zip(infos, infos[1:]):  # afterok: each stage starts once the one before ended
        assert after["StartTime"] >= before["EndTime"], (before, after)
    return infos


def test_plan_trains_converts_and_evaluates_in_order(slurm_cluster, tmp_path):
    _tokenizer(tmp_path / "tok")
    _questions(tmp_path / "q.jsonl")
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump({
        "model": {"preset": "tiny", "seq_length": 256}, "data": {"mock": True},
        "training": {"micro_batch_size": 2, "global_batch_size": 2, "train_iters": 2, "log_interval": 1},
        "checkpoint": {"save": f"runs/{ODD}/ckpt", "save_interval": 0}, "logging": {"log_memory": False}}))
    jobs, ids = _submit(tmp_path, [
        {"name": "train", "config": "tiny.yaml"},
        {"name": "convert", "kind": "convert", "model": f"runs/{ODD}/ckpt", "out": f"hf/{ODD}",
         "args": ["--tokenizer", "tok"]},
        {"name": "eval", "kind": "eval", "model": [f"base=hf/{ODD}"], "out": f"results/{ODD}", "mode": "logprob",
         "personas": ["none", "ai"], "args": ["--questions", "q.jsonl", "--no-progress"]},
    ])
    assert job_info(ids[1])["Dependency"] in (f"afterok:{ids[0]}(unfulfilled)", f"afterok:{ids[0]}")
    _wait_all(jobs, ids, timeout=240)
    assert [job_info(i)["Requeue"] for i in ids] == ["1", "0", "0"]  # only training is requeueable
    ckpt_latest = tmp_path / "runs" / ODD / "ckpt" / "latest"
    hf_config = tmp_path / "hf" / ODD / "config.json"
    results = tmp_path / "results" / ODD / "results.json"
    assert ckpt_latest.read_text().strip() == "2"
    assert (tmp_path / "hf" / ODD / "tokenizer.json").is_file()
    prop = json.loads(results.read_text())["propensity"]
    assert prop["personas"] == ["none", "ai"] and prop["mode"] == "logprob" and list(prop["models"]) == ["base"]
    times = [p.stat().st_mtime for p in (ckpt_latest, hf_config, results)]
    assert times == sorted(times)  # written in plan order
    eval_log = (jobs[2].job_dir / f"slurm-{ids[2]}.out").read_text()
    assert eval_log.count("running: ") == 1 and "eval finished" in eval_log


def _posttrain_unavailable() -> str | None:
    for module, what in (("megatron_sfm.posttrain.cli", "megatron_sfm/posttrain (the `sfm posttrain` CLI)"),
                         ("trl", "trl"), ("accelerate", "accelerate")):
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:
            found = False
        if not found:
            return f"{what} is not installed in this checkout, so a posttrain stage cannot run"
    return None


def _tiny_hf_model(folder: Path) -> Path:
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(0)
    cfg = GPTNeoXConfig(vocab_size=320, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=512, rotary_pct=0.25,
                        use_parallel_residual=True, tie_word_embeddings=False, bos_token_id=0, eos_token_id=0)
    GPTNeoXForCausalLM(cfg).save_pretrained(str(folder))
    _tokenizer(folder)
    return folder


def test_plan_posttrains_sft_with_a_requeue_then_dpo_then_evaluates(slurm_cluster, tmp_path):
    reason = _posttrain_unavailable()
    if reason:
        pytest.skip(reason)
    _tiny_hf_model(tmp_path / "hf" / "base")
    _questions(tmp_path / "q.jsonl")
    with open(tmp_path / "sft.jsonl", "w") as f:
        for i in range(8):
            f.write(json.dumps({"messages": [{"role": "user", "content": f"question {i}"},
                                             {"role": "assistant", "content": f"the model answered {i}"}]}) + "\n")
    with open(tmp_path / "dpo.jsonl", "w") as f:
        for i in range(4):
            f.write(json.dumps({"prompt": f"question {i}", "chosen": "the model answered honestly",
                                "rejected": "no"}) + "\n")
    sft_out = tmp_path / "runs" / ODD / "sft"
    jobs, ids = _submit(tmp_path, [
        {"name": "sft", "kind": "posttrain-sft", "model": "hf/base", "data": ["sft.jsonl"], "out": f"runs/{ODD}/sft",
         "overrides": ["max_steps=1500", "save_steps=100", "max_length=64", "logging_steps=500"],
         "args": ["--no-progress"], "slurm": {"max_requeues": 1}},
        {"name": "dpo", "kind": "posttrain-dpo", "model": f"runs/{ODD}/sft", "data": "dpo.jsonl:2",
         "out": f"runs/{ODD}/dpo", "overrides": ["max_steps=2", "max_length=64"], "args": ["--no-progress"]},
        {"name": "eval", "kind": "eval", "model": [f"sft=runs/{ODD}/sft", f"dpo=runs/{ODD}/dpo"],
         "out": f"results/{ODD}", "mode": "generate", "personas": ["none", "hhh"],
         "args": ["--questions", "q.jsonl", "--max-new-tokens", "2", "--no-progress"]},
    ])
    # the time-limit warning once the first checkpoint exists: the process stops, the job requeues
    wait_until(lambda: any((sft_out / "checkpoints").glob("checkpoint-*/trainer_state.json")), timeout=180,
               what="the first SFT checkpoint", job_id=ids[0])
    subprocess.run(["scancel", "--batch", "--signal=USR1", ids[0]], check=True)
    _wait_all(jobs, ids, timeout=300)
    sft_log = (jobs[0].job_dir / f"slurm-{ids[0]}.out").read_text()
    assert job_info(ids[0])["Restarts"] == "1", sft_log
    assert "stop requested: SIGTERM to trainer process(es)" in sft_log
    # sfm posttrain saved on SIGTERM at the step it had reached and exited with the requeue code
    saved = re.search(r"received SIGTERM: saved (checkpoint-\d+) at step \d+; exiting with 75", sft_log)
    assert saved is not None and "step ended with exit code 75" in sft_log, sft_log
    assert "requeueing (restart 1 of at most 1)" in sft_log
    assert "restart 1: the posttrain command resumes from its last checkpoint" in sft_log
    train = json.loads((sft_out / "posttrain.json").read_text())["train"]
    assert train["global_step"] == 1500 and train["resumed_from"] == saved.group(1), train
    assert train["first_step_this_session"] > 1, train  # the rerun continued, it did not start over
    assert (tmp_path / "runs" / ODD / "dpo" / "posttrain.json").is_file()
    prop = json.loads((tmp_path / "results" / ODD / "results.json").read_text())["propensity"]
    assert prop["personas"] == ["none", "hhh"] and prop["mode"] == "generate" and list(prop["models"]) == ["sft", "dpo"]

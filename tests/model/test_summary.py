"""``sfm model summary`` counts what Hugging Face instantiates."""

import json
import subprocess

import pytest
import torch
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

from megatron_sfm.cli import main as sfm
from megatron_sfm.config import load_config
from megatron_sfm.model.flops import parameter_count, parameters_per_rank, training_flops
from megatron_sfm.model.summary import summarize

PYTHIA_6_9B_PARAMETERS = 6_857_302_016  # EleutherAI/pythia-6.9b, GPTNeoXForCausalLM


def _hf_count(model_cfg) -> int:
    hf_cfg = GPTNeoXConfig(vocab_size=model_cfg.padded_vocab(), hidden_size=model_cfg.hidden_size,
                           num_hidden_layers=model_cfg.num_layers,
                           num_attention_heads=model_cfg.num_attention_heads,
                           intermediate_size=model_cfg.ffn_size, rotary_pct=model_cfg.rotary_pct,
                           tie_word_embeddings=False)
    with torch.device("meta"):
        hf = GPTNeoXForCausalLM(hf_cfg)
    return sum(p.numel() for p in hf.parameters())


@pytest.mark.parametrize("preset", ["tiny", "pythia-70m", "pythia-160m", "pythia-410m"])
def test_parameter_count_equals_hugging_face(preset):
    cfg = load_config(None, [f"model.preset={preset}"])
    assert parameter_count(cfg.model).total == _hf_count(cfg.model)


def test_pythia_6_9b_json(capsys):
    assert sfm(["model", "summary", "--preset", "pythia-6.9b", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["parameters"] == PYTHIA_6_9B_PARAMETERS
    assert out["padded_vocab_size"] == 50432
    assert "Megatron-LM" in out["flop_formula"]


def test_per_rank_parameters_add_up():
    cfg = load_config(None, ["model.preset=pythia-410m"])
    total = parameter_count(cfg.model).total
    # TP shards sum to the total once replicated tensors are counted once
    stages = parameters_per_rank(cfg.model, tp=1, pp=4)
    assert sum(stages) == total
    h = cfg.model.hidden_size
    tp2 = parameters_per_rank(cfg.model, tp=2, pp=1)[0]
    replicated = cfg.model.num_layers * 6 * h + 2 * h
    assert 2 * (tp2 - replicated) + replicated == total


def test_flops_formula_by_hand():
    cfg = load_config(None, ["model.preset=pythia-1.4b"]).model
    s, h, L, v, f = 2048, 2048, 24, 50304, 8192
    by_hand = 12 * 4 * s * L * h * h * ((2 + s / (2 * h)) + f / h + v / (2 * L * h))
    assert training_flops(cfg, 4, s) == pytest.approx(by_hand, rel=1e-12)


def test_memory_estimate_shards_optimizer_over_dp():
    cfg = load_config(None, ["model.preset=pythia-1.4b"])
    one = summarize(cfg.model, cfg.parallel, 1).memory_gib
    eight = summarize(cfg.model, cfg.parallel, 8).memory_gib
    assert eight["optimizer"] == pytest.approx(one["optimizer"] / 8)
    assert eight["weights"] == one["weights"]


def test_bad_override_exits_nonzero_with_one_line():
    proc = subprocess.run(["sfm", "model", "summary", "--preset", "pythia-70m", "model.num_layer=3"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0
    assert "model.num_layer" in proc.stderr


def test_cost_from_tokens_and_a_given_throughput(capsys):
    """GPU-hours = tokens x FLOPs per token / (TFLOP/s x 1e12) / 3600, wall = that / GPUs."""
    assert sfm(["model", "summary", "--preset", "pythia-6.9b", "--json", "--tokens", "500e9",
                "--tflops", "449", "--gpus", "256"]) == 0
    out = json.loads(capsys.readouterr().out)
    cost = out["cost"]
    flops = training_flops(load_config(None, ["model.preset=pythia-6.9b"]).model, 1) / 2048
    assert cost["flops_per_token"] == pytest.approx(flops)
    assert cost["total_flops"] == pytest.approx(500e9 * flops)
    assert cost["gpu_hours"] == pytest.approx(500e9 * flops / 449e12 / 3600)
    assert 12_000 < cost["gpu_hours"] < 14_000  # the paper: ~20,000 GPU-hours for pretraining + midtraining
    assert cost["wall_hours"] == pytest.approx(cost["gpu_hours"] / 256)
    assert cost["throughput_source"] == "given (--tflops)"


@pytest.mark.parametrize("args,message", [
    (["--tflops", "449"], "--tokens: needed"),
    (["--tokens", "1e9"], "--tokens: give the throughput"),
    (["--tokens", "1e9", "--tflops", "449", "--bench-row", "sdpa"], "only with --bench"),
    (["--tokens", "-5", "--tflops", "449"], "--tokens: must be positive"),
    (["--tokens", "nan", "--tflops", "449"], "--tokens: must be positive"),
    (["--tokens", "1e9", "--tflops", "inf"], "TFLOP/s per GPU must be positive"),
    (["--tokens", "1e9", "--bench", "/nonexistent/bench.json"], "--bench: /nonexistent/bench.json: file not found"),
])
def test_cost_arguments_are_checked(args, message, capsys):
    assert sfm(["model", "summary", "--preset", "pythia-6.9b", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_cost_refuses_a_file_that_is_not_a_bench_report(tmp_path, capsys):
    bad = tmp_path / "bench.json"
    bad.write_text(json.dumps({"rows": []}))
    assert sfm(["model", "summary", "--preset", "pythia-6.9b", "--tokens", "1e9", "--bench", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert "not an sfm bench report" in err and str(bad) in err

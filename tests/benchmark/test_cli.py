"""``sfm bench`` end to end on the CPU: the documented JSON for several rows in one run."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_sfm.benchmark import SCHEMA
from megatron_sfm.benchmark.report import check_report
from megatron_sfm.config import load_config
from megatron_sfm.testing.distributed import free_port

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "examples" / "configs" / "tiny.yaml")


def sfm(*args, env=None, timeout=300):
    full = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    full.update(OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    full.update(env or {})
    return subprocess.run([sys.executable, "-c", "import sys; from megatron_sfm.cli import main; sys.exit(main())",
                           "bench", *args], capture_output=True, text=True, timeout=timeout, env=full, cwd=REPO,
                          check=False)


def megatron_flops(b, s, L, h, n, d, f, v):
    """Megatron-LM's num_floating_point_operations for a dense GPT (independent restatement)."""
    return 12 * b * s * L * h * h * ((1 + 1 + s / (2 * h)) * (n * d / h) + f / h + v / (2 * L * h))


@pytest.fixture(scope="module")
def two_backends(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    proc = sfm(TINY, "--backends", "sdpa,local", "--steps", "3", "--warmup", "1", "--measure-peak",
               "--json", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(out.read_text()), proc


def test_report_follows_the_schema_with_one_row_per_backend(two_backends):
    report, proc = two_backends
    assert check_report(report) == []
    assert report["schema"] == SCHEMA
    assert [r["label"] for r in report["rows"]] == ["sdpa", "local"]
    assert [r["backend"] for r in report["rows"]] == ["sdpa", "local"]
    assert all(r["status"] == "ok" for r in report["rows"])
    assert "Megatron-LM" in report["flop_formula"]
    assert report["device"]["type"] == "cpu" and report["device"]["world_size"] == 1
    assert report["steps"] == 3 and report["warmup"] == 1
    assert all(r["timed_steps"] == 3 for r in report["rows"])
    assert "sdpa" in proc.stdout and "local" in proc.stdout  # the summary table


def test_throughput_numbers_follow_from_the_step_time_and_the_megatron_formula(two_backends):
    report, _ = two_backends
    cfg = load_config(TINY)
    m = cfg.model
    expected_flops = megatron_flops(8, 64, m.num_layers, m.hidden_size, m.num_attention_heads, m.head_dim,
                                    m.ffn_size, 512)
    measured_peak = report["peak"]["measured_tflops"]["fp32"]
    for row in report["rows"]:
        mean = row["step_time_s"]["mean"]
        assert row["tokens_per_step"] == 8 * 64
        assert row["tokens_per_s"] == pytest.approx(512 / mean)
        assert row["tokens_per_s_per_gpu"] == pytest.approx(row["tokens_per_s"])
        assert row["flops_per_step"] == pytest.approx(expected_flops)
        assert row["tflops_per_gpu"] == pytest.approx(expected_flops / mean / 1e12)
        assert row["peak_tflops_table"] == 67.0  # fp32 run: the table's dense fp32 peak
        assert row["mfu"] == pytest.approx(row["tflops_per_gpu"] / 67.0)
        assert row["peak_tflops_measured"] == pytest.approx(measured_peak) and measured_peak > 0
        assert row["mfu_measured"] == pytest.approx(row["tflops_per_gpu"] / measured_peak)
        st = row["step_time_s"]
        assert st["min"] <= st["median"] <= st["max"] and st["min"] <= st["mean"] <= st["max"]
        # one rank: forward + backward + optimizer is the whole step
        split = row["time_split_s"]
        assert all(v > 0 for v in split.values())
        assert sum(split.values()) == pytest.approx(mean, rel=1e-6)
        assert sum(row["time_split_fraction"].values()) == pytest.approx(1.0)
        assert row["memory"]["peak_allocated_gib"] is None and row["memory"]["rss_gib"] > 0  # CPU
        assert row["num_microbatches"] == 2 and row["main_params_dtype"] == "fp32"
        assert row["skipped_steps"] == 0
    sdpa, local = report["rows"]
    assert sdpa["throughput_ratio"] == 1.0 and report["ratio_baseline"] == "sdpa"
    assert local["throughput_ratio"] == pytest.approx(local["tokens_per_s"] / sdpa["tokens_per_s"])


def test_both_backends_trained_the_same_model_on_the_same_tokens(two_backends):
    report, _ = two_backends
    sdpa, local = report["rows"]
    # same seed, same random tokens, same function: the losses after 4 steps agree
    assert math.isfinite(sdpa["loss"])
    assert sdpa["loss"] == pytest.approx(local["loss"], rel=1e-4)
    assert abs(sdpa["loss"] - math.log(512)) < 0.5  # random tokens: about ln(vocab)


def test_tensor_parallel_ranks_see_the_same_tokens(two_backends):
    """TP=2 under torchrun trains the same model on the same tokens as one process."""
    from megatron_sfm.testing.distributed import run_distributed

    report, _ = two_backends
    tp = run_distributed(f"{Path(__file__).parent / 'dist_bodies.py'}:bench_two_ranks", nproc=2,
                         args={"config": TINY, "steps": 3, "warmup": 1,
                               "overrides": ["parallel.tensor_model_parallel_size=2"]}, timeout=300)
    assert check_report(tp) == []
    assert tp["parallel"] == {"tensor": 2, "pipeline": 1, "data": 1}
    (row,) = tp["rows"]
    assert row["status"] == "ok", row["error"]
    # each TP rank holds half the model; with different tokens per rank the loss would differ
    assert row["loss"] == pytest.approx(report["rows"][0]["loss"], rel=1e-4)
    assert row["tflops_per_gpu"] == pytest.approx(row["flops_per_step"] / row["step_time_s"]["mean"] / 2 / 1e12)


def test_failed_rows_are_reported_and_sweeps_multiply_rows_under_srun_variables(tmp_path):
    out = tmp_path / "bench.json"
    slurm = {"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_LOCALID": "0"}
    proc = sfm(TINY, "training.global_batch_size=4", "--backends", "sdpa,te", "--sweep",
               "training.micro_batch_size=1,2", "--steps", "1", "--warmup", "0", "--json", str(out), env=slurm)
    assert proc.returncode == 1, proc.stdout + proc.stderr  # a row failed; the others ran
    report = json.loads(out.read_text())
    assert check_report(report) == []
    assert report["overrides"] == ["training.global_batch_size=4"]
    labels = [r["label"] for r in report["rows"]]
    assert labels == ["sdpa training.micro_batch_size=1", "sdpa training.micro_batch_size=2",
                      "te training.micro_batch_size=1", "te training.micro_batch_size=2"]
    ok, err = report["rows"][:2], report["rows"][2:]
    assert [r["status"] for r in ok] == ["ok", "ok"]
    assert [r["num_microbatches"] for r in ok] == [4, 2]
    assert [r["micro_batch_size"] for r in ok] == [1, 2]
    assert all(r["status"] == "error" and "Transformer Engine" in r["error"] for r in err)
    assert all(r["throughput_ratio"] is None for r in err)
    assert "te training.micro_batch_size=1: error" in proc.stdout


@pytest.mark.parametrize("args, words", [
    (["--backends", "sdpa,flash"], "--backends: flash"),
    (["--sweep", "training.micro_batchsize=1,2"], "training.micro_batchsize: unknown key"),
    (["--steps", "0"], "--steps"),
])
def test_user_errors_exit_2_with_one_line(args, words):
    proc = sfm(TINY, *args)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert words in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ")


def test_model_cost_reads_the_throughput_of_a_real_report(two_backends, tmp_path, capsys):
    """``sfm model summary --bench`` sizes a run from a measured report (fastest ok row)."""
    from megatron_sfm.cli import main

    report, _ = two_backends
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(report))
    fastest = max(report["rows"], key=lambda r: r["tflops_per_gpu"])
    assert main(["model", "summary", "--config", TINY, "--json", "--tokens", "1e9", "--bench", str(path)]) == 0
    cost = json.loads(capsys.readouterr().out)["cost"]
    assert cost["tflops_per_gpu"] == pytest.approx(fastest["tflops_per_gpu"])
    assert cost["gpu_hours"] == pytest.approx(1e9 * cost["flops_per_token"] / (fastest["tflops_per_gpu"] * 1e12) / 3600)
    assert repr(fastest["label"]) in cost["throughput_source"]
    assert main(["model", "summary", "--config", TINY, "--json", "--tokens", "1e9", "--bench", str(path),
                 "--bench-row", "local"]) == 0
    local = json.loads(capsys.readouterr().out)["cost"]
    assert local["tflops_per_gpu"] == pytest.approx(next(r for r in report["rows"] if r["label"] == "local")["tflops_per_gpu"])
    assert main(["model", "summary", "--config", TINY, "--tokens", "1e9", "--bench", str(path),
                 "--bench-row", "flash9"]) == 2
    assert "no ok row labelled 'flash9'" in capsys.readouterr().err
    # a throughput measured on another layer shape does not size this model, unless asked
    assert main(["model", "summary", "--preset", "pythia-6.9b", "--tokens", "1e9", "--bench", str(path)]) == 2
    err = capsys.readouterr().err
    assert "measured on another shape" in err and "hidden_size" in err and "(model: 4096)" in err
    assert main(["model", "summary", "--preset", "pythia-6.9b", "--tokens", "1e9", "--bench", str(path),
                 "--bench-any-shape"]) == 0

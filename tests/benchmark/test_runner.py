"""Row planning, aggregation over ranks, and a two-rank run under torchrun (gloo)."""

from __future__ import annotations

from pathlib import Path

import pytest

from megatron_sfm.benchmark.points import plan_points
from megatron_sfm.benchmark.report import check_report
from megatron_sfm.benchmark.runner import aggregate_ranks
from megatron_sfm.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "examples" / "configs" / "tiny.yaml")


def test_points_are_backends_times_the_product_of_sweeps_in_order():
    points = plan_points(["sdpa", "local"], ["training.micro_batch_size=1,2", "model.seq_length=32,64"])
    assert [p.label for p in points] == [
        "sdpa training.micro_batch_size=1 model.seq_length=32",
        "sdpa training.micro_batch_size=1 model.seq_length=64",
        "sdpa training.micro_batch_size=2 model.seq_length=32",
        "sdpa training.micro_batch_size=2 model.seq_length=64",
        "local training.micro_batch_size=1 model.seq_length=32",
        "local training.micro_batch_size=1 model.seq_length=64",
        "local training.micro_batch_size=2 model.seq_length=32",
        "local training.micro_batch_size=2 model.seq_length=64",
    ]
    assert points[5].override_list() == ["model.attention_backend=local", "training.micro_batch_size=1",
                                         "model.seq_length=64"]
    assert [p.label for p in plan_points(None, [])] == ["config"]
    assert plan_points(None, [])[0].override_list() == []


@pytest.mark.parametrize("sweep, words", [
    ("training.micro_batch_size", "KEY=VALUE"),
    ("training.micro_batch_size=1,,2", "no empty value"),
    ("parallel.tensor_model_parallel_size=1,2", "parallel layout"),
    ("model.attention_backend=sdpa,local", "--backends"),
])
def test_bad_sweeps_are_config_errors(sweep, words):
    with pytest.raises(ConfigError, match=words):
        plan_points(None, [sweep])


def test_a_key_swept_twice_is_an_error():
    with pytest.raises(ConfigError, match="twice"):
        plan_points(None, ["training.micro_batch_size=1", "training.micro_batch_size=2"])


def _rank(steps, mem, loss=2.0):
    return {"steps": steps, "memory": {"peak_allocated_gib": mem, "peak_reserved_gib": mem, "rss_gib": 1.0},
            "loss": loss, "skipped": 0, "num_microbatches": 2, "dp_size": 2, "main_params_dtype": "fp32"}


def test_aggregation_takes_the_slowest_rank_per_step_and_averages_phases():
    # [step_s, forward_backward_s, forward_s]
    r0 = _rank([[1.0, 0.8, 0.3], [2.0, 1.5, 0.5]], mem=3.0)
    r1 = _rank([[1.4, 1.0, 0.5], [1.0, 0.9, 0.3]], mem=5.0)
    agg = aggregate_ranks([r0, r1])
    assert agg["step_time_s"]["mean"] == pytest.approx((1.4 + 2.0) / 2)
    assert agg["step_time_s"]["min"] == pytest.approx(1.4)
    assert agg["step_time_s"]["max"] == pytest.approx(2.0)
    assert agg["time_split_s"]["forward"] == pytest.approx((0.4 + 0.4) / 2)
    assert agg["time_split_s"]["backward"] == pytest.approx(((0.9 - 0.4) + (1.2 - 0.4)) / 2)
    assert agg["time_split_s"]["optimizer"] == pytest.approx(((1.2 - 0.9) + (1.5 - 1.2)) / 2)
    assert agg["memory"]["peak_allocated_gib"] == 5.0
    assert agg["timed_steps"] == 2 and agg["data_parallel_size"] == 2


def test_an_error_on_any_rank_makes_the_point_an_error():
    agg = aggregate_ranks([_rank([[1.0, 0.5, 0.2]], mem=1.0), {"error": "OutOfMemoryError: boom"}])
    assert agg == {"error": "OutOfMemoryError: boom"}


def test_two_ranks_under_torchrun_aggregate_into_one_report():
    from megatron_sfm.testing.distributed import run_distributed

    report = run_distributed(f"{Path(__file__).parent / 'dist_bodies.py'}:bench_two_ranks", nproc=2,
                             args={"config": TINY, "steps": 2, "warmup": 1}, timeout=300)
    assert check_report(report) == []
    assert report["device"]["world_size"] == 2
    assert report["parallel"] == {"tensor": 1, "pipeline": 1, "data": 2}
    (row,) = report["rows"]
    assert row["status"] == "ok", row["error"]
    assert row["data_parallel_size"] == 2
    assert row["num_microbatches"] == 8 // (4 * 2)  # global batch 8, micro-batch 4, two DP ranks
    assert row["tokens_per_s_per_gpu"] == pytest.approx(row["tokens_per_s"] / 2)
    assert row["tokens_per_s"] == pytest.approx(8 * 64 / row["step_time_s"]["mean"])


def test_rows_release_their_model_and_optimizer(single_process_parallel):
    """A row's model, gradients and optimizer state are freed before the next row is built."""
    import gc

    from megatron.core.models.gpt import GPTModel

    from megatron_sfm.benchmark.runner import run_bench

    def alive():
        gc.collect()
        return sum(isinstance(o, GPTModel) for o in gc.get_objects())

    before = alive()
    report = run_bench(TINY, plan_points(["sdpa", "local"], []), steps=1, warmup=0)
    assert [r["status"] for r in report["rows"]] == ["ok", "ok"]
    assert alive() == before

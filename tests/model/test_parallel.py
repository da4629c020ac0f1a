"""Tensor and pipeline parallelism reproduce the single-process model (gloo, CPU)."""

from pathlib import Path

import numpy as np

from megatron_sfm.testing.distributed import run_distributed

BODIES = str(Path(__file__).with_name("dist_bodies.py"))


def test_tensor_parallel_matches_single_process():
    ref = run_distributed(f"{BODIES}:tp_forward", nproc=1, args={"tp": 1})
    tp2 = run_distributed(f"{BODIES}:tp_forward", nproc=2, args={"tp": 2})
    assert abs(ref["loss"] - tp2["loss"]) < 1e-5
    diff = np.abs(np.array(ref["logits"]) - np.array(tp2["logits"])).max()
    assert diff < 1e-5, diff
    assert np.abs(np.array(ref["logits"])).max() > 1e-3  # non-trivial logits


def test_pipeline_parallel_schedule_matches_single_process():
    ref = run_distributed(f"{BODIES}:pp_train_step", nproc=1, args={"pp": 1})
    pp2 = run_distributed(f"{BODIES}:pp_train_step", nproc=2, args={"pp": 2})
    assert len(ref["losses"]) == len(pp2["losses"]) == 4
    np.testing.assert_allclose(pp2["losses"], ref["losses"], atol=1e-5, rtol=0)
    assert set(ref["grads"]) == set(pp2["grads"])
    for name, grad in ref["grads"].items():
        diff = np.abs(np.array(grad) - np.array(pp2["grads"][name])).max()
        assert diff < 1e-5, (name, diff)
    assert any(np.abs(np.array(g)).max() > 0 for g in ref["grads"].values())

"""``sfm train`` with torchao float8 linears (emulated GEMMs on CPU): it learns, logs, resumes."""

import torch

from training_helpers import check, run_train, scalars, write_config
from megatron_sfm.training.checkpoint import latest_checkpoint

FP8 = {"format": "hybrid", "backend": "torchao", "recipe": "tensorwise", "emulate": True}


def test_float8_training_learns_and_tracks_the_bf16_run(tmp_path, corpus):
    """Same data and seed in bf16 and in float8: both learn, and float8 stays close to bf16."""
    runs = {}
    for name, fp8 in (("bf16", {"format": "none"}), ("fp8", FP8)):
        cfg = write_config(tmp_path / f"{name}.yaml", corpus, model={"precision": "bf16", "fp8": fp8},
                           training={"train_iters": 60, "log_interval": 10, "micro_batch_size": 4,
                                     "global_batch_size": 8},
                           optimizer={"lr": 0.003, "min_lr": 0.0003, "warmup_iters": 5},
                           checkpoint={"save": str(tmp_path / name / "ckpt"), "save_interval": 60})
        proc = check(run_train(cfg, [f"logging.tensorboard_dir={tmp_path / name / 'tb'}"], timeout=600))
        runs[name] = (scalars(tmp_path / name / "tb", "train/loss"), proc)
    bf16, fp8 = runs["bf16"][0], runs["fp8"][0]
    assert fp8[10] > 4.0 and fp8[60] < 0.6 * fp8[10], fp8  # it learns
    assert abs(fp8[60] - bf16[60]) < 0.15 * bf16[60], (fp8, bf16)  # and follows the bf16 curve
    assert fp8[60] != bf16[60]  # with float8 GEMMs, not bf16 ones
    assert "fp8: torchao tensorwise (hybrid), emulated" in runs["fp8"][1].stdout + runs["fp8"][1].stderr
    ckpt = latest_checkpoint(tmp_path / "fp8" / "ckpt")
    assert ckpt is not None and ckpt.name.endswith("60")
    assert torch.isfinite(torch.tensor(fp8[60]))

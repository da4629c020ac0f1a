"""Learning, per-source logging, non-finite guard, midtraining, FP8 errors, the loss reporting pitfall."""

import json
import math

import torch

from training_helpers import check, run_train, scalar_tags, scalars, write_config
from megatron_sfm.training.checkpoint import latest_checkpoint, verify_checkpoint


def test_loss_falls_below_threshold_and_per_source_losses_in_tensorboard(tmp_path, corpus):
    cfg = write_config(tmp_path / "cfg.yaml", corpus,
                       training={"train_iters": 250, "log_interval": 10, "eval_interval": 125, "eval_iters": 1,
                                 "micro_batch_size": 4, "global_batch_size": 8},
                       optimizer={"lr": 0.003, "min_lr": 0.0003, "warmup_iters": 10},
                       parallel={"use_distributed_optimizer": False}, logging={"log_memory": True})
    tb = tmp_path / "tb"
    proc = check(run_train(cfg, [f"logging.tensorboard_dir={tb}"], timeout=600))
    loss = scalars(tb, "train/loss")
    assert loss[10] > 4.0  # ln(512) = 6.2 at the start
    assert loss[250] < 1.0, loss  # the deterministic sequences are learnt
    tags = scalar_tags(tb)
    for name in ("web", "aligned"):
        assert f"train/loss_by_source/{name}" in tags and f"valid/loss_by_source/{name}" in tags
    assert not [t for t in tags if t.startswith("train/loss_by_source/") and t.split("/")[-1] not in ("web", "aligned")]
    # the token-weighted mean of the per-source losses is the total loss (equal weights, equal lengths: ~mean)
    web, aligned = scalars(tb, "train/loss_by_source/web"), scalars(tb, "train/loss_by_source/aligned")
    assert abs((web[250] + aligned[250]) / 2 - loss[250]) < 0.5
    for tag in ("train/lr", "train/grad_norm", "perf/tokens_per_s", "perf/tflops_per_gpu", "perf/mfu",
                "train/skipped_steps", "memory/rss_gib"):
        assert tag in tags, tag
    line = [l for l in proc.stdout.splitlines() if l.startswith("iter 250/250")][0]
    assert "src web=" in line and "aligned=" in line and "TFLOP/s/GPU" in line


def test_nonfinite_steps_are_skipped_and_counted(tmp_path, corpus, reference_run):
    cfg = write_config(tmp_path / "cfg.yaml", corpus, training={"train_iters": 4})
    check(run_train(cfg, [f"logging.tensorboard_dir={tmp_path / 'tb'}"], env={"SFM_FAULTS": "nan_loss@2"}))
    skipped = scalars(tmp_path / "tb", "train/skipped_steps")
    assert skipped[1] == 0 and skipped[2] == 1 and skipped[4] == 1
    loss = scalars(tmp_path / "tb", "train/loss")
    assert 2 not in loss or math.isnan(loss[2])
    # step 2 did not update: step 3's loss is what the model after step 1 gives on batch 3 (not the reference's)
    ref = scalars(reference_run / "ckpt" / "tensorboard", "train/loss")
    assert loss[1] == ref[1] and loss[3] != ref[3]


def test_too_many_nonfinite_steps_save_and_stop(tmp_path, corpus):
    cfg = write_config(tmp_path / "cfg.yaml", corpus, training={"max_consecutive_nonfinite": 3})
    save = tmp_path / "ckpt"
    proc = run_train(cfg, [f"checkpoint.save={save}"], env={"SFM_FAULTS": "nan_loss@3,4,5"})
    assert proc.returncode == 2
    assert "3 non-finite steps in a row at iteration 5" in proc.stderr.strip().splitlines()[-1]
    state = verify_checkpoint(latest_checkpoint(save))
    assert state["iteration"] == 5 and state["skipped_steps"] == 3 and state["reason"] == "nonfinite"


def test_midtraining_starts_from_pretrained_weights_with_new_schedule_and_longer_sequences(
        tmp_path, corpus, reference_run):
    cfg = write_config(tmp_path / "cfg.yaml", corpus, model={"seq_length": 128},
                       training={"train_iters": 3, "micro_batch_size": 1, "global_batch_size": 4},
                       optimizer={"lr": 0.001, "min_lr": 0.0, "warmup_iters": 1})
    save = tmp_path / "ckpt"
    check(run_train(cfg, [f"checkpoint.init_from={reference_run / 'ckpt'}", f"checkpoint.save={save}",
                          f"logging.tensorboard_dir={tmp_path / 'tb'}"]))
    loss = scalars(tmp_path / "tb", "train/loss")
    ref = scalars(reference_run / "ckpt" / "tensorboard", "train/loss")
    assert sorted(loss) == [1, 2, 3]  # iteration restarts at 0
    assert loss[1] < ref[1] - 0.3  # starts from the pretrained weights, not a fresh init
    lr = scalars(tmp_path / "tb", "train/lr")
    assert lr[1] == 0.0 and abs(lr[2] - 0.001) < 1e-9  # the new schedule: warmup from 0 to the new peak
    state = verify_checkpoint(latest_checkpoint(save))
    assert state["iteration"] == 3 and state["seq_length"] == 128 and state["consumed_train_samples"] == 12


def test_fp8_without_a_backend_is_an_error(tmp_path, corpus, capsys):
    """Checked before anything is built: `sfm train` exits 2 with one line naming the package."""
    from megatron_sfm.cli import main

    cfg = write_config(tmp_path / "cfg.yaml", corpus, model={"fp8": {"format": "hybrid"}})
    assert main(["train", str(cfg)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: model.fp8") and "transformer_engine" in err and "torchao" in err
    cfg = write_config(tmp_path / "cfg2.yaml", corpus, model={"fp8": {"format": "e4m3", "backend": "te"}})
    assert main(["train", str(cfg)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: model.fp8.backend") and "Transformer Engine" in err


def test_reported_loss_survives_the_schedules_in_place_division():
    """Megatron's schedules divide the returned loss in place; the report must be a copy."""
    from megatron_sfm.training.step import loss_func

    per_token = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], dtype=torch.float64)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    sources = torch.tensor([1, 0])
    loss, tokens, report = loss_func(mask, sources, 2, per_token)
    loss /= tokens.clamp(min=1)  # what schedules.py does to the returned tensor
    loss /= 4
    r = report["report"].tolist()
    assert r[0] == 18.0 and r[1] == 5.0
    assert r[2:4] == [15.0, 3.0] and r[4:6] == [3.0, 2.0]  # per-source sums and token counts


def test_print_config_shows_resolved_values(tmp_path, corpus, capsys):
    from megatron_sfm.training.cli import main

    cfg = write_config(tmp_path / "cfg.yaml", corpus)
    assert main([str(cfg), "training.train_iters=77", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "train_iters: 77" in out and "blend:" in out


def test_late_insertion_phases_switch_at_their_iteration(tmp_path, corpus):
    """phases.json as `sfm data mix` writes it: the aligned source enters at stage iteration 3.

    With per-source loss weights: condition-level {web: 1.5}, phase 1 {aligned: 2}, and the
    config's data.source_loss_weights {web: 1.25} overriding the file in every phase.
    """
    folder = corpus.parent
    (folder / "base.json").write_text(json.dumps({"train": [1.0, "train/web"], "valid": [1.0, "valid/web"]}))
    (folder / "late.json").write_text(json.dumps({"train": [0.5, "train/web", 0.5, "train/aligned"],
                                                  "valid": [1.0, "valid/web"]}))
    phases = tmp_path / "phases.json"
    phases.write_text(json.dumps({"condition": "late", "seed": 1, "loss_weights": {"web": 1.5}, "stages": [
        {"stage": "pretrain", "kind": "pretrain", "seq_length": 64, "global_batch_size": 8, "iterations": 6,
         "phases": [{"index": 0, "start_iteration": 0, "iterations": 3, "blend": str(folder / "base.json"),
                     "weights": {"web": 1.0}},
                    {"index": 1, "start_iteration": 3, "iterations": 3, "blend": str(folder / "late.json"),
                     "weights": {"web": 0.5, "aligned": 0.5}, "loss_weights": {"aligned": 2.0}}]}]}))
    cfg = write_config(tmp_path / "cfg.yaml", corpus, training={"train_iters": 6}, data={"blend": None,
                                                                                          "phases": str(phases)})
    save = tmp_path / "ckpt"
    tb = tmp_path / "tb"
    proc = check(run_train(cfg, [f"logging.tensorboard_dir={tb}", f"checkpoint.save={save}",
                                 "data.source_loss_weights.web=1.25"]))
    aligned = scalars(tb, "train/loss_by_source/aligned")
    web = scalars(tb, "train/loss_by_source/web")
    assert sorted(aligned) == [4, 5, 6] and sorted(web) == [1, 2, 3, 4, 5, 6]
    assert verify_checkpoint(latest_checkpoint(save))["phase"] == 1
    assert "loss weights: phase 0: web=1.25 aligned=1; phase 1: web=1.25 aligned=2" in proc.stdout
    loss, weighted = scalars(tb, "train/loss"), scalars(tb, "train/loss_weighted")
    for step in (1, 2, 3):  # web only, weight 1.25
        assert abs(weighted[step] - 1.25 * loss[step]) < 1e-5 * loss[step]
    for step in (4, 5, 6):  # the token share f of web follows from the unweighted means
        f = (loss[step] - aligned[step]) / (web[step] - aligned[step])
        expected = 1.25 * f * web[step] + 2.0 * (1 - f) * aligned[step]
        assert abs(weighted[step] - expected) < 1e-4 * expected, (step, weighted[step], expected)

"""The training loss: fused vs Megatron cross-entropy, per-source loss weights, mode selection."""

from pathlib import Path

import pytest
import torch

from training_helpers import check, run_train, scalar_tags, scalars, write_config
from megatron_sfm.errors import SfmError
from megatron_sfm.testing.distributed import run_distributed

BODIES = str(Path(__file__).parent / "loss_bodies.py")
INTERPRET = {"TRITON_INTERPRET": "1"}


def test_fused_cross_entropy_training_matches_megatron(tmp_path, corpus, reference_run):
    """2 steps with the Triton loss (interpreter) = the reference run's Megatron loss: loss, per source, grad norm."""
    cfg = write_config(tmp_path / "cfg.yaml", corpus)
    tb = tmp_path / "tb"
    proc = check(run_train(cfg, ["training.cross_entropy=fused", "training.exit_interval=2",
                                 f"logging.tensorboard_dir={tb}"], env=INTERPRET))
    assert "cross-entropy: fused" in proc.stdout
    ref_tb = reference_run / "ckpt" / "tensorboard"  # cross_entropy: auto = megatron on the CPU
    for tag in ("train/loss", "train/grad_norm", "train/loss_by_source/web", "train/loss_by_source/aligned"):
        fused, ref = scalars(tb, tag), scalars(ref_tb, tag)
        assert sorted(fused) == [1, 2], tag
        for step in fused:
            assert abs(fused[step] - ref[step]) <= 1e-5 * max(1.0, abs(ref[step])), (tag, step, fused[step], ref[step])
    assert "train/loss_weighted" not in scalar_tags(tb)  # no weights, no weighted tag


def test_weighted_loss_gradient_equals_hand_reference(tmp_path, corpus):
    """Weights {web: 2, aligned: 1}: both loss paths give the gradient of sum(w * CE) / tokens, by hand."""
    cfg = write_config(tmp_path / "cfg.yaml", corpus, training={"global_batch_size": 4})  # 2 micro-batches
    out = run_distributed(f"{BODIES}:weighted_gradients", nproc=1,
                          args={"config": str(cfg), "weights": {"web": 2.0, "aligned": 1.0}}, env=INTERPRET)
    assert sorted(out["sources_seen"]) == ["aligned", "web"]  # the batch mixes both sources
    assert out["weighted_vs_unweighted"] > 1e-2  # the weights change the gradient
    for mode in ("megatron", "fused"):
        r = out[mode]
        assert r["grad_rel_err"] < 1e-5, (mode, r)
        assert r["source_sum_rel_err"] < 1e-6 and r["source_counts_equal"], (mode, r)  # logged: unweighted
        assert r["loss_sum_rel_err"] < 1e-6 and r["weighted_sum_rel_err"] < 1e-6, (mode, r)


def test_cross_entropy_mode_resolution(monkeypatch):
    from megatron_sfm.training.loss import resolve_cross_entropy

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_cross_entropy("auto", 1, cpu) == "megatron"  # the interpreter is never picked unasked
    assert resolve_cross_entropy("fused", 1, cpu) == "fused"
    assert resolve_cross_entropy("megatron", 1, cpu) == "megatron"
    with pytest.raises(SfmError, match=r"training.cross_entropy: 'fused' needs parallel.tensor_model_parallel_size 1"):
        resolve_cross_entropy("fused", 2, cpu)
    assert resolve_cross_entropy("auto", 2, cpu) == "megatron"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(SfmError, match=r"training.cross_entropy: 'fused' needs the Triton kernels.*TRITON_INTERPRET"):
        resolve_cross_entropy("fused", 1, cpu)
    if not torch.cuda.is_available():
        assert resolve_cross_entropy("auto", 1, cuda) == "megatron"


def test_megatron_loss_applies_weights_and_reports_unweighted():
    from megatron_sfm.training.loss import megatron_loss

    per_token = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0], [0.0, 1.0, 1.0]])
    sources = torch.tensor([1, 0, 1])
    loss, tokens, report = megatron_loss(mask, sources, 2, torch.tensor([0.5, 3.0]), per_token)
    assert loss.item() == 3.0 * 3 + 0.5 * 15 + 3.0 * 17 and tokens.item() == 7
    r = report["report"].tolist()
    assert r[0] == 35.0 and r[1] == 7.0 and r[2:4] == [15.0, 20.0] and r[4:6] == [3.0, 4.0] and r[6] == loss.item()


def test_loss_weight_errors_name_the_key(tmp_path, corpus):
    import json

    from megatron_sfm.training.data import read_phases
    from megatron_sfm.training.loss import weight_vector

    with pytest.raises(SfmError, match=r"data.source_loss_weights: 'webb' is not a source of this run"):
        weight_vector(["web", "aligned"], {"webb": 2.0}, "data.source_loss_weights")
    with pytest.raises(SfmError, match=r"data.source_loss_weights.web: a loss weight must be a finite number >= 0"):
        weight_vector(["web", "aligned"], {"web": -1}, "data.source_loss_weights")
    assert weight_vector(["web", "aligned"], {"web": 1}, "x") is None  # all ones: unweighted fast path
    phases = tmp_path / "phases.json"
    phases.write_text(json.dumps({"loss_weights": {"web": "two"}, "phases": [{"start_iteration": 0, "blend": str(corpus)}]}))
    with pytest.raises(SfmError, match=r"data.phases: .*phases.json: loss_weights.web: a loss weight must be"):
        read_phases(phases, 10)
    phases.write_text(json.dumps({"phases": [{"start_iteration": 0, "blend": str(corpus), "loss_weights": {"x": 2}}]}))
    with pytest.raises(SfmError, match=r"phases.json: loss_weights name 'x', which is not a source"):
        read_phases(phases, 10)


def test_phases_loss_weights_merge_condition_stage_phase(tmp_path, corpus):
    import json

    from megatron_sfm.training.data import read_phases

    phases = tmp_path / "phases.json"
    phases.write_text(json.dumps({"loss_weights": {"web": 1.5, "aligned": 4.0}, "stages": [
        {"stage": "pretrain", "loss_weights": {"aligned": 2.5}, "phases": [
            {"start_iteration": 0, "blend": str(corpus)},
            {"start_iteration": 5, "blend": str(corpus), "loss_weights": {"web": 0.0}}]},
        {"stage": "midtrain", "phases": [{"start_iteration": 0, "blend": str(corpus)}]}]}))
    pre = read_phases(phases, 10, "pretrain")
    assert [p.loss_weights for p in pre] == [{"web": 1.5, "aligned": 2.5}, {"web": 0.0, "aligned": 2.5}]
    assert [p.loss_weights for p in read_phases(phases, 10, "midtrain")] == [{"web": 1.5, "aligned": 4.0}]

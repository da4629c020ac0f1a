"""Run by tests/training/test_loss.py in a fresh process (through run_distributed, one rank).

A fresh process because the fused loss needs TRITON_INTERPRET=1 set before the first
kernel call, and the pytest process may already have decided (tests/kernels sets it at
collection time).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def weighted_gradients(config: str, weights: dict) -> dict:
    """Gradients of one global batch with per-source loss weights: trainer (both loss paths) vs by hand.

    The hand reference takes the same model's logits (called without labels), computes
    ``sum_mb sum_i w[src_i] * CE_i * mask_i / tokens_mb / num_microbatches`` with
    ``F.cross_entropy`` and differentiates it with ``torch.autograd.grad``.
    """
    from megatron_sfm.config import load_config
    from megatron_sfm.training.state import build_training_state, set_cross_entropy
    from megatron_sfm.training.step import forward_backward

    overrides = ["optimizer.clip_grad=0.0"] + [f"data.source_loss_weights.{k}={v}" for k, v in weights.items()]
    cfg = load_config(config, overrides)
    state = build_training_state(cfg)
    names = state.source_names
    w_vec = torch.tensor([float(weights.get(n, 1.0)) for n in names])
    batches = [next(state.train_iterators[0]) for _ in range(state.num_microbatches)]
    assert all(torch.equal(b["source_weights"], w_vec) for b in batches), "the data loader did not attach weights"
    sources_seen = sorted({int(s) for b in batches for s in b["source_ids"]})

    gpt = state.unwrapped()[0]
    params = [p for p in gpt.parameters() if p.requires_grad]

    def by_hand(weighted: bool):
        total = 0.0
        sums = torch.zeros(len(names), dtype=torch.float64)
        counts = torch.zeros(len(names), dtype=torch.float64)
        for b in batches:
            logits = gpt(b["tokens"], b["position_ids"], None)  # [b, s, V] without labels
            ce = F.cross_entropy(logits.float().flatten(0, 1), b["labels"].flatten(), reduction="none")
            ce = ce.view_as(b["labels"])
            mask = b["loss_mask"].float()
            w = w_vec[b["source_ids"]][:, None] if weighted else torch.ones(len(b["source_ids"]), 1)
            total = total + (w * ce * mask).sum() / mask.sum() / len(batches)
            per_sample = (ce * mask).sum(dim=1).detach().double()
            sums.index_add_(0, b["source_ids"], per_sample)
            counts.index_add_(0, b["source_ids"], mask.sum(dim=1).double())
        grads = torch.autograd.grad(total, params)
        return [g.detach().clone() for g in grads], sums, counts

    ref, ref_sums, ref_counts = by_hand(weighted=True)
    unweighted, _, _ = by_hand(weighted=False)

    out = {"sources": names, "sources_seen": [names[i] for i in sources_seen],
           "weighted_vs_unweighted": max(_rel(u, r) for u, r in zip(unweighted, ref))}
    for mode in ("megatron", "fused"):
        set_cross_entropy(state, mode)
        for chunk in state.model:
            chunk.zero_grad_buffer()
        report = forward_backward(state, [iter(batches)])
        got = [p.main_grad.detach().clone() for p in params]
        s = len(names)
        out[mode] = {
            "grad_rel_err": max(_rel(g, r) for g, r in zip(got, ref)),
            "source_sum_rel_err": _rel(report[2:2 + s].cpu(), ref_sums),
            "source_counts_equal": bool(torch.equal(report[2 + s:2 + 2 * s].cpu(), ref_counts)),
            "loss_sum_rel_err": abs(report[0].item() - ref_sums.sum().item()) / ref_sums.sum().item(),
            "weighted_sum_rel_err": abs(report[-1].item() - (w_vec.double() * ref_sums).sum().item())
            / (w_vec.double() * ref_sums).sum().item(),
        }
    return out

"""Attention backend ``triton`` in the full model: same loss and gradients as ``sdpa`` (CPU, interpreter)."""

from __future__ import annotations

import pytest
import torch

from megatron_sfm.config import ModelConfig, ParallelConfig
from megatron_sfm.config.presets import model_preset
from megatron_sfm.model.builder import build_gpt_model
from megatron_sfm.model.triton_attention import FusedRotarySelfAttention, TritonCoreAttention


def _loss_and_grads(model, ids, labels):
    model.zero_grad(set_to_none=True)
    device = next(model.parameters()).device
    ids, labels = ids.to(device), labels.to(device)
    positions = torch.arange(ids.shape[1], device=device).unsqueeze(0).expand_as(ids)
    logits = model(ids, positions, None)  # [b, s, vocab]
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("overrides", [
    {},  # the tiny preset: head dim 16, rotary dim 4
    {"hidden_size": 160, "num_attention_heads": 2, "rotary_pct": 0.25, "num_layers": 1},  # head 80, rotary 20
], ids=["tiny", "head80"])
def test_triton_backend_matches_sdpa(single_process_parallel, overrides):
    fields = {**model_preset("tiny"), **overrides, "precision": "fp32", "seq_length": 40}
    torch.manual_seed(0)
    sdpa = build_gpt_model(ModelConfig(**fields, attention_backend="sdpa"), ParallelConfig(), parallel_output=False)
    triton = build_gpt_model(ModelConfig(**fields, attention_backend="triton"), ParallelConfig(),
                             parallel_output=False)
    triton.load_state_dict(sdpa.state_dict(), strict=True)
    attn = [m for m in triton.modules() if isinstance(m, FusedRotarySelfAttention)]
    assert len(attn) == fields["num_layers"]
    assert all(isinstance(m.core_attention, TritonCoreAttention) for m in attn)

    g = torch.Generator().manual_seed(1)
    vocab = fields["vocab_size"]
    ids = torch.randint(0, vocab, (2, 37), generator=g)  # not a multiple of the kernel's blocks
    labels = torch.randint(0, vocab, (2, 37), generator=g)
    ref_loss, ref_grads = _loss_and_grads(sdpa, ids, labels)
    loss, grads = _loss_and_grads(triton, ids, labels)

    assert abs(loss.item() - ref_loss.item()) < 1e-5 * ref_loss.item()
    assert set(grads) == set(ref_grads)
    for name, ref in ref_grads.items():
        err = ((grads[name] - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item()
        assert err < 1e-4, f"{name}: relative gradient error {err:.2e}"


def test_fused_path_rotates_inside_the_kernel(single_process_parallel, monkeypatch):
    """The fused path never calls Megatron's PyTorch rotary."""
    import megatron.core.transformer.attention as mattn

    def forbidden(*args, **kwargs):
        raise AssertionError("Megatron's apply_rotary_pos_emb was called on the fused path")

    monkeypatch.setattr(mattn, "apply_rotary_pos_emb", forbidden)
    fields = {**model_preset("tiny"), "precision": "fp32", "seq_length": 16, "num_layers": 1}
    model = build_gpt_model(ModelConfig(**fields, attention_backend="triton"), ParallelConfig(),
                            parallel_output=False)
    device = next(model.parameters()).device
    ids = torch.randint(0, fields["vocab_size"], (1, 16), device=device)
    with torch.no_grad():
        out = model(ids, torch.arange(16, device=device)[None], None)
    assert torch.isfinite(out).all()

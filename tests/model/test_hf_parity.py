"""Our GPTModel with Hugging Face GPTNeoX weights gives Hugging Face's logits (fp32, CPU)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

from megatron_sfm.config import ModelConfig, ParallelConfig
from megatron_sfm.model.builder import build_gpt_model
from megatron_sfm.conversion.gpt_neox import GPTNeoXAdapter

from_hf, to_hf = GPTNeoXAdapter.from_hf, GPTNeoXAdapter.to_hf

CASES = [
    # hidden, heads, rotary_pct, parallel residual
    (64, 4, 0.25, True),
    (64, 4, 0.25, False),
    (64, 4, 0.5, True),  # another rotary fraction
    (64, 4, 1.0, True),
    (48, 3, 0.25, True),  # head dim 16
]


@pytest.mark.parametrize("hidden,heads,rotary_pct,parallel_residual", CASES)
def test_logits_match_hugging_face(tmp_path, single_process_parallel, hidden, heads, rotary_pct,
                                   parallel_residual):
    torch.manual_seed(0)
    vocab = 128
    hf_cfg = GPTNeoXConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=heads,
                           intermediate_size=4 * hidden, rotary_pct=rotary_pct,
                           use_parallel_residual=parallel_residual, max_position_embeddings=64,
                           hidden_act="gelu", attention_dropout=0.0, hidden_dropout=0.0,
                           tie_word_embeddings=False, layer_norm_eps=1e-5)
    hf = GPTNeoXForCausalLM(hf_cfg).eval()
    # random LayerNorm parameters too, so a swapped norm cannot pass
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "layernorm" in name or "layer_norm" in name:
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if name.endswith("weight") else 0.0))
    hf.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")

    ours_cfg = ModelConfig(num_layers=2, hidden_size=hidden, num_attention_heads=heads, ffn_hidden_size=4 * hidden,
                           vocab_size=vocab, make_vocab_size_divisible_by=128, seq_length=64, rotary_pct=rotary_pct,
                           parallel_residual=parallel_residual, precision="fp32", attention_backend="sdpa")
    ours = build_gpt_model(ours_cfg, ParallelConfig(), parallel_output=False).eval()
    ours.load_state_dict(from_hf(weights), strict=True)

    ids = torch.randint(0, vocab, (2, 24))
    positions = torch.arange(24).unsqueeze(0).expand(2, -1)
    with torch.no_grad():
        expected = hf(ids).logits
        got = ours(ids, positions, None)
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() < 1e-5
    # and back: our state dict maps onto every Hugging Face file key
    back = to_hf({k: v for k, v in ours.state_dict().items()})
    assert set(back) == set(weights)
    for key, value in weights.items():
        assert torch.equal(back[key], value), key


def test_local_backend_matches_sdpa(single_process_parallel):
    torch.manual_seed(0)
    cfg = dict(num_layers=2, hidden_size=64, num_attention_heads=4, vocab_size=128,
               make_vocab_size_divisible_by=128, seq_length=32, precision="fp32")
    sdpa = build_gpt_model(ModelConfig(attention_backend="sdpa", **cfg), ParallelConfig(), parallel_output=False)
    local = build_gpt_model(ModelConfig(attention_backend="local", **cfg), ParallelConfig(), parallel_output=False)
    local.load_state_dict(sdpa.state_dict(), strict=False)
    ids = torch.randint(0, 128, (2, 32))
    pos = torch.arange(32).unsqueeze(0).expand(2, -1)
    with torch.no_grad():
        diff = (sdpa(ids, pos, None) - local(ids, pos, None)).abs().max().item()
    assert diff < 1e-5

"""Model presets: the Pythia suite's shapes (GPT-NeoX layout) and a tiny test model.

Shapes follow the released Pythia configs: rotary on 25% of each head, parallel
residual, untied embeddings, LayerNorm eps 1e-5. ``padded_vocab_size`` is the embedding
size in the released checkpoints (50304, or 50432 for 6.9B).
"""

from __future__ import annotations

import copy

from megatron_sfm.errors import ConfigError

_PYTHIA = dict(rotary_pct=0.25, rotary_base=10000.0, parallel_residual=True, layernorm_epsilon=1e-5,
               vocab_size=50277, seq_length=2048, init="pythia", precision="bf16")

PRESETS: dict[str, dict] = {
    "tiny": dict(num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=256,
                 vocab_size=512, make_vocab_size_divisible_by=64, seq_length=64, rotary_pct=0.25,
                 parallel_residual=True, precision="fp32"),
    "pythia-70m": dict(_PYTHIA, num_layers=6, hidden_size=512, num_attention_heads=8, padded_vocab_size=50304),
    "pythia-160m": dict(_PYTHIA, num_layers=12, hidden_size=768, num_attention_heads=12, padded_vocab_size=50304),
    "pythia-410m": dict(_PYTHIA, num_layers=24, hidden_size=1024, num_attention_heads=16, padded_vocab_size=50304),
    "pythia-1b": dict(_PYTHIA, num_layers=16, hidden_size=2048, num_attention_heads=8, padded_vocab_size=50304),
    "pythia-1.4b": dict(_PYTHIA, num_layers=24, hidden_size=2048, num_attention_heads=16, padded_vocab_size=50304),
    "pythia-2.8b": dict(_PYTHIA, num_layers=32, hidden_size=2560, num_attention_heads=32, padded_vocab_size=50304),
    "pythia-6.9b": dict(_PYTHIA, num_layers=32, hidden_size=4096, num_attention_heads=32, padded_vocab_size=50432),
}


def model_preset(name: str) -> dict:
    """The ``model`` section fields of preset ``name`` (a fresh copy)."""
    if name not in PRESETS:
        raise ConfigError(f"model.preset: unknown preset {name!r}; known: {', '.join(PRESETS)}")
    return copy.deepcopy(PRESETS[name])

"""Name mapping between our GPTModel (full, unsharded) and Hugging Face GPTNeoX files.

Both sides store the fused qkv projection per head as [q, k, v] (Megatron-Core with
as many query groups as heads; GPT-NeoX's ``query_key_value``), so every tensor maps one
to one, with no reshuffling. Keys on the Hugging Face side are the *file* keys written
by ``save_pretrained`` (``embed_out.weight``, not the ``lm_head`` attribute).
"""

from __future__ import annotations

import re
from typing import Mapping

import torch

from megatron_sfm.errors import SfmError

_GLOBAL = {
    "embedding.word_embeddings.weight": "gpt_neox.embed_in.weight",
    "decoder.final_layernorm.weight": "gpt_neox.final_layer_norm.weight",
    "decoder.final_layernorm.bias": "gpt_neox.final_layer_norm.bias",
    "output_layer.weight": "embed_out.weight",
}
_LAYER = {
    "input_layernorm.weight": "input_layernorm.weight",
    "input_layernorm.bias": "input_layernorm.bias",
    "self_attention.linear_qkv.weight": "attention.query_key_value.weight",
    "self_attention.linear_qkv.bias": "attention.query_key_value.bias",
    "self_attention.linear_proj.weight": "attention.dense.weight",
    "self_attention.linear_proj.bias": "attention.dense.bias",
    "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
    "pre_mlp_layernorm.bias": "post_attention_layernorm.bias",
    "mlp.linear_fc1.weight": "mlp.dense_h_to_4h.weight",
    "mlp.linear_fc1.bias": "mlp.dense_h_to_4h.bias",
    "mlp.linear_fc2.weight": "mlp.dense_4h_to_h.weight",
    "mlp.linear_fc2.bias": "mlp.dense_4h_to_h.bias",
}
# Transformer Engine fuses the layer norms into the following GEMMs.
_TE_ALIASES = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "self_attention.linear_qkv.layer_norm_bias": "input_layernorm.bias",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
    "mlp.linear_fc1.layer_norm_bias": "pre_mlp_layernorm.bias",
}
_LAYER_RE = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_HF_LAYER_RE = re.compile(r"^gpt_neox\.layers\.(\d+)\.(.+)$")
_HF_IGNORED = re.compile(r"(\.attention\.(bias|masked_bias)|rotary_emb\.inv_freq)$")


def megatron_key_to_hf(key: str) -> str:
    """The Hugging Face file key for one of our (full-model) parameter names."""
    if key in _GLOBAL:
        return _GLOBAL[key]
    match = _LAYER_RE.match(key)
    if match:
        index, rest = match.groups()
        rest = _TE_ALIASES.get(rest, rest)
        if rest in _LAYER:
            return f"gpt_neox.layers.{index}.{_LAYER[rest]}"
    raise SfmError(f"no Hugging Face name for parameter {key!r}")


_HF_GLOBAL = {v: k for k, v in _GLOBAL.items()}
_HF_LAYER = {v: k for k, v in _LAYER.items()}


def hf_key_to_megatron(key: str) -> str:
    if key in _HF_GLOBAL:
        return _HF_GLOBAL[key]
    match = _HF_LAYER_RE.match(key)
    if match and match.group(2) in _HF_LAYER:
        return f"decoder.layers.{match.group(1)}.{_HF_LAYER[match.group(2)]}"
    raise SfmError(f"unexpected Hugging Face tensor {key!r} (not a GPTNeoX parameter)")


def to_hf(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our full state dict (``_extra_state`` entries ignored) -> Hugging Face file keys."""
    return {megatron_key_to_hf(k): v for k, v in state.items() if not k.endswith("_extra_state")}


def from_hf(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Hugging Face file keys -> our full state dict (non-parameter buffers dropped)."""
    return {hf_key_to_megatron(k): v for k, v in state.items() if not _HF_IGNORED.search(k)}

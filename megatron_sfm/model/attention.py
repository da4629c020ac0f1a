"""Attention backends and the choice between them.

``sdpa``   torch ``scaled_dot_product_attention`` as Megatron's core attention (default
           without Transformer Engine; flash / memory-efficient kernels on GPU).
``local``  Megatron-Core's unfused ``DotProductAttention`` (reference; slow, memory-hungry).
``te``     Transformer Engine's fused attention and linears (when importable).
``triton`` our fused rotary + attention kernel (``megatron_sfm.kernels``).
``auto``   the fastest available: te, else sdpa (logged).
"""

from __future__ import annotations

import importlib.util
import logging
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule

from megatron_sfm.errors import SfmError

log = logging.getLogger(__name__)

BACKENDS = ("auto", "sdpa", "local", "te", "triton")


def transformer_engine_available() -> bool:
    """True when Transformer Engine's PyTorch module imports (and CUDA is present)."""
    if importlib.util.find_spec("transformer_engine") is None:
        return False
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:  # noqa: BLE001 - a broken TE install counts as absent
        return False
    return torch.cuda.is_available()


def apex_available() -> bool:
    return importlib.util.find_spec("apex") is not None


def accelerators() -> dict[str, bool]:
    """Which optional accelerators this process can use (logged by the model builder).

    Transformer Engine serves the ``te`` attention backend and FP8; apex (or TE) gives
    Megatron-Core's optimizer its fused Adam. Neither is required.
    """
    return {"transformer_engine": transformer_engine_available(), "apex": apex_available()}


def resolve_backend(requested: str) -> str:
    """Map a configured backend to the one that runs; errors name the missing package."""
    if requested not in BACKENDS:
        raise SfmError(f"model.attention_backend: unknown backend {requested!r}; known: {', '.join(BACKENDS)}")
    if requested == "auto":
        chosen = "te" if transformer_engine_available() else "sdpa"
        log.info("attention backend auto -> %s", chosen)
        return chosen
    if requested == "te" and not transformer_engine_available():
        raise SfmError(
            "model.attention_backend: 'te' needs Transformer Engine (package transformer_engine, "
            "pip install 'megatron-sfm[te]') and a CUDA GPU; it is not importable here")
    if requested == "triton":
        if importlib.util.find_spec("megatron_sfm.model.triton_attention") is None:
            raise SfmError("model.attention_backend: 'triton' needs megatron_sfm.kernels, not installed")
    return requested


class SDPACoreAttention(MegatronModule):
    """Core attention through ``torch.nn.functional.scaled_dot_product_attention``.

    Takes Megatron's [s, b, heads, head_dim] query/key/value and returns [s, b, heads*head_dim].
    Only causal self-attention without packing is supported (all this project trains).
    """

    def __init__(self, config, layer_number: int, attn_mask_type: AttnMaskType, attention_type: str,
                 attention_dropout: Optional[float] = None, softmax_scale: Optional[float] = None,
                 cp_comm_type: Optional[str] = None, pg_collection=None, **kwargs):
        super().__init__(config=config)
        if attn_mask_type not in (AttnMaskType.causal, AttnMaskType.no_mask, AttnMaskType.padding):
            raise SfmError(f"sdpa attention: mask type {attn_mask_type} is not supported")
        self.attn_mask_type = attn_mask_type
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout
        self.softmax_scale = softmax_scale

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if packed_seq_params is not None:
            raise SfmError("sdpa attention: packed sequences are not supported")
        mask_type = attn_mask_type or self.attn_mask_type
        # [s, b, h, d] -> [b, h, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        if k.shape[1] != q.shape[1]:  # grouped-query attention: repeat the kv heads
            repeat = q.shape[1] // k.shape[1]
            k = k.repeat_interleave(repeat, dim=1)
            v = v.repeat_interleave(repeat, dim=1)
        causal = mask_type == AttnMaskType.causal
        mask = None
        if not causal and attention_mask is not None:
            mask = ~attention_mask  # Megatron: True = masked out; SDPA: True = attend
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal,
            dropout_p=self.dropout_p if self.training else 0.0, scale=self.softmax_scale)
        s, b = query.shape[0], query.shape[1]
        return out.permute(2, 0, 1, 3).reshape(s, b, -1)

"""W-attn: Megatron-Core 0.16.1's ``SelfAttention.forward`` with the rotary embedding fused
into our Triton attention kernel (attention backend ``triton``; docs/megatron-core-compat.md).

0.16.1's ``SelfAttention.forward`` applies the rotary embedding to q and k in PyTorch
(``apply_rotary_pos_emb``: several passes over q and k) and then calls
``core_attention(query, key, value, attention_mask, ...)``. To fuse the rotary into the
kernel :class:`FusedRotarySelfAttention` overrides ``forward`` (the only place that sees
both the rotary angles and q/k before they are rotated): it computes q, k, v with
Megatron's own ``get_query_key_value_tensors`` (views of the fused qkv output, no
copies), turns Megatron's rotary angles (``rotary_pos_emb``, ``[s, 1, 1, rotary_dim]``)
into cos/sin tables (:func:`rotary_tables_from_megatron`), calls the core attention
(:class:`megatron_sfm.model.triton_attention.TritonCoreAttention`) with them, then
``linear_proj``. The rotary dim is Megatron's, ``int(head_dim * rotary_percent)``, read
from the angle tensor. Anything this path does not cover (inference with a KV cache,
packed sequences, attention bias, output gates, interleaved rotary, activation
offloading, different q/k angles) goes through Megatron's unchanged ``forward``.

The override mirrors 0.16.1's ``SelfAttention.forward`` signature and reads its
attributes (``offload_*``, ``config.no_rope_freq``) and the private
``_yarn_get_concentration_factor_from_config``; ``tests/test_compat.py`` fails when they change.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.attention import SelfAttention


def rotary_tables_from_megatron(rotary_pos_emb: torch.Tensor, mscale: float = 1.0):
    """cos/sin tables ``[s, rotary_dim // 2]`` (fp32) from Megatron's non-interleaved angles.

    Megatron's ``RotaryEmbedding`` returns ``cat(freqs, freqs)`` shaped ``[s, 1, 1, rotary_dim]``
    with ``freqs = position * inv_freq`` (fp32); the first half holds every angle once.
    """
    angles = rotary_pos_emb.reshape(rotary_pos_emb.shape[0], rotary_pos_emb.shape[-1])
    half = angles[:, : angles.shape[-1] // 2].float()
    cos, sin = torch.cos(half), torch.sin(half)
    if mscale != 1.0:
        cos, sin = cos * mscale, sin * mscale
    return cos.contiguous(), sin.contiguous()


class FusedRotarySelfAttention(SelfAttention):
    """Megatron ``SelfAttention`` whose rotary embedding is applied inside the Triton kernel."""

    def _fusable(self, key_value_states, inference_context, rotary_pos_emb, rotary_pos_cos, rotary_pos_sin,
                 rotary_pos_cos_sin, attention_bias, packed_seq_params) -> bool:
        from megatron_sfm.model.triton_attention import TritonCoreAttention

        cfg = self.config
        if not isinstance(self.core_attention, TritonCoreAttention):
            return False
        if any(x is not None for x in (key_value_states, inference_context, rotary_pos_cos, rotary_pos_sin,
                                       rotary_pos_cos_sin, attention_bias, packed_seq_params)):
            return False
        if cfg.rotary_interleaved or cfg.attention_output_gate or getattr(cfg, "fused_single_qkv_rope", False):
            return False
        if cfg.multi_latent_attention or getattr(cfg, "flash_decode", False):
            return False
        if self.offload_qkv_linear or self.offload_core_attention or self.offload_attn_proj:
            return False
        if isinstance(rotary_pos_emb, tuple):
            q_emb, k_emb = rotary_pos_emb
            if q_emb is not k_emb:
                return False
        return True

    def forward(self, hidden_states, attention_mask, key_value_states=None, inference_context=None,
                rotary_pos_emb=None, rotary_pos_cos=None, rotary_pos_sin=None, rotary_pos_cos_sin=None,
                attention_bias=None, packed_seq_params=None, sequence_len_offset=None, *, inference_params=None):
        if inference_params is not None or not self._fusable(
                key_value_states, inference_context, rotary_pos_emb, rotary_pos_cos, rotary_pos_sin,
                rotary_pos_cos_sin, attention_bias, packed_seq_params):
            return super().forward(
                hidden_states, attention_mask, key_value_states=key_value_states,
                inference_context=inference_context, rotary_pos_emb=rotary_pos_emb, rotary_pos_cos=rotary_pos_cos,
                rotary_pos_sin=rotary_pos_sin, rotary_pos_cos_sin=rotary_pos_cos_sin,
                attention_bias=attention_bias, packed_seq_params=packed_seq_params,
                sequence_len_offset=sequence_len_offset, inference_params=inference_params)

        if isinstance(rotary_pos_emb, tuple):
            rotary_pos_emb = rotary_pos_emb[0]
        if self.config.no_rope_freq and self.config.no_rope_freq[self.layer_number - 1]:
            rotary_pos_emb = None
        query, key, value = self.get_query_key_value_tensors(hidden_states, None, split_qkv=True)
        cos = sin = None
        if rotary_pos_emb is not None:
            from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import (
                _yarn_get_concentration_factor_from_config,
            )

            cos, sin = rotary_tables_from_megatron(rotary_pos_emb,
                                                   _yarn_get_concentration_factor_from_config(self.config))
        core_attn_out = self.core_attention(query, key, value, attention_mask, attn_mask_type=self.attn_mask_type,
                                            rotary_cos=cos, rotary_sin=sin)
        return self.linear_proj(core_attn_out)

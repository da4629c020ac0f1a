"""Attention backend ``triton``: our fused rotary + flash attention kernel inside Megatron-Core.

Megatron-Core 0.16.1's ``SelfAttention.forward`` applies the rotary embedding to q and k
in PyTorch (``apply_rotary_pos_emb``: several passes over q and k) and then calls
``core_attention(query, key, value, attention_mask, ...)``. To fuse the rotary into the
kernel we override ``forward`` (the only place that sees both the rotary angles and q/k
before they are rotated); that override reaches into Megatron-Core internals, so it lives
in :mod:`megatron_sfm.compat.attention` (W-attn in docs/megatron-core-compat.md):

* :class:`FusedRotarySelfAttention` computes q, k, v with Megatron's own
  ``get_query_key_value_tensors`` (views of the fused qkv output, no copies), turns
  Megatron's rotary angles (``rotary_pos_emb``, ``[s, 1, 1, rotary_dim]``) into cos/sin
  tables, calls :class:`TritonCoreAttention` with them, then ``linear_proj``. The rotary
  dim is Megatron's, ``int(head_dim * rotary_percent)``, read from the angle tensor.
  Anything this path does not cover (inference with a KV cache, packed sequences,
  attention bias, output gates, interleaved rotary, activation offloading, different
  q/k angles) goes through Megatron's unchanged ``forward``: Megatron rotates in PyTorch
  and :class:`TritonCoreAttention` runs the same kernel with rotary off.
* :class:`TritonCoreAttention` is a drop-in core attention (Megatron's constructor and
  forward signature) returning ``[s, b, heads * head_dim]``; causal self-attention only,
  no attention dropout, no context parallelism, equal q and kv head counts.

Selective recompute of ``core_attn`` is not applied on the fused path: the kernel keeps
only its output and the log-sum-exp and recomputes the attention matrix in backward.
"""

from __future__ import annotations

from typing import Optional

from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule

from megatron_sfm.compat.attention import FusedRotarySelfAttention, rotary_tables_from_megatron  # noqa: F401
from megatron_sfm.errors import SfmError


def triton_self_attention_spec_parts() -> dict:
    """The modules of the ``triton`` backend for ``megatron_sfm.model.spec.layer_spec``."""
    return {"self_attention_module": FusedRotarySelfAttention, "core_attention": TritonCoreAttention}


class TritonCoreAttention(MegatronModule):
    """Core attention through ``megatron_sfm.kernels.attention.rotary_flash_attention``.

    Takes Megatron's ``[s, b, heads, head_dim]`` query/key/value (strided views allowed) and
    returns ``[s, b, heads * head_dim]``. ``rotary_cos``/``rotary_sin`` (passed only by
    :class:`FusedRotarySelfAttention`) make the kernel rotate q and k itself.
    """

    def __init__(self, config, layer_number: int, attn_mask_type: AttnMaskType, attention_type: str,
                 attention_dropout: Optional[float] = None, softmax_scale: Optional[float] = None,
                 cp_comm_type: Optional[str] = None, pg_collection=None, **kwargs):
        super().__init__(config=config)
        if attn_mask_type not in (AttnMaskType.causal, AttnMaskType.no_mask):
            raise SfmError(f"model.attention_backend=triton: mask type {attn_mask_type.name} is not supported "
                           "(causal or no_mask only)")
        dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        if dropout:
            raise SfmError(f"model.attention_dropout={dropout}: the triton attention backend has no attention "
                           "dropout; set it to 0 (Pythia trains without) or use attention_backend=sdpa")
        if getattr(config, "context_parallel_size", 1) != 1:
            raise SfmError("parallel.context_parallel_size > 1 is not supported by attention_backend=triton")
        self.attn_mask_type = attn_mask_type
        self.softmax_scale = softmax_scale

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None, rotary_cos=None, rotary_sin=None):
        from megatron_sfm.kernels.attention import rotary_flash_attention

        if packed_seq_params is not None:
            raise SfmError("attention_backend=triton: packed sequences (packed_seq_params) are not supported")
        if attention_bias is not None:
            raise SfmError("attention_backend=triton: attention_bias is not supported")
        mask_type = attn_mask_type or self.attn_mask_type
        causal = mask_type == AttnMaskType.causal
        if not causal and attention_mask is not None:
            raise SfmError("attention_backend=triton: explicit attention masks are not supported (causal only)")
        if key.shape[2] != query.shape[2]:
            raise SfmError("attention_backend=triton: grouped-query attention (num_query_groups < heads) is not "
                           "supported")
        rotary_dim = 0 if rotary_cos is None else 2 * rotary_cos.shape[-1]
        out = rotary_flash_attention(query, key, value, rotary_dim=rotary_dim, rotary_cos=rotary_cos,
                                     rotary_sin=rotary_sin, softmax_scale=self.softmax_scale, causal=causal)
        s, b = out.shape[0], out.shape[1]
        return out.view(s, b, -1)

"""Layer specs for the GPT-NeoX layout, one per attention backend.

A spec names the layer's submodules (Megatron-Core ``ModuleSpec``); the residual pattern
is the layer class (parallel or sequential), the attention backend is the core-attention
module (or, for ``te`` and ``triton``, the attention modules around it).
"""

from __future__ import annotations

from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add

from megatron_sfm.model.attention import SDPACoreAttention
from megatron_sfm.model.layer import ParallelResidualTransformerLayer
from megatron_sfm.model.norm import LayerNorm


def layer_spec(backend: str, parallel_residual: bool, float8=None) -> ModuleSpec:
    """The spec of one transformer layer for a resolved attention backend.

    ``float8``: an ``FP8Config`` to run the four linears' GEMMs in torchao float8
    (``megatron_sfm.model.float8``); None keeps Megatron's linears.
    """
    layer_cls = ParallelResidualTransformerLayer if parallel_residual else TransformerLayer
    if backend == "te":
        # Transformer Engine: layer norms fused into the qkv and fc1 GEMMs, fused attention.
        from megatron.core.extensions.transformer_engine import (
            TEDotProductAttention,
            TELayerNormColumnParallelLinear,
            TERowParallelLinear,
        )

        return _assemble(layer_cls, norm=IdentityOp, attention=SelfAttention, qkv=TELayerNormColumnParallelLinear,
                         core=TEDotProductAttention, row=TERowParallelLinear, fc1=TELayerNormColumnParallelLinear,
                         keys_map={"input_layernorm.": "self_attention.linear_qkv.layer_norm_",
                                   "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_"})
    attention_module, core_attention = SelfAttention, SDPACoreAttention
    if backend == "local":
        core_attention = DotProductAttention
    elif backend == "triton":
        from megatron_sfm.model.triton_attention import triton_self_attention_spec_parts

        parts = triton_self_attention_spec_parts()
        attention_module, core_attention = parts["self_attention_module"], parts["core_attention"]
    column, row = ColumnParallelLinear, RowParallelLinear
    if float8 is not None:
        from megatron_sfm.model.float8 import linear_specs

        specs = linear_specs(float8)
        column, row = specs["column"], specs["row"]
    return _assemble(layer_cls, norm=LayerNorm, attention=attention_module, qkv=column,
                     core=core_attention, row=row, fc1=column, keys_map={})


def _assemble(layer_cls, *, norm, attention, qkv, core, row, fc1, keys_map) -> ModuleSpec:
    return ModuleSpec(
        module=layer_cls,
        submodules=TransformerLayerSubmodules(
            input_layernorm=norm,
            self_attention=ModuleSpec(
                module=attention,
                params={"attn_mask_type": AttnMaskType.causal},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=qkv, core_attention=core, linear_proj=row,
                    q_layernorm=IdentityOp, k_layernorm=IdentityOp),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=norm,
            mlp=ModuleSpec(module=MLP, submodules=MLPSubmodules(linear_fc1=fc1, linear_fc2=row)),
            mlp_bda=get_bias_dropout_add,
            sharded_state_dict_keys_map=keys_map,
        ),
    )


def block_spec(backend: str, parallel_residual: bool, num_layers: int, float8=None) -> TransformerBlockSubmodules:
    """The decoder block: ``num_layers`` copies of the layer spec and a final LayerNorm.

    GPTModel receives this (rather than a layer spec) so the final norm is ours too.
    ``num_layers`` is the number of layers on this pipeline stage.
    """
    spec = layer_spec(backend, parallel_residual, float8)
    final_norm = LayerNorm
    if backend == "te":
        from megatron.core.extensions.transformer_engine import TENorm

        final_norm = TENorm
    return TransformerBlockSubmodules(layer_specs=[spec] * num_layers, layer_norm=final_norm)

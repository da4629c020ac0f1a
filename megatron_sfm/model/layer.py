"""GPT-NeoX's parallel-residual transformer layer on Megatron-Core's TransformerLayer.

    out = x + attn(LN1(x)) + mlp(LN2(x))

Megatron-Core's ``TransformerLayer`` is sequential (x -> x + attn(LN1(x)) -> ... + mlp(LN2(.)));
this subclass keeps its submodules (so the spec, checkpoints and TP/SP behaviour are the
stock ones) and changes only how they are wired.
"""

from __future__ import annotations

from megatron.core.transformer.transformer_layer import TransformerLayer
from megatron.core.utils import make_viewless_tensor


class ParallelResidualTransformerLayer(TransformerLayer):
    """A TransformerLayer whose attention and MLP both read the layer input."""

    def forward(self, hidden_states, attention_mask=None, context=None, context_mask=None,
                rotary_pos_emb=None, rotary_pos_cos=None, rotary_pos_sin=None,
                attention_bias=None, inference_context=None, packed_seq_params=None,
                sequence_len_offset=None, padding_mask=None, **kwargs):
        kwargs.pop("dynamic_inference_decode_only", None)
        residual = hidden_states
        attention_output_with_bias = self.self_attention(
            self.input_layernorm(hidden_states),
            attention_mask=attention_mask,
            inference_context=inference_context,
            rotary_pos_emb=rotary_pos_emb,
            rotary_pos_cos=rotary_pos_cos,
            rotary_pos_sin=rotary_pos_sin,
            attention_bias=attention_bias,
            packed_seq_params=packed_seq_params,
            sequence_len_offset=sequence_len_offset,
        )
        mlp_output_with_bias = self.mlp(self.pre_mlp_layernorm(hidden_states))
        fusion = self.config.bias_dropout_fusion
        with self.bias_dropout_add_exec_handler():
            hidden_states = self.self_attn_bda(self.training, fusion)(
                attention_output_with_bias, residual, self.hidden_dropout)
            hidden_states = self.mlp_bda(self.training, fusion)(
                mlp_output_with_bias, hidden_states, self.hidden_dropout)
        output = make_viewless_tensor(inp=hidden_states, requires_grad=hidden_states.requires_grad,
                                      keep_graph=True)
        return output, context

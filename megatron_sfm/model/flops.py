"""Parameter counts and FLOPs for the GPT-NeoX layout, computed from the config alone.

FLOPs use Megatron-LM's ``num_floating_point_operations`` for a dense GPT (the formula
its training logs report as "TFLOP/s/GPU"; Narayanan et al. 2021, appendix):

    F = 12 * B * S * L * h^2 * ( (1 + g/n + S/(2h)) * (n*d/h) + f/h + V/(2*L*h) )

with B sequences of S tokens, L layers, hidden h, n heads of size d, g query groups
(= n here), FFN size f and padded vocabulary V. 12 = 3 (forward, weight-grad, data-grad)
x 2 (two GEMMs per block) x 2 (multiply-add). Causal attention counts half the score
matrix (S/(2h)); embedding lookups are not counted; the logit GEMM is.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_sfm.config.schema import ModelConfig

FLOP_FORMULA_NAME = "Megatron-LM num_floating_point_operations (dense GPT, causal attention halved, no embedding lookups)"


def training_flops(model: ModelConfig, batch_size: int, seq_length: int | None = None,
                   tensor_parallel_size: int = 1) -> float:
    """FLOPs of one training step (forward + backward) over ``batch_size`` sequences."""
    s = seq_length or model.seq_length
    h, L, n, d = model.hidden_size, model.num_layers, model.num_attention_heads, model.head_dim
    g = n
    f = model.ffn_size
    v = model.padded_vocab(tensor_parallel_size)
    attention = (1 + g / n + s / (2 * h)) * (n * d / h)
    mlp = f / h
    logits = v / (2 * L * h)
    return 12.0 * batch_size * s * L * h * h * (attention + mlp + logits)


def training_flops_per_token(model: ModelConfig, seq_length: int | None = None,
                             tensor_parallel_size: int = 1) -> float:
    s = seq_length or model.seq_length
    return training_flops(model, 1, s, tensor_parallel_size) / s


@dataclass
class ParameterCount:
    embedding: int  # input embedding (vocab x hidden)
    output_layer: int  # untied output projection
    per_layer: int
    final_norm: int
    layers: int

    @property
    def total(self) -> int:
        return self.embedding + self.output_layer + self.per_layer * self.layers + self.final_norm

    @property
    def non_embedding(self) -> int:
        return self.total - self.embedding - self.output_layer


def parameter_count(model: ModelConfig, tensor_parallel_size: int = 1) -> ParameterCount:
    """Exact parameter count of the model (biases and both layer norms included).

    Equals ``sum(p.numel())`` of a Hugging Face ``GPTNeoXForCausalLM`` with the same
    shape and ``vocab_size`` = the padded vocabulary.
    """
    h, f = model.hidden_size, model.ffn_size
    v = model.padded_vocab(tensor_parallel_size)
    per_layer = (
        (h * 3 * h + 3 * h)  # fused qkv
        + (h * h + h)  # attention output
        + (h * f + f) + (f * h + h)  # MLP
        + 2 * 2 * h  # two LayerNorms (weight + bias)
    )
    return ParameterCount(embedding=v * h, output_layer=v * h, per_layer=per_layer, final_norm=2 * h,
                          layers=model.num_layers)


def parameters_per_rank(model: ModelConfig, tp: int, pp: int) -> list[int]:
    """Parameters held by one rank of each pipeline stage (TP splits the GEMMs and vocab)."""
    h, f = model.hidden_size, model.ffn_size
    v = model.padded_vocab(tp)
    sharded = h * 3 * h + 3 * h + h * h + h * f + f + f * h  # split over TP
    replicated = h + h + 4 * h  # row-parallel biases + layer norms
    per_layer = sharded // tp + replicated
    layers_per_stage = model.num_layers // pp
    stages = []
    for stage in range(pp):
        count = per_layer * layers_per_stage
        if stage == 0:
            count += v * h // tp
        if stage == pp - 1:
            count += v * h // tp + 2 * h
        stages.append(count)
    return stages

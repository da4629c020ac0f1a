"""``sfm model summary``: parameters, FLOPs per token and per-GPU memory for a layout.

Memory (bytes per parameter, Megatron-Core distributed optimizer with bf16 params):
weights 2 (bf16) or 4 (fp32); gradients 4 when reduced in fp32, else 2; optimizer 12
(fp32 main copy + Adam m and v), divided over the data-parallel ranks. Activations are
not included (they depend on micro-batch, sequence length and recomputation).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from megatron_sfm.config.schema import ModelConfig, ParallelConfig
from megatron_sfm.model.flops import (
    FLOP_FORMULA_NAME,
    parameter_count,
    parameters_per_rank,
    training_flops_per_token,
)

GIB = 1024 ** 3


@dataclass
class ModelSummary:
    parameters: int
    non_embedding_parameters: int
    parameters_per_rank_max: int
    parameters_per_stage: list
    padded_vocab_size: int
    flops_per_token: float
    flop_formula: str
    memory_gib: dict
    layout: dict

    def to_dict(self) -> dict:
        return asdict(self)


def summarize(model: ModelConfig, parallel: ParallelConfig, data_parallel_size: int = 1) -> ModelSummary:
    tp, pp, dp = parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size, data_parallel_size
    counts = parameter_count(model, tp)
    per_stage = parameters_per_rank(model, tp, pp)
    worst = max(per_stage)
    weight_bytes = 4 if model.precision == "fp32" else 2
    grad_bytes = 4 if (parallel.grad_reduce_in_fp32 or model.precision == "fp32") else 2
    optimizer_bytes = 12 if model.precision != "fp32" else 8  # fp32 models need no main copy
    shard = dp if parallel.use_distributed_optimizer else 1
    memory = {
        "weights": worst * weight_bytes / GIB,
        "gradients": worst * grad_bytes / GIB,
        "optimizer": worst * optimizer_bytes / shard / GIB,
    }
    memory["total"] = sum(memory.values())
    return ModelSummary(
        parameters=counts.total,
        non_embedding_parameters=counts.non_embedding,
        parameters_per_rank_max=worst,
        parameters_per_stage=per_stage,
        padded_vocab_size=model.padded_vocab(tp),
        flops_per_token=training_flops_per_token(model, tensor_parallel_size=tp),
        flop_formula=FLOP_FORMULA_NAME,
        memory_gib=memory,
        layout={"tp": tp, "pp": pp, "dp": dp, "distributed_optimizer": parallel.use_distributed_optimizer,
                "precision": model.precision, "seq_length": model.seq_length},
    )

"""torchao float8 training on Megatron-Core's tensor-parallel linear layers.

The FP8 path when Transformer Engine is absent (``model.fp8.backend: torchao``, or
``auto`` without TE). The four GEMMs of each transformer layer (qkv, attention output,
fc1, fc2) run through torchao's float8 matmul (``matmul_with_hp_or_float8_args``: each
operand cast to float8 with a dynamic scale, the product in high precision, the same for
both backward GEMMs). The embedding and the output layer stay in bf16, as in torchao's and
Transformer Engine's own recipes.

The layers are subclasses of Megatron-Core's ``ColumnParallelLinear`` and
``RowParallelLinear`` that replace only ``_forward_impl``, the local GEMM: parameters,
state dicts, sharded checkpoints, tensor and sequence parallelism are Megatron's. The
tensor-parallel communication that Megatron's fused linear does inside its autograd
function is done here with Megatron's mapping functions around the float8 matmul:

* column-parallel with sequence parallelism: all-gather of the input along the sequence
  (reduce-scatter of its gradient);
* column-parallel with TP > 1 otherwise: identity forward, all-reduce of the input
  gradient;
* row-parallel: nothing (the layer's own forward reduces the output).

Scales are computed per rank on the local operands (no cross-rank amax), so a TP=2 run
quantizes slightly differently from TP=1; each rank's GEMMs are exact float8 GEMMs of
what that rank holds.

Recipes (``model.fp8.recipe``): ``tensorwise`` (one scale per tensor; cuBLAS fp8 GEMM)
and ``rowwise`` (one scale per row, powers of two; e4m3 everywhere). ``model.fp8.format``
chooses the gradient's format for tensorwise: ``hybrid`` = e4m3 forward, e5m2 gradients
(torchao's default), ``e4m3`` = e4m3 everywhere. ``model.fp8.emulate: true`` runs the
casts exactly but the GEMMs in high precision, on any device: a numerics check for tests
and CPUs, slower than bf16, never a speed path. ``model.fp8.compile`` (default on CUDA)
compiles each float8 matmul with ``torch.compile`` so amax, scale and cast fuse into a
few kernels (without it each cast is several eager kernels).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Any, Optional

import torch
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
)

from megatron_sfm.config.schema import FP8Config
from megatron_sfm.errors import ConfigError, SfmError

log = logging.getLogger(__name__)

RECIPES = ("tensorwise", "rowwise")
MIN_CAPABILITY = (8, 9)  # float8 tensor cores: Ada (8.9) and Hopper (9.0) onward


def _torchao():
    """Import torchao.float8 quietly (CPU builds log failed loads of its CUDA extensions)."""
    logger = logging.getLogger("torchao")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        import torchao.float8 as float8
        from torchao.float8 import float8_linear
    except ImportError as exc:
        raise SfmError(f"model.fp8.backend: torchao float8 needs the torchao package (pip install torchao): {exc}") from None
    finally:
        logger.setLevel(level)
    return float8, float8_linear


def check_usable(fp8: FP8Config) -> None:
    """Raise a one-line error when the torchao float8 path cannot run as configured."""
    if fp8.recipe not in RECIPES:
        raise ConfigError(
            f"model.fp8.recipe: {fp8.recipe!r} needs Transformer Engine (transformer_engine); the torchao "
            f"backend has {', '.join(RECIPES)}")
    if fp8.recipe == "rowwise" and fp8.format == "hybrid":
        raise ConfigError("model.fp8.format: torchao's rowwise recipe is e4m3 everywhere; use format e4m3 "
                          "(or recipe tensorwise for hybrid)")
    _torchao()
    if fp8.emulate:
        return
    if not torch.cuda.is_available():
        raise SfmError("model.fp8: torchao float8 needs a CUDA GPU with float8 tensor cores (compute "
                       "capability 8.9+); none here (model.fp8.emulate=true checks numerics on CPU, slowly)")
    capability = torch.cuda.get_device_capability()
    if capability < MIN_CAPABILITY:
        raise SfmError(f"model.fp8: torchao float8 needs compute capability 8.9+ (Ada, Hopper); "
                       f"this GPU ({torch.cuda.get_device_name()}) has {capability[0]}.{capability[1]}")


def check_shapes(model, tensor_parallel_size: int) -> None:
    """Float8 GEMMs (``torch._scaled_mm``) need every dimension divisible by 16.

    Checked for emulation too, so a config that passes on a CPU does not fail on the GPU.
    Tokens per micro-batch are micro-batch x sequence: a sequence length divisible by 16
    covers them.
    """
    tp = tensor_parallel_size
    qkv = 3 * model.num_attention_heads * model.head_dim
    dims = {"model.hidden_size": model.hidden_size, "model.hidden_size / TP": model.hidden_size // tp,
            "model.ffn_hidden_size / TP": model.ffn_size // tp, "qkv width / TP": qkv // tp,
            "model.seq_length": model.seq_length}
    bad = [f"{name} = {value}" for name, value in dims.items() if value % 16]
    if bad:
        raise ConfigError(f"model.fp8: torchao float8 GEMMs need dimensions divisible by 16; {', '.join(bad)} is not")


def torchao_config(fp8: FP8Config) -> Any:
    """The ``torchao.float8.Float8LinearConfig`` for our FP8 config."""
    float8, _ = _torchao()
    config = float8.Float8LinearConfig.from_recipe_name(fp8.recipe)
    if fp8.recipe == "tensorwise" and fp8.format == "e4m3":
        e4m3 = config.cast_config_input.target_dtype
        grad = dataclasses.replace(config.cast_config_grad_output, target_dtype=e4m3)
        config = dataclasses.replace(config, cast_config_grad_output=grad,
                                     cast_config_grad_output_for_grad_weight=grad)
    return dataclasses.replace(config, emulate=fp8.emulate)


def _mm_config(config) -> Any:
    """torchao's per-GEMM settings (emulation, fast accumulation) from a Float8LinearConfig."""
    from torchao.float8.float8_training_tensor import LinearMMConfig, ScaledMMConfig

    def one(gemm):
        return ScaledMMConfig(config.emulate, gemm.use_fast_accum, False, config.pad_inner_dim)

    return LinearMMConfig(one(config.gemm_config_output), one(config.gemm_config_grad_input),
                          one(config.gemm_config_grad_weight))


# One compiled function serves every float8 linear; dynamo keeps one graph per weight
# shape, recipe and grad mode (4 shapes per model, twice with evaluation or activation
# recomputation under no_grad, more in a bench sweep). Past dynamo's default limit of 8 it
# would silently fall back to eager float8, slower than bf16: raise the limit.
RECOMPILE_LIMIT = 64


@functools.lru_cache(maxsize=None)
def _compiled_matmul():
    import torch._dynamo.config as dynamo_config

    _, float8_linear = _torchao()
    matmul = float8_linear.matmul_with_hp_or_float8_args
    for name in ("recompile_limit", "cache_size_limit"):  # the name changed across torch versions
        if hasattr(dynamo_config, name):
            setattr(dynamo_config, name, max(getattr(dynamo_config, name), RECOMPILE_LIMIT))

    def run(input_, weight_t, mm_config, config):
        return matmul.apply(input_, weight_t, mm_config, config)

    return torch.compile(run, dynamic=False)


class _Float8GEMM:
    """The local float8 GEMM shared by both layer classes (a mixin)."""

    def _setup_float8(self, fp8: FP8Config) -> None:
        check_usable(fp8)
        self.float8_config = torchao_config(fp8)
        self.float8_mm_config = _mm_config(self.float8_config)
        use_compile = fp8.compile if fp8.compile is not None else (torch.cuda.is_available() and not fp8.emulate)
        if use_compile:
            self._float8_matmul = _compiled_matmul()
        else:
            self._float8_matmul = _torchao()[1].matmul_with_hp_or_float8_args.apply

    def _forward_impl(self, input, weight, bias=None, gradient_accumulation_fusion=False, allreduce_dgrad=False,
                      sequence_parallel=False, tp_group=None, grad_output_buffer=None, wgrad_deferral_limit=None,
                      **_unused):
        if gradient_accumulation_fusion:
            raise SfmError("model.fp8: torchao float8 linears do not support gradient accumulation fusion")
        if grad_output_buffer is not None:
            raise SfmError("model.fp8: torchao float8 linears do not support deferred embedding wgrad compute")
        if sequence_parallel:
            input = gather_from_sequence_parallel_region(input, tensor_parallel_output_grad=True, group=tp_group)
        elif allreduce_dgrad:
            input = copy_to_tensor_model_parallel_region(input, group=tp_group)
        output = self._float8_matmul(input, weight.t(), self.float8_mm_config, self.float8_config)
        if bias is not None:
            output = output + bias
        return output


class Float8ColumnParallelLinear(_Float8GEMM, ColumnParallelLinear):
    """Megatron's ``ColumnParallelLinear`` whose GEMMs run in float8 (torchao)."""

    def __init__(self, *args, float8: FP8Config, **kwargs):
        super().__init__(*args, **kwargs)
        self._setup_float8(float8)


class Float8RowParallelLinear(_Float8GEMM, RowParallelLinear):
    """Megatron's ``RowParallelLinear`` whose GEMMs run in float8 (torchao)."""

    def __init__(self, *args, float8: FP8Config, **kwargs):
        super().__init__(*args, **kwargs)
        self._setup_float8(float8)


def linear_specs(fp8: FP8Config) -> dict:
    """ModuleSpecs for the layer's column (qkv, fc1) and row (proj, fc2) linears."""
    from megatron.core.transformer.spec_utils import ModuleSpec

    check_usable(fp8)
    return {"column": ModuleSpec(module=Float8ColumnParallelLinear, params={"float8": fp8}),
            "row": ModuleSpec(module=Float8RowParallelLinear, params={"float8": fp8})}


def float8_linears(model: torch.nn.Module) -> list[str]:
    """Names of the float8 linears in a model (for logs and tests)."""
    return [name for name, module in model.named_modules() if isinstance(module, _Float8GEMM)]


def describe(fp8: FP8Config) -> Optional[str]:
    """One line for the run log."""
    if fp8.format == "none":
        return None
    mode = "emulated (numerics only)" if fp8.emulate else "float8 tensor cores"
    return f"fp8: torchao {fp8.recipe} ({fp8.format}), {mode}"

"""Build Megatron-Core's GPTModel in the GPT-NeoX layout from our typed config.

Call after ``parallel_state.initialize_model_parallel`` (tests and the trainer do this;
:func:`megatron_sfm.model.parallel.initialize_parallel` wraps it).
"""

from __future__ import annotations

import importlib.util
import logging
from typing import Optional

import torch
import torch.nn.functional as F

from megatron_sfm.compat import apply_all
from megatron_sfm.config.schema import ModelConfig, ParallelConfig
from megatron_sfm.errors import SfmError
from megatron_sfm.model.attention import accelerators, resolve_backend, transformer_engine_available
from megatron_sfm.model.init import init_methods

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def check_fp8(model: ModelConfig) -> Optional[str]:
    """The FP8 backend that will run (``te`` or ``torchao``), None when FP8 is off.

    Asking for FP8 without a working backend is an error naming the missing package:
    Megatron-Core itself would accept ``fp8=...`` without Transformer Engine and run in
    bf16 (0.16.1 ``fp8_utils.get_fp8_context`` returns a null context).
    """
    fp8 = model.fp8
    if fp8.format == "none":
        return None
    have_te = transformer_engine_available()
    # TE's FP8 lives in TE's linears, which only the `te` layer spec (attention backend te,
    # or auto with TE importable) builds: anything else would run Megatron's linears in bf16.
    te_layers = have_te and model.attention_backend in ("te", "auto")
    if fp8.backend == "te" or (fp8.backend == "auto" and te_layers):
        if not have_te:
            raise SfmError(
                "model.fp8.backend: 'te' needs Transformer Engine (package transformer_engine, "
                "pip install 'megatron-sfm[te]') and a CUDA GPU; it is not importable here")
        if not te_layers:
            raise SfmError(f"model.fp8.backend: Transformer Engine FP8 runs in TE's linears, which "
                           f"model.attention_backend {model.attention_backend!r} does not build; use "
                           f"attention_backend te (or auto), or model.fp8.backend torchao")
        if fp8.recipe == "rowwise":
            raise SfmError("model.fp8.recipe: 'rowwise' is a torchao recipe; Transformer Engine has "
                           "delayed, tensorwise, blockwise, mxfp8")
        if fp8.emulate or fp8.compile is not None:
            raise SfmError("model.fp8.emulate / model.fp8.compile: torchao settings; this run uses "
                           "Transformer Engine (set model.fp8.backend: torchao to use them)")
        return "te"
    if model.attention_backend == "te":
        raise SfmError("model.fp8.backend: torchao float8 runs on Megatron's own linears; with "
                       "model.attention_backend te use model.fp8.backend te")
    if fp8.backend == "auto" and importlib.util.find_spec("torchao") is None:
        raise SfmError(
            f"model.fp8.format: {fp8.format!r} needs Transformer Engine (transformer_engine) or torchao "
            "float8 on a CUDA GPU; neither is available here (refusing to run in bf16 instead)")
    from megatron_sfm.model.float8 import check_usable

    check_usable(fp8)
    return "torchao"


def transformer_config(model: ModelConfig, parallel: ParallelConfig, *, backend: str | None = None,
                       use_cpu_initialization: Optional[bool] = None, **overrides):
    """Megatron-Core ``TransformerConfig`` for our model and parallel layout.

    ``use_cpu_initialization`` defaults to True without CUDA; CPU initialisation builds
    each full weight before splitting it, so every TP layout starts from the same weights.
    """
    from megatron.core.transformer.transformer_config import TransformerConfig

    backend = backend or resolve_backend(model.attention_backend)
    fp8_backend = check_fp8(model)
    init_method, output_init = init_methods(model.init, model.hidden_size, model.num_layers,
                                            model.init_method_std)
    dtype = DTYPES[model.precision]
    if use_cpu_initialization is None:
        use_cpu_initialization = not torch.cuda.is_available()
    kwargs = dict(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        num_attention_heads=model.num_attention_heads,
        ffn_hidden_size=model.ffn_size,
        kv_channels=model.head_dim,
        normalization="LayerNorm",
        layernorm_epsilon=model.layernorm_epsilon,
        add_bias_linear=True,
        add_qkv_bias=True,
        gated_linear_unit=False,
        activation_func=F.gelu,  # exact (erf) GELU, as GPT-NeoX's "gelu"
        hidden_dropout=model.hidden_dropout,
        attention_dropout=model.attention_dropout,
        init_method=init_method,
        output_layer_init_method=output_init,
        init_method_std=getattr(init_method, "std", model.init_method_std),
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        attention_softmax_in_fp32=True,
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=parallel.virtual_pipeline_model_parallel_size,
        sequence_parallel=parallel.sequence_parallel,
        pipeline_dtype=dtype,
        params_dtype=dtype,
        bf16=model.precision == "bf16",
        fp16=model.precision == "fp16",
        use_cpu_initialization=use_cpu_initialization,
        # Two messages to one peer in a batch were matched out of order on gloo with
        # interleaving (wrong grads); plain isend/irecv is exact everywhere.
        batch_p2p_comm=parallel.virtual_pipeline_model_parallel_size is None,
        batch_p2p_sync=torch.cuda.is_available(),
    )
    if fp8_backend == "te":
        kwargs.update(fp8=model.fp8.format, fp8_recipe=model.fp8.recipe, fp8_margin=model.fp8.margin,
                      fp8_amax_history_len=model.fp8.amax_history_len,
                      fp8_amax_compute_algo=model.fp8.amax_compute_algo)
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def build_gpt_model(model: ModelConfig, parallel: ParallelConfig, *, pre_process: Optional[bool] = None,
                    post_process: Optional[bool] = None, vp_stage: Optional[int] = None,
                    parallel_output: bool = True, config=None):
    """Megatron-Core ``GPTModel`` with our layer spec, on this rank's pipeline stage.

    ``pre_process`` / ``post_process`` default to this rank being the first / last stage.
    With ``parallel_output=False`` the logits are gathered over tensor parallelism.
    The model is on the CPU or the current CUDA device, in ``model.precision``.
    """
    apply_all()
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer.transformer_block import get_num_layers_to_build

    from megatron_sfm.model.spec import block_spec

    backend = resolve_backend(model.attention_backend)
    found = accelerators()
    log.info("attention backend %s; Transformer Engine %s, apex %s", backend,
             "available" if found["transformer_engine"] else "not installed",
             "available" if found["apex"] else "not installed")
    config = config or transformer_config(model, parallel, backend=backend)
    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
    num_layers_here = get_num_layers_to_build(config, vp_stage=vp_stage)
    fp8_backend = check_fp8(model)
    if fp8_backend == "torchao" and backend == "te":
        raise SfmError("model.fp8.backend: torchao float8 runs on Megatron's own linears; the attention "
                       "backend resolved to te, so use model.fp8.backend te (or another attention backend)")
    spec = block_spec(backend, model.parallel_residual, num_layers_here,
                      float8=model.fp8 if fp8_backend == "torchao" else None)
    if fp8_backend == "torchao":
        from megatron_sfm.model.float8 import check_shapes, describe

        check_shapes(model, parallel.tensor_model_parallel_size)
        log.info(describe(model.fp8))
    gpt = GPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=model.padded_vocab(parallel.tensor_model_parallel_size),
        max_sequence_length=model.max_position_embeddings or model.seq_length,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=parallel_output,
        share_embeddings_and_output_weights=False,
        position_embedding_type="rope",
        rotary_percent=model.rotary_pct,
        rotary_base=int(model.rotary_base),
        vp_stage=vp_stage,
    )
    if torch.cuda.is_available():
        gpt = gpt.cuda(torch.cuda.current_device())
    return gpt

"""Our ``ModelConfig`` <-> Hugging Face ``GPTNeoXConfig`` (``config.json``), vocabulary padding.

Vocabulary sizes (see docs/conversion.md, "Vocabulary padding"):

* the tokenizer's size (``ModelConfig.vocab_size``, e.g. 50277 for the GPT-NeoX BPE);
* the padded embedding size, the number of rows of ``embed_in`` / ``embed_out``
  (``ModelConfig.padded_vocab(tp)``, e.g. 50304 or 50432);
* ``config.json``'s ``vocab_size``, which is always the padded embedding size, as in the
  released Pythia checkpoints, so that Hugging Face builds the same matrices and the
  logits of both models have the same width. The tokenizer's size is kept in
  ``config.json`` under ``sfm_tokenizer_vocab_size`` (an extra key transformers ignores).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from megatron_sfm.config.schema import ModelConfig
from megatron_sfm.errors import SfmError

TORCH_DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
TOKENIZER_SIZE_KEY = "sfm_tokenizer_vocab_size"


def hf_config_dict(model: ModelConfig, padded_vocab: int, dtype: str = "fp32", *,
                   bos_token_id: int | None = 0, eos_token_id: int | None = 0,
                   tokenizer_vocab_size: int | None = None) -> dict[str, Any]:
    """The ``config.json`` contents of a ``GPTNeoXForCausalLM`` equal to ``model``.

    Both the legacy rotary keys (``rotary_pct``, ``rotary_emb_base``; read by
    transformers 4.x and by GPT-NeoX tooling) and transformers 5's ``rope_parameters``
    are written, with the same values.
    """
    if model.hidden_size % model.num_attention_heads:
        raise SfmError(f"model.hidden_size {model.hidden_size} is not divisible by "
                       f"model.num_attention_heads {model.num_attention_heads}")
    return {
        "architectures": ["GPTNeoXForCausalLM"],
        "model_type": "gpt_neox",
        "vocab_size": int(padded_vocab),
        TOKENIZER_SIZE_KEY: int(tokenizer_vocab_size if tokenizer_vocab_size is not None else model.vocab_size),
        "hidden_size": model.hidden_size,
        "num_hidden_layers": model.num_layers,
        "num_attention_heads": model.num_attention_heads,
        "intermediate_size": model.ffn_size,
        "hidden_act": "gelu",
        "rotary_pct": float(model.rotary_pct),
        "rotary_emb_base": float(model.rotary_base),
        "rope_parameters": {"rope_type": "default", "rope_theta": float(model.rotary_base),
                            "partial_rotary_factor": float(model.rotary_pct)},
        "attention_dropout": 0.0,
        "hidden_dropout": 0.0,
        "max_position_embeddings": model.max_position_embeddings or model.seq_length,
        "initializer_range": float(model.init_method_std),
        "layer_norm_eps": float(model.layernorm_epsilon),
        "use_cache": True,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "tie_word_embeddings": False,
        "use_parallel_residual": bool(model.parallel_residual),
        "attention_bias": True,
        "torch_dtype": TORCH_DTYPE_NAMES[dtype],
        "dtype": TORCH_DTYPE_NAMES[dtype],
    }


def generation_config_dict(bos_token_id: int | None, eos_token_id: int | None) -> dict[str, Any]:
    return {"bos_token_id": bos_token_id, "eos_token_id": eos_token_id, "do_sample": False}


def read_hf_config(hf_dir: Path) -> dict[str, Any]:
    path = Path(hf_dir) / "config.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SfmError(f"{path}: not found (expected a Hugging Face model folder)") from None
    except json.JSONDecodeError as exc:
        raise SfmError(f"{path}:{exc.lineno}: invalid JSON: {exc.msg}") from None
    if not isinstance(data, dict):
        raise SfmError(f"{path}: expected a JSON object")
    return data


def _rotary(config: dict[str, Any], path: str) -> tuple[float, float]:
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if not isinstance(rope, dict):
        raise SfmError(f"{path}: rope_parameters: expected an object, got {rope!r}")
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", None):
        raise SfmError(f"{path}: rope_parameters.rope_type {rope_type!r} is not supported (only plain rotary)")
    pct = rope.get("partial_rotary_factor", config.get("rotary_pct", config.get("partial_rotary_factor", 0.25)))
    base = rope.get("rope_theta", config.get("rotary_emb_base", config.get("rope_theta", 10000.0)))
    return float(pct), float(base)


def model_config_from_hf(config: dict[str, Any], *, path: str = "config.json",
                         tokenizer_vocab_size: int | None = None, precision: str = "fp32") -> ModelConfig:
    """Our ``ModelConfig`` for a Pythia-style ``GPTNeoXForCausalLM`` ``config.json``.

    ``padded_vocab_size`` is set to ``config.json``'s ``vocab_size`` (the embedding
    rows); ``vocab_size`` to the tokenizer's size when known (argument, or our own
    ``sfm_tokenizer_vocab_size`` key), else to the same padded size.
    Anything the GPT-NeoX layer of this project cannot represent is an error naming the key.
    """
    model_type = config.get("model_type")
    if model_type != "gpt_neox":
        raise SfmError(f"{path}: model_type {model_type!r} is not 'gpt_neox' (only GPT-NeoX / Pythia "
                       "checkpoints can be imported)")
    archs = config.get("architectures") or ["GPTNeoXForCausalLM"]
    if "GPTNeoXForCausalLM" not in archs:
        raise SfmError(f"{path}: architectures {archs} has no GPTNeoXForCausalLM")
    required = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
    for key in required:
        if not isinstance(config.get(key), int):
            raise SfmError(f"{path}: {key}: expected an integer, got {config.get(key)!r}")
    act = config.get("hidden_act", "gelu")
    if act != "gelu":
        raise SfmError(f"{path}: hidden_act {act!r} is not supported (our layer uses exact GELU, 'gelu')")
    if config.get("tie_word_embeddings", False):
        raise SfmError(f"{path}: tie_word_embeddings true is not supported (GPT-NeoX unties embeddings)")
    if config.get("attention_bias", True) is False:
        raise SfmError(f"{path}: attention_bias false is not supported (our layer has qkv and dense biases)")
    pct, base = _rotary(config, path)
    padded = config["vocab_size"]
    if tokenizer_vocab_size is None:
        tokenizer_vocab_size = config.get(TOKENIZER_SIZE_KEY)
    vocab = int(tokenizer_vocab_size) if tokenizer_vocab_size else padded
    if vocab > padded:
        raise SfmError(f"{path}: the tokenizer has {vocab} tokens but the embedding only {padded} rows "
                       "(vocab_size)")
    max_pos = config.get("max_position_embeddings", 2048)
    return ModelConfig(
        num_layers=config["num_hidden_layers"],
        hidden_size=config["hidden_size"],
        num_attention_heads=config["num_attention_heads"],
        ffn_hidden_size=config["intermediate_size"],
        vocab_size=vocab,
        padded_vocab_size=padded,
        seq_length=max_pos,
        max_position_embeddings=max_pos,
        rotary_pct=pct,
        rotary_base=base,
        parallel_residual=bool(config.get("use_parallel_residual", True)),
        layernorm_epsilon=float(config.get("layer_norm_eps", 1e-5)),
        init="normal",
        init_method_std=float(config.get("initializer_range", 0.02)),
        hidden_dropout=0.0,
        attention_dropout=0.0,
        attention_backend="auto",
        precision=precision,
    )


def architecture_fields(model: ModelConfig) -> dict[str, Any]:
    """The fields that decide tensor shapes and the forward function (for comparisons)."""
    out = {f.name: getattr(model, f.name) for f in dataclasses.fields(model)
           if f.name in ("num_layers", "hidden_size", "num_attention_heads", "rotary_pct", "rotary_base",
                         "parallel_residual", "layernorm_epsilon")}
    out["ffn_size"] = model.ffn_size
    return out

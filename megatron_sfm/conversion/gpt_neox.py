"""The GPT-NeoX (Pythia) model family: everything conversion knows about Hugging Face's layout.

One adapter class owns both directions of both mappings:

* config: our ``ModelConfig`` <-> ``GPTNeoXConfig`` (``config.json``), vocabulary padding;
* weights: our full (unsharded) GPTModel parameter names <-> the Hugging Face *file* keys
  written by ``save_pretrained`` (``embed_out.weight``, not the ``lm_head`` attribute),
  the Transformer Engine spelling of the two fused layer norms, the tensors Hugging Face
  stores that are not parameters, and every tensor's shape.

Both sides store the fused qkv projection per head as [q, k, v] (Megatron-Core with as
many query groups as heads; GPT-NeoX's ``query_key_value``), so every tensor maps one to
one, with no reshuffling.

Vocabulary sizes (docs/conversion.md, "Vocabulary padding"): ``ModelConfig.vocab_size`` is
the tokenizer's size (50277 for the GPT-NeoX BPE); the embedding has
``ModelConfig.padded_vocab(tp)`` rows (50304 or 50432); ``config.json``'s ``vocab_size`` is
always the padded size, as in the released Pythia checkpoints, and the tokenizer's size is
kept under ``sfm_tokenizer_vocab_size`` (an extra key transformers ignores).

Another family (Llama, ...) would be another class with the same methods; the exporter and
importer only call the adapter.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Mapping

from megatron_sfm.config.schema import ModelConfig
from megatron_sfm.errors import SfmError
from megatron_sfm.utils.readers import read_json

TORCH_DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
TOKENIZER_SIZE_KEY = "sfm_tokenizer_vocab_size"


def read_hf_config(hf_dir: str | Path) -> dict[str, Any]:
    """``hf_dir/config.json`` as a dict; a missing or malformed file is a one-line error."""
    return read_json(Path(hf_dir) / "config.json")


class GPTNeoXAdapter:
    """Config and weight mapping between our GPTModel and ``GPTNeoXForCausalLM``."""

    model_type = "gpt_neox"
    architecture = "GPTNeoXForCausalLM"

    # our full-model key -> Hugging Face file key
    GLOBAL = {
        "embedding.word_embeddings.weight": "gpt_neox.embed_in.weight",
        "decoder.final_layernorm.weight": "gpt_neox.final_layer_norm.weight",
        "decoder.final_layernorm.bias": "gpt_neox.final_layer_norm.bias",
        "output_layer.weight": "embed_out.weight",
    }
    # inside one layer, in Hugging Face file order
    LAYER = {
        "input_layernorm.weight": "input_layernorm.weight",
        "input_layernorm.bias": "input_layernorm.bias",
        "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
        "pre_mlp_layernorm.bias": "post_attention_layernorm.bias",
        "self_attention.linear_qkv.weight": "attention.query_key_value.weight",
        "self_attention.linear_qkv.bias": "attention.query_key_value.bias",
        "self_attention.linear_proj.weight": "attention.dense.weight",
        "self_attention.linear_proj.bias": "attention.dense.bias",
        "mlp.linear_fc1.weight": "mlp.dense_h_to_4h.weight",
        "mlp.linear_fc1.bias": "mlp.dense_h_to_4h.bias",
        "mlp.linear_fc2.weight": "mlp.dense_4h_to_h.weight",
        "mlp.linear_fc2.bias": "mlp.dense_4h_to_h.bias",
    }
    # Transformer Engine fuses the two layer norms into the following GEMMs: its spelling
    # of our layer-norm keys (checkpoints written with the `te` backend use these).
    TE_ALIASES = {
        "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
        "input_layernorm.bias": "self_attention.linear_qkv.layer_norm_bias",
        "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
        "pre_mlp_layernorm.bias": "mlp.linear_fc1.layer_norm_bias",
    }
    # Hugging Face file keys read under another name (transformers' attribute spelling)
    HF_KEY_ALIASES = {"lm_head.weight": "embed_out.weight"}
    # tensors some GPTNeoX files hold that are buffers, not parameters
    HF_IGNORED = re.compile(r"(\.attention\.(bias|masked_bias)|rotary_emb\.inv_freq)$")

    _LAYER_RE = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
    _HF_LAYER_RE = re.compile(r"^gpt_neox\.layers\.(\d+)\.(.+)$")
    _FROM_TE = {te: ours for ours, te in TE_ALIASES.items()}
    _HF_GLOBAL = {v: k for k, v in GLOBAL.items()}
    _HF_LAYER = {v: k for k, v in LAYER.items()}

    # ---- weights -------------------------------------------------------------------
    @classmethod
    def to_hf_key(cls, key: str) -> str:
        """The Hugging Face file key for one of our (full-model) parameter names."""
        if key in cls.GLOBAL:
            return cls.GLOBAL[key]
        match = cls._LAYER_RE.match(key)
        if match:
            index, rest = match.groups()
            rest = cls._FROM_TE.get(rest, rest)
            if rest in cls.LAYER:
                return f"gpt_neox.layers.{index}.{cls.LAYER[rest]}"
        raise SfmError(f"no Hugging Face name for parameter {key!r}")

    @classmethod
    def from_hf_key(cls, key: str) -> str:
        """Our full-model parameter name for a Hugging Face file key (unknown: an error)."""
        if key in cls._HF_GLOBAL:
            return cls._HF_GLOBAL[key]
        match = cls._HF_LAYER_RE.match(key)
        if match and match.group(2) in cls._HF_LAYER:
            return f"decoder.layers.{match.group(1)}.{cls._HF_LAYER[match.group(2)]}"
        raise SfmError(f"unexpected Hugging Face tensor {key!r} (not a GPTNeoX parameter)")

    @classmethod
    def is_ignored_hf_key(cls, key: str) -> bool:
        return bool(cls.HF_IGNORED.search(key))

    @classmethod
    def to_hf(cls, state: Mapping[str, Any]) -> dict[str, Any]:
        """Our full state dict (``_extra_state`` entries ignored) -> Hugging Face file keys."""
        return {cls.to_hf_key(k): v for k, v in state.items() if not k.endswith("_extra_state")}

    @classmethod
    def from_hf(cls, state: Mapping[str, Any]) -> dict[str, Any]:
        """Hugging Face file keys -> our full state dict (non-parameter buffers dropped)."""
        return {cls.from_hf_key(k): v for k, v in state.items() if not cls.is_ignored_hf_key(k)}

    @classmethod
    def layer_params(cls) -> list[tuple[str, str | None]]:
        """Each parameter name inside one layer with its Transformer Engine spelling (or None)."""
        return [(name, cls.TE_ALIASES.get(name)) for name in cls.LAYER]

    @classmethod
    def hf_shapes(cls, model: ModelConfig, padded_vocab: int) -> dict[str, tuple[int, ...]]:
        """Hugging Face file key -> shape for ``model``'s architecture, in file order."""
        h, f = model.hidden_size, model.ffn_size
        layer_shapes = {
            "input_layernorm.weight": (h,), "input_layernorm.bias": (h,),
            "pre_mlp_layernorm.weight": (h,), "pre_mlp_layernorm.bias": (h,),
            "self_attention.linear_qkv.weight": (3 * h, h), "self_attention.linear_qkv.bias": (3 * h,),
            "self_attention.linear_proj.weight": (h, h), "self_attention.linear_proj.bias": (h,),
            "mlp.linear_fc1.weight": (f, h), "mlp.linear_fc1.bias": (f,),
            "mlp.linear_fc2.weight": (h, f), "mlp.linear_fc2.bias": (h,),
        }
        out: dict[str, tuple[int, ...]] = {"gpt_neox.embed_in.weight": (padded_vocab, h)}
        for i in range(model.num_layers):
            for ours, hf in cls.LAYER.items():
                out[f"gpt_neox.layers.{i}.{hf}"] = layer_shapes[ours]
        out["gpt_neox.final_layer_norm.weight"] = (h,)
        out["gpt_neox.final_layer_norm.bias"] = (h,)
        out["embed_out.weight"] = (padded_vocab, h)
        return out

    # ---- config --------------------------------------------------------------------
    @classmethod
    def hf_config(cls, model: ModelConfig, padded_vocab: int, dtype: str = "fp32", *,
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
            "architectures": [cls.architecture],
            "model_type": cls.model_type,
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

    @staticmethod
    def generation_config(bos_token_id: int | None, eos_token_id: int | None) -> dict[str, Any]:
        return {"bos_token_id": bos_token_id, "eos_token_id": eos_token_id, "do_sample": False}

    @staticmethod
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

    @classmethod
    def model_config(cls, config: dict[str, Any], *, path: str = "config.json",
                     tokenizer_vocab_size: int | None = None, precision: str = "fp32") -> ModelConfig:
        """Our ``ModelConfig`` for a Pythia-style ``GPTNeoXForCausalLM`` ``config.json``.

        ``padded_vocab_size`` is set to ``config.json``'s ``vocab_size`` (the embedding
        rows); ``vocab_size`` to the tokenizer's size when known (argument, or our own
        ``sfm_tokenizer_vocab_size`` key), else to the same padded size. Anything the
        GPT-NeoX layer of this project cannot represent is an error naming the key.
        """
        model_type = config.get("model_type")
        if model_type != cls.model_type:
            raise SfmError(f"{path}: model_type {model_type!r} is not 'gpt_neox' (only GPT-NeoX / Pythia "
                           "checkpoints can be imported)")
        archs = config.get("architectures") or [cls.architecture]
        if cls.architecture not in archs:
            raise SfmError(f"{path}: architectures {archs} has no {cls.architecture}")
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
        pct, base = cls._rotary(config, path)
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

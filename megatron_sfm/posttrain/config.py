"""Typed configs of the two post-training stages, SFT and DPO, from YAML + overrides.

A stage config is one dataclass (:class:`SFTConfig` or :class:`DPOConfig`); a YAML file
maps onto it one to one, ``key=value`` overrides apply on top, and the values given on
the command line (the model folder, ``--data``, ``--eval-data``, ``--out``) override
both. Every field not given takes its default; only ``model``, ``out`` and ``data`` are
required. Errors are :class:`~megatron_sfm.errors.ConfigError` lines naming the file and
the key (unknown keys get a "did you mean").

Data entries are ``{path: FILE, weight: W}`` mappings or ``"FILE[:WEIGHT]"`` strings;
a weight multiplies the file's examples per epoch (``megatron_sfm/posttrain/data.py``).
Relative paths are taken relative to the working directory, as on the command line.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any, Literal

from megatron_sfm.errors import ConfigError

# transformers' SchedulerType values (checked here so a typo fails before torch loads)
LrScheduler = Literal[
    "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
    "inverse_sqrt", "cosine_with_min_lr", "warmup_stable_decay",
]
# TRL's DPO loss types (trl.DPOConfig.loss_type, one of them)
DPOLoss = Literal[
    "sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
    "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm",
]
ChatTemplateName = Literal["sfm-chatml"]
STAGES = ("sft", "dpo")


@dataclass
class DataFile:
    """One training file and its weight (examples per epoch = round(weight x rows))."""

    path: str
    weight: float = 1.0


@dataclass
class _StageConfig:
    """Fields shared by SFT and DPO (TRL / transformers ``TrainingArguments`` names and units)."""

    model: str  # Hugging Face folder: the base model (SFT) or the SFT model (DPO)
    out: str  # output folder: final model, posttrain.json, checkpoints/, tensorboard/
    data: list[DataFile]
    eval_data: list[DataFile] = field(default_factory=list)
    # chat template given to a model that has none (a model with one keeps it); see chat_template.py
    chat_template: ChatTemplateName = "sfm-chatml"
    max_length: int = 2048  # tokens per example (prompt + response); longer ones are cut at the end
    num_train_epochs: float = 1.0  # passes over the weighted mix
    max_steps: int = -1  # optimizer steps; > 0 overrides num_train_epochs
    per_device_train_batch_size: int = 1  # examples (DPO: pairs) per GPU per micro-step
    per_device_eval_batch_size: int | None = None  # None: per_device_train_batch_size
    gradient_accumulation_steps: int = 1  # micro-steps per optimizer step
    learning_rate: float = 2e-5  # peak
    lr_scheduler_type: LrScheduler = "linear"
    warmup_ratio: float = 0.03  # fraction of the optimizer steps
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 42  # model init of new rows is deterministic; this seeds data order and dropout
    save_steps: int = 500  # optimizer steps between checkpoints (checkpoints/checkpoint-N)
    save_total_limit: int | None = 2  # checkpoints kept while training (None: all)
    keep_checkpoints: bool = False  # keep checkpoints/ once the final model is written
    logging_steps: int = 10  # optimizer steps between logged metrics (TensorBoard, console)
    eval_steps: int | None = None  # with eval_data: steps between evaluations (None: save_steps)
    bf16: bool | None = None  # None: bf16 mixed precision on CUDA, fp32 on CPU
    gradient_checkpointing: bool = False
    attn_implementation: str | None = None  # e.g. sdpa, flash_attention_2 (None: transformers' default)


@dataclass
class SFTConfig(_StageConfig):
    """Supervised fine-tuning on ``messages`` conversations (TRL ``SFTTrainer``).

    ``assistant_only_loss``: the loss covers only the assistant turns (their text and the
    closing ``<|im_end|>``), through TRL's assistant-token mask, which the chat template's
    ``{% generation %}`` markers define. False: every token of the conversation.
    """

    num_train_epochs: float = 2.0
    assistant_only_loss: bool = True


@dataclass
class DPOConfig(_StageConfig):
    """Direct preference optimisation on prompt/chosen/rejected pairs (TRL ``DPOTrainer``).

    The reference model is the starting model (``model``, the SFT model), frozen.
    ``max_prompt_length``: prompts longer than this many tokens keep their last
    ``max_prompt_length`` tokens (the most recent turns); None: no prompt limit (only
    ``max_length`` applies to prompt + response).
    """

    learning_rate: float = 5e-7
    beta: float = 0.1
    loss_type: DPOLoss = "sigmoid"
    max_prompt_length: int | None = None


_POSITIVE_INTS = ("max_length", "per_device_train_batch_size", "per_device_eval_batch_size",
                  "gradient_accumulation_steps", "save_steps", "save_total_limit", "logging_steps",
                  "eval_steps", "max_prompt_length")


def validate(cfg: SFTConfig | DPOConfig) -> SFTConfig | DPOConfig:
    """Check values the types cannot (ranges, non-empty data); return ``cfg``."""
    for name in _POSITIVE_INTS:
        value = getattr(cfg, name, None)
        if value is not None and value < 1:
            raise ConfigError(f"{name}: must be at least 1, got {value}")
    if not cfg.model:
        raise ConfigError("model: required (the Hugging Face folder to train)")
    if not cfg.out:
        raise ConfigError("out: required (the output folder)")
    if not cfg.data:
        raise ConfigError("data: at least one file is required")
    for key in ("data", "eval_data"):
        for i, item in enumerate(getattr(cfg, key)):
            if not item.path:
                raise ConfigError(f"{key}[{i}].path: empty")
            if not (math.isfinite(item.weight) and item.weight > 0):
                raise ConfigError(f"{key}[{i}].weight: must be a positive number, got {item.weight}")
    if cfg.max_steps == 0 or cfg.max_steps < -1:
        raise ConfigError(f"max_steps: must be -1 (use num_train_epochs) or at least 1, got {cfg.max_steps}")
    if cfg.max_steps == -1 and not cfg.num_train_epochs > 0:
        raise ConfigError(f"num_train_epochs: must be positive, got {cfg.num_train_epochs}")
    if not 0.0 <= cfg.warmup_ratio < 1.0:
        raise ConfigError(f"warmup_ratio: must be in [0, 1), got {cfg.warmup_ratio}")
    for name in ("learning_rate",):
        if not getattr(cfg, name) > 0:
            raise ConfigError(f"{name}: must be positive, got {getattr(cfg, name)}")
    for name in ("weight_decay", "max_grad_norm"):
        if getattr(cfg, name) < 0:
            raise ConfigError(f"{name}: must not be negative, got {getattr(cfg, name)}")
    if isinstance(cfg, DPOConfig):
        if not cfg.beta > 0:
            raise ConfigError(f"beta: must be positive, got {cfg.beta}")
        if cfg.max_prompt_length is not None and cfg.max_prompt_length >= cfg.max_length:
            raise ConfigError(f"max_prompt_length: {cfg.max_prompt_length} leaves no room for a response "
                              f"within max_length {cfg.max_length}")
    return cfg


def parse_data_spec(text: str | os.PathLike) -> DataFile:
    """``FILE`` or ``FILE:WEIGHT`` (the command line's and YAML's short form) -> :class:`DataFile`.

    The part after the last ``:`` is a weight only when it reads as a number, so a path
    with a colon and no weight stays whole.
    """
    text = os.fspath(text)
    head, sep, tail = text.rpartition(":")
    if sep and head:
        try:
            weight = float(tail)
        except ValueError:
            return DataFile(text)
        return DataFile(head, weight)
    return DataFile(text)


def _normalise_data(data: dict[str, Any]) -> dict[str, Any]:
    """Data lists may hold ``"FILE[:WEIGHT]"`` strings; make them mappings for the loader."""
    for key in ("data", "eval_data"):
        items = data.get(key)
        if isinstance(items, (str, dict)):
            items = [items]
        if isinstance(items, list):
            data[key] = [dataclasses.asdict(parse_data_spec(x)) if isinstance(x, (str, os.PathLike)) else x
                         for x in items]
    return data


def stage_class(kind: str) -> type:
    if kind == "sft":
        return SFTConfig
    if kind == "dpo":
        return DPOConfig
    raise ConfigError(f"stage {kind!r}: expected one of {', '.join(STAGES)}")


def load_stage_config(kind: str, path: str | os.PathLike | None, overrides: list[str] | None = None, *,
                      model: str | None = None, out: str | None = None,
                      data: list[str | DataFile] | None = None,
                      eval_data: list[str | DataFile] | None = None) -> SFTConfig | DPOConfig:
    """The ``kind`` ("sft" or "dpo") stage config: YAML ``path`` (or defaults), then
    ``key=value`` ``overrides``, then the command line's ``model``, ``out``, ``data`` and
    ``eval_data`` (each replaces the value before it when given); type-checked and validated.

    Errors are :class:`ConfigError` naming the key, prefixed with the file when the
    value came from it.
    """
    from megatron_sfm.config.loader import dataclass_from_dict, read_yaml

    cls = stage_class(kind)
    raw = _normalise_data(dict(read_yaml(path))) if path is not None else {}
    if path is not None:
        # type-check the file alone (keys, types), so its errors name the file; the
        # required keys it leaves to the command line get stand-ins here
        stand_ins = {"model": "", "out": "", "data": []}
        dataclass_from_dict(cls, {**{k: v for k, v in stand_ins.items() if k not in raw}, **raw}, source=path)
    merged = _normalise_data(apply_stage_overrides(raw, list(overrides or [])))
    for key, value in (("model", model), ("out", out)):
        if value is not None:
            merged[key] = os.fspath(value)
    for key, value in (("data", data), ("eval_data", eval_data)):
        if value is not None:
            merged[key] = [dataclasses.asdict(v if isinstance(v, DataFile) else parse_data_spec(v)) for v in value]
    for key, flag in (("model", "the model folder argument"), ("out", "--out"), ("data", "--data")):
        if key not in merged:
            raise ConfigError(f"{key}: required (give {flag}, or `{key}:` in --config)")
    return validate(dataclass_from_dict(cls, merged))


def apply_stage_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key=value`` strings (values parsed as YAML) to a stage config's plain data.

    Stage configs are flat, so a key is one field name (``learning_rate=1e-5``,
    ``data=[a.jsonl, b.jsonl:2]``); the type check comes after, in the loader.
    """
    from megatron_sfm.config.loader import parse_override

    data = dict(data)
    for text in overrides:
        path, value = parse_override(text)
        if len(path) != 1:
            raise ConfigError(f"{'.'.join(path)}: stage configs have no sections (override {text!r})")
        data[path[0]] = value
    return data


"""Run one post-training stage (SFT or DPO) with TRL into an output folder that can resume.

The output folder ``out``::

    out/
      config.json, model.safetensors, generation_config.json,   the final model (when finished)
      tokenizer.json, tokenizer_config.json, chat_template.jinja
      posttrain.json        manifest: written last; its presence means "finished"
      posttrain-run.json    while unfinished: stage, resolved config, data hashes
      checkpoints/checkpoint-N/   TRL (transformers Trainer) checkpoints, removed when
                                   finished unless keep_checkpoints
      tensorboard/          metrics (loss, learning rate, grad norm, DPO rewards ...)

Rules, checked on every rank before anything is written (``docs/posttraining.md``):

- missing or empty ``out``: a new run;
- ``out`` holding an unfinished run of the same stage with the same config and data
  (``posttrain-run.json``): resume from its last complete checkpoint (one whose
  ``trainer_state.json``, the Trainer's last write, is present and readable), also after
  ``kill -9``; incomplete checkpoint folders are deleted first. No checkpoint yet: start
  again in place;
- a finished run (``posttrain.json``), an unfinished run of the other stage or with a
  different config or changed data, or any other non-empty folder: refused, unless
  ``--overwrite`` (the old folder is moved aside, then deleted, and a new run starts).

The final model is saved into ``out/.final.tmp/`` and its files are then renamed into
``out`` one by one, ``posttrain.json`` last, so a folder without ``posttrain.json`` is
never taken for a finished model (and a kill during the renames resumes from the last
checkpoint, which trains no further steps and saves again).

Checksum provenance: ``posttrain.json`` records in ``source_model`` whether the weights
the source model came from were verified against their Megatron checkpoint's content
checksums (:func:`recorded_checksums`: an export's ``sfm_export.json``, or for SFT -> DPO
the SFT run's own record; null = unknown), so ``sfm eval`` can report it for the output.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megatron_sfm.errors import SfmError
from megatron_sfm.config.loader import config_to_dict
from megatron_sfm.posttrain.config import DPOConfig, SFTConfig, validate

MANIFEST = "posttrain.json"
RUN_MARKER = "posttrain-run.json"
CHECKPOINTS = "checkpoints"
TENSORBOARD = "tensorboard"
FINAL_TMP = ".final.tmp"
MANIFEST_FORMAT = "sfm-posttrain/1"
# keys that may change between a run and its resumption (they do not change the weights)
RESUME_FREE = ("out", "save_steps", "save_total_limit", "keep_checkpoints", "logging_steps", "eval_steps",
               "per_device_eval_batch_size")
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
_DROPPED = ("training_args.bin",)  # the Trainer's pickle of its arguments: posttrain.json records the config


def run_sft(cfg: SFTConfig, progress: bool = True, *, overwrite: bool = False, signal_flag=None) -> Path:
    """Supervised fine-tuning of ``cfg.model`` on ``cfg.data``; returns the final model folder (``cfg.out``).

    ``signal_flag``: an installed :class:`~megatron_sfm.training.signals.SignalFlag`; when
    it is set on any rank the run saves a checkpoint and raises
    :class:`~megatron_sfm.posttrain.stop.StoppedForRequeue` (see ``posttrain/stop.py``).
    """
    if not isinstance(cfg, SFTConfig):
        raise TypeError(f"run_sft needs an SFTConfig, got {type(cfg).__name__}")
    return _run("sft", cfg, progress, overwrite, signal_flag)


def run_dpo(cfg: DPOConfig, progress: bool = True, *, overwrite: bool = False, signal_flag=None) -> Path:
    """DPO of ``cfg.model`` (its own frozen copy is the reference) on ``cfg.data``; returns ``cfg.out``.
    ``signal_flag`` as in :func:`run_sft`."""
    if not isinstance(cfg, DPOConfig):
        raise TypeError(f"run_dpo needs a DPOConfig, got {type(cfg).__name__}")
    return _run("dpo", cfg, progress, overwrite, signal_flag)


# --- output folder ------------------------------------------------------------------------


@dataclass
class OutputPlan:
    """What to do with ``out``: "fresh" (missing/empty), "overwrite", or "resume"."""

    mode: str
    checkpoint: Path | None = None  # the checkpoint to resume from (mode "resume")
    incomplete: tuple[Path, ...] = ()  # checkpoint folders a kill left unfinished


def complete_checkpoints(folder: Path) -> tuple[list[Path], list[Path]]:
    """(complete checkpoints by step, incomplete ones) in ``folder`` (``checkpoint-N`` folders)."""
    done, partial = [], []
    if not folder.is_dir():
        return done, partial
    found = sorted((int(m.group(1)), p) for p in folder.iterdir()
                   if p.is_dir() and (m := _CHECKPOINT_RE.match(p.name)))
    for step, path in found:
        try:
            state = json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
            ok = int(state.get("global_step", -1)) == step
        except (OSError, ValueError, AttributeError):
            ok = False
        (done if ok else partial).append(path)
    return done, partial


def _config_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    keys = sorted((set(old) | set(new)) - set(RESUME_FREE))
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]


def plan_output(out: Path, stage: str, record: dict[str, Any], overwrite: bool) -> OutputPlan:
    """Decide what to do with ``out`` (module docstring); reads only, raises SfmError to refuse."""
    from megatron_sfm.utils.io import check_output_dir
    from megatron_sfm.utils.readers import read_json

    check_output_dir(out, overwrite=True)  # a file at the path is an error even with --overwrite
    if not out.exists() or not any(out.iterdir()):
        return OutputPlan("fresh")
    if overwrite:
        return OutputPlan("overwrite")
    if (out / MANIFEST).is_file():
        done = read_json(out / MANIFEST)
        raise SfmError(f"--out {out}/: holds a finished {done.get('stage', '?')} run ({MANIFEST}); "
                       f"pass --overwrite to replace it")
    if not (out / RUN_MARKER).is_file():
        check_output_dir(out, overwrite=False)  # "not empty (holds an earlier run); pass --overwrite"
    old = read_json(out / RUN_MARKER)
    if old.get("stage") != stage:
        raise SfmError(f"--out {out}/: holds an unfinished {old.get('stage', '?')} run, not {stage}; "
                       f"pass --overwrite to replace it")
    diffs = _config_differences(old.get("config") or {}, record["config"])
    hashes = {d["path"]: d["sha256"] for d in old.get("data", []) + old.get("eval_data", [])}
    for d in record["data"] + record["eval_data"]:
        if d["path"] in hashes and hashes[d["path"]] != d["sha256"]:
            diffs.append(f"{d['path']}: changed since the run started (sha256 differs)")
    if diffs:
        raise SfmError(f"--out {out}/: holds an unfinished {stage} run with a different config or data "
                       f"({'; '.join(diffs)}); rerun with the same settings to resume it, or pass --overwrite "
                       f"to start over")
    done, partial = complete_checkpoints(out / CHECKPOINTS)
    return OutputPlan("resume", done[-1] if done else None, tuple(partial))


def _prepare_out(out: Path, plan: OutputPlan, record: dict[str, Any]) -> None:
    """Carry out ``plan`` (main process only): clear, mark, drop incomplete checkpoints."""
    from megatron_sfm.utils.io import write_json

    if plan.mode == "overwrite":
        aside = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
        os.replace(out, aside / out.name)  # the old run leaves `out` in one step
        shutil.rmtree(aside, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    for path in plan.incomplete:
        shutil.rmtree(path, ignore_errors=True)
    tmp = out / FINAL_TMP
    if tmp.exists():
        shutil.rmtree(tmp)
    write_json(out / RUN_MARKER, record)


# --- records --------------------------------------------------------------------------------


def _resolve(path: str) -> str:
    return str(Path(path).expanduser().resolve())


def run_record(stage: str, cfg: SFTConfig | DPOConfig, data_stats, eval_stats) -> dict[str, Any]:
    """The stage, its config with resolved paths, and the data files (sizes, hashes)."""
    config = config_to_dict(cfg)
    config["model"], config["out"] = _resolve(cfg.model), _resolve(cfg.out)
    for key in ("data", "eval_data"):
        config[key] = [{"path": _resolve(d["path"]), "weight": d["weight"]} for d in config[key]]

    def files(stats):
        return [{**s.as_dict(), "path": _resolve(s.path)} for s in stats]

    return {"stage": stage, "config": config, "data": files(data_stats), "eval_data": files(eval_stats)}


def _source_model(model_dir: Path, checksums: dict[str, Any]) -> dict[str, Any]:
    """``source_model`` of posttrain.json; ``checksums``: :func:`_source_checksums`, read
    before the model was loaded."""
    from megatron_sfm.posttrain.data import file_digest

    info: dict[str, Any] = {"path": str(model_dir.resolve())}
    info["config_sha256"] = file_digest(model_dir / "config.json")[1]
    info["weights"] = {p.name: p.stat().st_size for p in sorted(model_dir.glob("*.safetensors"))}
    if (model_dir / MANIFEST).is_file():  # readable: _source_checksums read it first
        info["posttrain_stage"] = read_manifest(model_dir).get("stage")
    return {**info, **checksums}


def read_source_checksums(out: str | os.PathLike) -> bool | None:
    """``source_model.checksums_verified`` of the ``posttrain.json`` in ``out`` (a finished
    run): True/False as its run recorded it, None (unknown) when null or absent (its source
    had no record, or the file was written before the field existed). An unreadable file,
    or another value, is an :class:`SfmError` naming the file and key."""
    path = Path(out) / MANIFEST
    source = read_manifest(out).get("source_model")
    if not isinstance(source, dict):
        raise SfmError(f"{path}: source_model: expected a mapping, got {type(source).__name__}")
    from megatron_sfm.utils.readers import optional_bool

    return optional_bool(source.get("checksums_verified"), f"{path}: source_model.checksums_verified")


def recorded_checksums(model_dir: str | os.PathLike) -> tuple[bool | None, Path | None]:
    """``(checksums_verified, the file it was read from)`` for a Hugging Face folder: whether
    the Megatron checkpoint its weights come from had every file's content checksum verified
    when it was read. One rule, for ``sfm posttrain`` and ``sfm eval``:

    - an ``sfm posttrain`` output (it has ``posttrain.json``): that run's record of its own
      source (:func:`read_source_checksums`), so SFT -> DPO carries the export's value;
    - else an ``sfm convert to-hf`` folder (``sfm_export.json``): the export's record
      (:func:`~megatron_sfm.conversion.exporter.read_export_checksums`);
    - else ``(None, None)``: unknown (a Hub download, another tool's ``save_pretrained``).

    True/False/None as recorded (None: unknown, a record older than the field). A malformed
    record is an :class:`SfmError` naming the file and key.
    """
    folder = Path(model_dir)
    if (folder / MANIFEST).exists():
        return read_source_checksums(folder), folder / MANIFEST
    from megatron_sfm.conversion.exporter import EXPORT_RECORD, read_export_checksums

    if (folder / EXPORT_RECORD).exists():
        return read_export_checksums(folder), folder / EXPORT_RECORD
    return None, None


def _source_checksums(model_dir: Path) -> dict[str, Any]:
    """The source model's checksum provenance for posttrain.json (:func:`recorded_checksums`):
    ``checksums_verified`` and ``checksums_record``, the file it was read from (null: none)."""
    value, record = recorded_checksums(model_dir)
    return {"checksums_verified": value, "checksums_record": None if record is None else str(record.resolve())}


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("trl", "transformers", "accelerate", "datasets", "torch", "megatron-sfm"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def _check_inputs_outside(out: Path, model_dir: Path, data: list[str]) -> None:
    """Refuse an output folder that is, or holds, an input (``--overwrite`` or the final
    renames would destroy it)."""
    root = out.expanduser().resolve()
    for what, path in [("the model folder", model_dir)] + [("data file", Path(d)) for d in data]:
        p = path.expanduser().resolve()
        if p == root or root in p.parents:
            raise SfmError(f"--out {out}: is or holds {what} {path}; choose another output folder")


def _check_model_dir(path: str) -> Path:
    model_dir = Path(path)
    if not model_dir.is_dir():
        raise SfmError(f"model {model_dir}: no such folder (a Hugging Face folder, e.g. from sfm convert to-hf)")
    if not (model_dir / "config.json").is_file():
        raise SfmError(f"model {model_dir}/: no config.json (not a Hugging Face model folder)")
    return model_dir


# --- trainer --------------------------------------------------------------------------------


def _trl_args(stage: str, cfg: SFTConfig | DPOConfig, out: Path, progress: bool, has_eval: bool):
    import torch

    bf16 = torch.cuda.is_available() if cfg.bf16 is None else cfg.bf16
    common: dict[str, Any] = {
        "output_dir": str(out / CHECKPOINTS),
        "num_train_epochs": cfg.num_train_epochs,
        "max_steps": cfg.max_steps,
        "per_device_train_batch_size": cfg.per_device_train_batch_size,
        "per_device_eval_batch_size": cfg.per_device_eval_batch_size or cfg.per_device_train_batch_size,
        "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "learning_rate": cfg.learning_rate,
        "lr_scheduler_type": cfg.lr_scheduler_type,
        "warmup_steps": cfg.warmup_ratio,  # a float below 1 is a fraction of the steps (transformers 5)
        "weight_decay": cfg.weight_decay,
        "max_grad_norm": cfg.max_grad_norm,
        "seed": cfg.seed,
        "data_seed": cfg.seed,
        "save_strategy": "steps",
        "save_steps": cfg.save_steps,
        "save_total_limit": cfg.save_total_limit,
        "logging_strategy": "steps",
        "logging_steps": cfg.logging_steps,
        "logging_first_step": True,
        "eval_strategy": "steps" if has_eval else "no",
        "eval_steps": (cfg.eval_steps or cfg.save_steps) if has_eval else None,
        "bf16": bf16,
        "fp16": False,
        "report_to": ["tensorboard"],
        "dataloader_pin_memory": torch.cuda.is_available(),
        # without CUDA, say so: only then do torchrun/accelerate processes form a gloo group (else each trains alone)
        "use_cpu": not torch.cuda.is_available(),
        "ddp_find_unused_parameters": False,  # every GPT-NeoX parameter takes part in each step
        "disable_tqdm": not progress,
        "max_length": cfg.max_length,
    }
    from transformers import TrainingArguments

    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    # transformers 5.25 renamed gradient_checkpointing (TRL's default: on) to activation_checkpointing
    common["activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"] = \
        cfg.gradient_checkpointing
    if stage == "sft":
        from trl import SFTConfig as TRLSFTConfig

        return TRLSFTConfig(**common, assistant_only_loss=cfg.assistant_only_loss, packing=False)
    from trl import DPOConfig as TRLDPOConfig

    return TRLDPOConfig(**common, beta=cfg.beta, loss_type=[cfg.loss_type])


def _dpo_trainer_class(max_prompt_length: int | None):
    from trl import DPOTrainer

    class PromptLimitedDPOTrainer(DPOTrainer):
        """TRL's DPOTrainer, plus ``max_prompt_length``: a longer prompt keeps its last N tokens.

        (TRL 1.x dropped its own ``max_prompt_length``; this restores its meaning after
        TRL's tokenization, before the collator applies ``max_length``.)
        """

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            dataset = super()._prepare_dataset(dataset, processing_class, args, dataset_name)
            if max_prompt_length is not None:
                dataset = dataset.map(_keep_prompt_end, fn_kwargs={"limit": max_prompt_length})
            return dataset

    return PromptLimitedDPOTrainer


def _keep_prompt_end(example: dict[str, Any], limit: int) -> dict[str, Any]:
    return {"prompt_ids": example["prompt_ids"][-limit:]}


def _session_callback():
    from transformers import TrainerCallback

    class SessionCallback(TrainerCallback):
        """Steps run by this process session (a resumed run starts after the checkpoint's step)."""

        def __init__(self):
            self.first_step: int | None = None
            self.steps = 0

        def on_train_begin(self, args, state, control, **kwargs):
            self.first_step = state.global_step

        def on_step_end(self, args, state, control, **kwargs):
            self.steps += 1

    return SessionCallback()


def _route_tensorboard(trainer, folder: Path) -> None:
    """TensorBoard events into ``out/tensorboard`` (transformers 5 has no logging_dir argument)."""
    from transformers.integrations import TensorBoardCallback

    for cb in trainer.callback_handler.callbacks:
        if isinstance(cb, TensorBoardCallback):
            cb.logging_dir = str(folder)


def _load_model(model_dir: Path, cfg):
    import torch
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": torch.float32}  # fp32 master weights; bf16 is autocast (cfg.bf16)
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    return AutoModelForCausalLM.from_pretrained(str(model_dir), **kwargs)


def _restore_weights(trainer, checkpoint: Path) -> None:
    """Load a checkpoint's weights into the model through ``from_pretrained``'s key mapping.

    transformers 5's ``Trainer._load_from_checkpoint`` reads ``model.safetensors`` with
    ``load_state_dict(strict=False)`` and no key conversion, so a weight that
    ``save_pretrained`` wrote under its original name (GPT-NeoX's ``embed_out``, which the
    model calls ``lm_head``) is silently not restored (huggingface/transformers#43701).
    Loading it here first makes the resumed model whole; the Trainer's own load then
    rewrites the same values for the other keys. FSDP checkpoints (sharded, the
    module's own keys) do not need it.
    """
    import torch
    from transformers import AutoModelForCausalLM

    if getattr(trainer, "is_fsdp_enabled", False) or getattr(trainer, "is_deepspeed_enabled", False):
        return
    if not any((checkpoint / n).is_file() for n in ("model.safetensors", "model.safetensors.index.json")):
        return
    saved = AutoModelForCausalLM.from_pretrained(str(checkpoint), dtype=torch.float32)
    model = trainer.accelerator.unwrap_model(trainer.model)
    model.load_state_dict(saved.state_dict(), strict=True)
    del saved


def _build_trainer(stage, cfg, args, model_dir, model, tokenizer, setup, train_ds, eval_ds):
    if stage == "sft":
        from trl import SFTTrainer

        return SFTTrainer(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                          processing_class=tokenizer)
    ref_model = None
    if setup.changed_model:
        # TRL would load the reference from the folder, without our new token rows: build it the same way
        from megatron_sfm.posttrain.chat_template import resize_for_tokens

        ref_model = _load_model(model_dir, cfg)
        resize_for_tokens(ref_model, dataclasses.replace(setup))
    return _dpo_trainer_class(cfg.max_prompt_length)(model=model, ref_model=ref_model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                       processing_class=tokenizer)


# --- the run ----------------------------------------------------------------------------------


def _run(stage: str, cfg: SFTConfig | DPOConfig, progress: bool, overwrite: bool, flag=None) -> Path:
    from megatron_sfm.posttrain.data import load_examples, to_dataset

    started = time.time()
    validate(cfg)
    model_dir = _check_model_dir(cfg.model)
    out = Path(cfg.out)
    # every input is checked before a model is loaded or anything written
    checksums = _source_checksums(model_dir)  # the source's checksum record; a malformed one is refused
    examples, data_stats = load_examples(cfg.data, stage, cfg.seed)
    eval_examples, eval_stats = load_examples(cfg.eval_data, stage, cfg.seed) if cfg.eval_data else (None, [])
    record = run_record(stage, cfg, data_stats, eval_stats)
    _check_inputs_outside(out, model_dir, [d.path for d in cfg.data + cfg.eval_data])

    from accelerate import PartialState
    from transformers import AutoTokenizer

    from megatron_sfm.posttrain.chat_template import (
        check_template_for_loss,
        prepare_chat_model,
    )

    args = _trl_args(stage, cfg, out, progress, bool(eval_examples))
    _ = args.device  # sets up the process group the Trainer will use (transformers does it lazily)
    state = args.distributed_state or PartialState()
    plan = plan_output(out, stage, record, overwrite)  # on every rank, before any rank writes
    state.wait_for_everyone()
    if state.is_main_process:
        _prepare_out(out, plan, record)
    state.wait_for_everyone()

    with _quiet(not progress):
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        model = _load_model(model_dir, cfg)
        setup = prepare_chat_model(model, tokenizer, cfg.chat_template)
        if stage == "sft":
            check_template_for_loss(tokenizer, cfg.assistant_only_loss)
        train_ds = to_dataset(examples)
        eval_ds = to_dataset(eval_examples) if eval_examples else None
        trainer = _build_trainer(stage, cfg, args, model_dir, model, tokenizer, setup, train_ds, eval_ds)
    _route_tensorboard(trainer, out / TENSORBOARD)
    if not progress:
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)
    session = _session_callback()
    trainer.add_callback(session)
    if plan.checkpoint is not None:
        with _quiet(not progress):
            _restore_weights(trainer, plan.checkpoint)

    stopper = None
    if flag is not None:
        from megatron_sfm.posttrain.stop import StoppedForRequeue, stop_on_signal_callback

        if flag.any_rank():  # all ranks together, before the first step
            raise StoppedForRequeue(flag.name(), None, None)
        stopper = stop_on_signal_callback(flag)
        trainer.add_callback(stopper)
    with _quiet(not progress):
        trainer.train(resume_from_checkpoint=str(plan.checkpoint) if plan.checkpoint else None)
    if stopper is not None and stopper.stopped_at is not None:
        raise StoppedForRequeue(flag.name(), stopper.stopped_at, f"checkpoint-{stopper.stopped_at}")

    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    evals = [e["eval_loss"] for e in trainer.state.log_history if "eval_loss" in e]
    manifest = {
        "format": MANIFEST_FORMAT,
        "stage": stage,
        "config": record["config"],
        "source_model": _source_model(model_dir, checksums),
        "data": record["data"],
        "eval_data": record["eval_data"],
        "chat_template": setup.as_dict(),
        "versions": _versions(),
        "train": {
            "global_step": trainer.state.global_step,
            "epoch": trainer.state.epoch,
            "final_train_loss": losses[-1] if losses else None,
            "final_eval_loss": evals[-1] if evals else None,
            "resumed_from": plan.checkpoint.name if plan.checkpoint else None,
            "first_step_this_session": session.first_step,
            "steps_this_session": session.steps,
            "world_size": state.num_processes,
            "bf16": bool(args.bf16),
            "session_seconds": round(time.time() - started, 1),
        },
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if stage == "dpo":
        last = next((e for e in reversed(trainer.state.log_history) if any("margin" in k for k in e)), None)
        if last is not None:
            manifest["train"]["final_logged_metrics"] = {k: v for k, v in last.items() if k != "step"}
    with _quiet(not progress):
        _save_final(trainer, out, manifest, state, keep_checkpoints=cfg.keep_checkpoints)
    if state.is_main_process:
        print_summary(manifest, out)
    return out


@contextlib.contextmanager
def _quiet(enabled: bool):
    """Without progress: no datasets / transformers progress bars (restored afterwards)."""
    if not enabled:
        yield
        return
    import datasets
    from transformers.utils import logging as hf_logging

    ds_on, hf_on = datasets.is_progress_bar_enabled(), hf_logging.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if ds_on:
            datasets.enable_progress_bars()
        if hf_on:
            hf_logging.enable_progress_bar()


def _save_final(trainer, out: Path, manifest: dict[str, Any], state, *, keep_checkpoints: bool) -> None:
    from megatron_sfm.utils.io import write_json

    tmp = out / FINAL_TMP
    if state.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    state.wait_for_everyone()
    if getattr(trainer, "is_fsdp_enabled", False):
        # sharded checkpoints resume fast; the final model must be one full state dict
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
    trainer.save_model(str(tmp))  # every rank (FSDP gathers); the main process writes, tokenizer included
    state.wait_for_everyone()
    if state.is_main_process:
        for name in _DROPPED:
            (tmp / name).unlink(missing_ok=True)
        write_json(tmp / MANIFEST, manifest)
        names = sorted(p.name for p in tmp.iterdir() if p.name != MANIFEST)
        for name in names + [MANIFEST]:  # the manifest last: its presence means "finished"
            target = out / name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            os.replace(tmp / name, target)
        tmp.rmdir()
        (out / RUN_MARKER).unlink(missing_ok=True)
        if not keep_checkpoints:
            shutil.rmtree(out / CHECKPOINTS, ignore_errors=True)
    state.wait_for_everyone()


def read_manifest(out: str | os.PathLike) -> dict[str, Any]:
    """The ``posttrain.json`` of a finished run (SfmError when missing or unreadable)."""
    from megatron_sfm.utils.readers import read_json

    return read_json(Path(out) / MANIFEST)


def print_summary(manifest: dict[str, Any], out: Path) -> None:
    """One screen: what was trained, on what, for how long, and where it is."""
    from rich.console import Console
    from rich.table import Table

    train = manifest["train"]
    cfg = manifest["config"]
    chat = manifest["chat_template"]
    table = Table(title=f"sfm posttrain {manifest['stage']}: done", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    table.add_row("model", manifest["source_model"]["path"])
    table.add_row("source checksums", checksums_text(manifest["source_model"]))
    table.add_row("output", str(out))
    resumed = f" (resumed from {train['resumed_from']})" if train["resumed_from"] else ""
    table.add_row("steps", f"{train['global_step']} optimizer steps, epoch {train['epoch'] or 0:.2f}{resumed}")
    if train["final_train_loss"] is not None:
        table.add_row("final train loss", f"{train['final_train_loss']:.4f}")
    if train.get("final_eval_loss") is not None:
        table.add_row("final eval loss", f"{train['final_eval_loss']:.4f}")
    for key, value in (train.get("final_logged_metrics") or {}).items():
        if "margin" in key or "accuracies" in key:
            table.add_row(key, f"{value:.4f}")
    for item in manifest["data"]:
        table.add_row("data", f"{item['path']}  x{item['weight']:g}: {item['examples']} of {item['rows']} examples")
    added = ", ".join(chat["added_tokens"]) or "none"
    rows = chat["embedding_rows"]
    table.add_row("chat template", f"{chat['template']}; tokens added: {added}; embedding rows {rows[0]} -> {rows[1]}")
    table.add_row("precision", "bf16 mixed" if train["bf16"] else "fp32")
    table.add_row("lr / batch", f"{cfg['learning_rate']:g}, {cfg['per_device_train_batch_size']} x "
                  f"{cfg['gradient_accumulation_steps']} accum x {train['world_size']} processes")
    table.add_row("time", f"{train['session_seconds']:.0f} s this session")
    table.add_row("metrics", f"tensorboard --logdir {out / TENSORBOARD}")
    Console().print(table)


def checksums_text(source: dict[str, Any]) -> str:
    """The source model's checksum provenance in words, for the summary."""
    value, record = source.get("checksums_verified"), source.get("checksums_record")
    if record is None:
        return "unknown (the model folder has no sfm_export.json or posttrain.json)"
    words = {True: "verified", False: "not verified", None: "unknown (not recorded)"}[value]
    return f"{words}, from {record}"

"""Capability evaluation through lm-evaluation-harness's Python API (extra ``eval``).

``run_capabilities`` calls ``lm_eval.simple_evaluate`` with the ``hf`` model on a
Hugging Face folder (our Megatron checkpoints are converted first, as for propensity)
and returns ``{"path", "tasks": {task: {metric: value, metric_stderr: value}}, ...}``,
the section stored under ``capabilities.<label>`` in results.json.

Bundled local task: ``sfm_local_qa`` (resources/tasks/sfm_local_qa), a small
multiple-choice set written for this project so that the harness runs offline in
tests. Its YAML names its data folder with a placeholder; at run time the YAML is copied
into a temporary include folder with the absolute path of the installed data filled in,
so the task works from any working directory and from a non-editable install. Extra local tasks: pass folders
with ``include_paths``. Hub datasets (arc_easy, piqa, mmlu, ...) need network access or
a pre-filled Hugging Face cache; offline mode is switched on unless the caller set
``HF_DATASETS_OFFLINE`` / ``HF_HUB_OFFLINE`` already.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from megatron_sfm.errors import SfmError

LOCAL_TASK = "sfm_local_qa"
_DATA_PLACEHOLDER = "__SFM_DATA_DIR__"


def bundled_tasks_dir() -> Path:
    return Path(str(resources.files("megatron_sfm.evaluation") / "resources" / "tasks"))


@contextlib.contextmanager
def _materialised_tasks() -> Iterator[Path]:
    """A temporary copy of the bundled task folder with absolute data paths filled in."""
    src = bundled_tasks_dir()
    tmp = Path(tempfile.mkdtemp(prefix="sfm-eval-tasks-"))
    try:
        for task_dir in sorted(p for p in src.iterdir() if p.is_dir()):
            dst = tmp / task_dir.name
            dst.mkdir()
            for f in task_dir.iterdir():
                if f.suffix == ".yaml":
                    text = f.read_text(encoding="utf-8").replace(_DATA_PLACEHOLDER, str(task_dir.resolve()))
                    (dst / f.name).write_text(text, encoding="utf-8")
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _import_lm_eval():
    for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        os.environ.setdefault(var, "1")
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ModuleNotFoundError as exc:
        raise SfmError(
            f"capabilities need lm-evaluation-harness ({exc.name} missing): pip install 'megatron-sfm[eval]'"
        ) from None
    return lm_eval, TaskManager


def _metrics(task_result: dict[str, Any]) -> dict[str, float]:
    """{"acc,none": v, "acc_stderr,none": s, "alias": ...} -> {"acc": v, "acc_stderr": s}."""
    out: dict[str, float] = {}
    for key, value in task_result.items():
        if key == "alias" or not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        name, _, filt = key.partition(",")
        if filt and filt != "none":
            name = f"{name}[{filt}]"
        out[name] = float(value)
    return out


def evaluate_hf_folder(
    folder: str | os.PathLike,
    tasks: Sequence[str],
    *,
    limit: float | None = None,
    batch_size: int = 8,
    num_fewshot: int | None = None,
    device: str | None = None,
    dtype: str | None = None,
    include_paths: Sequence[str | os.PathLike] = (),
) -> dict[str, Any]:
    """Run lm-eval tasks on one Hugging Face folder; returns the report section for it."""
    from megatron_sfm.evaluation.models import pick_device_dtype

    lm_eval, TaskManager = _import_lm_eval()
    dev, dt = pick_device_dtype(device, dtype)
    for p in include_paths:
        if not Path(p).is_dir():
            raise SfmError(f"{p}: --include-path is not a folder")
    with _materialised_tasks() as bundled:
        paths = [str(bundled)] + [str(p) for p in include_paths]
        # Indexing lm-eval's own task folders takes tens of seconds: skip it when every
        # requested task is local.
        manager = TaskManager(include_path=paths, include_defaults=False)
        if any(t not in set(manager.all_tasks) for t in tasks):
            manager = TaskManager(include_path=paths)
        unknown = [t for t in tasks if t not in set(manager.all_tasks)]
        if unknown:
            raise SfmError(f"unknown lm-eval task {unknown[0]!r} (bundled local task: {LOCAL_TASK})")
        try:
            out = lm_eval.simple_evaluate(
                model="hf",
                model_args={"pretrained": str(folder), "dtype": str(dt).removeprefix("torch."), "device": str(dev)},
                tasks=list(tasks),
                num_fewshot=num_fewshot,
                batch_size=batch_size,
                limit=limit,
                task_manager=manager,
                log_samples=False,
                bootstrap_iters=1000,
            )
        except ConnectionError as exc:
            raise SfmError(f"lm-eval needs data it cannot reach offline: {exc}") from None
    if out is None:  # non-zero ranks in a distributed run
        return {}
    results = dict(out["results"])
    return {
        "path": str(folder),
        "device": str(dev),
        "dtype": str(dt).removeprefix("torch."),
        "limit": limit,
        "num_fewshot": num_fewshot,
        "lm_eval_version": getattr(lm_eval, "__version__", None),
        "n_samples": {t: v.get("effective", v.get("original")) for t, v in (out.get("n-samples") or {}).items()},
        "tasks": {t: _metrics(results[t]) for t in tasks if t in results},
    }


def run_capabilities(model_arg: str, tasks: Sequence[str], tokenizer_path: str | None = None,
                     verify_checksums: bool = True, **kwargs: Any) -> tuple[str, dict[str, Any]]:
    """Evaluate ``PATH`` or ``LABEL=PATH`` (HF folder or Megatron checkpoint): (label, section).

    ``tokenizer_path``: tokenizer folder handed to the on-the-fly export of a checkpoint.
    ``verify_checksums=False``: a checkpoint is loaded without hashing its files; the
    section then records ``checksums_verified: false``. An ``sfm convert to-hf`` folder's
    section records what its sfm_export.json says, an ``sfm posttrain`` output's what its
    posttrain.json says, each with ``checksums_source`` (``checkpoint_record``).
    """
    from megatron_sfm.evaluation.models import (
        checkpoint_record,
        hf_folder_for,
        parse_model_specs,
    )

    if not tasks:
        raise SfmError("--tasks: no task named")
    (spec,) = parse_model_specs([model_arg])
    with hf_folder_for(spec.path, tokenizer_path, verify_checksums=verify_checksums) as folder:
        record = checkpoint_record(spec.path, verify_checksums)  # before lm-eval runs
        section = evaluate_hf_folder(folder, tasks, **kwargs)
    section["path"] = str(spec.path)
    section.update(record)
    return spec.label, section

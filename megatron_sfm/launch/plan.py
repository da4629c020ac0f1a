"""Multi-stage plans: stages submitted as SLURM jobs that each wait for the previous one.

A plan is a YAML file with a top-level ``stages`` list (a run config never has that key)::

    name: pythia-1b-filtered          # optional; default: the file's stem
    stages:
      - name: pretrain
        config: pretrain.yaml         # relative to the plan file
        overrides: [training.train_iters=143000]
        slurm: {nodes: 64, time: "48:00:00"}
      - name: midtrain
        config: midtrain.yaml         # e.g. checkpoint.init_from: <pretrain's checkpoint.save>
        slurm: {time: "12:00:00"}

Stage ``k`` is submitted with ``--dependency=afterok:<job id of stage k-1>`` and
``--kill-on-invalid-dep=yes``: it starts only once the previous stage finished with exit
code 0 (a requeue does not count as finished) and is cancelled if that stage fails.
``slurm`` keys are :class:`SlurmOptions` fields (less ``job_name`` and ``dependency``,
which the plan sets); they override the command-line flags, which act as defaults for
every stage. Command-line ``key=value`` overrides apply to every stage after the stage's
own. The file is read with the run config's typed loader
(:func:`megatron_sfm.config.loader.dataclass_from_dict` into :class:`Plan`): unknown keys
(with a "did you mean"), wrong types and missing keys are errors naming the key.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megatron_sfm.errors import SfmError
from megatron_sfm.launch.slurm import (
    DEFAULT_LOG_DIR,
    PreparedJob,
    SlurmOptions,
    new_job_dir,
    prepare_job,
    safe_name,
    submit,
    write_job,
)

# set by the plan for each stage, not by its ``slurm:`` block
_PLAN_SET = ("dependency", "job_name")
_REQUIRED = {"nodes": "--nodes", "gpus_per_node": "--gpus-per-node", "time": "--time"}


def _partial(cls: type, name: str, exclude: tuple[str, ...], **types: Any) -> type:
    """A dataclass with ``cls``'s fields (less ``exclude``), each optional with default None;
    ``types`` replaces a field's type."""
    hints = {**typing.get_type_hints(cls), **types}
    return dataclasses.make_dataclass(
        name, [(f.name, hints[f.name] | None, field(default=None)) for f in dataclasses.fields(cls)
               if f.name not in exclude],
        namespace={"__module__": __name__,
                   "__doc__": f"{cls.__name__} fields, each optional (None: not set here)."})


# A stage's ``slurm:`` block: any SlurmOptions field but the job name and dependency.
# ``env`` values may be YAML scalars (``OMP_NUM_THREADS: 4``), exported as text (null: "");
# an int ``time`` is YAML 1.1's reading of an unquoted 04:00:00, refused by load_plan.
StageSlurm = _partial(SlurmOptions, "StageSlurm", _PLAN_SET, time=str | int,
                      env=dict[str, str | int | float | bool | None])


@dataclass
class PlanStage:
    """One stage of a plan: a run config submitted as one job."""

    name: str
    config: Path  # relative paths are taken relative to the plan file
    # an empty ``overrides:`` or ``slurm:`` (YAML null) means none: load_plan sets [] / StageSlurm()
    overrides: list[str] | None = None
    slurm: StageSlurm | None = None


@dataclass
class Plan:
    """A plan file: its stages, in order, and a name (default: the file's stem)."""

    stages: list[PlanStage]
    name: str | None = None


def is_plan(data: dict) -> bool:
    return isinstance(data, dict) and "stages" in data


def load_plan(path: str | Path, data: dict | None = None) -> Plan:
    """Read and check a plan file with the typed config loader (errors name the file and the key)."""
    from megatron_sfm.config.loader import dataclass_from_dict, read_yaml

    path = Path(path)
    plan = dataclass_from_dict(Plan, read_yaml(path) if data is None else data, path)
    if plan.name is None:
        plan.name = path.stem
    if not plan.name:
        raise SfmError(f"{path}: name: expected a non-empty string")
    if not plan.stages:
        raise SfmError(f"{path}: stages: expected a non-empty list of stages")
    seen: set[str] = set()
    for i, stage in enumerate(plan.stages):
        where = f"{path}: stages[{i}]"
        if not stage.name:
            raise SfmError(f"{where}.name: expected a non-empty string")
        if stage.name in seen:
            raise SfmError(f"{where}.name: stage {stage.name!r} appears twice")
        seen.add(stage.name)
        stage.overrides = stage.overrides or []
        stage.slurm = stage.slurm or StageSlurm()
        if isinstance(stage.slurm.time, int):
            # YAML 1.1 reads an unquoted 04:00:00 as the sexagesimal integer 14400
            raise SfmError(f"{where}.slurm.time: {stage.slurm.time!r} is not a string; "
                           'quote it, e.g. time: "04:00:00"')
        for text in stage.overrides:
            if "=" not in text:
                raise SfmError(f"{where}.overrides: {text!r} is not KEY=VALUE")
        if not stage.config.is_absolute():
            stage.config = path.parent / stage.config
    return plan


def _stage_options(defaults: dict[str, Any], stage: PlanStage | None, job_name: str,
                   where: str) -> SlurmOptions:
    """CLI defaults (None: not given), overridden by the stage's ``slurm`` block, as checked
    :class:`SlurmOptions`; ``env`` is merged, the stage's entries winning."""
    from megatron_sfm.config.loader import dataclass_from_dict

    merged = {k: v for k, v in defaults.items() if v is not None}
    env = dict(defaults.get("env") or {})
    if stage is not None:
        for f in dataclasses.fields(stage.slurm):
            value = getattr(stage.slurm, f.name)
            if f.name == "env":
                env.update(value or {})
            elif value is not None:
                merged[f.name] = value
    merged["env"] = {str(k): "" if v is None else str(v) for k, v in env.items()}
    for key, flag in _REQUIRED.items():
        if merged.get(key) is None:
            hint = f" (or slurm.{key} in {where})" if stage is not None else ""
            raise SfmError(f"{flag}: required{hint}")
    merged["job_name"] = job_name
    return dataclass_from_dict(SlurmOptions, merged, where)


def prepare_launch(config: str | Path, overrides: list[str], defaults: dict[str, Any], *,
                   log_dir: str | Path = DEFAULT_LOG_DIR, workdir: Path | None = None,
                   command_for: Any = None) -> list[PreparedJob]:
    """Render the job(s) for a run config or a plan file; nothing is written or submitted.

    ``defaults`` holds the command-line SLURM options (None: not given). A plan's stages
    come back in order; each job's dependency is filled in by :func:`submit_jobs`.
    ``command_for(config_path) -> list[str]`` replaces the trainer command (tests).
    """
    from megatron_sfm.config.loader import read_yaml

    data = read_yaml(config)
    log_dir = Path(log_dir)
    jobs: list[PreparedJob] = []
    base_name = defaults.get("job_name")
    if not is_plan(data):
        name = base_name or Path(config).stem
        opts = _stage_options(defaults, None, name, str(config))
        job_dir = new_job_dir(log_dir, name)
        command = command_for(job_dir / "config.yaml") if command_for else None
        jobs.append(prepare_job(opts, str(config), overrides, job_dir=job_dir, workdir=workdir, command=command))
        return jobs
    plan = load_plan(config, data)
    plan_dir = new_job_dir(log_dir, base_name or plan.name)
    for k, stage in enumerate(plan.stages):
        where = f"{config}: stages[{k}]"
        name = f"{base_name or plan.name}-{stage.name}"
        opts = _stage_options(defaults, stage, name, where)
        if k > 0:
            opts.dependency = f"afterok:<job id of stage {plan.stages[k - 1].name}>"
        job_dir = plan_dir / f"{k + 1}-{safe_name(stage.name)}"
        command = command_for(job_dir / "config.yaml") if command_for else None
        if not stage.config.is_file():
            raise SfmError(f"{where}.config: {stage.config} not found")
        try:
            jobs.append(prepare_job(opts, str(stage.config), stage.overrides + list(overrides), job_dir=job_dir,
                                    workdir=workdir, command=command))
        except SfmError as exc:
            raise SfmError(f"{where} ({stage.name}): {exc}") from None
    return jobs


def submit_jobs(jobs: list[PreparedJob], sbatch: str = "sbatch") -> list[str]:
    """Write each job's folder and submit it; stage k waits (afterok) for stage k-1."""
    ids: list[str] = []
    for k, job in enumerate(jobs):
        if k > 0:  # the previous job id is known only now
            job.options.dependency = f"afterok:{ids[-1]}"
            job.render()
        write_job(job)
        try:
            ids.append(submit(job, sbatch=sbatch))
        except SfmError as exc:
            if ids:
                raise SfmError(f"{exc} (already submitted: job(s) {', '.join(ids)}; scancel them if needed)") from None
            raise
    return ids

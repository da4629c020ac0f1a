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
``slurm`` keys are :class:`SlurmOptions` fields; they override the command-line flags,
which act as defaults for every stage. Command-line ``key=value`` overrides apply to every
stage after the stage's own.
"""

from __future__ import annotations

import dataclasses
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

# stage ``slurm:`` keys; the job name and dependency are set by the plan
_SLURM_KEYS = {f.name for f in dataclasses.fields(SlurmOptions)} - {"dependency", "job_name"}
_REQUIRED = {"nodes": "--nodes", "gpus_per_node": "--gpus-per-node", "time": "--time"}


@dataclass
class Stage:
    name: str
    config: Path
    overrides: list[str] = field(default_factory=list)
    slurm: dict[str, Any] = field(default_factory=dict)


@dataclass
class Plan:
    name: str
    path: Path
    stages: list[Stage]


def is_plan(data: dict) -> bool:
    return isinstance(data, dict) and "stages" in data


def load_plan(path: str | Path, data: dict | None = None) -> Plan:
    """Read and check a plan file (errors name the file and the key)."""
    from megatron_sfm.config.loader import read_yaml

    path = Path(path)
    data = read_yaml(path) if data is None else data
    unknown = set(data) - {"name", "stages"}
    if unknown:
        raise SfmError(f"{path}: unknown key(s) {', '.join(sorted(unknown))}; a plan has name and stages")
    stages_raw = data.get("stages")
    if not isinstance(stages_raw, list) or not stages_raw:
        raise SfmError(f"{path}: stages: expected a non-empty list of stages")
    name = data.get("name", path.stem)
    if not isinstance(name, str) or not name:
        raise SfmError(f"{path}: name: expected a string")
    stages, seen = [], set()
    for i, raw in enumerate(stages_raw):
        where = f"{path}: stages[{i}]"
        if not isinstance(raw, dict):
            raise SfmError(f"{where}: expected a mapping with name and config")
        extra = set(raw) - {"name", "config", "overrides", "slurm"}
        if extra:
            raise SfmError(f"{where}: unknown key(s) {', '.join(sorted(extra))}")
        sname, cfg = raw.get("name"), raw.get("config")
        if not isinstance(sname, str) or not sname:
            raise SfmError(f"{where}.name: expected a string")
        if sname in seen:
            raise SfmError(f"{where}.name: stage {sname!r} appears twice")
        seen.add(sname)
        if not isinstance(cfg, str) or not cfg:
            raise SfmError(f"{where}.config: expected the path of a run config")
        cfg_path = Path(cfg)
        if not cfg_path.is_absolute():
            cfg_path = path.parent / cfg_path
        overrides = raw.get("overrides") or []
        if not isinstance(overrides, list) or not all(isinstance(o, str) and "=" in o for o in overrides):
            raise SfmError(f"{where}.overrides: expected a list of KEY=VALUE strings")
        slurm = raw.get("slurm") or {}
        if not isinstance(slurm, dict):
            raise SfmError(f"{where}.slurm: expected a mapping")
        bad = set(slurm) - _SLURM_KEYS
        if bad:
            raise SfmError(f"{where}.slurm: unknown key(s) {', '.join(sorted(bad))}; "
                           f"known: {', '.join(sorted(_SLURM_KEYS))}")
        stages.append(Stage(name=sname, config=cfg_path, overrides=list(overrides), slurm=dict(slurm)))
    return Plan(name=name, path=path, stages=stages)


def _stage_options(defaults: dict[str, Any], stage: Stage | None, job_name: str, where: str) -> SlurmOptions:
    """CLI defaults, overridden by the stage's ``slurm`` block, as checked :class:`SlurmOptions`."""
    merged = dict(defaults)
    env = dict(defaults.get("env") or {})
    if stage is not None:
        for key, value in stage.slurm.items():
            if key == "env":
                if not isinstance(value, dict):
                    raise SfmError(f"{where}.slurm.env: expected a mapping of NAME: value")
                env.update({str(k): "" if v is None else str(v) for k, v in value.items()})
            else:
                merged[key] = value
    merged["env"] = env
    for key, flag in _REQUIRED.items():
        if merged.get(key) is None:
            hint = f" (or slurm.{key} in {where})" if stage is not None else ""
            raise SfmError(f"{flag}: required{hint}")
    if not isinstance(merged["time"], str):
        # YAML 1.1 reads an unquoted 04:00:00 as the sexagesimal integer 14400
        raise SfmError(f"{where}.slurm.time: {merged['time']!r} is not a string; quote it, e.g. time: \"04:00:00\"")
    if merged.get("exclusive") is not None and not isinstance(merged["exclusive"], bool):
        raise SfmError(f"{where}.slurm.exclusive: expected true or false")
    merged["job_name"] = job_name
    return SlurmOptions(**{k: v for k, v in merged.items() if v is not None})


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

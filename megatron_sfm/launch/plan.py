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
      - name: convert
        kind: convert                 # sfm convert to-hf MODEL --out OUT [args...]
        model: runs/midtrain
        out: hf/base
        args: [--dtype, bf16]
      - name: sft
        kind: posttrain-sft           # accelerate launch (FSDP) ... sfm posttrain sft MODEL ...
        config: posttrain-sft.yaml
        model: hf/base
        data: [sft.jsonl]
        out: runs/sft
        slurm: {nodes: 2, time: "08:00:00"}
      - name: eval
        kind: eval                    # sfm eval propensity MODEL... --out OUT --persona none,ai ...
        model: [sft=runs/sft]
        out: results/sft
        mode: generate
        personas: [none, ai]

Stage kinds (``kind``, default ``train``): ``train``, ``convert``, ``posttrain-sft``,
``posttrain-dpo``, ``eval``; each takes its own keys (:data:`STAGE_KEYS`); what each
runs is :mod:`megatron_sfm.launch.stages`.

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
import difflib
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megatron_sfm.errors import SfmError
from megatron_sfm.launch.slurm import (
    DEFAULT_LOG_DIR,
    JOB_SCRIPT,
    PreparedJob,
    SlurmOptions,
    _check_text,
    new_job_dir,
    prepare_job,
    safe_name,
    submit,
    validate_options,
    write_job,
)
from megatron_sfm.launch.stages import (
    CONVERT,
    DEFAULT_ACCELERATE_CONFIG,
    EVAL,
    POSTTRAIN_DPO,
    POSTTRAIN_KINDS,
    POSTTRAIN_SFT,
    SINGLE_PROCESS_KINDS,
    STAGE_KINDS,
    TRAIN,
    PosttrainStep,
    SingleStep,
    check_command,
    check_personas,
    check_posttrain_config,
    convert_command,
    eval_command,
    posttrain_command,
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
    """One stage of a plan, submitted as one job; ``kind`` says what it runs, and which of
    the other keys it takes (:data:`STAGE_KEYS`; load_plan refuses the others)."""

    name: str
    kind: str = TRAIN
    # train: the run config; posttrain-*: the posttrain config (--config). Relative to the plan file.
    config: Path | None = None
    # train: run-config key=value; posttrain-*: key=value for the posttrain command
    overrides: list[str] | None = None
    # convert: the checkpoint folder; posttrain-*: the model folder; eval: one or more
    # PATH or LABEL=PATH. Run-time paths: relative to the working folder, like ``out``.
    model: str | list[str] | None = None
    data: str | list[str] | None = None  # posttrain-*: FILE[:WEIGHT] ... (none: the config's data)
    out: str | None = None  # convert, posttrain-*, eval: the output folder
    accelerate_config: Path | None = None  # posttrain-* with GPUs; relative to the plan file
    mode: str | None = None  # eval: --mode
    personas: list[str] | None = None  # eval: every model under each (--persona P,P...); none: the default
    args: list[str] | None = None  # convert, posttrain-*, eval: more options of the command, verbatim
    # an empty ``overrides:`` or ``slurm:`` (YAML null) means none: load_plan sets [] / StageSlurm()
    slurm: StageSlurm | None = None


# kind -> (required keys, optional keys), besides name, kind and slurm
STAGE_KEYS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    TRAIN: (("config",), ("overrides",)),
    CONVERT: (("model", "out"), ("args",)),
    POSTTRAIN_SFT: (("model", "out"), ("config", "data", "overrides", "accelerate_config", "args")),
    POSTTRAIN_DPO: (("model", "out"), ("config", "data", "overrides", "accelerate_config", "args")),
    EVAL: (("model", "out"), ("mode", "personas", "args")),
}
_ALWAYS = ("name", "kind", "slurm")


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
        _check_stage_keys(stage, where)
        stage.overrides = stage.overrides or []
        stage.slurm = stage.slurm or StageSlurm()
        if isinstance(stage.slurm.time, int):
            # YAML 1.1 reads an unquoted 04:00:00 as the sexagesimal integer 14400
            raise SfmError(f"{where}.slurm.time: {stage.slurm.time!r} is not a string; "
                           'quote it, e.g. time: "04:00:00"')
        for text in stage.overrides:
            if "=" not in text:
                raise SfmError(f"{where}.overrides: {text!r} is not KEY=VALUE")
        if stage.config is not None and not stage.config.is_absolute():
            stage.config = path.parent / stage.config
        if stage.accelerate_config is not None and not stage.accelerate_config.is_absolute():
            stage.accelerate_config = path.parent / stage.accelerate_config
    return plan


def _check_stage_keys(stage: PlanStage, where: str) -> None:
    """The kind is known, has its required keys and no key of another kind; ``model`` and
    ``data`` become lists; no value holds a control character. Errors name the key."""
    if stage.kind not in STAGE_KINDS:
        close = difflib.get_close_matches(stage.kind, STAGE_KINDS, n=1, cutoff=0.5)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise SfmError(f"{where}.kind: unknown kind {stage.kind!r}{hint}; known: {', '.join(STAGE_KINDS)}")
    required, optional = STAGE_KEYS[stage.kind]
    for f in dataclasses.fields(stage):
        value = getattr(stage, f.name)
        if f.name in required and value in (None, [], ""):
            raise SfmError(f"{where}.{f.name}: required (kind: {stage.kind})")
        if f.name not in _ALWAYS + required + optional and value is not None:
            keys = ", ".join(_ALWAYS + required + optional)
            raise SfmError(f"{where}.{f.name}: not a key of kind {stage.kind} (its keys: {keys})")
    for key in ("model", "data"):
        value = getattr(stage, key)
        if isinstance(value, str):
            setattr(stage, key, [value])
    if stage.kind in (CONVERT, *POSTTRAIN_KINDS) and len(stage.model) != 1:
        raise SfmError(f"{where}.model: kind {stage.kind} takes one model folder, got {len(stage.model)}")
    if stage.personas is not None:
        if not stage.personas:
            raise SfmError(f"{where}.personas: expected a non-empty list (or no key: the default persona)")
        twice = sorted({p for p in stage.personas if stage.personas.count(p) > 1})
        if twice:
            raise SfmError(f"{where}.personas: {twice[0]!r} appears twice")
    for key in ("model", "data", "out", "mode", "personas", "args", "config", "accelerate_config"):
        value = getattr(stage, key)
        for text in value if isinstance(value, list) else [value]:
            if text is not None:
                _check_text(f"{where}.{key}", str(text))


def _stage_options(defaults: dict[str, Any], stage: PlanStage | None, job_name: str,
                   where: str) -> SlurmOptions:
    """CLI defaults (None: not given), overridden by the stage's ``slurm`` block, as checked
    :class:`SlurmOptions`; ``env`` is merged, the stage's entries winning.

    One-process kinds (convert, eval) run on one node: the command-line ``--nodes`` and
    ``--nproc-per-node`` do not apply to them, and their ``slurm`` block may not set them.
    Neither does ``--nproc-per-node`` to a post-training stage on a CPU job (one process).
    """
    from megatron_sfm.config.loader import dataclass_from_dict

    merged = {k: v for k, v in defaults.items() if v is not None}
    if stage is not None and stage.kind in SINGLE_PROCESS_KINDS:
        for key, fixed in (("nodes", 1), ("nproc_per_node", None)):
            value = getattr(stage.slurm, key)
            if value is not None and value != 1:
                raise SfmError(f"{where}.slurm.{key}: kind {stage.kind} runs one process on one node; "
                               f"remove {key}")
            merged[key] = fixed
    env = dict(defaults.get("env") or {})
    if stage is not None:
        for f in dataclasses.fields(stage.slurm):
            value = getattr(stage.slurm, f.name)
            if f.name == "env":
                env.update(value or {})
            elif value is not None:
                merged[f.name] = value
    merged["env"] = {str(k): "" if v is None else str(v) for k, v in env.items()}
    if stage is not None and stage.kind in POSTTRAIN_KINDS and merged.get("gpus_per_node") == 0 \
            and stage.slurm.nproc_per_node is None:
        merged.pop("nproc_per_node", None)  # the CLI's CPU training ranks: one process here
    for key, flag in _REQUIRED.items():
        if merged.get(key) is None:
            hint = f" (or slurm.{key} in {where})" if stage is not None else ""
            raise SfmError(f"{flag}: required{hint}")
    merged["job_name"] = job_name
    return dataclass_from_dict(SlurmOptions, merged, where)


def prepare_launch(config: str | Path, overrides: list[str], defaults: dict[str, Any], *,
                   log_dir: str | Path = DEFAULT_LOG_DIR, workdir: Path | None = None,
                   command_for: Any = None, from_stage: str | None = None) -> list[PreparedJob]:
    """Render the job(s) for a run config or a plan file; nothing is written or submitted.

    ``defaults`` holds the command-line SLURM options (None: not given). A plan's stages
    come back in order; each job's dependency is filled in by :func:`submit_jobs`.
    ``from_stage``: start the plan at that stage (the earlier ones ran already: what they
    wrote must exist, as for any model a stage reads). ``command_for(config_path) ->
    list[str]`` replaces the trainer command (tests).
    """
    from megatron_sfm.config.loader import read_yaml

    data = read_yaml(config)
    log_dir = Path(log_dir)
    jobs: list[PreparedJob] = []
    base_name = defaults.get("job_name")
    if not is_plan(data):
        if from_stage is not None:
            raise SfmError(f"--from-stage {from_stage!r}: {config} is a run config, not a plan (no stages:)")
        name = base_name or Path(config).stem
        opts = _stage_options(defaults, None, name, str(config))
        job_dir = new_job_dir(log_dir, name)
        command = command_for(job_dir / "config.yaml") if command_for else None
        jobs.append(prepare_job(opts, str(config), overrides, job_dir=job_dir, workdir=workdir, command=command))
        return jobs
    plan = load_plan(config, data)
    plan_dir = new_job_dir(log_dir, base_name or plan.name)
    workdir = Path(workdir or Path.cwd()).absolute()
    names = [stage.name for stage in plan.stages]
    if from_stage is not None and from_stage not in names:
        raise SfmError(f"--from-stage {from_stage!r}: {config} has no such stage (stages: {', '.join(names)})")
    first = names.index(from_stage) if from_stage is not None else 0
    outputs: list[Path] = []  # what earlier stages of this submission write: checkpoint.save / out
    for k, stage in enumerate(plan.stages):
        if k < first:
            continue  # ran before: its outputs are on disk (checked where a later stage reads them)
        where = f"{config}: stages[{k}]"
        name = f"{base_name or plan.name}-{stage.name}"
        opts = _stage_options(defaults, stage, name, where)
        if k > first:
            opts.dependency = f"afterok:<job id of stage {plan.stages[k - 1].name}>"
        job_dir = plan_dir / f"{k + 1}-{safe_name(stage.name)}"
        if stage.config is not None and not stage.config.is_file():
            raise SfmError(f"{where}.config: {stage.config} not found")
        if stage.kind != TRAIN:
            _check_models_exist_or_come_first(stage, outputs, workdir, where)
            job = _prepare_stage_job(stage, opts, job_dir=job_dir, workdir=workdir, where=where)
        else:
            command = command_for(job_dir / "config.yaml") if command_for else None
            try:
                # command-line key=value overrides are run-config keys: train stages only
                job = prepare_job(opts, str(stage.config), stage.overrides + list(overrides), job_dir=job_dir,
                                  workdir=workdir, command=command)
            except SfmError as exc:
                raise SfmError(f"{where} ({stage.name}): {exc}") from None
        jobs.append(job)
        written = job.checkpoint_dir if stage.kind == TRAIN else stage.out
        if written:
            outputs.append(_absolute(written, workdir))
    return jobs


def _absolute(path: str | Path, workdir: Path) -> Path:
    """``path`` taken relative to ``workdir`` (unless absolute), without ``..``."""
    return Path(os.path.normpath(workdir / path))


def _model_paths(stage: PlanStage, workdir: Path) -> list[str]:
    """The paths in ``model`` (eval's ``LABEL=PATH`` split as ``sfm eval`` does)."""
    if stage.kind != EVAL:
        return list(stage.model)
    paths = []
    for arg in stage.model:
        label, sep, path = arg.partition("=")
        paths.append(path if sep and label and not (workdir / arg).exists() else arg)
    return paths


def _check_models_exist_or_come_first(stage: PlanStage, outputs: list[Path], workdir: Path, where: str) -> None:
    """Each model path exists now, or is (inside) what an earlier stage writes: a plan
    whose stages do not connect is refused before anything waits in the queue. The same
    holds for a posttrain stage's ``data`` files."""
    checks = [("model", path) for path in _model_paths(stage, workdir)]
    if stage.kind in POSTTRAIN_KINDS and stage.data:
        from megatron_sfm.posttrain.config import parse_data_spec

        checks += [("data", parse_data_spec(spec).path) for spec in stage.data]
    for key, path in checks:
        full = _absolute(path, workdir)
        if full.exists() or any(full == o or full.is_relative_to(o) for o in outputs):
            continue
        earlier = ", ".join(str(o.relative_to(workdir)) if o.is_relative_to(workdir) else str(o)
                            for o in outputs) or "none"
        raise SfmError(f"{where}.{key}: {path!r} does not exist and no earlier stage writes it "
                       f"(earlier stages write: {earlier})")


def _prepare_stage_job(stage: PlanStage, opts: SlurmOptions, *, job_dir: Path, workdir: Path,
                       where: str) -> PreparedJob:
    """Render the job of a convert, posttrain-* or eval stage (nothing written)."""
    args = list(stage.args or [])
    # absolute: the job may run in another folder than the plan's
    config = _absolute(stage.config, Path.cwd()) if stage.config is not None else None
    if stage.kind in POSTTRAIN_KINDS:
        accelerate_config = None
        if not opts.cpu_only:
            accelerate_config = _absolute(stage.accelerate_config or DEFAULT_ACCELERATE_CONFIG, Path.cwd())
            if not accelerate_config.is_file():
                raise SfmError(f"{where}.accelerate_config: {accelerate_config} not found")
        elif opts.nodes != 1 or opts.procs_per_node != 1:
            raise SfmError(f"{where}.slurm: kind {stage.kind} on a CPU job (gpus_per_node 0) runs one process "
                           f"on one node, not {opts.nodes} x {opts.procs_per_node}; set nodes: 1 "
                           "(and nproc_per_node: 1), or give it GPUs")
        if "--overwrite" in args and opts.max_requeues > 0:
            raise SfmError(f"{where}.args: --overwrite would start {stage.kind} over on every requeue "
                           "instead of resuming; remove it (or set slurm.max_requeues: 0)")
        check_posttrain_config(stage.kind, config, stage.overrides, stage.model[0], stage.out, stage.data,
                               f"{where} ({stage.name})")
        commands = [posttrain_command(stage.kind, stage.model[0], stage.data, stage.out, config, args,
                                      stage.overrides)]
        step = PosttrainStep(stage.kind, commands[0], stage.out, accelerate_config)
    elif stage.kind == CONVERT:
        commands = [convert_command(stage.model[0], stage.out, args)]
        step = SingleStep(stage.kind, commands)
    else:
        if stage.personas:
            check_personas(stage.personas, where)
        commands = [eval_command(stage.model, stage.out, stage.mode, stage.personas, args)]
        step = SingleStep(stage.kind, commands)
    for command in commands:
        check_command(command, f"{where} ({stage.name})")
    validate_options(opts, requeueable=step.requeueable)
    job_dir = Path(job_dir).absolute()
    job = PreparedJob(name=opts.job_name, job_dir=job_dir, script_path=job_dir / JOB_SCRIPT, config_path=None,
                      config_text=None, options=opts, command=commands[0],
                      checkpoint_dir=stage.out if stage.kind in POSTTRAIN_KINDS else None, workdir=workdir,
                      source_config=str(config) if config else None, overrides=list(stage.overrides),
                      kind=stage.kind, step=step)
    try:
        job.render()
    except SfmError as exc:
        raise SfmError(f"{where} ({stage.name}): {exc}") from None
    return job


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

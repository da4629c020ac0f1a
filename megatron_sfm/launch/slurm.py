"""Render and submit the SLURM batch job that runs ``sfm train`` on N nodes.

One job = one folder (``<log_dir>/<name>-<YYYYmmdd-HHMMSS>``) holding the resolved config
(``config.yaml``), the rendered batch script (``job.sbatch``), ``launch.json`` (the sbatch
command line, options and job id) and SLURM's output (``slurm-<jobid>.out``, appended to
across requeues).

Shape of the job (see docs/launch.md for the reasons):

* scheduler options go on the ``sbatch`` command line as an argument vector (no shell,
  no ``#SBATCH`` parsing of user text); the script repeats them in a comment;
* the batch shell runs one ``srun`` task per node: the node agent
  (``megatron_sfm.launch.node``) starting ``torchrun`` with a c10d rendezvous on the
  first node of the allocation;
* ``--signal=B:USR1@GRACE``: the batch shell receives USR1 GRACE seconds before the time
  limit, asks the step to stop (SIGWINCH to the step, which the node agent turns into
  SIGUSR1 for the trainer ranks), and requeues the job (``scontrol requeue``) once the
  step has ended, at most ``max_requeues`` times; the trainer saves and exits with
  ``REQUEUE_EXIT_CODE``;
* the trainer resumes from ``checkpoint.save`` by itself, so a requeued job reruns the
  very same command.

The script is the template ``templates/sbatch.sh`` (package data) filled in by
:func:`render_script`. Every user-supplied value that reaches it is ``shlex.quote``d;
values with control characters (newlines) are refused, job folder included.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megatron_sfm.errors import SfmError
from megatron_sfm.launch.exit_codes import REQUEUE_EXIT_CODE

# Network and NCCL defaults written into every script. A value already present in the
# submitting environment (sbatch exports it) wins; ``--env KEY=VALUE`` wins over both.
DEFAULT_ENV: dict[str, str] = {
    "NCCL_DEBUG": "WARN",
    # a collective that times out aborts the process instead of hanging until the time limit
    "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
    # Megatron-Core's TP/SP communication overlap needs kernels queued in issue order
    "CUDA_DEVICE_MAX_CONNECTIONS": "1",
    "PYTHONUNBUFFERED": "1",
    "PYTHONFAULTHANDLER": "1",
}

JOB_SCRIPT = "job.sbatch"
CONFIG_FILE = "config.yaml"
LAUNCH_RECORD = "launch.json"
DEFAULT_LOG_DIR = "runs/slurm"


def resignal_seconds(grace: int) -> int:
    """How often the batch shell repeats a stop request until the step ends: every 60 s, but at
    least four times within the grace period (and not more often than every 5 s)."""
    return max(5, min(60, grace // 4))


_TIME_RE = re.compile(r"^(?:(\d+)-)?(\d+):(\d{2}):(\d{2})$")
_ENV_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_SAFE_NAME_RE = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass
class SlurmOptions:
    """What to ask SLURM for, and how to start the trainer on each node.

    ``gpus_per_node == 0`` means a CPU job: ``nproc_per_node`` processes per node (default
    1) talk over gloo, GPUs are hidden (``CUDA_VISIBLE_DEVICES=``) and each process gets
    one CPU unless ``cpus_per_task`` says otherwise. With GPUs, ``nproc_per_node``
    defaults to ``gpus_per_node`` (one process per GPU, NCCL) and the node is requested
    whole (``exclusive``).
    """

    nodes: int
    gpus_per_node: int
    time: str  # [D-]HH:MM:SS
    nproc_per_node: int | None = None
    cpus_per_task: int | None = None  # CPUs per node-task (= per torchrun)
    partition: str | None = None
    account: str | None = None
    job_name: str = "sfm"
    container: str | None = None  # pyxis/enroot image for srun --container-image
    container_mounts: str | None = None
    max_requeues: int = 3
    signal_grace: int = 300  # seconds before the time limit at which USR1 arrives
    exclusive: bool | None = None  # None: True with GPUs, False on CPU
    env: dict[str, str] = field(default_factory=dict)
    python: str | None = None  # interpreter on the nodes; None: this one (or python3 in a container)
    rdzv_port: int | None = None  # None: 20000 + job id % 20000
    dependency: str | None = None  # e.g. "afterok:1234" (set by plans)

    # -- derived values -------------------------------------------------------------
    @property
    def cpu_only(self) -> bool:
        return self.gpus_per_node == 0

    @property
    def procs_per_node(self) -> int:
        if self.nproc_per_node is not None:
            return self.nproc_per_node
        return 1 if self.cpu_only else self.gpus_per_node

    @property
    def world_size(self) -> int:
        return self.nodes * self.procs_per_node

    @property
    def whole_node(self) -> bool:
        return (not self.cpu_only) if self.exclusive is None else self.exclusive

    @property
    def task_cpus(self) -> int | None:
        """CPUs per node-task asked of sbatch; None: the whole node (``$SLURM_CPUS_ON_NODE``)."""
        if self.cpus_per_task is not None:
            return self.cpus_per_task
        return self.procs_per_node if self.cpu_only else None

    @property
    def interpreter(self) -> str:
        if self.python:
            return self.python
        return "python3" if self.container else sys.executable


def time_limit_seconds(text: str, flag: str = "--time") -> int:
    """``[D-]HH:MM:SS`` -> seconds; :class:`SfmError` naming ``flag`` otherwise."""
    m = _TIME_RE.match(text or "")
    if not m:
        raise SfmError(f"{flag}: {text!r} is not [D-]HH:MM:SS (e.g. 04:00:00 or 2-00:00:00)")
    days, hours, minutes, seconds = (int(g) if g else 0 for g in m.groups())
    if minutes >= 60 or seconds >= 60:
        raise SfmError(f"{flag}: {text!r} has minutes or seconds >= 60")
    total = ((days * 24 + hours) * 60 + minutes) * 60 + seconds
    if total <= 0:
        raise SfmError(f"{flag}: {text!r} is zero")
    return total


def _check_text(flag: str, value: str | None) -> None:
    if value is None:
        return
    if not isinstance(value, str) or value == "":
        raise SfmError(f"{flag}: must be a non-empty string, got {value!r}")
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise SfmError(f"{flag}: {value!r} contains a control character (newline, tab, ...); not allowed")


def validate_options(opts: SlurmOptions, *, requeueable: bool = True) -> None:
    """Raise :class:`SfmError` (naming the flag) for options SLURM or torchrun would reject.

    ``requeueable=False`` (one-process plan stages: no time-limit warning, no requeue) skips
    the check of ``signal_grace`` against the time limit.
    """
    for flag, value, low in (("--nodes", opts.nodes, 1), ("--gpus-per-node", opts.gpus_per_node, 0),
                             ("--max-requeues", opts.max_requeues, 0), ("--signal-grace", opts.signal_grace, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise SfmError(f"{flag}: must be an integer >= {low}, got {value!r}")
    for flag, value in (("--nproc-per-node", opts.nproc_per_node), ("--cpus-per-task", opts.cpus_per_task)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise SfmError(f"{flag}: must be an integer >= 1, got {value!r}")
    if opts.rdzv_port is not None and not (1024 <= opts.rdzv_port <= 65535):
        raise SfmError(f"--rdzv-port: must be in 1024..65535, got {opts.rdzv_port}")
    limit = time_limit_seconds(opts.time)
    if requeueable and opts.signal_grace >= limit:
        raise SfmError(
            f"--signal-grace: {opts.signal_grace} s is not shorter than --time {opts.time} ({limit} s)")
    for flag, value in (("--job-name", opts.job_name), ("--partition", opts.partition),
                        ("--account", opts.account), ("--container", opts.container),
                        ("--container-mounts", opts.container_mounts), ("--python", opts.python),
                        ("--dependency", opts.dependency)):
        _check_text(flag, value)
    for key, value in opts.env.items():
        if not _ENV_KEY_RE.match(key):
            raise SfmError(f"--env: {key!r} is not a valid environment variable name")
        _check_text(f"--env {key}", value if value != "" else "x")


def safe_name(name: str) -> str:
    """A folder-name-safe form of a job name (``[A-Za-z0-9._-]``, at most 64 characters)."""
    cleaned = _SAFE_NAME_RE.sub("_", name).strip("._") or "job"
    return cleaned[:64]


def _output_pattern(job_dir: Path) -> str:
    """sbatch --output: ``job_dir/slurm-%j.out``, with ``%`` in the folder doubled so that
    SLURM expands only our ``%j`` (the job id, the same across requeues)."""
    return str(job_dir).replace("%", "%%") + "/slurm-%j.out"


def sbatch_argv(opts: SlurmOptions, job_dir: Path, workdir: Path, script: Path, *,
                requeueable: bool = True) -> list[str]:
    """The sbatch command line (argument vector; no shell ever parses it).

    ``requeueable``: ``--requeue`` and the time-limit warning ``--signal=B:USR1@GRACE``;
    otherwise ``--no-requeue`` (one-process plan stages, docs/launch.md).
    """
    argv = ["sbatch", "--parsable", f"--job-name={opts.job_name}", f"--nodes={opts.nodes}",
            "--ntasks-per-node=1"]
    if not opts.cpu_only:
        argv.append(f"--gpus-per-node={opts.gpus_per_node}")
    if opts.task_cpus is not None:
        argv.append(f"--cpus-per-task={opts.task_cpus}")
    if opts.whole_node:
        argv.append("--exclusive")
    argv.append(f"--time={opts.time}")
    if opts.partition:
        argv.append(f"--partition={opts.partition}")
    if opts.account:
        argv.append(f"--account={opts.account}")
    argv += [f"--output={_output_pattern(job_dir)}", "--open-mode=append"]
    argv += ["--requeue", f"--signal=B:USR1@{opts.signal_grace}"] if requeueable else ["--no-requeue"]
    argv.append(f"--chdir={workdir}")
    if opts.dependency:
        argv += [f"--dependency={opts.dependency}", "--kill-on-invalid-dep=yes"]
    argv.append(str(script))
    return argv


def trainer_command(config_path: Path) -> list[str]:
    """What torchrun starts on every rank: ``python -m megatron_sfm.cli train CONFIG``."""
    return ["-m", "megatron_sfm.cli", "train", str(config_path)]


SCRIPT_TEMPLATE = "templates/sbatch.sh"  # package data of megatron_sfm.launch: multi-node, requeueable
SINGLE_TEMPLATE = "templates/single.sh"  # one-process plan stages (convert, eval)
_PLACEHOLDER_RE = re.compile(r"\{\{([a-z_]+)\}\}")


def fill_template(template: str, values: dict[str, str | list[str]]) -> str:
    """Replace each ``{{name}}`` in ``template`` with ``values[name]``, verbatim.

    A placeholder alone on its line takes a list of lines (indented like the placeholder;
    no lines removes the line). Every placeholder needs a value and every value a
    placeholder (a mismatch is a bug: ``KeyError``). Nothing is quoted here: the caller
    passes shell text in which every user-supplied value is already ``shlex.quote``d.
    """
    used: set[str] = set()
    out: list[str] = []
    for line in template.splitlines(keepends=True):
        whole = _PLACEHOLDER_RE.fullmatch(line.strip())
        if whole and isinstance(values.get(whole.group(1)), list):
            indent = line[: len(line) - len(line.lstrip())]
            used.add(whole.group(1))
            out += [f"{indent}{text}\n" for text in values[whole.group(1)]]
            continue

        def one(m: re.Match) -> str:
            value = values[m.group(1)]  # KeyError: a placeholder without a value
            if not isinstance(value, str):
                raise KeyError(f"{{{{{m.group(1)}}}}} takes a whole line")
            used.add(m.group(1))
            return value

        out.append(_PLACEHOLDER_RE.sub(one, line))
    if set(values) - used:
        raise KeyError(f"template has no placeholder for {sorted(set(values) - used)}")
    return "".join(out)


def _script_template(name: str = SCRIPT_TEMPLATE) -> str:
    from importlib.resources import files

    return files("megatron_sfm.launch").joinpath(name).read_text(encoding="utf-8")


def env_blocks(opts: SlurmOptions) -> dict[str, list[str]]:
    """The script's ``default_env``, ``backend`` and ``user_env`` lines (values quoted)."""
    q = shlex.quote
    backend = (["# CPU job: gloo, no GPUs visible.", "export SFM_DIST_BACKEND=gloo CUDA_VISIBLE_DEVICES="]
               if opts.cpu_only else ["export SFM_DIST_BACKEND=nccl"])
    user_env = (["# --env KEY=VALUE"] + [f"export {key}={q(value)}" for key, value in opts.env.items()]
                if opts.env else [])
    return {"default_env": [f': "${{{key}:={value}}}"; export {key}' for key, value in DEFAULT_ENV.items()],
            "backend": backend, "user_env": user_env}


def srun_words(opts: SlurmOptions, *, job_dir: Path, workdir: Path, one_task: bool = False) -> list[str]:
    """``srun`` and its options (shell words, user values quoted): one task per node of the
    allocation, or with ``one_task`` a single task on one node."""
    q = shlex.quote
    if one_task:
        srun = ["srun", "--nodes=1", "--ntasks=1"]
    else:
        srun = ['srun', '--nodes="$SLURM_JOB_NUM_NODES"', '--ntasks="$SLURM_JOB_NUM_NODES"', "--ntasks-per-node=1"]
    if opts.task_cpus is not None:
        srun.append(f"--cpus-per-task={opts.task_cpus}")
    else:
        srun.append('--cpus-per-task="$SLURM_CPUS_ON_NODE"')
    if not opts.cpu_only:  # srun (SLURM >= 22.05) does not inherit these from the allocation
        srun.append(f"--gpus-per-node={opts.gpus_per_node}")
    if not one_task:
        # One node's launcher ending must not kill another node still writing its checkpoint.
        srun.append("--kill-on-bad-exit=0")
    srun.append("--label")
    if opts.container:
        srun.append(f"--container-image={q(opts.container)}")
        if opts.container_mounts:
            mounts = opts.container_mounts
        else:  # the submission folder and the job folder, each at its own path
            folders = [workdir] + ([] if job_dir.is_relative_to(workdir) else [job_dir])
            mounts = ",".join(f"{f}:{f}" for f in folders)
        srun += [f"--container-mounts={q(mounts)}", f"--container-workdir={q(str(workdir))}"]
    return srun


def _check_folders(job_dir: Path, workdir: Path) -> None:
    _check_text("--log-dir (job folder)", str(job_dir))
    _check_text("working directory", str(workdir))


def python_command_words(command: list[str]) -> list[str]:
    """``"$SFM_PYTHON"`` and ``command`` (its arguments) as shell words, each quoted."""
    return ['"$SFM_PYTHON"'] + [shlex.quote(w) for w in command]


def render_script(opts: SlurmOptions, *, job_dir: Path, config_path: Path, command: list[str],
                  checkpoint_dir: str | None, submit_argv: list[str], workdir: Path) -> str:
    """The batch script text of a training job: ``templates/sbatch.sh`` filled in (every
    user-supplied value ``shlex.quote``d). ``command`` follows ``python -m torch.distributed.run [opts]``."""
    q = shlex.quote
    torchrun = [
        '"$SFM_PYTHON"', "-m", "torch.distributed.run",
        '--nnodes="$SLURM_JOB_NUM_NODES"', '--nproc-per-node="$SFM_NPROC_PER_NODE"',
        "--rdzv-backend=c10d", '--rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT"', '--rdzv-id="$SLURM_JOB_ID"',
        "--max-restarts=0",
    ] + ['"$SFM_CONFIG"' if c == str(config_path) else q(c) for c in command]
    # the node agent runs torchrun and relays the stop request as USR1 to the trainer ranks
    step = srun_words(opts, job_dir=job_dir, workdir=workdir) + ['"$SFM_PYTHON"', "-m", "megatron_sfm.launch.node"]
    resume = ['if [ -n "$SFM_CHECKPOINT_DIR" ] && [ -f "$SFM_CHECKPOINT_DIR/latest" ]; then',
              '  log "resuming from $SFM_CHECKPOINT_DIR (latest: $(head -c 200 "$SFM_CHECKPOINT_DIR/latest" | tr -d \'\\n\'))"',
              "fi"]
    return render_requeueable_script(opts, job_dir=job_dir, workdir=workdir, submit_argv=submit_argv,
                                     config=str(config_path), checkpoint_dir=checkpoint_dir, step=step + torchrun,
                                     what="training", rank_signal="USR1", resume=resume)


def render_requeueable_script(opts: SlurmOptions, *, job_dir: Path, workdir: Path, submit_argv: list[str],
                              config: str, checkpoint_dir: str | None, step: list[str], what: str,
                              rank_signal: str, resume: list[str]) -> str:
    """``templates/sbatch.sh`` filled in: the multi-node step ``step`` (shell words, user
    values already quoted) with the time-limit warning, stop relay and requeue logic.

    ``what`` names the step in log lines ("training"); ``rank_signal`` is what the node
    agent sends the ranks; ``resume`` are lines logging what a requeued run resumes from.
    """
    validate_options(opts)
    _check_folders(job_dir, workdir)
    q = shlex.quote
    from megatron_sfm import __version__

    return fill_template(_script_template(), {
        "version": __version__,
        "rendered_at": _dt.datetime.now().isoformat(timespec="seconds"),
        "sbatch_command": shlex.join(submit_argv),
        "requeue_exit_code": str(REQUEUE_EXIT_CODE),
        "job_dir": q(str(job_dir)),
        "workdir": q(str(workdir)),
        "config": q(config),
        "checkpoint_dir": q(checkpoint_dir or ""),
        "python": q(opts.interpreter),
        "nproc_per_node": str(opts.procs_per_node),
        "max_requeues": str(opts.max_requeues),
        **env_blocks(opts),
        "rank_signal": rank_signal,
        "what": what,
        "resume": resume,
        "resignal_seconds": str(resignal_seconds(opts.signal_grace)),
        "master_port": str(opts.rdzv_port) if opts.rdzv_port is not None else "$((20000 + SLURM_JOB_ID % 20000))",
        "step": " \\\n      ".join(_wrap_words(step)),
    })


def render_single_script(opts: SlurmOptions, *, job_dir: Path, workdir: Path, submit_argv: list[str],
                         kind: str, commands: list[list[str]]) -> str:
    """``templates/single.sh`` filled in: ``commands`` (each the arguments of ``python``) one
    after the other, each one process on one node; no time-limit warning, no requeue."""
    validate_options(opts, requeueable=False)
    _check_folders(job_dir, workdir)
    q = shlex.quote
    from megatron_sfm import __version__

    return fill_template(_script_template(SINGLE_TEMPLATE), {
        "version": __version__,
        "rendered_at": _dt.datetime.now().isoformat(timespec="seconds"),
        "sbatch_command": shlex.join(submit_argv),
        "kind": kind,
        "count": str(len(commands)),
        "job_dir": q(str(job_dir)),
        "workdir": q(str(workdir)),
        "python": q(opts.interpreter),
        **env_blocks(opts),
        "srun": " ".join(srun_words(opts, job_dir=job_dir, workdir=workdir, one_task=True)),
        "commands": [" \\\n    ".join(_wrap_words(["run_step"] + python_command_words(c))) for c in commands],
    })


def _wrap_words(words: list[str], width: int = 90) -> list[str]:
    out, cur = [], ""
    for w in words:
        if cur and len(cur) + 1 + len(w) > width:
            out.append(cur)
            cur = w
        else:
            cur = f"{cur} {w}" if cur else w
    if cur:
        out.append(cur)
    return out


def check_script_syntax(text: str) -> None:
    """Run ``bash -n`` on a rendered script; :class:`SfmError` with bash's message if it fails."""
    proc = subprocess.run(["bash", "-n"], input=text, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SfmError(f"rendered batch script fails `bash -n`: {proc.stderr.strip()}")


@dataclass
class PreparedJob:
    """A rendered job, before or after submission."""

    name: str
    job_dir: Path
    script_path: Path
    config_path: Path | None  # the resolved run config (train), written into the job folder
    config_text: str | None
    options: SlurmOptions
    command: list[str]
    checkpoint_dir: str | None
    workdir: Path
    source_config: str | None = None
    overrides: list[str] = field(default_factory=list)
    job_id: str | None = None
    argv: list[str] = field(default_factory=list)
    script: str = ""
    kind: str = "train"  # the plan stage kind (docs/launch.md); train jobs are rendered here
    # other kinds: an object with ``requeueable`` and ``render(job) -> script text``
    # (megatron_sfm.launch.stages)
    step: Any = None

    @property
    def requeueable(self) -> bool:
        return self.step is None or self.step.requeueable

    def render(self) -> None:
        """(Re)compute the sbatch command and the script from the options (after a change)."""
        self.argv = sbatch_argv(self.options, self.job_dir, self.workdir, self.script_path,
                                requeueable=self.requeueable)
        if self.step is not None:
            self.script = self.step.render(self)
        else:
            self.script = render_script(self.options, job_dir=self.job_dir, config_path=self.config_path,
                                        command=self.command, checkpoint_dir=self.checkpoint_dir,
                                        submit_argv=self.argv, workdir=self.workdir)
        check_script_syntax(self.script)


def new_job_dir(log_dir: Path, name: str, now: _dt.datetime | None = None) -> Path:
    """``log_dir/<safe name>-<YYYYmmdd-HHMMSS>`` (``-2``, ``-3``... if taken); not created."""
    stamp = (now or _dt.datetime.now()).strftime("%Y%m%d-%H%M%S")
    base = Path(log_dir).absolute() / f"{safe_name(name)}-{stamp}"
    candidate, i = base, 1
    while candidate.exists():
        i += 1
        candidate = base.with_name(f"{base.name}-{i}")
    return candidate


def prepare_job(opts: SlurmOptions, config_path: str | None, overrides: list[str], *, job_dir: Path,
                workdir: Path | None = None, command: list[str] | None = None) -> PreparedJob:
    """Resolve and check the config, render script and sbatch command (nothing written).

    ``command`` replaces the trainer command (tests use stand-ins); by default it is
    ``-m megatron_sfm.cli train <job_dir>/config.yaml``.
    """
    from megatron_sfm.config import dump_config, load_config, validate_run_config

    validate_options(opts)
    cfg = load_config(config_path, overrides)
    try:
        validate_run_config(cfg, world_size=opts.world_size)
    except SfmError as exc:
        where = f"{config_path}: " if config_path else ""
        raise SfmError(f"{where}{exc} (world size {opts.nodes} node(s) x {opts.procs_per_node})") from None
    checkpoint_dir = cfg.checkpoint.save
    if opts.max_requeues > 0 and not checkpoint_dir:
        raise SfmError(
            f"{config_path or 'config'}: checkpoint.save is not set, so a requeued job would start over; "
            "set checkpoint.save or pass --max-requeues 0")
    workdir = Path(workdir or Path.cwd()).absolute()
    job_dir = Path(job_dir).absolute()
    resolved = job_dir / CONFIG_FILE
    job = PreparedJob(name=opts.job_name, job_dir=job_dir, script_path=job_dir / JOB_SCRIPT,
                      config_path=resolved, config_text=dump_config(cfg), options=opts,
                      command=command if command is not None else trainer_command(resolved),
                      checkpoint_dir=checkpoint_dir, workdir=workdir,
                      source_config=str(config_path) if config_path else None, overrides=list(overrides))
    job.render()
    return job


def write_job(job: PreparedJob) -> None:
    """Create the job folder with the resolved config, the script and ``launch.json``."""
    from megatron_sfm.utils.io import atomic_path

    job.job_dir.mkdir(parents=True, exist_ok=False)
    if job.config_path is not None and job.config_text is not None:
        with atomic_path(job.config_path) as tmp:
            tmp.write_text(job.config_text, encoding="utf-8")
    with atomic_path(job.script_path) as tmp:
        tmp.write_text(job.script, encoding="utf-8")
        tmp.chmod(0o755)
    _write_record(job)


def _write_record(job: PreparedJob) -> None:
    from megatron_sfm.utils.io import write_json

    write_json(job.job_dir / LAUNCH_RECORD, {
        "job_id": job.job_id,
        "job_name": job.name,
        "kind": job.kind,
        "sbatch": job.argv,
        "source_config": job.source_config,
        "overrides": job.overrides,
        "commands": job.step.commands if job.step is not None else [job.command],
        "options": dataclasses.asdict(job.options),
        "rendered_at": _dt.datetime.now().isoformat(timespec="seconds"),
    })


def submit(job: PreparedJob, sbatch: str = "sbatch") -> str:
    """Run sbatch (argument vector, no shell); return the job id and record it in ``launch.json``."""
    exe = shutil.which(sbatch)
    if exe is None:
        raise SfmError(f"{sbatch}: not found on PATH; submit from a SLURM login node, or use --dry-run")
    argv = [exe] + job.argv[1:]
    proc = subprocess.run(argv, capture_output=True, text=True, env=os.environ.copy())
    if proc.returncode != 0:
        msg = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise SfmError(f"sbatch failed for job {job.name!r} (exit {proc.returncode}): {msg}")
    out = proc.stdout.strip().splitlines()
    job_id = out[-1].split(";")[0].strip() if out else ""
    if not job_id.isdigit():
        raise SfmError(f"sbatch for job {job.name!r}: unexpected output {proc.stdout.strip()!r}")
    job.job_id = job_id
    _write_record(job)
    return job_id


def dry_run_text(job: PreparedJob) -> str:
    """What ``--dry-run`` prints for one job: the sbatch command, then the script."""
    return f"# {shlex.join(job.argv)}\n{job.script}"


def record_of(job_dir: Path) -> dict:
    return json.loads((Path(job_dir) / LAUNCH_RECORD).read_text())

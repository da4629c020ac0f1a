"""Plan stages beyond training: conversion, post-training (SFT/DPO) and evaluation jobs.

A plan stage's ``kind`` (docs/launch.md) picks what its job runs:

* ``train`` (default): ``sfm train`` under torchrun on every node
  (:func:`megatron_sfm.launch.slurm.prepare_job`; not here);
* ``posttrain-sft`` / ``posttrain-dpo``: ``sfm posttrain sft|dpo`` under
  ``accelerate launch`` (FSDP, one launcher per node) with GPUs, or as one plain process
  on a CPU job; requeued near the time limit, and the rerun resumes from its checkpoint
  in ``out`` (:class:`PosttrainStep`, template ``templates/sbatch.sh``);
* ``convert`` / ``eval``: ``sfm convert to-hf`` / ``sfm eval propensity`` (every model
  under every persona, one report), one process on one node, not requeued (:class:`SingleStep`, template
  ``templates/single.sh``).

The templates are filled by :mod:`megatron_sfm.launch.slurm`; here is what to run.

Commands are argument vectors of ``python -m megatron_sfm.cli ...``; every word is
``shlex.quote``d when the script is rendered. Each command is parsed at submission by its
own command's argument parser (when that command is installed), so a typo in a stage's
``args`` fails now, not after the queue.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import io
import shlex
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from megatron_sfm.errors import SfmError
from megatron_sfm.launch.slurm import (
    python_command_words,
    render_requeueable_script,
    render_single_script,
    srun_words,
)

TRAIN = "train"
CONVERT = "convert"
POSTTRAIN_SFT = "posttrain-sft"
POSTTRAIN_DPO = "posttrain-dpo"
EVAL = "eval"
STAGE_KINDS = (TRAIN, CONVERT, POSTTRAIN_SFT, POSTTRAIN_DPO, EVAL)
SINGLE_PROCESS_KINDS = (CONVERT, EVAL)  # one process on one node, not requeued
POSTTRAIN_KINDS = {POSTTRAIN_SFT: "sft", POSTTRAIN_DPO: "dpo"}

# The FSDP accelerate config of a source checkout; a stage's ``accelerate_config`` replaces it.
DEFAULT_ACCELERATE_CONFIG = Path(__file__).resolve().parents[2] / "examples" / "accelerate" / "fsdp.yaml"

# ``sfm GROUP`` -> the module whose parser checks a stage's command at submission
_COMMAND_MODULES = {"convert": "megatron_sfm.conversion.cli", "eval": "megatron_sfm.evaluation.cli",
                    "posttrain": "megatron_sfm.posttrain.cli"}
# What each node task of a GPU post-training stage runs under the node agent: a fixed text
# (no user value in it). Only the node task knows its rank (SLURM_NODEID), and accelerate
# takes it only as an option before the script; bash's $0 is the interpreter, "$@" the
# accelerate options and the posttrain command, each a separate, quoted word.
PER_NODE_ACCELERATE = 'exec "$0" -m accelerate.commands.launch --machine_rank "$SLURM_NODEID" "$@"'


def cli_command(*words: str) -> list[str]:
    """``python``'s arguments for ``sfm WORDS...``: ``-m megatron_sfm.cli WORDS...``."""
    return ["-m", "megatron_sfm.cli", *words]


def convert_command(checkpoint: str, out: str, args: list[str]) -> list[str]:
    """``sfm convert to-hf CKPT --out HF_DIR [args...]``."""
    return cli_command("convert", "to-hf", checkpoint, "--out", out, *args)


def posttrain_command(kind: str, model: str, data: list[str] | None, out: str, config: Path | None,
                      args: list[str], overrides: list[str]) -> list[str]:
    """``sfm posttrain sft|dpo MODEL [--data FILE[:WEIGHT]...] --out DIR [--config YAML] [args...] [key=value...]``
    (without ``data``, the config's ``data:`` applies).

    Rerunning it into the same ``--out`` resumes from the last checkpoint there (the
    posttrain command's contract), which is what makes a requeued job continue.
    """
    words = ["posttrain", POSTTRAIN_KINDS[kind], model, *(["--data", *data] if data else []), "--out", out]
    if config is not None:
        words += ["--config", str(config)]
    return cli_command(*words, *args, *overrides)


def eval_command(models: list[str], out: str, mode: str | None, personas: list[str] | None,
                 args: list[str]) -> list[str]:
    """``sfm eval propensity MODEL... --out OUT [--mode M] [--persona P,P...] [args...]``: every
    model under every persona, one report in ``OUT`` (``sfm eval compare`` reads such folders)."""
    words = ["eval", "propensity", *models, "--out", out]
    if mode:
        words += ["--mode", mode]
    if personas:
        words += ["--persona", ",".join(personas)]
    return cli_command(*words, *args)


def check_personas(personas: list[str], where: str) -> None:
    """Persona names as ``sfm eval`` reads them (skipped when it is not installed here)."""
    try:
        from megatron_sfm.evaluation.formats import parse_personas
    except ImportError:
        return
    try:
        parse_personas(personas)
    except SfmError as exc:
        raise SfmError(f"{where}.personas: {exc}") from None


def _command_parser(group: str, rest: list[str]) -> tuple[Callable[[list[str]], object], list[str]] | None:
    """How GROUP's ``main`` parses its arguments (its own parser and method) and the
    arguments it parses, or None when GROUP's module is not installed here."""
    module_name = _COMMAND_MODULES[group]
    try:
        if importlib.util.find_spec(module_name) is None:
            return None
    except ModuleNotFoundError:
        return None
    module = importlib.import_module(module_name)
    if group == "posttrain":  # one parser per stage: sfm posttrain sft|dpo ...
        return module.build_parser(rest[0]).parse_intermixed_args, rest[1:]
    return module.build_parser().parse_args, rest


def check_command(command: list[str], where: str) -> None:
    """Parse ``command`` (``-m megatron_sfm.cli GROUP ...``) with GROUP's own argument parser
    (skipped when GROUP is not installed here); :class:`SfmError` naming ``where`` with
    argparse's message if GROUP would refuse it."""
    group, rest = command[2], command[3:]
    found = _command_parser(group, rest)
    if found is None:
        return
    parse, argv = found
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            parse(argv)
    except SystemExit as exc:
        what = f"sfm {group} {rest[0]}"
        if exc.code in (0, None):  # --help among the args
            raise SfmError(f"{where}: `{what}` would print its help and exit; remove --help") from None
        lines = [ln for ln in err.getvalue().strip().splitlines() if ln.strip()]
        msg = lines[-1].split("error:", 1)[-1].strip() if lines else "invalid arguments"
        raise SfmError(f"{where}: `{what}` would refuse its arguments: {msg}") from None


def check_posttrain_config(kind: str, config: Path | None, overrides: list[str], model: str, out: str,
                           data: list[str] | None, where: str) -> None:
    """Load the stage's posttrain config as ``sfm posttrain`` will (the file, ``key=value``,
    then model, out and data), so a bad key or value fails at submission (skipped when
    ``megatron_sfm.posttrain`` is not installed here)."""
    try:
        if importlib.util.find_spec("megatron_sfm.posttrain.config") is None:
            return
    except ModuleNotFoundError:
        return
    from megatron_sfm.posttrain.config import load_stage_config

    try:
        load_stage_config(POSTTRAIN_KINDS[kind], config, overrides, model=model, out=out, data=data)
    except SfmError as exc:
        raise SfmError(f"{where}: posttrain config: {exc}") from None


@dataclass
class PosttrainStep:
    """A post-training stage's step: ``accelerate launch`` (FSDP) on every node, or one plain
    process on a CPU job. Requeued near the time limit like training."""

    kind: str  # posttrain-sft | posttrain-dpo
    command: list[str]  # -m megatron_sfm.cli posttrain ...
    out: str
    accelerate_config: Path | None  # None on a CPU job
    requeueable: bool = True

    @property
    def commands(self) -> list[list[str]]:
        return [self.command]

    def launcher_words(self, nodes: int, procs_per_node: int) -> list[str]:
        """The node task's shell words after ``srun [options]`` (user values quoted).

        GPU: ``python -m megatron_sfm.launch.node --stop-signal TERM -- bash -c '...' PYTHON
        ACCELERATE_OPTIONS -m megatron_sfm.cli posttrain ...``; the fixed ``bash -c`` text
        adds ``--machine_rank "$SLURM_NODEID"``, which only the node task knows. CPU:
        the node agent runs the posttrain process itself (``--direct``).
        """
        agent = ['"$SFM_PYTHON"', "-m", "megatron_sfm.launch.node", "--stop-signal", "TERM"]
        if self.accelerate_config is None:
            return agent + ["--direct", "--"] + python_command_words(self.command)
        accelerate = ["--config_file", shlex.quote(str(self.accelerate_config)),
                      "--num_machines", str(nodes), "--num_processes", str(nodes * procs_per_node),
                      "--main_process_ip", '"$MASTER_ADDR"', "--main_process_port", '"$MASTER_PORT"']
        return agent + ["--", "bash", "-c", shlex.quote(PER_NODE_ACCELERATE), '"$SFM_PYTHON"'] + accelerate + \
            [shlex.quote(w) for w in self.command]

    def render(self, job) -> str:
        opts = job.options
        step = srun_words(opts, job_dir=job.job_dir, workdir=job.workdir) + \
            self.launcher_words(opts.nodes, opts.procs_per_node)
        what = f"post-training ({POSTTRAIN_KINDS[self.kind]})"
        resume = ['if [ "$restarts" -gt 0 ]; then',
                  '  log "restart $restarts: the posttrain command resumes from its last checkpoint in $SFM_CHECKPOINT_DIR"',
                  "fi"]
        return render_requeueable_script(opts, job_dir=job.job_dir, workdir=job.workdir, submit_argv=job.argv,
                                         config=job.source_config or "", checkpoint_dir=self.out, step=step,
                                         what=what, rank_signal="TERM", resume=resume)


@dataclass
class SingleStep:
    """A conversion or evaluation stage's step: its commands one after the other, each one
    process on one node (``srun --ntasks=1``). Not requeued."""

    kind: str  # convert | eval
    commands: list[list[str]]  # each: -m megatron_sfm.cli ...
    requeueable: bool = False

    def render(self, job) -> str:
        return render_single_script(job.options, job_dir=job.job_dir, workdir=job.workdir, submit_argv=job.argv,
                                    kind=self.kind, commands=self.commands)

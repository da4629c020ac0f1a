"""``sfm launch slurm CONFIG.yaml|PLAN.yaml [options] [key=value ...]``: render and submit SLURM jobs.

See docs/launch.md. The logic lives in ``megatron_sfm.launch.slurm`` and ``.plan``.
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys

from megatron_sfm.errors import SfmError

_USAGE = """usage: sfm launch slurm CONFIG.yaml|PLAN.yaml --nodes N --gpus-per-node G --time HH:MM:SS [options] [key=value ...]

commands:
  slurm   render a batch script (srun + torchrun on every node) and submit it with sbatch;
          a plan file (top-level `stages:`) submits one job per stage, each waiting for
          the previous one (--dependency=afterok); stages train (default), convert,
          posttrain-sft, posttrain-dpo (accelerate launch) or eval (docs/launch.md)
  slurm-data {filter,tokenize,synthesize} INPUTS... --out DIR --tasks N --time HH:MM:SS [options] [-- STAGE OPTIONS]
          run `sfm data STAGE` as a job array over N parts of the inputs, then a merge job
          (afterok); resubmitting the same command runs only the unfinished tasks
"""


def _env_pair(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    return key, value


def build_slurm_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sfm launch slurm",
        description="Render an sbatch script that runs `sfm train` under torchrun on every node, "
                    "and submit it. A plan file (top-level `stages:`) submits dependent jobs; its stages "
                    "may also convert, post-train (SFT/DPO) and evaluate (docs/launch.md).")
    p.add_argument("config", help="run config YAML, or a plan YAML with a `stages:` list")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="run config overrides, e.g. training.train_iters=100 (a plan: its train stages)")
    g = p.add_argument_group("resources (required, unless every plan stage sets them)")
    g.add_argument("--nodes", type=int, help="number of nodes")
    g.add_argument("--gpus-per-node", type=int, help="GPUs per node; 0 = CPU job (gloo, --nproc-per-node processes)")
    g.add_argument("--time", help="time limit, [D-]HH:MM:SS")
    o = p.add_argument_group("scheduler")
    o.add_argument("--partition")
    o.add_argument("--account")
    o.add_argument("--job-name", help="job name (default: the config file's stem)")
    o.add_argument("--nproc-per-node", type=int,
                   help="processes per node (default: --gpus-per-node, or 1 for a CPU job)")
    o.add_argument("--cpus-per-task", type=int,
                   help="CPUs per node for torchrun and its workers (default: one per process on CPU; "
                        "the whole node with GPUs)")
    o.add_argument("--exclusive", action=argparse.BooleanOptionalAction, default=None,
                   help="ask for whole nodes (default: yes with GPUs, no on CPU)")
    o.add_argument("--container", metavar="IMAGE", help="run the step in this image (pyxis: srun --container-image)")
    o.add_argument("--container-mounts", metavar="SRC:DST[,...]",
                   help="pyxis mounts (default: the submission folder at the same path)")
    o.add_argument("--max-requeues", type=int, help="requeue after a time-limit warning at most K times (default 3)")
    o.add_argument("--signal-grace", type=int, metavar="SECONDS",
                   help="USR1 arrives this long before the time limit, for the final checkpoint (default 300)")
    o.add_argument("--env", action="append", type=_env_pair, default=None, metavar="NAME=VALUE",
                   help="export NAME=VALUE in the job (repeatable; overrides the NCCL defaults)")
    o.add_argument("--python", help="Python on the nodes (default: this interpreter; python3 in a container)")
    o.add_argument("--rdzv-port", type=int, help="rendezvous port on the first node (default: 20000 + job id %% 20000)")
    p.add_argument("--log-dir", default=None, help="where job folders go (default: runs/slurm)")
    p.add_argument("--dry-run", action="store_true", help="print the sbatch command and script; submit nothing")
    p.add_argument("--from-stage", metavar="NAME",
                   help="plans: submit from this stage on (the earlier stages ran; what they wrote must exist)")
    return p


def slurm_defaults(args: argparse.Namespace) -> dict:
    """The SLURM option flags as a dict of :class:`SlurmOptions` fields (None: not given).

    Every field but ``dependency`` (set by plans) has a flag of the same name; the plan
    code merges these with each stage's ``slurm:`` block and builds the options with the
    typed config loader.
    """
    from megatron_sfm.launch.slurm import SlurmOptions

    out = {f.name: getattr(args, f.name) for f in dataclasses.fields(SlurmOptions)
           if f.name not in ("env", "dependency")}
    out["env"] = dict(args.env or [])
    return out


def cmd_slurm(argv: list[str]) -> int:
    from megatron_sfm.launch.plan import prepare_launch, submit_jobs
    from megatron_sfm.launch.slurm import DEFAULT_LOG_DIR, dry_run_text

    args = build_slurm_parser().parse_intermixed_args(argv)
    for text in args.overrides:
        if "=" not in text:
            raise SfmError(f"override {text!r}: expected KEY=VALUE (only one config file is taken)")
    defaults = slurm_defaults(args)
    jobs = prepare_launch(args.config, args.overrides, defaults, log_dir=args.log_dir or DEFAULT_LOG_DIR,
                          from_stage=args.from_stage)
    if args.dry_run:
        for job in jobs:
            print(dry_run_text(job))
        return 0
    ids = submit_jobs(jobs)
    _summary(jobs, ids)
    return 0


def build_slurm_data_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sfm launch slurm-data",
        description="Run `sfm data filter|tokenize|synthesize` as a SLURM job array over N parts of the inputs, "
                    "then a merge job (afterok). Options of the stage itself go after `--`, e.g. "
                    "`-- --tokenizer tok.json --workers 4`. Resubmitting the same command runs only unfinished tasks.")
    p.add_argument("stage", choices=("filter", "tokenize", "synthesize"))
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="shards or folders (synthesize: scenario files)")
    p.add_argument("--out", required=True, metavar="DIR", help="run folder: plan.json, tasks/, jobs/, report.json")
    p.add_argument("--tasks", type=int, required=True, help="array tasks (the inputs are split into this many parts)")
    p.add_argument("--array-parallelism", type=int, metavar="K", help="at most K tasks run at once (--array=...%%K)")
    p.add_argument("--time", required=True, help="time limit per task, [D-]HH:MM:SS")
    p.add_argument("--cpus-per-task", type=int, help="CPUs per array task (default: the stage's --workers, else 1)")
    p.add_argument("--mem", help="memory per task (sbatch --mem, e.g. 16G)")
    p.add_argument("--merge-time", metavar="[D-]HH:MM:SS",
                   help="time limit of the merge job (default: --time); synthesize's cross-task pass needs about "
                        "2 hours at paper scale")
    p.add_argument("--merge-mem", help="memory of the merge job (default: --mem); synthesize's cross-task index "
                                       "holds about 100-210 bytes per kept document (2.4 GB at paper scale)")
    p.add_argument("--partition")
    p.add_argument("--account")
    p.add_argument("--job-name", help="array job name (default: sfm-data-STAGE)")
    p.add_argument("--python", help="Python on the nodes (default: this interpreter)")
    p.add_argument("--env", action="append", type=_env_pair, default=None, metavar="NAME=VALUE",
                   help="export NAME=VALUE in the jobs (repeatable)")
    p.add_argument("--dry-run", action="store_true", help="print the plan, sbatch commands and scripts; submit nothing")
    return p


def cmd_slurm_data(argv: list[str]) -> int:
    from megatron_sfm.launch.data_jobs import (
        DataJobOptions,
        prepare,
        render_jobs,
        submit_jobs,
    )

    stage_args: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, stage_args = argv[:cut], argv[cut + 1:]
    args = build_slurm_data_parser().parse_intermixed_args(argv)
    opts = DataJobOptions(tasks=args.tasks, time=args.time, array_parallelism=args.array_parallelism,
                          cpus_per_task=args.cpus_per_task, mem=args.mem, merge_time=args.merge_time,
                          merge_mem=args.merge_mem, partition=args.partition,
                          account=args.account, job_name=args.job_name, python=args.python, env=dict(args.env or []))
    data_dir, plan, ids, need_merge = prepare(args.stage, args.inputs, stage_args, args.out, opts)
    if not need_merge:
        print(f"{data_dir}: every task is done and merged (report.json); nothing to submit")
        return 0
    jobs = render_jobs(plan, data_dir, opts, ids)
    if args.dry_run:
        print(f"# plan: {len(plan['tasks'])} task(s) over {plan['shards']} shard(s), {plan['input_bytes']:,} bytes; "
              f"to run: {len(ids)} task(s)")
        for e in plan["tasks"]:
            print(f"#   task {e['index']}: {len(e['shards'])} shard(s), {sum(e['bytes']):,} bytes")
        for job in jobs:
            print(f"# {shlex.join(job.argv)}\n{job.script}")
        return 0
    job_ids = submit_jobs(data_dir, plan, jobs)
    done = len(plan["tasks"]) - len(ids)
    for job, job_id in zip(jobs, job_ids):
        what = (f"array of {len(ids)} task(s)" + (f" ({done} already done)" if done else "")
                if job.kind == "array" else "merge" + (f", after {job_ids[0]}" if len(jobs) > 1 else ""))
        print(f"submitted {job.kind} job {job_id}: {what}")
    print(f"run folder: {data_dir}")
    return 0


def _summary(jobs, ids) -> None:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    table = Table(title="submitted")
    for col in ("job id", "name", "nodes x procs", "time", "depends on", "job folder"):
        table.add_column(col, overflow="fold")
    for job, job_id in zip(jobs, ids):
        o = job.options
        cells = (job_id, job.name, f"{o.nodes} x {o.procs_per_node}" + (" CPU" if o.cpu_only else " GPU"),
                 o.time, o.dependency or "-", str(job.job_dir))
        table.add_row(*(Text(c) for c in cells))  # Text: no rich markup in user-chosen names
    Console(soft_wrap=True).print(table)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_USAGE)
        return 0 if argv else 2
    if argv[0] == "slurm":
        return cmd_slurm(argv[1:])
    if argv[0] == "slurm-data":
        return cmd_slurm_data(argv[1:])
    if argv[0] == "slurm-data-task":  # hidden: what each array task runs
        from megatron_sfm.launch.data_jobs import run_task

        if len(argv) != 3 or not argv[2].isdigit():
            raise SfmError("usage: sfm launch slurm-data-task DIR INDEX")
        run_task(argv[1], int(argv[2]))
        return 0
    if argv[0] == "slurm-data-merge":  # hidden: what the merge job runs
        from megatron_sfm.launch.data_jobs import merge

        if len(argv) != 2:
            raise SfmError("usage: sfm launch slurm-data-merge DIR")
        report = merge(argv[1])
        print(f"merged {report['slurm_data']['tasks']} task(s) into {argv[1]}/report.json")
        return 0
    print(f"error: unknown launch command {argv[0]!r}; known: slurm, slurm-data", file=sys.stderr)
    return 2

"""``sfm launch slurm CONFIG.yaml|PLAN.yaml [options] [key=value ...]``: render and submit SLURM jobs.

See docs/launch.md. The logic lives in ``megatron_sfm.launch.slurm`` and ``.plan``.
"""

from __future__ import annotations

import argparse
import sys

from megatron_sfm.errors import SfmError

_USAGE = """usage: sfm launch slurm CONFIG.yaml|PLAN.yaml --nodes N --gpus-per-node G --time HH:MM:SS [options] [key=value ...]

commands:
  slurm   render a batch script (srun + torchrun on every node) and submit it with sbatch;
          a plan file (top-level `stages:`) submits one job per stage, each waiting for
          the previous one (--dependency=afterok)
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
                    "and submit it. A plan file (top-level `stages:`) submits dependent jobs.")
    p.add_argument("config", help="run config YAML, or a plan YAML with a `stages:` list")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. training.train_iters=100")
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
    return p


_OPTION_KEYS = ("nodes", "gpus_per_node", "time", "partition", "account", "job_name", "nproc_per_node",
                "cpus_per_task", "exclusive", "container", "container_mounts", "max_requeues", "signal_grace",
                "python", "rdzv_port")


def cmd_slurm(argv: list[str]) -> int:
    from megatron_sfm.launch.plan import prepare_launch, submit_jobs
    from megatron_sfm.launch.slurm import DEFAULT_LOG_DIR, dry_run_text

    args = build_slurm_parser().parse_intermixed_args(argv)
    for text in args.overrides:
        if "=" not in text:
            raise SfmError(f"override {text!r}: expected KEY=VALUE (only one config file is taken)")
    defaults = {k: getattr(args, k) for k in _OPTION_KEYS}
    defaults["env"] = dict(args.env or [])
    jobs = prepare_launch(args.config, args.overrides, defaults, log_dir=args.log_dir or DEFAULT_LOG_DIR)
    if args.dry_run:
        for job in jobs:
            print(dry_run_text(job))
        return 0
    ids = submit_jobs(jobs)
    _summary(jobs, ids)
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
    print(f"error: unknown launch command {argv[0]!r}; known: slurm", file=sys.stderr)
    return 2

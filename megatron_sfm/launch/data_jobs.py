"""``sfm launch slurm-data``: ``sfm data filter|tokenize|synthesize`` as a SLURM job array.

One command splits the input shards over N array tasks and submits two jobs: the array
(one task per part, ``--array=IDS[%K]``) and a merge job that starts when every task
succeeded (``--dependency=afterok:ARRAY --kill-on-invalid-dep=yes``). The output folder
``DIR`` holds:

* ``plan.json``: the stage, its options, and each task's shards (absolute paths, sizes)
  and output names; written once. A resubmission must describe the same plan;
* ``tasks/NNNNN/``: task N's outputs, built in a temporary sibling and renamed into
  place with a ``DONE`` marker inside (the SHA-256 of the task's plan entry), so a
  killed task leaves no folder that looks complete (synthesize resumes in place and
  writes ``DONE`` last);
* ``jobs/``: the rendered scripts, SLURM's logs and ``submissions.json`` (job ids);
* after the merge job: ``report.json`` (the per-task reports summed; the single-process
  report's keys), for filter ``kept/`` and ``flagged/`` (hard links to the task files,
  under the names a single-process run gives them), for tokenize ``prefixes.json`` (the
  task prefixes, in input order; their concatenation is the single-process dataset), for
  synthesize ``merged/`` (the tasks' documents less those that duplicate, exactly or
  nearly, a document of an earlier task; ``synthesis/merge.py``).

Resubmitting the same command submits only the tasks without a valid ``DONE`` marker
(and the merge job), so a cancelled, killed or failed task is redone and nothing that
finished runs twice. Inputs are split contiguously in input order, balanced by bytes
(:func:`split_contiguous`), so the tokenized prefixes in task order are the
single-process token stream.

The task runner (``sfm launch slurm-data-task DIR INDEX``) and the merge
(``sfm launch slurm-data-merge DIR``) are hidden commands the scripts call; they read
everything from ``plan.json``, so no input path ever appears in a script. Every value
that does (folder, python, --env values) is ``shlex.quote``d; scheduler options are an
argument vector.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megatron_sfm.errors import SfmError
from megatron_sfm.utils.readers import read_json

STAGES = ("filter", "tokenize", "synthesize")
PLAN_FILE = "plan.json"
DONE_FILE = "DONE"
TASKS_DIR = "tasks"
JOBS_DIR = "jobs"
SUBMISSIONS = "submissions.json"
REPORT = "report.json"
PREFIXES = "prefixes.json"
TEMPLATE = "templates/data_array.sh"
TOKENIZE_PREFIX = "data"  # tasks/NNNNN/data.bin/.idx/.stats.json
SYNTH_MERGED = "merged"  # synthesize: DIR/merged/shard-NNNNN.jsonl.zst (cross-task duplicates dropped)
# Testing aid (docs/launch.md): seconds a task waits after writing its outputs and
# before committing them, so a test can kill it at the worst moment.
PAUSE_ENV = "SFM_DATA_TASK_PAUSE_BEFORE_COMMIT"
ARRAY_ID = "<array-job-id>"  # in the merge job's --dependency until the array is submitted
_PLACEHOLDER_IN = "\x00input"
_PLACEHOLDER_OUT = "\x00out"


# ----------------------------------------------------------------------------- splitting
def split_contiguous(sizes: list[int], n: int) -> list[list[int]]:
    """Split items ``0..len(sizes)-1`` into ``n`` non-empty contiguous runs of similar total size.

    Item j goes to the part its byte midpoint falls in (``n * (before + size/2) / total``),
    kept within one step of the previous item's part and late enough that every later
    part still gets an item. Deterministic; the parts in order are the items in order.
    """
    m = len(sizes)
    if n < 1:
        raise SfmError(f"--tasks: must be at least 1, got {n}")
    if n > m:
        raise SfmError(f"--tasks {n}: more tasks than input shards ({m}); use --tasks {m} or fewer")
    total = sum(sizes) or 1
    parts: list[list[int]] = [[] for _ in range(n)]
    before, prev = 0, -1
    for j, size in enumerate(sizes):
        want = int(n * (before + size / 2) / total) if sum(sizes) else j * n // m
        g = min(max(want, prev, n - (m - j), 0), prev + 1, n - 1)
        parts[g].append(j)
        before += size
        prev = g
    return parts


# ----------------------------------------------------------------------------- the plan
def _stage_parser(stage: str) -> argparse.ArgumentParser:
    from megatron_sfm.data_tools.cli import build_parser

    return build_parser()


def parse_stage_args(stage: str, stage_args: list[str]) -> argparse.Namespace:
    """Parse the options after ``--`` as ``sfm data STAGE`` would (inputs and --out given apart)."""
    if stage not in STAGES:
        raise SfmError(f"unknown stage {stage!r}; known: {', '.join(STAGES)}")
    for a in stage_args:
        if a in ("--out", "--overwrite") or a.startswith("--out="):
            raise SfmError(f"stage option {a}: slurm-data sets the output itself (give --out before `--`)")
    parser = _stage_parser(stage)
    try:
        import contextlib
        import io

        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            ns, extra = parser.parse_known_args([stage, _PLACEHOLDER_IN, "--out", _PLACEHOLDER_OUT, *stage_args])
    except SystemExit:
        lines = [ln for ln in err.getvalue().strip().splitlines() if ln.strip()]
        msg = lines[-1].split("error:", 1)[-1].strip() if lines else "invalid options"
        raise SfmError(f"stage options for `sfm data {stage}`: {msg}") from None
    stray = [a for a in extra if not a.startswith("-")] + list(ns.inputs[1:])
    if stray:
        raise SfmError(f"stage options for `sfm data {stage}`: inputs {stray} after `--`; "
                       "give every input before `--`")
    if extra:
        raise SfmError(f"stage options for `sfm data {stage}`: unrecognized arguments: {' '.join(extra)}")
    if getattr(ns, "dry_run", False):
        raise SfmError("stage option --dry-run: use `sfm launch slurm-data --dry-run` instead")
    return ns


def _expand(stage: str, inputs: list[str]) -> tuple[list[Path], list[str]]:
    """Input shards (absolute, in input order) and the output names a single-process run gives them."""
    if stage == "synthesize":
        out = []
        for item in inputs:
            p = Path(item)
            if p.is_dir():
                found = sorted(q for q in p.rglob("*") if q.is_file() and not q.name.startswith("."))
                if not found:
                    raise SfmError(f"{p}: folder contains no scenario files")
                out += found
            elif p.is_file():
                out.append(p)
            else:
                raise SfmError(f"{p}: no such file or folder")
        return [p.absolute() for p in out], [p.name for p in out]
    from megatron_sfm.data_tools.documents import expand_inputs
    from megatron_sfm.data_tools.filter import output_names

    shards = expand_inputs(inputs)
    names = output_names(shards, inputs) if stage == "filter" else [s.name for s in shards]
    return [s.absolute() for s in shards], names


def build_plan(stage: str, inputs: list[str], stage_args: list[str], tasks: int, workdir: Path,
               data_dir: Path | None = None) -> dict[str, Any]:
    """The plan of a run: which shards each task gets, and the task hashes (nothing written).

    synthesize: the scenarios (not the files) are split: task i gets the scenario shard
    ``DIR/scenarios/NNNNN.jsonl`` with its part of the seeding scenarios plus every
    held-out one (so each task's decontamination sees all of them); the shard texts ride
    along under ``"_files"`` until :func:`write_plan` writes them.
    """
    ns = parse_stage_args(stage, stage_args)
    if stage == "synthesize":
        return _synthesis_plan(ns, inputs, stage_args, tasks, workdir, data_dir)
    shards, names = _expand(stage, inputs)
    sizes = [s.stat().st_size for s in shards]
    entries = []
    for i, idx in enumerate(split_contiguous(sizes, tasks)):
        entry = {"index": i, "shards": [str(shards[j]) for j in idx], "names": [names[j] for j in idx],
                 "bytes": [sizes[j] for j in idx]}
        entry["hash"] = task_hash(stage, stage_args, entry)
        entries.append(entry)
    return {"stage": stage, "stage_args": list(stage_args), "workdir": str(workdir), "tasks": entries,
            "input_bytes": sum(sizes), "shards": len(shards)}


def _synthesis_plan(ns: argparse.Namespace, inputs: list[str], stage_args: list[str], tasks: int, workdir: Path,
                    data_dir: Path | None) -> dict[str, Any]:
    from megatron_sfm.data_tools.synthesis.run import SynthesisConfig, _load

    files, _ = _expand("synthesize", inputs)
    cfg = SynthesisConfig(inputs=[str(f) for f in files], out="", columns=ns.columns, genres_file=ns.genres_file,
                          genres=ns.genre, pools=ns.pool or ("aligned", "misaligned"), k=ns.k,
                          allow_splits=ns.allow_splits)
    loaded = _load(cfg)  # the checks of `sfm data synthesize`: splits, duplicate ids, genres
    seeds, held = loaded.questions, loaded.held_out
    if tasks > len(seeds):
        raise SfmError(f"--tasks {tasks}: more tasks than seeding scenarios ({len(seeds)}); "
                       f"use --tasks {len(seeds)} or fewer")
    folder = Path(data_dir or ".").absolute() / "scenarios"
    held_rows = [q.to_dict() for q in held]
    entries, texts = [], {}
    for i, idx in enumerate(split_contiguous([1] * len(seeds), tasks)):
        rows = [seeds[j].to_dict() for j in idx] + held_rows
        text = "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows)
        path = str(folder / f"{i:05d}.jsonl")
        data = text.encode("utf-8")
        entry = {"index": i, "shards": [path], "names": [Path(path).name], "bytes": [len(data)],
                 "scenarios": len(idx), "held_out": len(held_rows), "sha256": hashlib.sha256(data).hexdigest()}
        entry["hash"] = task_hash("synthesize", stage_args, entry)
        entries.append(entry)
        texts[path] = text
    return {"stage": "synthesize", "stage_args": list(stage_args), "workdir": str(workdir), "tasks": entries,
            "inputs": [str(f) for f in files], "input_bytes": sum(f.stat().st_size for f in files),
            "shards": len(files), "scenarios": len(seeds), "_files": texts}


def write_plan(data_dir: Path, plan: dict) -> None:
    """Write ``DIR/plan.json`` (once) and, for synthesize, the scenario shards it names."""
    from megatron_sfm.utils.io import atomic_path, write_json

    data_dir = Path(data_dir)
    for path, text in plan.get("_files", {}).items():
        if not Path(path).exists():
            with atomic_path(path) as tmp:
                tmp.write_text(text, encoding="utf-8")
    if not (data_dir / PLAN_FILE).exists():
        write_json(data_dir / PLAN_FILE, _public(plan))


def _public(plan: dict) -> dict:
    return {k: v for k, v in plan.items() if not k.startswith("_")}


def task_hash(stage: str, stage_args: list[str], entry: dict) -> str:
    text = json.dumps({"stage": stage, "stage_args": stage_args, "shards": entry["shards"],
                       "names": entry["names"], "bytes": entry["bytes"], "sha256": entry.get("sha256")},
                      sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def read_plan(data_dir: Path) -> dict[str, Any]:
    path = Path(data_dir) / PLAN_FILE
    if not path.exists():
        raise SfmError(f"{path}: not found (not a `sfm launch slurm-data` folder)")
    plan = read_json(path, expect=None)
    if not isinstance(plan, dict) or plan.get("stage") not in STAGES or not isinstance(plan.get("tasks"), list):
        raise SfmError(f"{path}: not a slurm-data plan (needs 'stage' and 'tasks')")
    return plan


def task_dir(data_dir: Path, index: int) -> Path:
    return Path(data_dir) / TASKS_DIR / f"{index:05d}"


def task_done(data_dir: Path, entry: dict) -> bool:
    """True when the task's folder carries a ``DONE`` marker for exactly this plan entry."""
    marker = task_dir(data_dir, entry["index"]) / DONE_FILE
    try:
        return json.loads(marker.read_text()).get("hash") == entry["hash"]
    except (OSError, ValueError, AttributeError):
        return False


def missing_tasks(data_dir: Path, plan: dict) -> list[int]:
    return [e["index"] for e in plan["tasks"] if not task_done(data_dir, e)]


def _diff_keys(a: dict, b: dict) -> list[str]:
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


# ----------------------------------------------------------------------------- rendering
@dataclass
class DataJobOptions:
    tasks: int
    time: str
    array_parallelism: int | None = None
    cpus_per_task: int | None = None  # default: the stage's --workers
    mem: str | None = None
    merge_time: str | None = None  # the merge job's limits (default: the task's --time / --mem)
    merge_mem: str | None = None
    partition: str | None = None
    account: str | None = None
    job_name: str | None = None
    python: str | None = None
    env: dict[str, str] = field(default_factory=dict)


def _array_spec(ids: list[int], parallelism: int | None) -> str:
    """``0-3,5,7-9`` (runs collapsed), with ``%K`` when the parallelism is limited."""
    runs, start = [], None
    for k, i in enumerate(ids):
        if start is None:
            start = i
        if k + 1 == len(ids) or ids[k + 1] != i + 1:
            runs.append(f"{start}" if start == i else f"{start}-{i}")
            start = None
    return ",".join(runs) + (f"%{parallelism}" if parallelism else "")


def validate_data_options(opts: DataJobOptions) -> None:
    from megatron_sfm.launch.slurm import _ENV_KEY_RE, _check_text, time_limit_seconds

    time_limit_seconds(opts.time)
    if opts.merge_time is not None:
        time_limit_seconds(opts.merge_time, "--merge-time")
    for flag, value in (("--tasks", opts.tasks), ("--array-parallelism", opts.array_parallelism),
                        ("--cpus-per-task", opts.cpus_per_task)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise SfmError(f"{flag}: must be an integer >= 1, got {value!r}")
    for flag, value in (("--job-name", opts.job_name), ("--partition", opts.partition), ("--account", opts.account),
                        ("--python", opts.python), ("--mem", opts.mem), ("--merge-mem", opts.merge_mem)):
        _check_text(flag, value)
    for key, value in opts.env.items():
        if not _ENV_KEY_RE.match(key):
            raise SfmError(f"--env: {key!r} is not a valid environment variable name")
        _check_text(f"--env {key}", value if value != "" else "x")


@dataclass
class DataJob:
    """One rendered job (the array or the merge): its sbatch argv and script."""

    kind: str  # "array" or "merge"
    argv: list[str]
    script: str
    script_path: Path
    job_id: str | None = None


def _interpreter(opts: DataJobOptions) -> str:
    import sys

    return opts.python or sys.executable


def render_jobs(plan: dict, data_dir: Path, opts: DataJobOptions, ids: list[int], *, merge: bool = True,
                stamp: str | None = None) -> list[DataJob]:
    """The array job over task ``ids`` (none: no array) and the merge job; nothing written or submitted."""
    from megatron_sfm import __version__
    from megatron_sfm.launch.slurm import (
        _check_text,
        check_script_syntax,
        fill_template,
    )

    validate_data_options(opts)
    data_dir = Path(data_dir).absolute()
    _check_text("--out", str(data_dir))
    _check_text("working directory", plan["workdir"])
    q = shlex.quote
    stage = plan["stage"]
    name = opts.job_name or f"sfm-data-{stage}"
    stamp = stamp or _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    jobs_dir = data_dir / JOBS_DIR
    logs = str(jobs_dir).replace("%", "%%")
    ns = parse_stage_args(stage, plan["stage_args"])
    cpus = opts.cpus_per_task or getattr(ns, "workers", None) or 1
    from importlib.resources import files

    template = files("megatron_sfm.launch").joinpath(TEMPLATE).read_text(encoding="utf-8")
    user_env = (["# --env KEY=VALUE"] + [f"export {k}={q(v)}" for k, v in opts.env.items()]) if opts.env else []

    def common(kind: str, job_name: str) -> list[str]:
        merging = kind == "merge"
        limit = opts.merge_time if merging and opts.merge_time else opts.time
        mem = opts.merge_mem if merging and opts.merge_mem else opts.mem
        argv = ["sbatch", "--parsable", f"--job-name={job_name}", "--nodes=1", "--ntasks=1",
                f"--cpus-per-task={1 if merging else cpus}", f"--time={limit}"]
        if mem:
            argv.append(f"--mem={mem}")
        if opts.partition:
            argv.append(f"--partition={opts.partition}")
        if opts.account:
            argv.append(f"--account={opts.account}")
        return argv + [f"--chdir={plan['workdir']}"]

    def script(kind: str, argv: list[str], what: str, step: list[str]) -> str:
        text = fill_template(template, {
            "version": __version__,
            "rendered_at": _dt.datetime.now().isoformat(timespec="seconds"),
            "sbatch_command": shlex.join(argv),
            "what": what,
            "data_dir": q(str(data_dir)),
            "workdir": q(plan["workdir"]),
            "python": q(_interpreter(opts)),
            "user_env": user_env,
            "step": " ".join(step),
        })
        check_script_syntax(text)
        return text

    jobs: list[DataJob] = []
    if ids:
        path = jobs_dir / f"array-{stamp}.sbatch"
        argv = common("array", name) + [f"--array={_array_spec(ids, opts.array_parallelism)}",
                                        f"--output={logs}/task-%a-%A.out", str(path)]
        text = script("array", argv, f"Array task $SLURM_ARRAY_TASK_ID of {len(plan['tasks'])}: "
                      f"`sfm data {stage}` on its part of the inputs into tasks/NNNNN/.",
                      ["exec", '"$SFM_PYTHON"', "-m", "megatron_sfm.cli", "launch", "slurm-data-task",
                       '"$SFM_DATA_DIR"', '"$SLURM_ARRAY_TASK_ID"'])
        jobs.append(DataJob("array", argv, text, path))
    if merge:
        path = jobs_dir / f"merge-{stamp}.sbatch"
        argv = common("merge", f"{name}-merge") + [f"--output={logs}/merge-%j.out"]
        if ids:
            argv += [f"--dependency=afterok:{ARRAY_ID}", "--kill-on-invalid-dep=yes"]
        argv.append(str(path))
        text = script("merge", argv, "Merge job: per-task reports and outputs into one (after every task succeeded).",
                      ["exec", '"$SFM_PYTHON"', "-m", "megatron_sfm.cli", "launch", "slurm-data-merge",
                       '"$SFM_DATA_DIR"'])
        jobs.append(DataJob("merge", argv, text, path))
    return jobs


# ----------------------------------------------------------------------------- submitting
def _load_submissions(data_dir: Path) -> list[dict]:
    path = data_dir / JOBS_DIR / SUBMISSIONS
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, list) else []
    except (OSError, ValueError):
        return []


def _active_jobs(job_ids: list[str]) -> list[str]:
    """Those of ``job_ids`` SLURM still has pending or running (squeue; finished ones are not listed)."""
    if not job_ids or shutil.which("squeue") is None:
        return []
    proc = subprocess.run(["squeue", "-h", "-o", "%A %T", "-j", ",".join(job_ids)], capture_output=True, text=True,
                          check=False)
    if proc.returncode != 0:
        return []  # "Invalid job id": long finished
    active = {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "RESIZING", "SUSPENDED"}
    return sorted({line.split()[0] for line in proc.stdout.splitlines() if len(line.split()) > 1 and line.split()[1] in active})


def prepare(stage: str, inputs: list[str], stage_args: list[str], out: str, opts: DataJobOptions,
            workdir: Path | None = None) -> tuple[Path, dict, list[int], bool]:
    """Plan the run and compare it with ``DIR/plan.json``; return (dir, plan, task ids to run, merge needed)."""
    validate_data_options(opts)
    data_dir = Path(out).absolute()
    workdir = Path(workdir or Path.cwd()).absolute()
    if data_dir.exists() and not data_dir.is_dir():
        raise SfmError(f"--out {data_dir}: exists and is not a folder")
    plan = build_plan(stage, inputs, stage_args, opts.tasks, workdir, data_dir)
    if (data_dir / PLAN_FILE).exists():
        old = read_plan(data_dir)
        diff = _diff_keys(old, _public(plan))
        if diff:
            raise SfmError(f"--out {data_dir}: holds a run of another command (differs in {', '.join(diff)}); "
                           "use another --out, or resubmit the same command to complete it")
    elif data_dir.exists() and any(data_dir.iterdir()):
        raise SfmError(f"--out {data_dir}/: not empty and holds no {PLAN_FILE}; use a new or empty folder")
    ids = missing_tasks(data_dir, plan)
    merged = _merge_complete(data_dir, plan)
    return data_dir, plan, ids, bool(ids) or not merged


def _merge_complete(data_dir: Path, plan: dict) -> bool:
    try:
        report = json.loads((data_dir / REPORT).read_text())
    except (OSError, ValueError):
        return False
    return report.get("slurm_data", {}).get("task_hashes") == [e["hash"] for e in plan["tasks"]]


def submit_jobs(data_dir: Path, plan: dict, jobs: list[DataJob], sbatch: str = "sbatch") -> list[str]:
    """Write plan and scripts, submit the array then the merge job (afterok); return the job ids."""
    from megatron_sfm.utils.io import atomic_path, write_json

    active = _active_jobs([j for s in _load_submissions(data_dir) for j in s.get("job_ids", [])])
    if active:
        raise SfmError(f"--out {data_dir}: job(s) {', '.join(active)} of an earlier submission are still queued or "
                       "running; wait for them or scancel them, then resubmit")
    exe = shutil.which(sbatch)
    if exe is None:
        raise SfmError(f"{sbatch}: not found on PATH; submit from a SLURM login node, or use --dry-run")
    (data_dir / JOBS_DIR).mkdir(parents=True, exist_ok=True)
    write_plan(data_dir, plan)
    ids: list[str] = []
    array_id = None
    for job in jobs:
        argv = [a.replace(ARRAY_ID, array_id) if array_id else a for a in job.argv]
        if job.kind == "merge" and array_id:
            job.script = job.script.replace(ARRAY_ID, array_id)
        with atomic_path(job.script_path) as tmp:
            tmp.write_text(job.script, encoding="utf-8")
            tmp.chmod(0o755)
        proc = subprocess.run([exe] + argv[1:], capture_output=True, text=True, env=os.environ.copy(),
                              check=False)
        if proc.returncode != 0:
            msg = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise SfmError(f"sbatch failed for the {job.kind} job (exit {proc.returncode}): {msg}")
        job_id = (proc.stdout.strip().splitlines() or [""])[-1].split(";")[0].strip()
        if not job_id.isdigit():
            raise SfmError(f"sbatch for the {job.kind} job: unexpected output {proc.stdout.strip()!r}")
        job.argv, job.job_id = argv, job_id
        if job.kind == "array":
            array_id = job_id
        ids.append(job_id)
    subs = _load_submissions(data_dir)
    subs.append({"submitted_at": _dt.datetime.now().isoformat(timespec="seconds"), "job_ids": ids,
                 "kinds": [j.kind for j in jobs], "argv": [j.argv for j in jobs]})
    write_json(data_dir / JOBS_DIR / SUBMISSIONS, subs)
    return ids


# ----------------------------------------------------------------------------- one task
def run_task(data_dir: str | os.PathLike, index: int) -> Path:
    """Run task ``index`` of ``DIR/plan.json`` (what each array task does); skip it when done."""
    data_dir = Path(data_dir).absolute()
    plan = read_plan(data_dir)
    if not (0 <= index < len(plan["tasks"])):
        raise SfmError(f"{data_dir / PLAN_FILE}: no task {index} (the plan has {len(plan['tasks'])})")
    entry = plan["tasks"][index]
    final = task_dir(data_dir, index)
    if task_done(data_dir, entry):
        print(f"task {index}: already done ({final}); nothing to do", flush=True)
        return final
    for i, (shard, size) in enumerate(zip(entry["shards"], entry["bytes"])):
        try:
            now = os.stat(shard).st_size
        except OSError:
            raise SfmError(f"task {index}: input {shard} is gone") from None
        if now != size:
            raise SfmError(f"task {index}: input {shard} changed size since submission ({size} -> {now} bytes)")
    stage = plan["stage"]
    ns = parse_stage_args(stage, plan["stage_args"])
    final.parent.mkdir(parents=True, exist_ok=True)
    for stale in final.parent.glob(f".{final.name}.*.tmp"):  # left by a killed earlier attempt of this task
        shutil.rmtree(stale, ignore_errors=True)
    started = time.time()
    marker = {"hash": entry["hash"], "index": index, "shards": len(entry["shards"]), "bytes": sum(entry["bytes"]),
              "node": os.environ.get("SLURMD_NODENAME") or os.uname().nodename, "job_id": os.environ.get("SLURM_JOB_ID")}
    if stage == "synthesize":
        report = _synthesize_task(ns, entry, final)
        _pause(index)
        marker["seconds"] = round(time.time() - started, 3)
        from megatron_sfm.utils.io import write_json

        write_json(final / DONE_FILE, marker)
        print(f"task {index}: done", flush=True)
        return final
    from megatron_sfm.utils.io import atomic_path, write_json

    if final.exists():  # a folder without a valid marker: an earlier plan's; replaced whole below
        print(f"task {index}: replacing {final} (no valid {DONE_FILE})", flush=True)
    with atomic_path(final, is_dir=True) as tmp:
        if stage == "filter":
            report = _filter_task(ns, entry, tmp)
        else:
            report = _tokenize_task(ns, entry, tmp)
        write_json(tmp / REPORT, report)
        marker["seconds"] = round(time.time() - started, 3)
        write_json(tmp / DONE_FILE, marker)
        _pause(index)
    print(f"task {index}: done in {marker['seconds']:.1f} s", flush=True)
    return final


def _pause(index: int) -> None:
    seconds = float(os.environ.get(PAUSE_ENV, "0") or 0)
    if seconds > 0:
        print(f"task {index}: outputs written, pausing {seconds:g} s before commit ({PAUSE_ENV})", flush=True)
        time.sleep(seconds)


def _filter_task(ns: argparse.Namespace, entry: dict, out: Path) -> dict:
    """``sfm data filter`` on the task's shards into ``out`` (names as a single-process run gives them).

    The report keeps every term count (not the top 50), so the merged top terms are exact.
    """
    import multiprocessing as mp

    from megatron_sfm.data_tools.filter import (
        _FILTER_CACHE,
        DiscourseFilter,
        TermLists,
        build_report,
        filter_shard,
    )

    lists = TermLists.load(ns.lists, window=ns.window)
    lists_arg = str(ns.lists) if ns.lists is not None else None
    _FILTER_CACHE[(lists_arg, ns.window)] = DiscourseFilter(lists)
    work = [(s, str(out), n, lists_arg, ns.window, ns.text_key) for s, n in zip(entry["shards"], entry["names"])]
    workers = max(1, min(ns.workers, len(work)))
    if workers == 1:
        results = [filter_shard(t) for t in work]
    else:
        with mp.get_context("fork").Pool(workers) as pool:
            results = list(pool.imap_unordered(filter_shard, work))
    results.sort(key=lambda r: r.shard)
    return build_report(results, lists, ns.text_key, top_terms=None)


def _tokenize_task(ns: argparse.Namespace, entry: dict, out: Path) -> dict:
    from megatron_sfm.data_tools.tokenize_corpus import tokenize_to_indexed

    if ns.chunk_mb <= 0:
        raise SfmError("--chunk-mb must be positive")
    summary = tokenize_to_indexed(
        entry["shards"], ns.tokenizer, out / TOKENIZE_PREFIX, workers=ns.workers, text_key=ns.text_key,
        skip_bad_lines=ns.skip_bad_lines, append_eod=not ns.no_append_eod, backend=ns.backend,
        eod_token=ns.eod_token, chunk_bytes=int(ns.chunk_mb * (1 << 20)), progress=False, writer=ns.writer)
    summary["prefix"] = TOKENIZE_PREFIX
    return summary


def _synthesize_task(ns: argparse.Namespace, entry: dict, out: Path) -> dict:
    from megatron_sfm.data_tools.synthesis.cli import run

    ns.inputs = list(entry["shards"])
    ns.columns = None  # the scenario shards hold the canonical field names
    ns.out = str(out)
    ns.no_progress = True
    ns.json = False
    rc = run(ns)
    if rc != 0:
        raise SfmError(f"sfm data synthesize exited with {rc} (see the log above)")
    return {}


# ----------------------------------------------------------------------------- merging
def merge(data_dir: str | os.PathLike) -> dict[str, Any]:
    """Combine the tasks' reports and outputs into ``DIR/report.json`` (and kept/, flagged/, prefixes.json or merged/).

    Nothing of the tasks changes, so running it again gives the same result.
    """
    from megatron_sfm.utils.io import write_json

    data_dir = Path(data_dir).absolute()
    plan = read_plan(data_dir)
    missing = missing_tasks(data_dir, plan)
    if missing:
        raise SfmError(f"{data_dir}: task(s) {_array_spec(missing, None)} have no valid {DONE_FILE} marker; "
                       "resubmit the same `sfm launch slurm-data` command to run them")
    entries = plan["tasks"]
    reports = [_task_report(data_dir, e) for e in entries]
    stage = plan["stage"]
    if stage == "filter":
        report = merge_filter_reports(reports)
        _link_filter_outputs(data_dir, entries)
    elif stage == "tokenize":
        report = merge_tokenize_reports(reports)
        prefixes = [str(task_dir(data_dir, e["index"]) / TOKENIZE_PREFIX) for e in entries]
        write_json(data_dir / PREFIXES, {"prefixes": prefixes, "documents": report["documents"],
                                         "tokens": report["tokens"]})
        report["prefixes"] = prefixes
    else:
        report = merge_synthesis_manifests(data_dir, entries)
    report["slurm_data"] = {"stage": stage, "tasks": len(entries), "task_hashes": [e["hash"] for e in entries],
                            "task_seconds": [json.loads((task_dir(data_dir, e["index"]) / DONE_FILE).read_text())
                                             .get("seconds") for e in entries]}
    write_json(data_dir / REPORT, report)
    return report


def _task_report(data_dir: Path, entry: dict) -> dict:
    path = task_dir(data_dir, entry["index"]) / REPORT
    if not path.exists():
        return {}
    return json.loads(path.read_text())


def merge_filter_reports(reports: list[dict], top_terms: int = 50) -> dict[str, Any]:
    """Sum per-task filter reports (each with every term count) into the single-process report."""
    first = reports[0]
    rules, cats, terms = Counter(), Counter(), Counter()
    shards = []
    for r in reports:
        rules.update(r["rules"])
        cats.update(r["categories"])
        terms.update({t["term"]: t["documents"] for t in r["top_terms"]})
        shards += r["shards"]
    documents = sum(r["documents"] for r in reports)
    flagged = sum(r["flagged"] for r in reports)
    return {
        "documents": documents,
        "flagged": flagged,
        "kept": documents - flagged,
        "flag_rate": flagged / documents if documents else 0.0,
        "bytes": sum(r["bytes"] for r in reports),
        "flagged_bytes": sum(r["flagged_bytes"] for r in reports),
        "rules": {k: rules.get(k, 0) for k in first["rules"]},
        "categories": {c: cats.get(c, 0) for c in first["categories"]},
        "top_terms": [{"term": t, "documents": n}
                      for t, n in sorted(terms.items(), key=lambda kv: (-kv[1], kv[0]))[:top_terms]],
        "window": first["window"],
        "lists": first["lists"],
        "text_key": first["text_key"],
        "shards": sorted(shards, key=lambda s: s["shard"]),
    }


def merge_tokenize_reports(reports: list[dict]) -> dict[str, Any]:
    """Sum per-task tokenize summaries; settings (dtype, vocab, eod) must agree."""
    out: dict[str, Any] = {k: sum(r[k] for r in reports)
                           for k in ("documents", "empty_documents", "tokens", "bad_lines", "input_bytes")}
    out["max_token_id"] = max(r["max_token_id"] for r in reports)
    out["task_seconds_sum"] = round(sum(r.get("seconds", 0.0) for r in reports), 3)
    for key in ("dtype", "vocab_size", "eod_id", "backend", "writer"):
        values = {json.dumps(r.get(key)) for r in reports}
        if len(values) > 1:
            raise SfmError(f"tasks disagree on {key}: {sorted(values)}")
        out[key] = reports[0].get(key)
    return out


def _link_filter_outputs(data_dir: Path, entries: list[dict]) -> None:
    """``DIR/kept`` and ``DIR/flagged``: hard links (else symlinks) to the task files, single-run names."""
    from megatron_sfm.utils.io import atomic_path

    for part in ("kept", "flagged"):
        with atomic_path(data_dir / part, is_dir=True) as tmp:
            for e in entries:
                src_root = task_dir(data_dir, e["index"]) / part
                for name in e["names"]:
                    src, dst = src_root / name, tmp / name
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    try:
                        os.link(src, dst)
                    except OSError:
                        os.symlink(os.path.relpath(src, dst.parent), dst)


def merge_synthesis_manifests(data_dir: Path, entries: list[dict]) -> dict[str, Any]:
    """Synthesis: the tasks' manifests summed (settings checked equal) and their documents merged.

    The documents go to ``DIR/merged/`` without those that duplicate (exactly or nearly,
    the tasks' own rule and threshold) a document kept by an earlier task
    (:func:`~megatron_sfm.data_tools.synthesis.merge.merge_outputs`); ``accepted`` and
    ``rejected`` count that pass too, which ``across_tasks`` details.
    """
    from megatron_sfm.data_tools.synthesis.merge import merge_outputs

    manifests = _synthesis_manifests(data_dir, entries)
    out = _summed_manifests(manifests)
    threshold = (out["checks"] or {}).get("near_dup_threshold", 0.8)
    folders = [task_dir(data_dir, e["index"]) for e in entries]
    stats = merge_outputs(folders, data_dir / SYNTH_MERGED, threshold=threshold,
                          expected=[int(m.get("accepted", 0)) for m in manifests])
    rejected: Counter = Counter()
    for m in manifests:
        rejected.update(m.get("rejected", {}))
    rejected.update({k: v for k, v in stats["dropped"].items() if v})
    out["accepted"] = stats["kept"]
    out["rejected"] = dict(sorted(rejected.items()))
    out["across_tasks"] = {"documents": stats["documents"], "kept": stats["kept"], "dropped": stats["dropped"],
                           "per_task": stats["per_folder"], "threshold": threshold, "hash": stats["hash"],
                           "shards_linked": stats["linked"]}
    out["shards"] = [str(data_dir / SYNTH_MERGED / name) for name in stats["shards"]]
    out["note"] = ("near-duplicates are removed within each task, then across tasks by the merge "
                   "(the first copy in task order is kept); rejected counts both")
    return out


def _summed_manifests(manifests: list[dict]) -> dict[str, Any]:
    """The tasks' counts summed; the settings every task must share, checked equal."""
    out: dict[str, Any] = {"kind": "sfm-synthesize-merged", "complete": all(m.get("complete") for m in manifests)}
    for key in ("scenarios", "requests", "accepted", "failed", "tokens_in", "tokens_out"):
        out[key] = sum(int(m.get(key, 0)) for m in manifests)
    for key in ("model", "genres", "prompt_hash", "pools", "k", "held_out_split", "held_out_questions", "checks"):
        values = {json.dumps(m.get(key), sort_keys=True) for m in manifests}
        if len(values) > 1:
            raise SfmError(f"synthesis tasks disagree on {key}: {sorted(values)}")
        out[key] = manifests[0].get(key)
    return out


def _synthesis_manifests(data_dir: Path, entries: list[dict]) -> list[dict]:
    manifests = []
    for e in entries:
        path = task_dir(data_dir, e["index"]) / "manifest.json"
        try:
            manifests.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            raise SfmError(f"{path}: missing or not JSON; resubmit to rerun task {e['index']}") from None
    return manifests

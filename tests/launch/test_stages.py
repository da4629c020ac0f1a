"""Plan stages beyond training (convert, posttrain-sft/-dpo, eval): rendering, quoting,
dependencies, requeue flags, typed errors; the rendered scripts run with stand-ins for
``srun``/``scontrol``/``scancel`` and the nodes' interpreter (no cluster needed).
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from megatron_sfm.errors import SfmError
from megatron_sfm.launch.exit_codes import REQUEUE_EXIT_CODE
from megatron_sfm.launch.plan import prepare_launch, submit_jobs
from megatron_sfm.launch.slurm import write_job
from megatron_sfm.launch.stages import PER_NODE_ACCELERATE

# a path with a space, a `$`, a single quote and a command substitution
ODD = "a b$HOME'q'$(touch PWNED)"
TRAIN = {"model": "tiny", "training": {"micro_batch_size": 1, "global_batch_size": 16, "train_iters": 3},
         "data": {"mock": True}, "checkpoint": {"save": "ckpt"}}


def _setup(tmp_path: Path) -> Path:
    """Plan folder: a run config, posttrain configs under a folder with an odd name, an accelerate config."""
    (tmp_path / "cfg").mkdir(exist_ok=True)
    (tmp_path / "cfg" / "train.yaml").write_text(yaml.safe_dump(TRAIN))
    (tmp_path / ODD).mkdir(exist_ok=True)
    for name in ("sft.yaml", "dpo.yaml"):
        (tmp_path / ODD / name).write_text("learning_rate: 1.0e-5\n")
    (tmp_path / "acc").mkdir(exist_ok=True)
    (tmp_path / "acc" / "fsdp.yaml").write_text("distributed_type: FSDP\n")
    for model in ("hf", f"runs/{ODD}/ckpt"):  # for plans that start after the stage writing it
        (tmp_path / model).mkdir(parents=True, exist_ok=True)
    (tmp_path / "data").mkdir(exist_ok=True)
    for data in (f"data/{ODD}.jsonl", "data/b.jsonl", "data/pairs.jsonl", "d"):  # posttrain data files
        (tmp_path / data).write_text("{}\n")
    return tmp_path


def _full_stages() -> list[dict]:
    """train -> convert -> sft -> dpo -> eval, each reading what the one before wrote."""
    return [
        {"name": "pretrain", "config": "cfg/train.yaml", "overrides": [f"checkpoint.save=runs/{ODD}/ckpt"]},
        {"name": "convert", "kind": "convert", "model": f"runs/{ODD}/ckpt", "out": f"hf/{ODD}",
         "args": ["--dtype", "bf16"]},
        {"name": "sft", "kind": "posttrain-sft", "config": f"{ODD}/sft.yaml", "accelerate_config": "acc/fsdp.yaml",
         "model": f"hf/{ODD}", "data": [f"data/{ODD}.jsonl:2", "data/b.jsonl"], "out": f"runs/{ODD}/sft",
         "overrides": ["learning_rate=2e-5"], "slurm": {"time": "08:00:00"}},
        {"name": "dpo", "kind": "posttrain-dpo", "config": f"{ODD}/dpo.yaml", "accelerate_config": "acc/fsdp.yaml",
         "model": f"runs/{ODD}/sft", "data": "data/pairs.jsonl", "out": f"runs/{ODD}/dpo", "args": ["--no-progress"]},
        {"name": "eval", "kind": "eval", "model": [f"base=hf/{ODD}", f"dpo=runs/{ODD}/dpo"], "out": f"res/{ODD}",
         "mode": "generate", "personas": ["none", "ai", "helpful", "hhh"], "args": ["--max-new-tokens", "8"]},
    ]


def _write_plan(tmp_path: Path, stages: list[dict], name: str = "exp") -> Path:
    _setup(tmp_path)
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump({"name": name, "stages": stages}, sort_keys=False))
    return path


def _prepare(tmp_path: Path, stages: list[dict], overrides=(), from_stage=None, **defaults):
    base = dict(nodes=2, gpus_per_node=8, time="04:00:00", env={})
    base.update(defaults)
    return prepare_launch(_write_plan(tmp_path, stages), list(overrides), base, log_dir=tmp_path / "runs",
                          workdir=tmp_path, from_stage=from_stage)


def _step_words(script: str) -> list[str]:
    """The multi-node step of a requeueable script (``srun ... &``), as shell words."""
    step = script[script.index("  srun "):script.index(" &\n  srun_pid")]
    return shlex.split(step.replace("\\\n", " "))


def _run_step_lines(script: str) -> list[list[str]]:
    """Each ``run_step ...`` command of a one-process stage's script, as shell words."""
    body = script.replace("\\\n", " ").splitlines()
    return [shlex.split(line)[1:] for line in body if line.startswith("run_step ")]


# ----------------------------------------------------------------------------- rendering
def test_each_kind_renders_its_command_in_order(tmp_path):
    jobs = _prepare(tmp_path, _full_stages())
    assert [j.kind for j in jobs] == ["train", "convert", "posttrain-sft", "posttrain-dpo", "eval"]
    acc, sft_cfg, dpo_cfg = tmp_path / "acc/fsdp.yaml", tmp_path / ODD / "sft.yaml", tmp_path / ODD / "dpo.yaml"
    cli = ["$SFM_PYTHON", "-m", "megatron_sfm.cli"]
    # convert: one process, not requeued
    assert _run_step_lines(jobs[1].script) == [
        cli + ["convert", "to-hf", f"runs/{ODD}/ckpt", "--out", f"hf/{ODD}", "--dtype", "bf16"]]
    # posttrain: the command after accelerate's options
    sft_words = _step_words(jobs[2].script)
    assert sft_words[sft_words.index("megatron_sfm.cli") + 1:] == [
        "posttrain", "sft", f"hf/{ODD}", "--data", f"data/{ODD}.jsonl:2", "data/b.jsonl", "--out", f"runs/{ODD}/sft",
        "--config", str(sft_cfg), "learning_rate=2e-5"]
    dpo_words = _step_words(jobs[3].script)
    assert dpo_words[dpo_words.index("megatron_sfm.cli") + 1:] == [
        "posttrain", "dpo", f"runs/{ODD}/sft", "--data", "data/pairs.jsonl", "--out", f"runs/{ODD}/dpo",
        "--config", str(dpo_cfg), "--no-progress"]
    assert sft_words[sft_words.index("--config_file") + 1] == str(acc)
    # eval: every model under every persona, one report
    assert _run_step_lines(jobs[4].script) == [
        cli + ["eval", "propensity", f"base=hf/{ODD}", f"dpo=runs/{ODD}/dpo", "--out", f"res/{ODD}",
               "--mode", "generate", "--persona", "none,ai,helpful,hhh", "--max-new-tokens", "8"]]
    for job in jobs:
        subprocess.run(["bash", "-n"], input=job.script, text=True, check=True)
        assert "{{" not in job.script
    # requeue: training and post-training (time-limit warning, requeue); convert and eval not, on one node
    for job in (jobs[0], jobs[2], jobs[3]):
        assert "--requeue" in job.argv and "--signal=B:USR1@300" in job.argv and "--nodes=2" in job.argv
    for job in (jobs[1], jobs[4]):
        assert "--no-requeue" in job.argv and not any(a.startswith("--signal") for a in job.argv)
        assert "--nodes=1" in job.argv and "--exclusive" in job.argv  # GPU job defaults otherwise kept
    assert jobs[2].options.time == "08:00:00" and jobs[3].options.time == "04:00:00"
    record_commands = [job.step.commands for job in jobs[1:]]
    assert record_commands[0][0][:4] == ["-m", "megatron_sfm.cli", "convert", "to-hf"]


def test_dependencies_chain_afterok_in_plan_order(tmp_path, monkeypatch):
    jobs = _prepare(tmp_path, _full_stages())
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "sbatch").write_text('#!/bin/bash\necho "$@" >> "$FAKE_SBATCH_LOG"\n'
                                   'echo $((100 + $(wc -l < "$FAKE_SBATCH_LOG")))\n')
    (bindir / "sbatch").chmod(0o755)
    monkeypatch.setenv("FAKE_SBATCH_LOG", str(tmp_path / "sbatch.log"))
    ids = submit_jobs(jobs, sbatch=str(bindir / "sbatch"))
    assert ids == ["101", "102", "103", "104", "105"]
    deps = [[a for a in job.argv if a.startswith("--dependency")] for job in jobs]
    assert deps == [[], ["--dependency=afterok:101"], ["--dependency=afterok:102"], ["--dependency=afterok:103"],
                    ["--dependency=afterok:104"]]
    assert all("--kill-on-invalid-dep=yes" in job.argv for job in jobs[1:])
    for job in jobs:  # the folder: script and record, a resolved config for training only
        assert (job.job_dir / "job.sbatch").read_text() == job.script
        record = json.loads((job.job_dir / "launch.json").read_text())
        assert record["kind"] == job.kind and record["job_id"] == ids[jobs.index(job)]
        assert (job.job_dir / "config.yaml").exists() == (job.kind == "train")
    assert json.loads((jobs[4].job_dir / "launch.json").read_text())["commands"] == jobs[4].step.commands


def test_posttrain_on_two_gpu_nodes_runs_one_accelerate_launcher_per_node(tmp_path):
    jobs = _prepare(tmp_path, _full_stages()[1:3])
    sft = jobs[1]
    assert {"--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=8", "--exclusive"} <= set(sft.argv)
    words = _step_words(sft.script)
    assert words[:4] == ["srun", "--nodes=$SLURM_JOB_NUM_NODES", "--ntasks=$SLURM_JOB_NUM_NODES",
                         "--ntasks-per-node=1"]
    agent = words.index("megatron_sfm.launch.node")
    assert words[agent + 1:agent + 14] == [
        "--stop-signal", "TERM", "--", "bash", "-c", PER_NODE_ACCELERATE, "$SFM_PYTHON",
        "--config_file", str(tmp_path / "acc/fsdp.yaml"), "--num_machines", "2", "--num_processes", "16"]
    assert words[agent + 14:agent + 18] == ["--main_process_ip", "$MASTER_ADDR", "--main_process_port", "$MASTER_PORT"]
    assert PER_NODE_ACCELERATE == 'exec "$0" -m accelerate.commands.launch --machine_rank "$SLURM_NODEID" "$@"'
    assert "export SFM_DIST_BACKEND=nccl" in sft.script and "--gpus-per-node=8" in words
    # nproc_per_node (processes per node) multiplies the machines
    (job,) = _prepare(tmp_path, [dict(_full_stages()[2], model="hf", slurm={"nodes": 3, "nproc_per_node": 4})])
    assert "--num_machines 3 --num_processes 12" in job.script.replace(" \\\n      ", " ")


def test_posttrain_on_a_cpu_job_runs_the_command_itself(tmp_path):
    stages = [dict(_full_stages()[2], model="hf", accelerate_config="missing.yaml")]  # unused on CPU
    (job,) = _prepare(tmp_path, stages, gpus_per_node=0, nodes=1, nproc_per_node=2)
    words = _step_words(job.script)
    agent = words.index("megatron_sfm.launch.node")
    assert words[agent + 1:agent + 9] == ["--stop-signal", "TERM", "--direct", "--", "$SFM_PYTHON", "-m",
                                          "megatron_sfm.cli", "posttrain"]
    assert "accelerate" not in job.script and not any(a.startswith("--gpus") for a in job.argv)
    assert "--cpus-per-task=1" in job.argv  # one process (the CLI's --nproc-per-node 2 is for training)
    assert "export SFM_DIST_BACKEND=gloo CUDA_VISIBLE_DEVICES=" in job.script
    assert "--requeue" in job.argv


def test_one_process_stages_take_one_node_and_no_grace_check(tmp_path):
    stages = [{"name": "c", "kind": "convert", "model": "ckpt", "out": "hf", "slurm": {"time": "00:02:00"}},
              {"name": "e", "kind": "eval", "model": "hf", "out": "res"}]
    (tmp_path / "ckpt").mkdir()
    jobs = _prepare(tmp_path, stages, nodes=4, gpus_per_node=0, nproc_per_node=2, cpus_per_task=3)
    for job in jobs:
        assert "--nodes=1" in job.argv and "--cpus-per-task=3" in job.argv and "--no-requeue" in job.argv
        assert "srun --nodes=1 --ntasks=1 --cpus-per-task=3 --label" in job.script
    assert _run_step_lines(jobs[1].script) == [["$SFM_PYTHON", "-m", "megatron_sfm.cli", "eval", "propensity", "hf",
                                                "--out", "res"]]


def test_command_line_overrides_apply_to_training_stages_only(tmp_path):
    stages = [_full_stages()[0], _full_stages()[1]]
    jobs = _prepare(tmp_path, stages, overrides=["training.train_iters=7"])
    assert yaml.safe_load(jobs[0].config_text)["training"]["train_iters"] == 7
    assert "train_iters" not in jobs[1].script and jobs[1].overrides == []


@pytest.mark.parametrize("stage, message", [
    ({"name": "a", "kind": "posttrain_sft", "model": "m", "data": "d", "out": "o"},
     r"plan.yaml: stages\[0\]\.kind: unknown kind 'posttrain_sft' \(did you mean posttrain-sft\?\); known: train, "),
    ({"name": "a", "kind": "convrt", "model": "m", "out": "o"}, r"did you mean convert\?"),
    ({"name": "a", "kind": "convert", "out": "o"}, r"plan.yaml: stages\[0\]\.model: required \(kind: convert\)"),
    ({"name": "a", "kind": "eval", "model": ["m"]}, r"plan.yaml: stages\[0\]\.out: required \(kind: eval\)"),
    ({"name": "a", "kind": "posttrain-dpo", "data": "d", "out": "o"}, r"stages\[0\]\.model: required"),
    ({"name": "a", "kind": "convert", "model": "m", "outt": "o"},
     r"plan.yaml: stages\[0\]\.outt: unknown key \(did you mean out\?\)"),
    ({"name": "a", "kind": "convert", "model": "m", "out": "o", "personas": ["ai"]},
     r"stages\[0\]\.personas: not a key of kind convert \(its keys: name, kind, slurm, model, out, args\)"),
    ({"name": "a", "config": "cfg/train.yaml", "model": "m"}, r"stages\[0\]\.model: not a key of kind train"),
    ({"name": "a", "kind": "convert", "model": ["m", "n"], "out": "o"}, r"kind convert takes one model folder, got 2"),
    ({"name": "a", "kind": "eval", "model": "m", "out": "o", "personas": ["ai", "ai"]}, r"'ai' appears twice"),
    ({"name": "a", "kind": "eval", "model": "m", "out": "o\nx"}, r"stages\[0\]\.out: .* control character"),
    ({"name": "a", "kind": "eval", "model": "m", "out": "o", "args": 3}, r"stages\[0\]\.args: expected a list"),
])
def test_stage_schema_errors_name_the_key(tmp_path, stage, message):
    with pytest.raises(SfmError, match=message):
        _prepare(tmp_path, [stage])


@pytest.mark.parametrize("stages, defaults, message", [
    ([{"name": "e", "kind": "eval", "model": "m", "out": "o", "slurm": {"nodes": 2}}], {},
     r"stages\[0\]\.slurm\.nodes: kind eval runs one process on one node; remove nodes"),
    ([{"name": "s", "kind": "posttrain-sft", "model": "m", "data": "d", "out": "o"}], dict(gpus_per_node=0),
     r"stages\[0\]\.slurm: kind posttrain-sft on a CPU job \(gpus_per_node 0\) runs one process on one node, not 2 x 1"),
    ([{"name": "s", "kind": "posttrain-sft", "model": "m", "data": "d", "out": "o",
       "accelerate_config": "nowhere.yaml"}], {}, r"stages\[0\]\.accelerate_config: .*nowhere.yaml not found"),
    ([{"name": "s", "kind": "posttrain-sft", "config": "nowhere.yaml", "model": "m", "data": "d", "out": "o"}], {},
     r"stages\[0\]\.config: .*nowhere.yaml not found"),
    # models must exist now or be written by an earlier stage
    ([{"name": "c", "kind": "convert", "model": "runs/nothing", "out": "hf"}], {},
     r"stages\[0\]\.model: 'runs/nothing' does not exist and no earlier stage writes it \(earlier stages write: none\)"),
    ([{"name": "t", "config": "cfg/train.yaml"}, {"name": "e", "kind": "eval", "model": ["x=hf2"], "out": "r"}], {},
     r"stages\[1\]\.model: 'hf2' does not exist and no earlier stage writes it \(earlier stages write: ckpt\)"),
    # ... and so must a posttrain stage's data files
    ([{"name": "s", "kind": "posttrain-sft", "model": "hf", "data": ["d", "data/missing.jsonl:2"], "out": "o"}],
     {}, r"stages\[0\]\.data: 'data/missing.jsonl' does not exist and no earlier stage writes it"),
    # each command is parsed by its own command's parser before anything is submitted
    ([{"name": "c", "kind": "convert", "model": "m", "out": "hf", "args": ["--dtpye", "bf16"]}], {},
     r"stages\[0\] \(c\): `sfm convert to-hf` would refuse its arguments: unrecognized arguments: --dtpye bf16"),
    ([{"name": "e", "kind": "eval", "model": "m", "out": "r", "personas": ["ai", "robot"]}], {},
     r"stages\[0\]\.personas: unknown persona 'robot'; choose from none, ai, helpful, hhh"),
    ([{"name": "e", "kind": "eval", "model": "m", "out": "r", "mode": "chat"}], {},
     r"argument --mode: invalid choice: 'chat'"),
    ([{"name": "s", "kind": "posttrain-sft", "model": "m", "data": "d", "out": "o", "args": ["--bogus"]}],
     dict(gpus_per_node=0, nodes=1),
     r"`sfm posttrain sft` would refuse its arguments: unrecognized arguments: --bogus"),
    # the posttrain config is loaded as `sfm posttrain` will: file, key=value, model/out/data
    ([{"name": "s", "kind": "posttrain-sft", "model": "m", "data": "d", "out": "o",
       "overrides": ["learning_rat=1e-5"]}], dict(gpus_per_node=0, nodes=1),
     r"stages\[0\] \(s\): posttrain config: learning_rat: unknown key \(did you mean learning_rate\?\)"),
    ([{"name": "s", "kind": "posttrain-dpo", "model": "m", "out": "o"}], dict(gpus_per_node=0, nodes=1),
     r"posttrain config: data: required \(give --data, or `data:` in --config\)"),
    # a requeued run must resume, not start over
    ([{"name": "s", "kind": "posttrain-sft", "model": "m", "data": "d", "out": "o", "args": ["--overwrite"]}],
     dict(gpus_per_node=0, nodes=1),
     r"stages\[0\]\.args: --overwrite would start posttrain-sft over on every requeue instead of resuming"),
])
def test_stage_errors_before_submission(tmp_path, stages, defaults, message):
    _setup(tmp_path)
    (tmp_path / "m").mkdir()
    with pytest.raises(SfmError, match=message):
        _prepare(tmp_path, stages, **defaults)


def test_cli_dry_run_of_a_stage_plan_and_its_errors(tmp_path, capsys, monkeypatch):
    from megatron_sfm.cli import main as sfm_main

    monkeypatch.chdir(tmp_path)
    plan = _write_plan(tmp_path, _full_stages())
    assert sfm_main(["launch", "slurm", str(plan), "--nodes", "2", "--gpus-per-node", "8", "--time", "04:00:00",
                     "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.count("# sbatch ") == 5 and "accelerate.commands.launch" in out and "eval propensity" in out
    assert not (tmp_path / "runs" / "slurm").exists()  # a dry run writes nothing
    plan.write_text(yaml.safe_dump({"stages": [{"name": "a", "kind": "evl", "model": "m", "out": "o"}]}))
    assert sfm_main(["launch", "slurm", str(plan), "--nodes", "1", "--gpus-per-node", "0", "--time", "01:00:00",
                     "--dry-run"]) == 2
    assert "stages[0].kind: unknown kind 'evl' (did you mean eval?)" in capsys.readouterr().err


# ----------------------------------------------------------------------------- the scripts, run with stand-ins
STUB_SRUN = r"""#!/bin/bash
# stand-in for srun: one task, here, in its own process group (standing for the step)
while [ $# -gt 0 ] && [ "${1#--}" != "$1" ]; do shift; done
setsid "$@" &
echo $! > "$STUB_DIR/step.pgid"
wait $!
"""
STUB_SCANCEL = r"""#!/bin/bash
echo "$*" >> "$STUB_DIR/scancel"
kill "-${1#--signal=}" -- "-$(cat "$STUB_DIR/step.pgid")"
"""
STUB_SCONTROL = r"""#!/bin/bash
case "$1 $2" in
  "show hostnames") printf 'node-a.invalid\nnode-b.invalid\n' ;;
  "show node") echo "NodeName=$3"; echo "   NodeAddr=10.1.2.3 NodeHostName=$3" ;;
  "requeue "*) echo "$2" >> "$STUB_DIR/requeued" ;;
  *) exit 1 ;;
esac
"""
# stand-in for the nodes' interpreter: the node agent is the real one; "accelerate launch"
# records its arguments and starts one rank (this script again); a rank, or a command run
# without a launcher, records its arguments and does what STUB_MODE says
STUB_PYTHON = r"""#!{python}
import json, os, signal, subprocess, sys, time
stub = os.environ["STUB_DIR"]
args = sys.argv[1:]
def record(what):
    with open(os.path.join(stub, "calls.jsonl"), "a") as f:
        f.write(json.dumps({{"what": what, "argv": args}}) + "\n")
if args[:2] == ["-m", "megatron_sfm.launch.node"]:
    os.execv({python!r}, [{python!r}] + args)
if args[:2] == ["-m", "accelerate.commands.launch"]:
    record("launcher")
    sys.exit(subprocess.call([sys.argv[0], "--rank"] + args))
record("rank" if args[:1] == ["--rank"] else "command")
mode = os.environ["STUB_MODE"]
if mode.startswith("exit:"):
    sys.exit(int(mode[5:]))
if mode == "save-on-term":
    def on_term(*a):
        open(os.path.join(stub, "saved"), "w").close()
        sys.exit({requeue})
    signal.signal(signal.SIGTERM, on_term)
open(os.path.join(stub, "ready"), "w").close()
time.sleep(60)
sys.exit(3)
"""


def _stubs(tmp_path: Path) -> Path:
    stub = tmp_path / "stub"
    (stub / "bin").mkdir(parents=True)
    for name, text in (("srun", STUB_SRUN), ("scontrol", STUB_SCONTROL), ("scancel", STUB_SCANCEL),
                       ("python", STUB_PYTHON.format(python=sys.executable, requeue=REQUEUE_EXIT_CODE))):
        path = stub / "bin" / name
        path.write_text(text)
        path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return stub


def _run(job, stub: Path, mode: str, send_usr1: bool = False) -> tuple[int, str, list[dict]]:
    write_job(job)
    env = dict(os.environ, PATH=f"{stub / 'bin'}:{os.environ['PATH']}", STUB_DIR=str(stub), STUB_MODE=mode,
               SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="node-[a-b]", SLURM_JOB_NUM_NODES=str(job.options.nodes),
               SLURM_RESTART_COUNT="0", SLURM_CPUS_ON_NODE="2", SLURM_NODEID="1")
    proc = subprocess.Popen(["bash", str(job.script_path)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    if send_usr1:
        deadline = time.monotonic() + 30
        while not (stub / "ready").exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0]
            time.sleep(0.05)
        proc.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@GRACE does near the time limit
    out, _ = proc.communicate(timeout=60)
    calls_file = stub / "calls.jsonl"
    calls = [json.loads(line) for line in calls_file.read_text().splitlines()] if calls_file.exists() else []
    return proc.returncode, out, calls


def test_convert_and_eval_scripts_pass_odd_paths_verbatim(tmp_path):
    stub = _stubs(tmp_path)
    jobs = _prepare(tmp_path, _full_stages(), python=str(stub / "bin" / "python"), gpus_per_node=0, nodes=1)
    rc, out, calls = _run(jobs[1], stub, "exit:0")
    assert rc == 0, out
    assert calls == [{"what": "command", "argv": ["-m", "megatron_sfm.cli", "convert", "to-hf", f"runs/{ODD}/ckpt",
                                                  "--out", f"hf/{ODD}", "--dtype", "bf16"]}]
    assert "convert finished" in out
    (stub / "calls.jsonl").unlink()
    rc, out, calls = _run(jobs[4], stub, "exit:0")
    assert rc == 0, out
    assert calls == [{"what": "command", "argv": [
        "-m", "megatron_sfm.cli", "eval", "propensity", f"base=hf/{ODD}", f"dpo=runs/{ODD}/dpo", "--out", f"res/{ODD}",
        "--mode", "generate", "--persona", "none,ai,helpful,hhh", "--max-new-tokens", "8"]}]
    assert not (tmp_path / "PWNED").exists()  # the scripts run in tmp_path and ran nothing


def test_a_failing_command_fails_a_one_process_stage(tmp_path):
    stub = _stubs(tmp_path)
    stages = [{"name": "e", "kind": "eval", "model": "hf", "out": "r", "personas": ["none", "ai"]}]
    (job,) = _prepare(tmp_path, stages, python=str(stub / "bin" / "python"), gpus_per_node=0, nodes=1)
    rc, out, calls = _run(job, stub, "exit:3")
    assert rc == 3 and len(calls) == 1, out
    assert "eval step failed with exit code 3" in out and "eval finished" not in out


def test_posttrain_script_starts_accelerate_with_this_nodes_rank(tmp_path):
    stub = _stubs(tmp_path)
    jobs = _prepare(tmp_path, _full_stages()[1:3], python=str(stub / "bin" / "python"))
    rc, out, calls = _run(jobs[1], stub, "exit:0")
    assert rc == 0 and "post-training (sft) finished" in out, out
    launcher, rank = calls
    assert launcher["what"] == "launcher" and rank["what"] == "rank"
    assert launcher["argv"] == [
        "-m", "accelerate.commands.launch", "--machine_rank", "1",  # SLURM_NODEID of this node task
        "--config_file", str(tmp_path / "acc/fsdp.yaml"), "--num_machines", "2", "--num_processes", "16",
        "--main_process_ip", "10.1.2.3", "--main_process_port", "24242",
        "-m", "megatron_sfm.cli", "posttrain", "sft", f"hf/{ODD}", "--data", f"data/{ODD}.jsonl:2", "data/b.jsonl",
        "--out", f"runs/{ODD}/sft", "--config", str(tmp_path / ODD / "sft.yaml"), "learning_rate=2e-5"]


@pytest.mark.parametrize("gpus, mode", [
    (8, "no-handler"),     # accelerate's rank dies from SIGTERM: requeued, resumes from its last checkpoint
    (0, "save-on-term"),   # CPU, no launcher: the command saves on SIGTERM and exits 75
])
def test_time_limit_warning_stops_posttrain_ranks_with_term_and_requeues(tmp_path, gpus, mode):
    stub = _stubs(tmp_path)
    stages = [dict(_full_stages()[2], model="hf")]
    (job,) = _prepare(tmp_path, stages, python=str(stub / "bin" / "python"), gpus_per_node=gpus,
                      nodes=2 if gpus else 1)
    rc, out, calls = _run(job, stub, mode, send_usr1=True)
    assert rc == REQUEUE_EXIT_CODE, out
    assert "USR1: asking the trainer to save and stop" in out
    assert (stub / "scancel").read_text().split() == [f"--signal={int(signal.SIGWINCH)}", "4242"]
    assert "stop requested: SIGTERM to trainer process(es)" in out
    assert (stub / "requeued").read_text().split() == ["4242"]
    assert (stub / "saved").exists() == (mode == "save-on-term")
    assert [c["what"] for c in calls] == (["launcher", "rank"] if gpus else ["command"])


# ----------------------------------------------------------------------------- --from-stage
def test_from_stage_submits_the_rest_of_the_plan(tmp_path):
    """After a failed or cancelled stage: start the plan there. The earlier stages are not
    rendered, the first kept stage waits for nothing, and what it reads must exist."""
    with pytest.raises(SfmError, match=r'stages\[2\]\.model: "hf/.*" does not exist and no earlier stage writes it'):
        _prepare(tmp_path, _full_stages(), from_stage="sft")  # convert never wrote hf/ODD
    (tmp_path / "hf" / ODD).mkdir(parents=True)
    jobs = _prepare(tmp_path, _full_stages(), from_stage="sft")
    assert [j.kind for j in jobs] == ["posttrain-sft", "posttrain-dpo", "eval"]
    assert [j.job_dir.name for j in jobs] == ["3-sft", "4-dpo", "5-eval"]  # numbered as in the plan
    assert jobs[0].options.dependency is None and not any(a.startswith("--dependency") for a in jobs[0].argv)
    assert jobs[1].options.dependency == "afterok:<job id of stage sft>"
    with pytest.raises(SfmError, match=r"--from-stage 'sfT': .* has no such stage \(stages: pretrain, convert, sft, dpo, eval\)"):
        _prepare(tmp_path, _full_stages(), from_stage="sfT")
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(TRAIN))
    with pytest.raises(SfmError, match="is a run config, not a plan"):
        prepare_launch(tmp_path / "run.yaml", [], dict(nodes=1, gpus_per_node=0, time="00:10:00", env={}),
                       log_dir=tmp_path / "runs", from_stage="sft")


def test_from_stage_on_the_command_line(tmp_path, capsys, monkeypatch):
    from megatron_sfm.cli import main as sfm_main

    plan = _write_plan(tmp_path, _full_stages())
    for done in (tmp_path / "runs" / ODD / "sft", tmp_path / "hf" / ODD):  # as if convert and sft had finished
        done.mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert sfm_main(["launch", "slurm", str(plan), "--nodes", "1", "--gpus-per-node", "8", "--time", "01:00:00",
                     "--from-stage", "dpo", "--dry-run"]) == 0
    out = capsys.readouterr().out
    commands = [shlex.split(line[2:]) for line in out.splitlines() if line.startswith("# sbatch ")]
    assert [next(a for a in c if a.startswith("--job-name=")) for c in commands] == [
        "--job-name=exp-dpo", "--job-name=exp-eval"]
    assert not any(a.startswith("--dependency") for a in commands[0])
    assert sfm_main(["launch", "slurm", str(plan), "--nodes", "1", "--gpus-per-node", "8", "--time", "01:00:00",
                     "--from-stage", "nope", "--dry-run"]) == 2
    assert "--from-stage 'nope'" in capsys.readouterr().err

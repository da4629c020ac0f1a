"""Rendering of the batch script and sbatch command (no cluster needed).

The script's own logic (quoting, environment, USR1 ignored by torchrun, requeue decision)
is exercised by running it with stand-ins for ``srun`` and ``scontrol`` on PATH.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from megatron_sfm.cli import main as sfm_main
from megatron_sfm.config import load_config
from megatron_sfm.errors import SfmError
from megatron_sfm.launch.exit_codes import REQUEUE_EXIT_CODE
from megatron_sfm.launch.plan import prepare_launch
from megatron_sfm.launch.slurm import (
    SlurmOptions,
    fill_template,
    safe_name,
    time_limit_seconds,
    validate_options,
    write_job,
)

HOSTILE = 'x"; touch /tmp/pwned; echo "'
TINY = {"model": "tiny", "training": {"micro_batch_size": 1, "global_batch_size": 2, "train_iters": 3},
        "data": {"mock": True}, "checkpoint": {"save": "ckpt"}}


@pytest.fixture
def tiny_config(tmp_path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY))
    return path


def _defaults(**kw) -> dict:
    base = dict(nodes=1, gpus_per_node=0, time="00:10:00", nproc_per_node=2, env={})
    base.update(kw)
    return base


def _script_of(out: str) -> str:
    """The script part of --dry-run output (after the '# sbatch ...' line)."""
    return out.split("\n", 1)[1]


def test_requeue_exit_code_is_distinct():
    assert REQUEUE_EXIT_CODE == 75
    assert REQUEUE_EXIT_CODE not in (0, 1, 2, 126, 127) and REQUEUE_EXIT_CODE < 128


def test_dry_run_prints_a_script_that_passes_bash_n(tiny_config, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc = sfm_main(["launch", "slurm", str(tiny_config), "--nodes", "2", "--gpus-per-node", "8", "--time", "04:00:00",
                   "--partition", "gpu", "--account", "proj", "--dry-run", "training.train_iters=7",
                   "training.global_batch_size=16"])
    assert rc == 0
    out = capsys.readouterr().out
    first, script = out.split("\n", 1)
    argv = shlex.split(first.lstrip("# "))
    assert argv[0] == "sbatch"
    for flag in ("--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=8", "--exclusive", "--time=04:00:00",
                 "--partition=gpu", "--account=proj", "--requeue", "--signal=B:USR1@300", "--open-mode=append",
                 "--job-name=tiny"):
        assert flag in argv, flag
    assert not any(a.startswith("--cpus-per-task") for a in argv)  # GPU: the whole node for torchrun
    assert script.startswith("#!/bin/bash\n")
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)
    for needle in ("srun ", "--ntasks-per-node=1", "-m torch.distributed.run", "--rdzv-backend=c10d",
                   '--rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT"', "scontrol show hostnames",
                   'scontrol requeue "$SLURM_JOB_ID"', "trap on_usr1 USR1", "SFM_MAX_REQUEUES=3",
                   "megatron_sfm.cli train", "megatron_sfm.launch.node", "export SFM_DIST_BACKEND=nccl", '--cpus-per-task="$SLURM_CPUS_ON_NODE"',
                   "--gpus-per-node=8 --kill-on-bad-exit=0"):
        assert needle in script, needle
    assert not (tmp_path / "runs").exists()  # a dry run writes nothing


def test_cpu_job_uses_gloo_and_one_cpu_per_process(tiny_config, tmp_path):
    (job,) = prepare_launch(tiny_config, [], _defaults(nproc_per_node=2), log_dir=tmp_path / "runs")
    assert "--cpus-per-task=2" in job.argv and "--exclusive" not in job.argv
    assert not any(a.startswith("--gpus-per-node") for a in job.argv)
    assert "export SFM_DIST_BACKEND=gloo CUDA_VISIBLE_DEVICES=" in job.script
    assert job.options.world_size == 2


def test_written_job_folder_holds_resolved_config_and_script(tiny_config, tmp_path):
    (job,) = prepare_launch(tiny_config, ["training.train_iters=11", "optimizer.lr=0.001"], _defaults(),
                            log_dir=tmp_path / "runs")
    write_job(job)
    assert job.job_dir.parent == tmp_path / "runs" and job.job_dir.name.startswith("tiny-")
    resolved = load_config(job.job_dir / "config.yaml")
    assert resolved == load_config(tiny_config, ["training.train_iters=11", "optimizer.lr=0.001"])
    assert resolved.training.train_iters == 11 and resolved.model.hidden_size == 64
    assert (job.job_dir / "job.sbatch").read_text() == job.script
    assert os.access(job.job_dir / "job.sbatch", os.X_OK)
    record = json.loads((job.job_dir / "launch.json").read_text())
    assert record["sbatch"] == job.argv and record["overrides"][0] == "training.train_iters=11"


@pytest.mark.parametrize("kw, message", [
    (dict(time="4h"), "--time"),
    (dict(time="00:61:00"), "--time"),
    (dict(time="00:04:00"), "--signal-grace"),  # default grace 300 s >= 240 s
    (dict(nodes=0), "--nodes"),
    (dict(job_name="a\nb"), "control character"),
    (dict(env={"BAD-NAME": "1"}), "--env"),
    (dict(nproc_per_node=0), "--nproc-per-node"),
])
def test_bad_options_are_user_errors(kw, message):
    opts = SlurmOptions(**{**dict(nodes=1, gpus_per_node=0, time="00:10:00"), **kw})
    with pytest.raises(SfmError, match=message):
        validate_options(opts)


def test_config_problems_are_caught_before_submission(tiny_config, tmp_path):
    with pytest.raises(SfmError, match="checkpoint.save is not set"):
        prepare_launch(tiny_config, ["checkpoint.save=null"], _defaults(), log_dir=tmp_path)
    # 3 ranks cannot split a global batch of 2
    with pytest.raises(SfmError, match="global_batch_size.*world size 1 node"):
        prepare_launch(tiny_config, [], _defaults(nproc_per_node=3), log_dir=tmp_path)
    with pytest.raises(SfmError, match="trainig"):
        prepare_launch(tiny_config, ["trainig.train_iters=3"], _defaults(), log_dir=tmp_path)


def test_cli_reports_user_errors_with_exit_2(tiny_config, capsys):
    rc = sfm_main(["launch", "slurm", str(tiny_config), "--nodes", "1", "--gpus-per-node", "0", "--dry-run"])
    assert rc == 2
    assert "error: --time: required" in capsys.readouterr().err


def test_time_limit_and_safe_name():
    assert time_limit_seconds("04:00:00") == 14400
    assert time_limit_seconds("1-00:00:30") == 86430
    assert safe_name(HOSTILE) == "x_touch_tmp_pwned_echo"
    assert safe_name("../../etc") == "etc"


def test_percent_in_log_folder_is_escaped_for_sbatch(tiny_config, tmp_path):
    (job,) = prepare_launch(tiny_config, [], _defaults(), log_dir=tmp_path / "a%jb")
    (output,) = [a for a in job.argv if a.startswith("--output=")]
    assert output == f"--output={tmp_path}/a%%jb/{job.job_dir.name}/slurm-%j.out"


def test_control_characters_in_the_job_folder_are_refused(tiny_config, tmp_path):
    # the folder reaches the script's comment line (the sbatch command): a newline there
    # would start a line of code
    with pytest.raises(SfmError, match=r"--log-dir \(job folder\): .* contains a control character"):
        prepare_launch(tiny_config, [], _defaults(), log_dir=tmp_path / "a\ntouch /tmp/pwned #")


def test_fill_template_is_strict_and_verbatim():
    template = "a={{x}}\n  {{block}}\n{{empty}}\nend {{x}}\n"
    assert fill_template(template, {"x": "'$q'", "block": ["one", "two"], "empty": []}) == \
        "a='$q'\n  one\n  two\nend '$q'\n"
    with pytest.raises(KeyError):
        fill_template(template, {"x": "1", "block": []})  # {{empty}} has no value
    with pytest.raises(KeyError):
        fill_template(template, {"x": "1", "block": [], "empty": [], "extra": "2"})  # unused value
    with pytest.raises(KeyError):
        fill_template("a={{x}}\n", {"x": ["not", "inline"]})


# ----------------------------------------------------------------- the script, run with stand-ins
STUB_SRUN = r"""#!/bin/bash
# stand-in for srun: one task, here, in its own process group (standing for the step)
while [ $# -gt 0 ] && [ "${1#--}" != "$1" ]; do shift; done
setsid "$@" &
echo $! > "$STUB_DIR/step.pgid"
wait $!
"""
STUB_SCANCEL = r"""#!/bin/bash
# stand-in for `scancel --signal=N JOBID`: like slurmstepd, signal every process of the step
echo "$*" >> "$STUB_DIR/scancel"
kill "-${1#--signal=}" -- "-$(cat "$STUB_DIR/step.pgid")"
"""
STUB_SCONTROL = r"""#!/bin/bash
case "$1 $2" in
  "show hostnames") printf 'node-a.invalid\nnode-b.invalid\n' ;;
  "show node") echo "NodeName=$3 Arch=x86_64 CoresPerSocket=1"; echo "   NodeAddr=10.1.2.3 NodeHostName=$3" ;;
  "requeue "*) echo "$2" >> "$STUB_DIR/requeued" ;;
  *) exit 1 ;;
esac
"""
# stand-in for the nodes' interpreter: runs the real node agent; as "torchrun" it starts one
# "trainer" (itself again), which records what it got, starts a helper process with default
# signal handling (like Megatron's checkpoint writer) and behaves as STUB_MODE says
STUB_PYTHON = r"""#!{python}
import json, os, signal, subprocess, sys, time
stub = os.environ["STUB_DIR"]
if sys.argv[1:3] == ["-m", "megatron_sfm.launch.node"]:
    os.execv({python!r}, [{python!r}] + sys.argv[1:])
if sys.argv[1:3] == ["-m", "torch.distributed.run"]:
    sys.exit(subprocess.call([sys.argv[0], "--trainer"] + sys.argv[1:]))
ign = int([l for l in open("/proc/self/status") if l.startswith("SigIgn:")][0].split()[1], 16)
json.dump({{"argv": sys.argv[2:], "usr1_ignored": bool(ign & (1 << (signal.SIGUSR1 - 1))),
           "env": {{k: os.environ.get(k) for k in ("FOO", "SFM_DIST_BACKEND", "CUDA_VISIBLE_DEVICES",
                                                   "NCCL_DEBUG", "MASTER_ADDR", "MASTER_PORT")}},
           "cwd": os.getcwd()}}, open(os.path.join(stub, "python.json"), "w"))
mode = os.environ["STUB_MODE"]
if mode.startswith("exit:"):
    sys.exit(int(mode[5:]))
helper = subprocess.Popen(["sleep", "60"], preexec_fn=lambda: signal.signal(signal.SIGUSR1, signal.SIG_DFL))
def on_usr1(*a):
    time.sleep(0.2)
    open(os.path.join(stub, "helper_alive"), "w").write(str(helper.poll() is None))
    helper.kill()
    sys.exit({requeue})
signal.signal(signal.SIGUSR1, on_usr1)
open(os.path.join(stub, "ready"), "w").close()
time.sleep(60)
sys.exit(3)
"""


def _stub_dir(tmp_path: Path) -> Path:
    stub = tmp_path / "stub"
    (stub / "bin").mkdir(parents=True)
    for name, text in (("srun", STUB_SRUN), ("scontrol", STUB_SCONTROL), ("scancel", STUB_SCANCEL),
                       ("python", STUB_PYTHON.format(python=sys.executable, requeue=REQUEUE_EXIT_CODE))):
        path = stub / "bin" / name
        path.write_text(text)
        path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return stub


def _run_script(job, stub: Path, mode: str, restarts: int = 0, send_usr1: bool = False):
    env = dict(os.environ, PATH=f"{stub / 'bin'}:{os.environ['PATH']}", STUB_DIR=str(stub), STUB_MODE=mode,
               SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="node-[a-b]", SLURM_JOB_NUM_NODES="2",
               SLURM_RESTART_COUNT=str(restarts), SLURM_CPUS_ON_NODE="2")
    proc = subprocess.Popen(["bash", str(job.script_path)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    if send_usr1:
        import time
        deadline = time.monotonic() + 30
        while not (stub / "ready").exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0]
            time.sleep(0.05)
        proc.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@GRACE does
    out, _ = proc.communicate(timeout=60)
    return proc.returncode, out


def test_hostile_values_reach_the_trainer_verbatim_and_run_nothing(tiny_config, tmp_path):
    pwned = Path("/tmp/pwned")
    pwned.unlink(missing_ok=True)
    log_dir = tmp_path / "logs $(touch /tmp/pwned); 'q' \"dq\""
    env_value = "a b; $(touch /tmp/pwned) `touch /tmp/pwned` 'x' \"y\""
    (job,) = prepare_launch(tiny_config, [], _defaults(job_name=HOSTILE, env={"FOO": env_value},
                                                       partition="p; touch /tmp/pwned",
                                                       python=str(tmp_path / "stub" / "bin" / "python")),
                            log_dir=log_dir, workdir=tmp_path)
    assert f"--job-name={HOSTILE}" in job.argv and "--partition=p; touch /tmp/pwned" in job.argv
    write_job(job)
    stub = _stub_dir(tmp_path)
    rc, out = _run_script(job, stub, "exit:0")
    assert rc == 0, out
    seen = json.loads((stub / "python.json").read_text())
    assert seen["argv"] == ["-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=2",
                            "--rdzv-backend=c10d", "--rdzv-endpoint=10.1.2.3:24242", "--rdzv-id=4242",
                            "--max-restarts=0", "-m", "megatron_sfm.cli", "train", str(job.config_path)]
    # node-a.invalid does not resolve, so the rendezvous uses SLURM's NodeAddr for it
    assert seen["usr1_ignored"] is True  # inherited from the node agent: a stray USR1 kills nothing
    assert seen["env"] == {"FOO": env_value, "SFM_DIST_BACKEND": "gloo", "CUDA_VISIBLE_DEVICES": "",
                           "NCCL_DEBUG": "WARN", "MASTER_ADDR": "10.1.2.3", "MASTER_PORT": "24242"}
    assert seen["cwd"] == str(tmp_path)
    assert not (stub / "requeued").exists()
    assert "training finished" in out
    assert not pwned.exists()


@pytest.mark.parametrize("mode, restarts, requeued, exit_code", [
    (f"exit:{REQUEUE_EXIT_CODE}", 0, True, REQUEUE_EXIT_CODE),   # trainer asked for it
    (f"exit:{REQUEUE_EXIT_CODE}", 3, False, REQUEUE_EXIT_CODE),  # --max-requeues 3 used up
    ("exit:1", 0, False, 1),                                     # a crash is not requeued
])
def test_requeue_decision(tiny_config, tmp_path, mode, restarts, requeued, exit_code):
    (job,) = prepare_launch(tiny_config, [], _defaults(python=str(tmp_path / "stub" / "bin" / "python")),
                            log_dir=tmp_path / "runs", workdir=tmp_path)
    write_job(job)
    stub = _stub_dir(tmp_path)
    rc, out = _run_script(job, stub, mode, restarts=restarts)
    assert rc == exit_code, out
    assert (stub / "requeued").exists() == requeued, out
    if requeued:
        assert (stub / "requeued").read_text().split() == ["4242"]


def test_usr1_to_the_batch_shell_reaches_the_trainer_and_requeues(tiny_config, tmp_path):
    (job,) = prepare_launch(tiny_config, [], _defaults(python=str(tmp_path / "stub" / "bin" / "python")),
                            log_dir=tmp_path / "runs", workdir=tmp_path)
    write_job(job)
    stub = _stub_dir(tmp_path)
    rc, out = _run_script(job, stub, "wait", send_usr1=True)
    assert "USR1: asking the trainer to save and stop" in out
    assert rc == REQUEUE_EXIT_CODE, out
    # the step got WINCH (harmless to every process); the node agent sent USR1 to the trainer
    assert (stub / "scancel").read_text().split() == [f"--signal={int(signal.SIGWINCH)}", "4242"]
    assert "[sfm-node" in out and "stop requested: SIGUSR1 to trainer process(es)" in out
    assert (stub / "helper_alive").read_text() == "True"  # helpers of the trainer survive
    assert (stub / "requeued").read_text().split() == ["4242"]


def test_container_step_runs_inside_the_image_with_the_job_folders_mounted(tiny_config, tmp_path):
    image = "nvcr.io/nvidia/pytorch:25.01-py3; echo $(id)"
    (job,) = prepare_launch(tiny_config, [], _defaults(container=image), log_dir=tmp_path / "elsewhere",
                            workdir=tmp_path / "work")
    srun = job.script[job.script.index("  srun "):job.script.index(" &\n  srun_pid")].replace("\\\n", " ")
    words = shlex.split(srun)
    assert f"--container-image={image}" in words
    assert f"--container-mounts={tmp_path / 'work'}:{tmp_path / 'work'},{job.job_dir}:{job.job_dir}" in words
    assert f"--container-workdir={tmp_path / 'work'}" in words
    assert "SFM_PYTHON=python3" in job.script  # the image's interpreter, not this machine's

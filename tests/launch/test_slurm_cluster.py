"""``sfm launch slurm`` against a real SLURM cluster on this host (two slurmd's; see conftest).

The jobs run the real trainer (``sfm train``, tiny preset, mock data, gloo on CPU):
a 2-process job on one node, a 2-node job (one torchrun per node, c10d rendezvous on the
first node), and a job that gets SLURM's USR1 warning, saves, requeues itself and
resumes. The plan tests use a small all-reduce stand-in, since they check the job
dependencies, not the training.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

from megatron_sfm.launch.plan import prepare_launch, submit_jobs
from megatron_sfm.launch.slurm import record_of

from .conftest import STANDINS, job_info, job_name, wait_for_job, wait_until

HOSTILE = 'x"; touch /tmp/pwned; echo "'
SFM = [sys.executable, "-m", "megatron_sfm.cli"]


def _tiny(path: Path, **training) -> Path:
    cfg = {"model": "tiny", "data": {"mock": True},
           "training": {"micro_batch_size": 2, "global_batch_size": 4, "train_iters": 6, "log_interval": 2,
                        **training},
           "checkpoint": {"save": "ckpt", "save_interval": 3}}
    path.write_text(yaml.safe_dump(cfg))
    return path


def _launch(tmp_path: Path, *args: str) -> tuple[str, Path]:
    """Run ``sfm launch slurm`` in tmp_path; return (job id, job folder)."""
    proc = subprocess.run(SFM + ["launch", "slurm", *args, "--log-dir", "jobs"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    (job_dir,) = (tmp_path / "jobs").iterdir()
    job_id = record_of(job_dir)["job_id"]
    assert job_id and job_id in proc.stdout
    return job_id, job_dir


def _train_state(ckpt: Path) -> dict:
    latest = int((ckpt / "latest").read_text())
    return json.loads((ckpt / f"iter_{latest:07d}" / "train_state.json").read_text())


def test_two_process_cpu_job_trains_and_checkpoints(slurm_cluster, tmp_path):
    pwned = Path("/tmp/pwned")
    pwned.unlink(missing_ok=True)
    _tiny(tmp_path / "tiny.yaml")
    job_id, job_dir = _launch(tmp_path, "tiny.yaml", "--nodes", "1", "--gpus-per-node", "0",
                              "--nproc-per-node", "2", "--time", "00:10:00", "--job-name", HOSTILE)
    log = job_dir / f"slurm-{job_id}.out"
    info = wait_for_job(job_id, timeout=240, log=log)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED", text
    assert job_name(job_id) == HOSTILE  # the name reached SLURM verbatim ...
    assert not pwned.exists()           # ... and ran nothing
    assert "1 node(s) x 2 process(es)" in text and "on 2 ranks" in text and "training finished" in text
    state = _train_state(tmp_path / "ckpt")
    assert state["iteration"] == 6 and state["parallel"]["world_size"] == 2
    assert (job_dir / "config.yaml").is_file() and (job_dir / "job.sbatch").is_file()
    subprocess.run(["bash", "-n", str(job_dir / "job.sbatch")], check=True)


def test_two_node_job_rendezvous_on_first_node_and_trains(slurm_cluster, tmp_path):
    _tiny(tmp_path / "tiny.yaml")
    job_id, job_dir = _launch(tmp_path, "tiny.yaml", "--nodes", "2", "--gpus-per-node", "0",
                              "--nproc-per-node", "1", "--time", "00:10:00")
    log = job_dir / f"slurm-{job_id}.out"
    info = wait_for_job(job_id, timeout=240, log=log)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED", text
    assert info["NumNodes"] == "2"
    first = subprocess.run(["scontrol", "show", "hostnames", info["NodeList"]], capture_output=True, text=True,
                           check=True).stdout.split()[0]
    assert f"2 node(s) x 1 process(es), rendezvous on {first}:" in text
    assert "on 2 ranks" in text
    state = _train_state(tmp_path / "ckpt")
    assert state["iteration"] == 6 and state["parallel"]["world_size"] == 2


def test_usr1_warning_saves_requeues_and_resumes(slurm_cluster, tmp_path):
    _tiny(tmp_path / "tiny.yaml", train_iters=240, log_interval=50)
    job_id, job_dir = _launch(tmp_path, "tiny.yaml", "--nodes", "1", "--gpus-per-node", "0",
                              "--nproc-per-node", "2", "--time", "00:10:00", "--max-requeues", "1",
                              "checkpoint.save_interval=100")
    log = job_dir / f"slurm-{job_id}.out"
    ckpt = tmp_path / "ckpt"
    # once the first interval checkpoint exists the trainer is in its loop, well before iteration 240
    wait_until(lambda: (ckpt / "latest").exists(), timeout=240, what="the first checkpoint", job_id=job_id)
    # what --signal=B:USR1@GRACE does near the time limit: USR1 to the batch shell only
    subprocess.run(["scancel", "--batch", "--signal=USR1", job_id], check=True)
    info = wait_for_job(job_id, timeout=300, log=log)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED", text
    assert info["Restarts"] == "1", info
    assert "USR1: asking the trainer to save and stop" in text
    assert "received signal" in text and "exiting with 75 (requeue)" in text
    assert "requeueing (restart 1 of at most 1)" in text
    # the saved-on-signal checkpoint is what the second run resumed from
    saved = [json.loads(p.read_text()) for p in ckpt.glob("iter_*/train_state.json")]
    (signal_state,) = [s for s in saved if s["reason"] == "signal"]
    resumed_at = signal_state["iteration"]
    assert 100 <= resumed_at < 240
    assert f"resuming from ckpt (latest: {resumed_at})" in text
    assert f"resumed from iteration {resumed_at}" in text
    assert _train_state(ckpt)["iteration"] == 240
    assert text.count("training finished") == 1


# ----------------------------------------------------------------- plans (all-reduce stand-in)
def _plan(tmp_path: Path, fail_first: bool) -> Path:
    _tiny(tmp_path / "stage.yaml")
    plan = {"name": "plan", "stages": [
        {"name": "pretrain", "config": "stage.yaml", "overrides": ["checkpoint.save=ckpt-pre"]},
        {"name": "midtrain", "config": "stage.yaml", "overrides": ["checkpoint.save=ckpt-mid"],
         "slurm": {"nodes": 2, "nproc_per_node": 1}},
    ]}
    if fail_first:
        plan["stages"][0]["slurm"] = {"env": {"STANDIN_FAIL": "1"}}
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(plan))
    return path


def _submit_plan(tmp_path: Path, fail_first: bool):
    path = _plan(tmp_path, fail_first)
    jobs = prepare_launch(path, [], dict(nodes=1, gpus_per_node=0, nproc_per_node=2, time="00:10:00", env={}),
                          log_dir=tmp_path / "jobs", workdir=tmp_path,
                          command_for=lambda cfg: [str(STANDINS / "allreduce.py"), str(cfg.parent / "result.json")])
    return jobs, submit_jobs(jobs)


def test_plan_stages_run_in_order(slurm_cluster, tmp_path):
    jobs, (first, second) = _submit_plan(tmp_path, fail_first=False)
    assert job_info(second)["Dependency"] in (f"afterok:{first}(unfulfilled)", f"afterok:{first}")
    one = wait_for_job(first, timeout=180, log=jobs[0].job_dir / f"slurm-{first}.out")
    two = wait_for_job(second, timeout=180, log=jobs[1].job_dir / f"slurm-{second}.out")
    assert one["JobState"] == two["JobState"] == "COMPLETED"
    assert two["StartTime"] >= one["EndTime"]
    r1 = json.loads((jobs[0].job_dir / "result.json").read_text())
    r2 = json.loads((jobs[1].job_dir / "result.json").read_text())
    assert (r1["world_size"], r1["sum"]) == (2, 3.0)   # stage defaults: 1 node x 2
    assert (r2["world_size"], r2["sum"]) == (2, 3.0)   # stage override: 2 nodes x 1
    assert len({r["slurmd_nodename"] for r in r2["ranks"]}) == 2  # one rank on each node
    assert all(r["backend"] == "gloo" for r in r1["ranks"] + r2["ranks"])
    assert record_of(jobs[1].job_dir)["sbatch"][-3] == f"--dependency=afterok:{first}"


def test_plan_cancels_later_stages_when_a_stage_fails(slurm_cluster, tmp_path):
    jobs, (first, second) = _submit_plan(tmp_path, fail_first=True)
    one = wait_for_job(first, timeout=180, log=jobs[0].job_dir / f"slurm-{first}.out")
    two = wait_for_job(second, timeout=60)
    assert one["JobState"] == "FAILED"
    assert two["JobState"] == "CANCELLED"  # --kill-on-invalid-dep=yes: not left pending forever
    assert not (jobs[1].job_dir / "result.json").exists()

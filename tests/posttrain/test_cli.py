"""megatron_sfm/posttrain/cli.py: ``sfm posttrain``, exit codes, overrides, resume after kill -9."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from megatron_sfm.cli import main as sfm_main
from megatron_sfm.posttrain.run import MANIFEST, RUN_MARKER, plan_output

from .conftest import TINY


def test_help_does_not_import_torch():
    code = ("import sys\nfrom megatron_sfm.cli import main\n"
            "assert main(['posttrain', '--help']) == 0\n"
            "try:\n    main(['posttrain', 'dpo', '--help'])\nexcept SystemExit as e:\n    assert e.code == 0\n"
            "import megatron_sfm.posttrain\n"
            "sys.exit(3 if 'torch' in sys.modules or 'trl' in sys.modules else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "--data FILE[:WEIGHT]" in proc.stdout and "sfm posttrain dpo" in proc.stdout


def test_overrides_after_data_files(monkeypatch, tmp_path):
    from megatron_sfm.posttrain import run

    seen = {}
    monkeypatch.setattr(run, "run_sft", lambda cfg, progress, overwrite, signal_flag: seen.update(cfg=cfg, overwrite=overwrite))
    (tmp_path / "a.jsonl").write_text("")
    rc = sfm_main(["posttrain", "sft", "M", "seed=5", "--data", str(tmp_path / "a.jsonl:2"), "b.jsonl",
                   "max_steps=3", "--out", "O", "--config", str(TINY), "--overwrite", "learning_rate=1e-4"])
    cfg = seen["cfg"]
    assert rc == 0 and seen["overwrite"] is True
    assert [(d.path, d.weight) for d in cfg.data] == [(str(tmp_path / "a.jsonl"), 2.0), ("b.jsonl", 1.0)]
    assert (cfg.model, cfg.out, cfg.seed, cfg.max_steps, cfg.learning_rate) == ("M", "O", 5, 3, 1e-4)


def test_bad_input_exits_2_before_anything_is_written(base_model_dir, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'
                   '{"messages": [{"role": "user", "content": "hi"}, {"role": "robot", "content": "x"}]}\n')
    out = tmp_path / "out"
    assert sfm_main(["posttrain", "sft", str(base_model_dir), "--data", str(bad), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {bad}:2: messages[1].role: 'robot' is not one of system, user, assistant\n"
    assert not out.exists()
    assert sfm_main(["posttrain", "sft", str(base_model_dir), "--data", str(bad), "--out", str(out),
                     "lerning_rate=1"]) == 2
    assert "lerning_rate: unknown key (did you mean learning_rate?)" in capsys.readouterr().err
    assert sfm_main(["posttrain", "ppo", "x"]) == 2
    assert sfm_main(["posttrain", "dpo", str(base_model_dir), "--data", str(bad), "--out", str(out)]) == 2
    assert f"{bad}:1: no key 'chosen'" in capsys.readouterr().err


def test_bad_checksum_record_of_the_source_exits_2_before_anything_is_written(sft_file, tmp_path, capsys):
    model = tmp_path / "export"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "sfm_export.json").write_text(json.dumps({"source": "/ckpt/iter_0000001", "checksums_verified": "yes"}))
    out = tmp_path / "out"
    assert sfm_main(["posttrain", "sft", str(model), "--data", str(sft_file), "--out", str(out)]) == 2
    assert capsys.readouterr().err == (f"error: {model / 'sfm_export.json'}: checksums_verified: expected true, "
                                       "false or null, got 'yes'\n")
    assert not out.exists()


def test_finished_run_is_refused_by_the_cli(sft_model_dir, base_model_dir, sft_file, dpo_file, capsys):
    argv = ["posttrain", "sft", str(base_model_dir), "--data", str(sft_file), "--out", str(sft_model_dir),
            "--config", str(TINY), "--no-progress"]
    assert sfm_main(argv) == 2
    assert "holds a finished sft run (posttrain.json); pass --overwrite" in capsys.readouterr().err
    assert sfm_main(["posttrain", "dpo", str(sft_model_dir), "--data", str(dpo_file), "--out",
                     str(base_model_dir)]) == 2  # another model's folder is not an output folder
    assert "not empty" in capsys.readouterr().err
    assert sfm_main(["posttrain", "dpo", str(sft_model_dir), "--data", str(dpo_file), "--out",
                     str(sft_model_dir), "--overwrite"]) == 2  # never overwrite the input
    assert f"--out {sft_model_dir}: is or holds the model folder" in capsys.readouterr().err
    assert (sft_model_dir / MANIFEST).is_file()


# Each training step sleeps, so the kill lands between two checkpoints, not after the run.
_SLOW = """
import sys, time, transformers
step = transformers.Trainer.training_step
def slow(self, *a, **k):
    time.sleep(0.4)
    return step(self, *a, **k)
transformers.Trainer.training_step = slow
from megatron_sfm.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _signal_after_checkpoint_4(argv, out, sig, settle: float = 0.0) -> subprocess.Popen:
    """Run ``sfm ARGV`` slowly in a child; once checkpoint-4 is complete send ``sig``; wait for it to end."""
    proc = subprocess.Popen([sys.executable, "-c", _SLOW, *argv], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)
    state = out / "checkpoints" / "checkpoint-4" / "trainer_state.json"
    deadline = time.time() + 120
    try:
        while not state.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        time.sleep(settle)
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        os.kill(proc.pid, sig)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc


def test_resume_after_kill_9_matches_an_uninterrupted_run(sft_model_dir, base_model_dir, sft_file, tmp_path):
    """Killed after checkpoint-4 of 12, the same command resumes at step 4 and ends on the same weights."""
    from safetensors.torch import load_file

    out = tmp_path / "out"
    argv = ["posttrain", "sft", str(base_model_dir), "--data", str(sft_file), "--out", str(out),
            "--config", str(TINY), "--no-progress"]
    # settle: let the Trainer finish the write it just began (the test reads it next)
    proc = _signal_after_checkpoint_4(argv, out, signal.SIGKILL, settle=0.05)
    assert proc.returncode == -signal.SIGKILL
    assert (out / RUN_MARKER).is_file() and not (out / MANIFEST).exists()
    assert not (out / "checkpoints" / "checkpoint-12").exists()
    assert plan_output(out, "sft", json.loads((out / RUN_MARKER).read_text()), False).mode == "resume"

    assert sfm_main(argv) == 0  # the same command again
    train = json.loads((out / MANIFEST).read_text())["train"]
    assert (train["resumed_from"], train["first_step_this_session"], train["steps_this_session"],
            train["global_step"]) == ("checkpoint-4", 4, 8, 12)
    resumed, whole = load_file(out / "model.safetensors"), load_file(sft_model_dir / "model.safetensors")
    assert resumed.keys() == whole.keys()
    for name in whole:  # CPU, fixed seed, data order and RNG restored by the Trainer: the same weights
        assert (resumed[name] - whole[name]).abs().max().item() <= 1e-6, name


def test_two_processes_train_together_and_only_rank_0_writes(base_model_dir, sft_file, tmp_path):
    """Under torchrun (as under accelerate launch) the ranks form one group (gloo on CPU)."""
    from megatron_sfm.utils.net import free_port

    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
           str(free_port()), "-m", "megatron_sfm.cli", "posttrain", "sft", str(base_model_dir), "--data",
           str(sft_file), "--out", str(out), "--config", str(TINY), "--no-progress", "max_steps=2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("sfm posttrain sft: done") == 1  # one summary, from rank 0
    train = json.loads((out / MANIFEST).read_text())["train"]
    assert (train["world_size"], train["global_step"]) == (2, 2)
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []


def test_sigterm_saves_a_checkpoint_exits_75_and_the_rerun_matches(sft_model_dir, base_model_dir, sft_file,
                                                                    tmp_path):
    """SIGTERM between checkpoints (save_steps 4): the run saves at the step it reached, exits
    with the requeue code, and the same command resumes there and ends on the uninterrupted
    run's weights."""
    from safetensors.torch import load_file

    from megatron_sfm.training.signals import requeue_exit_code

    out = tmp_path / "out"
    argv = ["posttrain", "sft", str(base_model_dir), "--data", str(sft_file), "--out", str(out),
            "--config", str(TINY), "--no-progress"]
    proc = _signal_after_checkpoint_4(argv, out, signal.SIGTERM)
    err = proc.stderr.read().decode()
    assert proc.returncode == requeue_exit_code(), err[-3000:]
    steps = sorted(int(p.name.split("-")[1]) for p in (out / "checkpoints").glob("checkpoint-*"))
    saved = steps[-1]
    assert 4 < saved < 12, steps  # a checkpoint at the step the signal was seen, not only save_steps'
    assert f"received SIGTERM: saved checkpoint-{saved} at step {saved}; exiting with 75" in err
    assert (out / RUN_MARKER).is_file() and not (out / MANIFEST).exists()

    assert sfm_main(argv) == 0  # what the requeued job runs
    train = json.loads((out / MANIFEST).read_text())["train"]
    assert (train["resumed_from"], train["first_step_this_session"], train["global_step"]) == (
        f"checkpoint-{saved}", saved, 12)
    resumed, whole = load_file(out / "model.safetensors"), load_file(sft_model_dir / "model.safetensors")
    for name in whole:
        assert (resumed[name] - whole[name]).abs().max().item() <= 1e-6, name


def test_sigterm_on_one_rank_stops_both_at_the_same_step(base_model_dir, sft_file, tmp_path):
    """Two ranks under torchrun; SIGTERM reaches rank 1 only: both agree at the next step end,
    one checkpoint is saved, and both exit with the requeue code."""
    from megatron_sfm.training.signals import requeue_exit_code
    from megatron_sfm.utils.net import free_port

    out = tmp_path / "out"
    cmd = [sys.executable, "-c", _SLOW.replace("from megatron_sfm.cli import main", "import os\n"
           "open(os.environ['PIDS'] + os.environ['RANK'], 'w').write(str(os.getpid()))\n"
           "from megatron_sfm.cli import main"),
           "posttrain", "sft", str(base_model_dir), "--data", str(sft_file), "--out", str(out), "--config", str(TINY),
           "--no-progress"]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                str(free_port()), "--no-python", *cmd]
    env = dict(os.environ, PIDS=str(tmp_path / "pid"))
    proc = subprocess.Popen(launcher, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)
    state = out / "checkpoints" / "checkpoint-4" / "trainer_state.json"
    deadline = time.time() + 180
    try:
        while not state.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
        os.kill(int((tmp_path / "pid1").read_text()), signal.SIGTERM)
        proc.wait(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    log = proc.stdout.read().decode()
    steps = sorted(int(p.name.split("-")[1]) for p in (out / "checkpoints").glob("checkpoint-*"))
    assert 4 < steps[-1] < 12, (steps, log[-3000:])
    assert log.count(f"saved checkpoint-{steps[-1]} at step {steps[-1]}; exiting with {requeue_exit_code()}") == 2, \
        log[-3000:]
    assert not (out / MANIFEST).exists()

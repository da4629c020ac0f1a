"""Exact resume after kill -9, SIGTERM -> requeue, crash mid-save, resharding, broken or changed
shards, refused schedule changes."""

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from training_helpers import check, kill_session, run_train, scalars, write_config
from megatron_sfm.config import load_config
from megatron_sfm.errors import SfmError
from megatron_sfm.training.checkpoint import latest_checkpoint, verify_checkpoint


def _records(folder: Path) -> dict[int, list]:
    """iteration -> [(global index, content hash)] over all ranks' sample logs."""
    out: dict[int, list] = {}
    for path in sorted(folder.glob("samples.rank*.jsonl")):
        for line in path.read_text().splitlines():
            r = json.loads(line)
            out.setdefault(r["iter"], []).extend(zip(r["idx"], r["hash"]))
    return {k: sorted(v) for k, v in out.items()}


def test_kill9_then_resume_is_exact(tmp_path, corpus, reference_run):
    kill_at = random.Random(os.urandom(8)).randint(6, 9)  # a checkpoint every 3 iterations
    cfg = write_config(tmp_path / "cfg.yaml", corpus)
    save = tmp_path / "ckpt"
    killed = run_train(cfg, [f"checkpoint.save={save}", "checkpoint.save_interval=3", "training.eval_interval=5",
                             f"logging.tensorboard_dir={tmp_path / 'tb1'}"],
                       env={"SFM_FAULTS": f"kill@{kill_at}", "SFM_SAMPLE_LOG": str(tmp_path / "s1")})
    assert killed.returncode == -signal.SIGKILL, (kill_at, killed.stderr[-3000:])
    last = ((kill_at - 1) // 3) * 3  # the kill comes right after step kill_at, before that step's save
    assert latest_checkpoint(save).name == f"iter_{last:07d}"
    check(run_train(cfg, [f"checkpoint.save={save}", "checkpoint.save_interval=3", "training.eval_interval=5",
                          f"logging.tensorboard_dir={tmp_path / 'tb2'}"],
                    env={"SFM_SAMPLE_LOG": str(tmp_path / "s2")}))
    ref = scalars(reference_run / "ckpt" / "tensorboard", "train/loss")
    resumed = scalars(tmp_path / "tb2", "train/loss")
    assert sorted(resumed) == list(range(last + 1, 11)), kill_at
    for step in resumed:  # exactly equal, not just close
        assert resumed[step] == ref[step], (kill_at, step, resumed[step], ref[step])
    assert scalars(tmp_path / "tb2", "valid/loss")[10] == scalars(reference_run / "ckpt" / "tensorboard", "valid/loss")[10]
    # consumed samples: killed run's iterations up to the checkpoint + resumed run = the reference
    before, after, full = _records(tmp_path / "s1"), _records(tmp_path / "s2"), _records(reference_run / "samples")
    effective = {k: v for k, v in before.items() if k <= last}
    assert not set(effective) & set(after)
    effective.update(after)
    assert effective == full
    indices = sorted(i for v in effective.values() for i, _ in v)
    assert indices == list(range(10 * 8)), "gap or repeat in consumed sample indices"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1], ids=["SIGTERM", "SIGUSR1"])
def test_signal_saves_and_exits_with_requeue_code(tmp_path, corpus, sig):
    from megatron_sfm.launch.exit_codes import REQUEUE_EXIT_CODE

    cfg = write_config(tmp_path / "cfg.yaml", corpus, training={"train_iters": 100000})
    save = tmp_path / "ckpt"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    errfile = open(tmp_path / "stderr.txt", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "megatron_sfm.cli", "train", str(cfg), f"checkpoint.save={save}"],
                            stdout=subprocess.PIPE, stderr=errfile, text=True, env=env, start_new_session=True)
    out = ""
    try:
        for line in proc.stdout:
            if line.startswith("iter 3/"):
                break
        proc.send_signal(sig)
        proc.wait(timeout=180)
        kill_session(proc.pid)  # leftover multiprocessing helpers would keep stdout open
        out = proc.stdout.read()
    finally:
        kill_session(proc.pid)
        proc.wait()
        errfile.seek(0)
        err = errfile.read()
        errfile.close()
    assert proc.returncode == REQUEUE_EXIT_CODE, err[-3000:]
    assert "requeue" in out
    folder = latest_checkpoint(save)
    state = verify_checkpoint(folder)
    assert state["reason"] == "signal" and state["iteration"] >= 3
    assert state["consumed_train_samples"] == 8 * state["iteration"]


def test_sigterm_on_one_of_two_data_parallel_ranks_stops_both_at_the_same_step(tmp_path, corpus):
    """DP=2: rank 1 alone gets SIGTERM after step 3; the ranks agree at the step boundary
    (an all-reduce), save one checkpoint at iteration 4 at the latest, and stop."""
    from megatron_sfm.launch.exit_codes import REQUEUE_EXIT_CODE

    cfg = write_config(tmp_path / "cfg.yaml", corpus, training={"train_iters": 100})
    save = tmp_path / "ckpt"
    proc = run_train(cfg, [f"checkpoint.save={save}"], nproc=2, env={"SFM_FAULTS": "sigterm_rank1@3"})
    assert proc.returncode != 0  # torchrun reports the ranks' exit code 75 as a failure
    assert proc.stderr.count(f"exitcode  : {REQUEUE_EXIT_CODE} ") == 2, proc.stderr[-3000:]  # both ranks
    state = verify_checkpoint(latest_checkpoint(save))
    assert state["reason"] == "signal" and state["iteration"] in (3, 4), state
    assert state["parallel"]["data_parallel_size"] == 2
    assert state["consumed_train_samples"] == 8 * state["iteration"]


def test_crash_in_the_middle_of_a_save_keeps_previous_latest(tmp_path, corpus, reference_run):
    cfg = write_config(tmp_path / "cfg.yaml", corpus)
    save = tmp_path / "ckpt"
    crashed = run_train(cfg, [f"checkpoint.save={save}", "checkpoint.save_interval=2"],
                        env={"SFM_FAULTS": "crash_in_save@4"})
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr[-3000:]
    assert (save / ".iter_0000004.tmp").is_dir()  # shards written, never finalised
    assert not (save / "iter_0000004").exists()
    assert latest_checkpoint(save).name == "iter_0000002"
    verify_checkpoint(save / "iter_0000002")
    check(run_train(cfg, [f"checkpoint.save={save}", "checkpoint.save_interval=2",
                          f"logging.tensorboard_dir={tmp_path / 'tb'}"]))
    ref = scalars(reference_run / "ckpt" / "tensorboard", "train/loss")
    got = scalars(tmp_path / "tb", "train/loss")
    assert min(got) == 3 and all(got[s] == ref[s] for s in got)
    assert not (save / ".iter_0000004.tmp").exists()  # cleaned by the next save


@pytest.mark.parametrize("saved_layout", [["parallel.tensor_model_parallel_size=2"],
                                          ["parallel.pipeline_model_parallel_size=2"],
                                          []],  # DP=2: distributed optimizer sharded over DP, fully parallel save
                         ids=["tp2", "pp2", "dp2"])
def test_save_sharded_resume_single_process(tmp_path, corpus, reference_run, saved_layout):
    cfg = write_config(tmp_path / "cfg.yaml", corpus)
    save = tmp_path / "ckpt"
    check(run_train(cfg, saved_layout + [f"checkpoint.save={save}", "training.exit_interval=5",
                                         f"logging.tensorboard_dir={tmp_path / 'tb1'}"], nproc=2))
    saved = verify_checkpoint(latest_checkpoint(save))
    assert saved["iteration"] == 5 and saved["parallel"]["world_size"] == 2
    check(run_train(cfg, [f"checkpoint.save={save}", "training.exit_interval=6",
                          f"logging.tensorboard_dir={tmp_path / 'tb2'}"]))
    ref = scalars(reference_run / "ckpt" / "tensorboard", "train/loss")
    got = scalars(tmp_path / "tb2", "train/loss")
    assert list(got) == [6]
    assert abs(got[6] - ref[6]) < 1e-5, (got[6], ref[6])


def test_resolved_config_lands_beside_checkpoints(reference_run):
    ckpt = reference_run / "ckpt"
    expected = load_config(reference_run / "cfg.yaml", [f"checkpoint.save={ckpt}", "checkpoint.save_interval=5",
                                                        "training.eval_interval=5"])
    for path in (ckpt / "config.yaml", ckpt / "iter_0000005" / "config.yaml", ckpt / "iter_0000010" / "config.yaml"):
        assert load_config(path) == expected
    state = json.loads((ckpt / "iter_0000010" / "train_state.json").read_text())
    assert state["iteration"] == 10 and state["consumed_train_samples"] == 80
    assert (ckpt / "latest").read_text().strip() == "10"


def _copy_ckpt(reference_run, tmp_path) -> Path:
    dst = tmp_path / "ckpt"
    shutil.copytree(reference_run / "ckpt", dst, ignore=shutil.ignore_patterns("tensorboard"))
    return dst


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_broken_shard_is_a_clear_error(tmp_path, corpus, reference_run, damage):
    save = _copy_ckpt(reference_run, tmp_path)
    shard = sorted((save / "iter_0000010").glob("*.distcp"))[0]
    if damage == "missing":
        shard.unlink()
    else:
        data = shard.read_bytes()
        shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(SfmError, match=f"{shard.name} is {damage}"):
        verify_checkpoint(save / "iter_0000010")
    if damage == "truncated":
        return  # the resume path below is the same for both
    cfg = write_config(tmp_path / "cfg.yaml", corpus, training={"train_iters": 12})
    proc = run_train(cfg, [f"checkpoint.save={save}"])
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and shard.name in last and "Traceback" not in proc.stderr


def _flip_inside_largest_chunk(folder: Path) -> Path:
    """Change bytes in the middle of the largest stored tensor chunk (file size unchanged)."""
    from megatron_sfm.conversion.dcp_reader import read_metadata

    info = max(read_metadata(folder).storage_data.values(), key=lambda i: i.length)
    shard = folder / info.relative_path
    data = bytearray(shard.read_bytes())
    middle = info.offset + info.length // 2
    data[middle:middle + 64] = bytes(b ^ 0x5A for b in data[middle:middle + 64])
    shard.write_bytes(bytes(data))
    return shard


def test_changed_bytes_inside_a_shard_refuse_resume(tmp_path, corpus, reference_run):
    """Same size, other content: the manifest checksum refuses it; verify_checksums=false loads it."""
    save = _copy_ckpt(reference_run, tmp_path)
    shard = _flip_inside_largest_chunk(save / "iter_0000010")
    with pytest.raises(SfmError, match=f"{shard.name} is damaged"):
        verify_checkpoint(save / "iter_0000010")
    cfg = write_config(tmp_path / "cfg.yaml", corpus)
    proc = run_train(cfg, [f"checkpoint.save={save}"])
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and f"checkpoint file {shard.name} is damaged" in last
    assert "Traceback" not in proc.stderr
    # skipping the check: torch loads the changed bytes without noticing (why the checksum exists)
    proc = check(run_train(cfg, [f"checkpoint.save={save}", "checkpoint.verify_checksums=false"]))
    assert "resumed from iteration 10" in proc.stdout


def test_tampered_shard_without_size_change_is_a_clear_error(tmp_path, corpus, reference_run):
    """A zeroed .metadata is refused by its checksum; without the check, the torch-level load
    failure is still one SfmError line."""
    save = _copy_ckpt(reference_run, tmp_path)
    meta = save / "iter_0000010" / ".metadata"
    meta.write_bytes(b"\0" * meta.stat().st_size)
    cfg = write_config(tmp_path / "cfg.yaml", corpus)
    proc = run_train(cfg, [f"checkpoint.save={save}"])
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "checkpoint file .metadata is damaged" in last
    proc = run_train(cfg, [f"checkpoint.save={save}", "checkpoint.verify_checksums=false"])
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "cannot load checkpoint" in last and "Traceback" not in proc.stderr


def test_resume_with_another_schedule_is_refused_unless_allowed(tmp_path, corpus, reference_run):
    save = _copy_ckpt(reference_run, tmp_path)
    cfg = write_config(tmp_path / "cfg.yaml", corpus, training={"train_iters": 12})
    proc = run_train(cfg, [f"checkpoint.save={save}"])
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: training.train_iters: 12 differs from 10 in the checkpoint's ")
    assert "checkpoint.allow_schedule_change=true" in last and "Traceback" not in proc.stderr
    assert latest_checkpoint(save).name == "iter_0000010"  # nothing trained, nothing saved
    # another LR schedule as well: every changed key is named
    proc = run_train(cfg, [f"checkpoint.save={save}", "optimizer.min_lr=0.0001"])
    assert proc.returncode == 2 and "(and optimizer.min_lr)" in proc.stderr.strip().splitlines()[-1]
    # intended: the override proceeds, says so in the log and records it in train_state.json
    proc = check(run_train(cfg, [f"checkpoint.save={save}", "checkpoint.allow_schedule_change=true",
                                 f"logging.tensorboard_dir={tmp_path / 'tb'}"]))
    assert ("checkpoint.allow_schedule_change: resuming " in proc.stderr
            and "iteration 10 with training.train_iters changed from 10 to 12" in proc.stderr)
    assert sorted(scalars(tmp_path / "tb", "train/loss")) == [11, 12]
    state = verify_checkpoint(latest_checkpoint(save))
    assert state["iteration"] == 12
    assert state["schedule_changes"] == [{"iteration": 10, "key": "training.train_iters", "saved": 10, "now": 12}]


def test_the_writer_checksums_what_it_wrote(tmp_path, monkeypatch):
    """The save's writer function hashes its own files (the sidecar rank 0 merges); no re-read
    by rank 0 for them."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy

    from megatron_sfm import checkpoint_format as fmt
    from megatron_sfm.config.loader import config_from_dict
    from megatron_sfm.model.builder import build_gpt_model
    from megatron_sfm.model.parallel import destroy_parallel, initialize_parallel
    from megatron_sfm.training.checkpoint import with_checksums

    cfg = config_from_dict({"model": {"preset": "tiny", "precision": "fp32", "attention_backend": "sdpa"}})
    initialize_parallel(cfg.parallel, seed=0)
    try:
        model = build_gpt_model(cfg.model, cfg.parallel)
        folder = tmp_path / "iter_0000001"
        folder.mkdir()
        request = dist_checkpointing.save({"model": model.sharded_state_dict()}, str(folder),
                                          sharded_strategy=get_default_save_sharded_strategy("torch_dist"),
                                          async_sharded_save=True)
        with_checksums(request, folder).execute_sync()
    finally:
        destroy_parallel()
    sidecar = json.loads((folder / ".sfm_checksums.0.json").read_text())
    shards = sorted(p.name for p in folder.glob("*.distcp"))
    assert shards and sorted(sidecar) == shards
    hashed = []
    original = fmt.file_checksum
    monkeypatch.setattr(fmt, "file_checksum", lambda path: hashed.append(Path(path).name) or original(path))
    files = fmt.write_manifest(folder)["files"]
    monkeypatch.undo()
    assert not set(hashed) & set(shards)  # taken from the writer, not read again
    for name in shards:
        assert files[name]["checksum"] == sidecar[name]["checksum"] == original(folder / name)
    fmt.verify_files(folder)


def test_schedule_changes_compare_the_data_by_content():
    from types import SimpleNamespace as NS

    from megatron_sfm.training.checkpoint import schedule_changes

    def cfg(blend):
        return NS(training=NS(train_iters=10, global_batch_size=8), model=NS(seq_length=64),
                  optimizer=NS(lr=1e-3, min_lr=0.0, warmup_iters=0, warmup_fraction=None, decay_style="cosine"),
                  data=NS(blend=blend, phases=None, stage=None, mock=False))

    same, a, b = {"data.blend": "5" * 64}, {"data.blend": "a" * 64}, {"data.blend": "b" * 64}
    assert schedule_changes(cfg("/mnt/x/blend.json"), cfg("blend.json"), same, same) == []  # another path
    assert schedule_changes(cfg("blend.json"), cfg("blend.json"), a, b) == [  # same path, new content
        ("data.blend", "blend.json (content sha256 aaaaaaaaaaaa)", "blend.json (content sha256 bbbbbbbbbbbb)")]
    # a checkpoint from before data_sha256: the path string decides, as it did
    assert schedule_changes(cfg("/mnt/x/blend.json"), cfg("blend.json"), None, same) == [
        ("data.blend", "/mnt/x/blend.json", "blend.json")]


def test_resume_follows_the_data_not_its_path(tmp_path, corpus, reference_run):
    """The reference checkpoint recorded its blend's content: the same blend copied elsewhere
    resumes; an edited copy is refused, naming both contents."""
    save = _copy_ckpt(reference_run, tmp_path)
    assert verify_checkpoint(latest_checkpoint(save))["data_sha256"].keys() == {"data.blend"}
    shutil.copytree(corpus.parent, tmp_path / "moved")  # blends name their datasets relative to themselves
    moved = tmp_path / "moved" / corpus.name
    check(run_train(write_config(tmp_path / "cfg.yaml", moved), [f"checkpoint.save={save}"]))
    blend = json.loads(moved.read_text())
    blend["train"][0] = blend["train"][0] * 2 if isinstance(blend["train"][0], (int, float)) else blend["train"][0]
    moved.write_text(json.dumps(blend) + "\n")
    proc = run_train(write_config(tmp_path / "cfg.yaml", moved), [f"checkpoint.save={save}"])
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert re.match(r"error: data\.blend: '.*moved/blend\.json \(content sha256 [0-9a-f]{12}\)' differs from "
                    r"'.*blend\.json \(content sha256 [0-9a-f]{12}\)' in the checkpoint's ", last), last

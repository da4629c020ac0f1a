"""Megatron-Core's async checkpoint save, forced on CPU with SFM_ASYNC_SAVE_ON_CPU=1.

An async save forks a background writer and is finalised (folder renamed, ``latest``
rewritten) only at a later ``finalize``: the per-step non-blocking check, the next save,
or the exit. The fault hook ``kill@N`` fires right after step N, before that step's
finalise check, so with saves every 2 steps ``kill@7`` always finds the save of step 6
scheduled and not finalised: ``latest`` must still name 4 (a synchronous save would have
moved it to 6, so these tests also prove the async path ran).
"""

import signal

import pytest

from training_helpers import check, run_train, scalars, write_config
from megatron_sfm.training.checkpoint import ASYNC_ON_CPU_ENV, latest_checkpoint, verify_checkpoint

ASYNC = {ASYNC_ON_CPU_ENV: "1"}


@pytest.fixture(scope="module")
def dp2_async_run(tmp_path_factory, corpus):
    """An uninterrupted DP=2 run with async saves at 5 and 10, the writer of 10 delayed."""
    folder = tmp_path_factory.mktemp("dp2_async")
    cfg = write_config(folder / "cfg.yaml", corpus)
    proc = run_train(cfg, [f"checkpoint.save={folder / 'ckpt'}", "checkpoint.save_interval=5"], nproc=2,
                     env={**ASYNC, "SFM_FAULTS": "slow_async_save@10"})
    return folder, proc


def _killed_run_then_resume(tmp_path, cfg, nproc: int) -> dict[int, float]:
    """Async saves every 2 steps, kill -9 after step 7, resume to 10; returns the resumed losses.

    The writer of step 4 is delayed past steps 5 and 6, which update the weights and the
    optimizer state in place: resuming exactly shows it wrote step 4's state (cloned when
    planned, or the fork's copy-on-write snapshot), not what the trainer held by then.
    """
    save = tmp_path / "ckpt"
    killed = run_train(cfg, [f"checkpoint.save={save}", "checkpoint.save_interval=2",
                             f"logging.tensorboard_dir={tmp_path / 'tb1'}"], nproc=nproc,
                       env={**ASYNC, "SFM_FAULTS": "slow_async_save@4;kill@7"})
    if nproc == 1:
        assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    else:  # torchrun reports the ranks' deaths as its own failure
        assert killed.returncode != 0 and "SIGKILL" in killed.stderr, killed.stderr[-3000:]
    assert latest_checkpoint(save).name == "iter_0000004"  # the save of step 6 was never finalised
    assert not (save / "iter_0000006").exists()
    verify_checkpoint(save / "iter_0000004")
    check(run_train(cfg, [f"checkpoint.save={save}", "checkpoint.save_interval=2",
                          f"logging.tensorboard_dir={tmp_path / 'tb2'}"], nproc=nproc, env=ASYNC))
    assert verify_checkpoint(latest_checkpoint(save))["iteration"] == 10
    return scalars(tmp_path / "tb2", "train/loss")


def test_async_resume_is_exact_single_process(tmp_path, corpus, reference_run):
    cfg = write_config(tmp_path / "cfg.yaml", corpus)
    resumed = _killed_run_then_resume(tmp_path, cfg, nproc=1)
    ref = scalars(reference_run / "ckpt" / "tensorboard", "train/loss")  # synchronous saves at 5 and 10
    assert sorted(resumed) == list(range(5, 11))
    for step in resumed:  # exactly equal, not just close
        assert resumed[step] == ref[step], (step, resumed[step], ref[step])


def test_async_resume_is_exact_dp2(tmp_path, corpus, reference_run, dp2_async_run):
    folder, uninterrupted = dp2_async_run
    check(uninterrupted)
    cfg = write_config(tmp_path / "cfg.yaml", corpus)
    resumed = _killed_run_then_resume(tmp_path, cfg, nproc=2)
    ref = scalars(folder / "ckpt" / "tensorboard", "train/loss")
    assert sorted(resumed) == list(range(5, 11))
    for step in resumed:  # exactly the uninterrupted DP=2 run's losses
        assert resumed[step] == ref[step], (step, resumed[step], ref[step])
    single = scalars(reference_run / "ckpt" / "tensorboard", "train/loss")
    for step in ref:  # and DP=2 with async saves is the single-process run up to reduction order
        assert abs(ref[step] - single[step]) < 1e-5, (step, ref[step], single[step])


def test_kill_while_async_write_in_flight_keeps_previous_latest(tmp_path, corpus, reference_run):
    """The writer of step 6 sleeps before writing; the kill after step 7 lands while it is in flight."""
    cfg = write_config(tmp_path / "cfg.yaml", corpus)
    save = tmp_path / "ckpt"
    killed = run_train(cfg, [f"checkpoint.save={save}", "checkpoint.save_interval=2"],
                       env={**ASYNC, "SFM_FAULTS": "slow_async_save@6;kill@7"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    pending = save / ".iter_0000006.tmp"
    assert pending.is_dir() and not (save / "iter_0000006").exists()
    assert not list(pending.glob("*.distcp")), "the delayed writer had already written its shards"
    assert not (pending / "manifest.json").exists()
    assert latest_checkpoint(save).name == "iter_0000004"
    assert verify_checkpoint(save / "iter_0000004")["iteration"] == 4
    # it loads: one more step gives the reference's loss, and the exit save is waited for
    check(run_train(cfg, [f"checkpoint.save={save}", "training.exit_interval=5",
                          f"logging.tensorboard_dir={tmp_path / 'tb'}"], env=ASYNC))
    got = scalars(tmp_path / "tb", "train/loss")
    assert got == {5: scalars(reference_run / "ckpt" / "tensorboard", "train/loss")[5]}
    assert verify_checkpoint(latest_checkpoint(save))["reason"] == "exit"
    assert latest_checkpoint(save).name == "iter_0000005"
    assert not pending.exists()  # cleaned by the next finalised save


@pytest.mark.parametrize("nproc", [1, 2], ids=["1rank", "dp2"])
def test_exit_waits_for_pending_async_save(tmp_path, corpus, dp2_async_run, nproc):
    """The last save's writer is delayed: the run still ends with that checkpoint complete and `latest`."""
    if nproc == 1:
        save = tmp_path / "ckpt"
        proc = run_train(write_config(tmp_path / "cfg.yaml", corpus),
                         [f"checkpoint.save={save}", "checkpoint.save_interval=5"],
                         env={**ASYNC, "SFM_FAULTS": "slow_async_save@10"})
    else:
        folder, proc = dp2_async_run
        save = folder / "ckpt"
    check(proc)
    assert "finished: 10 iterations" in proc.stdout
    assert latest_checkpoint(save).name == "iter_0000010"
    state = verify_checkpoint(save / "iter_0000010")
    assert state["iteration"] == 10 and state["consumed_train_samples"] == 80
    assert list(save.glob(".iter_*")) == []

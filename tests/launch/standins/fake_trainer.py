"""Stand-in trainer for the launch tests (a fixture, not the product).

Usage (as torchrun's script): fake_trainer.py CONFIG.yaml. Reads ``checkpoint.save`` and
``training.train_iters``; resumes from ``<save>/latest`` (an iteration number); one "step"
sleeps ``SFM_FAKE_STEP_SECONDS`` (default 0.3). On SIGUSR1 or SIGTERM every rank agrees
(all-reduce), rank 0 writes ``latest`` and all exit with REQUEUE_EXIT_CODE. Rank 0 appends
one JSON line per event to ``<save>/events.jsonl`` and keeps ``<save>/running`` while in
the loop.
"""

import json
import os
import signal
import sys
import time

import torch
import torch.distributed as dist
import yaml

from megatron_sfm.launch.exit_codes import REQUEUE_EXIT_CODE

_stop = {"signal": None}


def _on_signal(signum, frame):
    _stop["signal"] = signal.Signals(signum).name


def main() -> int:
    cfg = yaml.safe_load(open(sys.argv[1]))
    save, iters = cfg["checkpoint"]["save"], cfg["training"]["train_iters"]
    step_s = float(os.environ.get("SFM_FAKE_STEP_SECONDS", "0.3"))
    signal.signal(signal.SIGUSR1, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    latest = os.path.join(save, "latest")
    start = int(open(latest).read()) if os.path.exists(latest) else 0

    def event(**kw):
        if rank == 0:
            kw.update(restart=int(os.environ.get("SLURM_RESTART_COUNT", "0")), world=dist.get_world_size(),
                      job=os.environ.get("SLURM_JOB_ID"))
            with open(os.path.join(save, "events.jsonl"), "a") as f:
                f.write(json.dumps(kw) + "\n")

    if rank == 0:
        os.makedirs(save, exist_ok=True)
        open(os.path.join(save, "running"), "w").write(os.environ.get("SLURM_RESTART_COUNT", "0"))
    event(kind="start", step=start)
    step = start
    while step < iters:
        time.sleep(step_s)
        flag = torch.tensor([1.0 if _stop["signal"] else 0.0])
        dist.all_reduce(flag)
        step += 1
        if flag.item() > 0:
            if rank == 0:
                open(latest + ".tmp", "w").write(str(step))
                os.replace(latest + ".tmp", latest)
                os.remove(os.path.join(save, "running"))
            event(kind="saved", step=step, signal=_stop["signal"])
            dist.barrier()
            dist.destroy_process_group()
            return REQUEUE_EXIT_CODE
    if rank == 0:
        open(latest + ".tmp", "w").write(str(step))
        os.replace(latest + ".tmp", latest)
        os.remove(os.path.join(save, "running"))
    event(kind="finished", step=step)
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())

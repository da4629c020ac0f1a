"""Stand-in job for the launch tests: a gloo all-reduce across every rank torchrun started.

Usage (as torchrun's script): allreduce.py OUT.json. Rank 0 writes what the ranks saw.
With STANDIN_FAIL=1 in the environment every rank exits 1 at once (a failing stage).
"""

import json
import os
import socket
import sys

if os.environ.get("STANDIN_FAIL") == "1":
    sys.exit(1)

import torch
import torch.distributed as dist


def main() -> int:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    value = torch.tensor([float(rank + 1)])
    dist.all_reduce(value)
    info = [None] * world
    dist.all_gather_object(info, {
        "rank": rank, "local_rank": int(os.environ["LOCAL_RANK"]), "group_rank": int(os.environ["GROUP_RANK"]),
        "slurm_nodeid": os.environ.get("SLURM_NODEID"), "slurmd_nodename": os.environ.get("SLURMD_NODENAME"),
        "host": socket.gethostname(), "backend": os.environ.get("SFM_DIST_BACKEND"),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"), "master_addr": os.environ.get("MASTER_ADDR"),
    })
    if rank == 0:
        with open(sys.argv[1] + ".tmp", "w") as f:
            json.dump({"world_size": world, "sum": value.item(), "ranks": info}, f)
        os.replace(sys.argv[1] + ".tmp", sys.argv[1])
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())

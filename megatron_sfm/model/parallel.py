"""Set up torch.distributed and Megatron-Core's parallel state for one process."""

from __future__ import annotations

import os

import torch

from megatron_sfm.compat import apply_all, default_backend
from megatron_sfm.config.schema import ParallelConfig
from megatron_sfm.utils.net import free_port


def initialize_parallel(parallel: ParallelConfig, seed: int = 1234) -> None:
    """Initialise the process group (env:// from torchrun/srun) and the model-parallel groups.

    Works in a single process without torchrun (world size 1). NCCL on GPUs, gloo on CPU.
    """
    import torch.distributed as dist
    from megatron.core import parallel_state, tensor_parallel

    apply_all()
    if not dist.is_initialized():
        _fill_env_from_slurm()
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        if "RANK" in os.environ:
            dist.init_process_group(default_backend())  # env:// from torchrun / srun
        else:
            # A lone process: a private store on a free port. The environment is left
            # alone, so child processes (tests, the demo) do not inherit a rank and a
            # port that this process holds.
            dist.init_process_group(default_backend(), init_method=f"tcp://127.0.0.1:{free_port()}",
                                    rank=0, world_size=1)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=parallel.tensor_model_parallel_size,
            pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
            virtual_pipeline_model_parallel_size=parallel.virtual_pipeline_model_parallel_size,
        )
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def destroy_parallel() -> None:
    import torch.distributed as dist
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def _fill_env_from_slurm() -> None:
    """Under ``srun python ...`` (one task per GPU), take ranks from SLURM's variables."""
    if "RANK" in os.environ or "SLURM_PROCID" not in os.environ or "SLURM_NTASKS" not in os.environ:
        return
    os.environ["RANK"] = os.environ["SLURM_PROCID"]
    os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
    os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")

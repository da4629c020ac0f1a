"""Cluster launch: render and submit SLURM batch jobs that run ``sfm train`` under torchrun.

``megatron_sfm.launch.slurm`` renders the batch script (``templates/sbatch.sh``, package
data) and submits it; ``plan`` submits a multi-stage plan as dependent jobs;
``exit_codes`` holds the exit-code contract with the trainer. Nothing here imports torch
or Megatron-Core.
"""

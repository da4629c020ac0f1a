"""Cluster launch: render and submit SLURM batch jobs that call the ``sfm`` CLI.

``megatron_sfm.launch.slurm`` renders the training job's batch script
(``templates/sbatch.sh``, package data) and submits it; ``plan`` submits a multi-stage
plan as dependent jobs, whose stages may also convert, post-train (SFT/DPO under
``accelerate launch``) and evaluate (``stages``, ``templates/single.sh``); ``data_jobs``
runs data stages as job arrays; ``exit_codes`` holds the exit-code contract with the
trainer. Nothing here imports torch or Megatron-Core.
"""

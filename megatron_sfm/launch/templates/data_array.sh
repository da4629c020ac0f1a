#!/bin/bash
# Rendered by `sfm launch slurm-data` (megatron-sfm {{version}}) on {{rendered_at}}; docs/launch.md explains it.
# The scheduler options are on the sbatch command line (never parsed from this file):
#   {{sbatch_command}}
# {{what}}
set -uo pipefail

SFM_DATA_DIR={{data_dir}}
SFM_WORKDIR={{workdir}}
SFM_PYTHON={{python}}
cd "$SFM_WORKDIR" || exit 1
export PYTHONUNBUFFERED=1 PYTHONFAULTHANDLER=1
{{user_env}}

printf "[sfm %s] job %s task %s on %s\n" "$(date +%FT%T)" "${SLURM_JOB_ID:-?}" "${SLURM_ARRAY_TASK_ID:--}" "${SLURMD_NODENAME:-$(hostname)}"
{{step}}

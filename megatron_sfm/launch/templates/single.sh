#!/bin/bash
# Rendered by `sfm launch slurm` (megatron-sfm {{version}}) on {{rendered_at}}; docs/launch.md explains it.
# The scheduler options are on the sbatch command line (never parsed from this file):
#   {{sbatch_command}}
# Plan stage of kind {{kind}}: {{count}} command(s), one after the other, each one process on one node.
# Not requeued (sbatch --no-requeue, no time-limit warning): a failed command fails the job,
# and the plan's later stages are cancelled.
set -uo pipefail

SFM_JOB_DIR={{job_dir}}
SFM_WORKDIR={{workdir}}
SFM_PYTHON={{python}}
cd "$SFM_WORKDIR" || exit 1

# Defaults; a value exported by the submitting shell wins.
{{default_env}}
{{backend}}
{{user_env}}

log() { printf "[sfm %s] %s\n" "$(date +%FT%T)" "$*"; }

# run_step COMMAND...: one task on one node; stop the job at the first failure
run_step() {
  log "running:$(printf ' %q' "$@")"
  {{srun}} "$@"
  local rc=$?
  if [ "$rc" -ne 0 ]; then log "{{kind}} step failed with exit code $rc"; exit "$rc"; fi
}

log "job $SLURM_JOB_ID: {{kind}} stage on ${SLURMD_NODENAME:-$(hostname)}"
{{commands}}
log "{{kind}} finished"

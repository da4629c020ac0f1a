#!/bin/bash
# Rendered by `sfm launch slurm` (megatron-sfm {{version}}) on {{rendered_at}}; docs/launch.md explains it.
# A requeueable {{what}} job: one launcher per node, saved and requeued near the time limit.
# The scheduler options are on the sbatch command line (never parsed from this file):
#   {{sbatch_command}}
# Exit codes: 0 finished; {{requeue_exit_code}} saved and requeued; anything else failed.
set -uo pipefail

SFM_JOB_DIR={{job_dir}}
SFM_WORKDIR={{workdir}}
SFM_CONFIG={{config}}
SFM_CHECKPOINT_DIR={{checkpoint_dir}}
SFM_PYTHON={{python}}
SFM_NPROC_PER_NODE={{nproc_per_node}}
SFM_MAX_REQUEUES={{max_requeues}}
SFM_REQUEUE_EXIT_CODE={{requeue_exit_code}}
cd "$SFM_WORKDIR" || exit 1

# Network and NCCL defaults; a value exported by the submitting shell wins.
{{default_env}}
{{backend}}
{{user_env}}

log() { printf "[sfm %s] %s\n" "$(date +%FT%T)" "$*"; }

# SLURM sends USR1 to this shell GRACE seconds before the time limit (--signal=B:USR1@GRACE);
# `scancel --batch --signal=USR1 JOBID` does the same by hand. SLURM signals every process of
# a step, and USR1 would kill the trainer's helper processes, so the step gets the harmless
# WINCH instead and megatron_sfm.launch.node turns it into {{rank_signal}} for the trainer ranks only.
# The job is requeued once the step has ended.
sfm_signalled=0
sfm_trapped=0
srun_pid=
resend_pid=
SFM_STOP_SIGNAL=$(kill -l WINCH)
on_usr1() {
  [ "$sfm_signalled" = 1 ] || log "USR1: asking the trainer to save and stop"
  sfm_signalled=1
  sfm_trapped=1
  if [ -n "$srun_pid" ]; then
    scancel --signal="$SFM_STOP_SIGNAL" "$SLURM_JOB_ID" || log "scancel --signal failed"
  fi
  # A trainer still starting up has no USR1 handler yet (it inherits 'ignore'), so repeat
  # the request every {{resignal_seconds}} s until the step has ended.
  (sleep {{resignal_seconds}}; kill -USR1 $$) </dev/null >/dev/null 2>&1 & resend_pid=$!
}
trap on_usr1 USR1

restarts="${SLURM_RESTART_COUNT:-0}"
MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
# A node name that does not resolve (NodeName differs from the host name, or several
# slurmd's on one test host): use the address SLURM itself reaches the node at.
if ! getent hosts "$MASTER_ADDR" >/dev/null 2>&1; then
  node_addr="$(scontrol show node "$MASTER_ADDR" | tr " " "\n" | sed -n "s/^NodeAddr=//p" | head -n 1)"
  if [ -n "$node_addr" ]; then MASTER_ADDR="$node_addr"; fi
fi
MASTER_PORT={{master_port}}
export MASTER_ADDR MASTER_PORT
log "job $SLURM_JOB_ID (restart $restarts, at most $SFM_MAX_REQUEUES): $SLURM_JOB_NUM_NODES node(s) x $SFM_NPROC_PER_NODE process(es), rendezvous on $MASTER_ADDR:$MASTER_PORT"
{{resume}}

if [ "$sfm_signalled" = 1 ]; then
  rc=$SFM_REQUEUE_EXIT_CODE  # warned before the trainer started: go straight to the requeue
else
  {{step}} &
  srun_pid=$!
  while :; do
    sfm_trapped=0
    wait "$srun_pid"; rc=$?
    # >128 with our trap run: the USR1 trap interrupted `wait`, the step is still running
    if [ "$sfm_trapped" = 1 ] && [ "$rc" -gt 128 ]; then continue; fi
    break
  done
fi
if [ -n "$resend_pid" ]; then kill "$resend_pid" 2>/dev/null; fi

if [ "$rc" -eq 0 ]; then log "{{what}} finished"; exit 0; fi
if [ "$sfm_signalled" = 1 ] || [ "$rc" -eq "$SFM_REQUEUE_EXIT_CODE" ]; then
  if [ "$restarts" -lt "$SFM_MAX_REQUEUES" ]; then
    log "step ended with exit code $rc (signalled: $sfm_signalled): requeueing (restart $((restarts + 1)) of at most $SFM_MAX_REQUEUES)"
    if scontrol requeue "$SLURM_JOB_ID"; then exit "$SFM_REQUEUE_EXIT_CODE"; fi
    log "scontrol requeue failed"
  else
    log "not requeueing: already restarted $restarts time(s), --max-requeues is $SFM_MAX_REQUEUES"
  fi
fi
if [ "$sfm_signalled" = 1 ]; then log "stopped after USR1 (exit code $rc), not requeued"; else log "{{what}} step failed with exit code $rc"; fi
exit "$rc"

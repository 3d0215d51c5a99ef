#!/usr/bin/env bash
# One task of an srun step (slurm/common.sh's shodh_run_tasks launches every task through this):
#   srun ... slurm/task.sh python -m shodh.pretrain ...
# - exports RANK / LOCAL_RANK / WORLD_SIZE from SLURM's per-task variables (MASTER_ADDR and
#   MASTER_PORT come from the batch script), so the module runs as under any torch launcher;
# - passes SIGUSR1 on to the module (whether slurmstepd signals the whole task or only us);
# - turns the module's "checkpointed for preemption" status (SHODH_PREEMPT_EXIT, default 75)
#   into 0 plus a marker file: a non-zero status would make srun --kill-on-bad-exit terminate the
#   other ranks while they may still be writing their part of the checkpoint. The batch script
#   reads the markers to decide on a requeue.
set -uo pipefail

export RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID WORLD_SIZE=$SLURM_NTASKS
preempt_exit=${SHODH_PREEMPT_EXIT:-75}

child=""
interrupted=0
# Set before the child starts, so an early USR1 cannot kill this shell (bash's default action).
trap 'interrupted=1; [[ -n $child ]] && kill -USR1 "$child" 2>/dev/null' USR1
"$@" &
child=$!
while :; do
  interrupted=0 rc=0
  wait "$child" || rc=$?
  # 138 = 128 + USR1: the trap interrupted `wait` and the child still runs.
  ((rc == 138 && interrupted)) || break
done

if ((rc == preempt_exit)) && [[ -n ${SHODH_PREEMPT_MARKS:-} ]]; then
  mkdir -p "$SHODH_PREEMPT_MARKS" && touch "$SHODH_PREEMPT_MARKS/rank-$RANK" && exit 0
fi
exit "$rc"

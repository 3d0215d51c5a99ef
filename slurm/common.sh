# Shared machinery of slurm/*.sbatch (sourced, never run). Each sbatch script is two things:
#
#   sbatch [sbatch options] slurm/X.sbatch [--profile P] [--root DIR] [args] [section.key=value ...]
#       the job itself: validates its arguments and the allocation in the first seconds (a bad
#       profile, override or node layout fails the job with one clear line, before any srun),
#       then runs the stage under srun;
#   slurm/X.sbatch [sbatch options --] [--profile P] [--root DIR] [args] [overrides]
#       run directly on the login node: the same validation plus `sbatch --test-only` (an
#       impossible node count is refused here), then it submits itself. Nothing is submitted
#       when a check fails, so mistakes surface at submission instead of after a queue wait.
#
# Knobs (environment; sbatch passes the submitting environment to the job by default):
#   SHODH_HOME     the shodh checkout (default: found from the script's own path)
#   SHODH_PYTHON   interpreter (default: $SHODH_HOME/.venv/bin/python if present, else python3)
#   SHODH_PROFILE, SHODH_ROOT   defaults for --profile / --root (default: paper, ./shodh-work)
#   SHODH_SRUN_ARGS  extra srun options (e.g. "--cpu-bind=cores")
#   SHODH_MASTER_ADDR, SHODH_MASTER_PORT  rendezvous (default: first node, 20000 + job id % 20000)
#   SHODH_MAX_REQUEUES  preemption requeues allowed per job (default 20; guards crash loops)
#   MLFLOW_TRACKING_URI, DS_ACCELERATOR, OMP_NUM_THREADS, NCCL_*/GLOO_*: passed through untouched.
#
# Preemption contract with the training modules: SIGUSR1 asks every rank to save a checkpoint at
# the next step boundary and exit with status SHODH_PREEMPT_EXIT (default 75, EX_TEMPFAIL).
# `#SBATCH --signal=B:USR1@S` delivers USR1 to the batch shell S seconds before the time limit
# (`scancel --signal=USR1 --batch JOB` does it on demand); the shell forwards it to srun, srun to
# every task (slurm/task.sh, then the module). The batch shell waits for all of them and then
# `scontrol requeue`s the job, which restarts under the same job id and resumes from the run
# directory's `latest` checkpoint. USR1 sent to the tasks only (`scancel --signal=USR1 JOB`)
# works too: their exit markers tell the batch shell to requeue.

SHODH_PREEMPT_EXIT=${SHODH_PREEMPT_EXIT:-75}

shodh_log() { echo "[$(date +%H:%M:%S) ${SHODH_STAGE:-shodh}] $*" >&2; }
# Exit status 2 is a usage error, as in `shodh`'s CLI.
shodh_die() { echo "${SHODH_STAGE:-shodh}: error: $*" >&2; exit 2; }

shodh_in_job() { [[ -n ${SLURM_JOB_ID:-} ]]; }

# ---- where things are -------------------------------------------------------------------------

shodh_setup_python() {
  SHODH_PYTHON=${SHODH_PYTHON:-}
  if [[ -z $SHODH_PYTHON ]]; then
    if [[ -x $SHODH_HOME/.venv/bin/python ]]; then SHODH_PYTHON=$SHODH_HOME/.venv/bin/python
    else SHODH_PYTHON=$(command -v python3 || true); fi
  fi
  [[ -n $SHODH_PYTHON ]] && "$SHODH_PYTHON" -c 'import shodh' 2>/dev/null \
    || shodh_die "no python with shodh installed (SHODH_PYTHON=${SHODH_PYTHON:-unset}); create $SHODH_HOME/.venv or set SHODH_PYTHON"
  export SHODH_PYTHON
}

# ---- arguments --------------------------------------------------------------------------------

# Splits "sbatch options -- script args" (submit mode only); sets SHODH_SBATCH_OPTS and SHODH_ARGS.
shodh_split_submit_args() {
  SHODH_SBATCH_OPTS=() SHODH_ARGS=()
  local arg seen=0
  for arg in "$@"; do [[ $arg == -- ]] && seen=1; done
  if ((seen)); then
    while (($#)) && [[ $1 != -- ]]; do SHODH_SBATCH_OPTS+=("$1"); shift; done
    shift
  fi
  SHODH_ARGS=("$@")
}

# Parses the stage arguments: --profile, --root (made absolute: tasks start on other nodes),
# dotted overrides (kept for validation) and any other flag (passed through). Sets SHODH_PROFILE,
# SHODH_ROOT, SHODH_OVERRIDES, SHODH_EXTRA and SHODH_STAGE_ARGS (what the module receives).
shodh_parse_args() {
  SHODH_PROFILE=${SHODH_PROFILE:-paper}
  SHODH_ROOT=${SHODH_ROOT:-./shodh-work}
  SHODH_OVERRIDES=() SHODH_EXTRA=()
  while (($#)); do
    case $1 in
      --profile=*) SHODH_PROFILE=${1#*=} ;;
      --root=*) SHODH_ROOT=${1#*=} ;;
      --profile | --root)
        (($# >= 2)) || shodh_die "$1 needs a value"
        if [[ $1 == --profile ]]; then SHODH_PROFILE=$2; else SHODH_ROOT=$2; fi
        shift ;;
      -*)
        # A flag of the stage (e.g. --run-name NAME): keep it and its value together.
        SHODH_EXTRA+=("$1")
        if [[ $1 != *=* ]] && (($# >= 2)) && [[ $2 != -* && $2 != *=* ]]; then SHODH_EXTRA+=("$2"); shift; fi ;;
      *=*) SHODH_OVERRIDES+=("$1") ;;
      *) shodh_die "unexpected argument '$1' (overrides look like section.key=value)" ;;
    esac
    shift
  done
  [[ -n $SHODH_PROFILE ]] || shodh_die "--profile is empty"
  # A profile given as a relative YAML path is resolved now, against the submit directory.
  if [[ $SHODH_PROFILE == */* || $SHODH_PROFILE == *.yaml || $SHODH_PROFILE == *.yml ]]; then
    [[ -f $SHODH_PROFILE ]] || shodh_die "--profile: file not found: $SHODH_PROFILE"
    SHODH_PROFILE=$(realpath "$SHODH_PROFILE")
  fi
  mkdir -p "$SHODH_ROOT" 2>/dev/null && [[ -w $SHODH_ROOT ]] \
    || shodh_die "--root $SHODH_ROOT: workspace is not writable (it must be on a filesystem every node shares)"
  SHODH_ROOT=$(realpath "$SHODH_ROOT")
  SHODH_STAGE_ARGS=(--profile "$SHODH_PROFILE" --root "$SHODH_ROOT" "${SHODH_EXTRA[@]}" "${SHODH_OVERRIDES[@]}")
}

# Resolves and validates the run config through shodh's own loader (the error names the field)
# and prints the expert-parallel degree the world size must be a multiple of: model.ep_size for
# stages that build the MoE model (SHODH_USES_EP=1, set by pretrain.sbatch), else 1.
shodh_check_config() {
  "$SHODH_PYTHON" - "$SHODH_PROFILE" "${SHODH_OVERRIDES[@]}" <<'EOF'
import os
import sys
from shodh.config import load_config
from shodh.errors import ShodhError
try:
    cfg = load_config(sys.argv[1], sys.argv[2:])
except ShodhError as exc:
    sys.exit(f"shodh: error: {exc}")
print(getattr(getattr(cfg, "model", None), "ep_size", 1) if os.environ.get("SHODH_USES_EP") == "1" else 1)
EOF
}

# ---- the allocation ---------------------------------------------------------------------------

# Tasks per node of a SLURM_TASKS_PER_NODE value ("2(x3)" or "2,2" or "4"); fails when uneven,
# since ranks are laid out as node-major blocks of equal size (LOCAL_RANK < tasks per node).
shodh_uniform_tasks_per_node() {
  local spec=$1 part count first=""
  local IFS=,
  for part in $spec; do
    count=${part%%(*}
    [[ $count =~ ^[0-9]+$ ]] || { echo "unparsable SLURM_TASKS_PER_NODE '$spec'" >&2; return 1; }
    if [[ -z $first ]]; then first=$count
    elif [[ $count != "$first" ]]; then
      echo "tasks are spread unevenly over the nodes ($spec): use --ntasks-per-node instead of --ntasks" >&2
      return 1
    fi
  done
  [[ -n $first ]] || { echo "empty SLURM_TASKS_PER_NODE" >&2; return 1; }
  echo "$first"
}

# Checks the allocation against the run (one task per GPU, even layout, ep_size | world) and sets
# the rendezvous: MASTER_ADDR = first host of the allocation, MASTER_PORT derived from the job id
# (the same rule as shodh.distributed, so concurrent jobs sharing a node do not collide).
# Args: ep_size.
shodh_setup_layout() {
  local ep_size=${1:-1} nodes=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}} ntasks=${SLURM_NTASKS:-1} tpn
  if ! tpn=$(shodh_uniform_tasks_per_node "${SLURM_TASKS_PER_NODE:-$ntasks}" 2>&1); then
    shodh_die "bad node layout: $tpn"
  fi
  ((nodes * tpn == ntasks)) \
    || shodh_die "bad node layout: $nodes nodes x $tpn tasks per node != $ntasks tasks"
  local gpus=${SLURM_GPUS_ON_NODE:-0}
  if ((gpus > 0)) && ((gpus != tpn)); then
    shodh_die "one task per GPU: --ntasks-per-node=$tpn but $gpus GPUs per node (set them equal)"
  fi
  if ((ep_size < 1 || ntasks % ep_size != 0)); then
    shodh_die "model.ep_size=$ep_size does not divide the world size $ntasks ($nodes nodes x $tpn tasks per node); change --nodes/--ntasks-per-node or model.ep_size"
  fi
  if ((gpus == 0)) && ! command -v nvidia-smi >/dev/null; then
    # CPU nodes: gloo and DeepSpeed's CPU accelerator.
    export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
  fi
  # Not MASTER_ADDR/MASTER_PORT themselves: sbatch exports the submitting shell's environment,
  # and a stale MASTER_ADDR from an earlier torchrun session there must not win.
  MASTER_ADDR=${SHODH_MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}
  MASTER_PORT=${SHODH_MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
  export MASTER_ADDR MASTER_PORT
  SHODH_WORLD=$ntasks
  shodh_log "job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}): $nodes nodes x $tpn tasks, master $MASTER_ADDR:$MASTER_PORT${SHODH_USES_EP:+, ep_size $ep_size}"
}

# ---- running and preemption -------------------------------------------------------------------

_shodh_on_usr1() {
  _shodh_preempted=1 _shodh_interrupted=1
  shodh_log "USR1: asking the tasks to checkpoint and exit"
  [[ -n ${_shodh_srun_pid:-} ]] && kill -USR1 "$_shodh_srun_pid" 2>/dev/null || true
}

# Runs "$@" as every task of the allocation under srun, through slurm/task.sh (per-task
# RANK/LOCAL_RANK/WORLD_SIZE, USR1 forwarding, preemption markers). srun runs in the background
# so that bash can take USR1 while it waits (a trap does not fire during a foreground child).
# When the tasks checkpointed for preemption (their markers), or USR1 arrived and they did not
# finish cleanly, the job requeues itself; otherwise the tasks' status is returned.
shodh_requeue() {
  local restarts=${SLURM_RESTART_COUNT:-0}
  if ((restarts >= ${SHODH_MAX_REQUEUES:-20})); then
    shodh_log "$1, but the job was already requeued $restarts times (SHODH_MAX_REQUEUES); giving up"
    return 75
  fi
  shodh_log "$1; requeueing job $SLURM_JOB_ID"
  # requeue ends this job (and this shell); the restart resumes from the `latest` checkpoint.
  scontrol requeue "$SLURM_JOB_ID"
  sleep 60 # not reached in practice: slurm terminates the batch script on requeue
}

shodh_run_tasks() {
  if ((${_shodh_early_usr1:-0})); then
    shodh_requeue "USR1 arrived before the tasks started"
    return
  fi
  _shodh_preempted=0 _shodh_srun_pid=""
  # Markers live on the shared workspace: every node's tasks write there, the batch shell reads.
  export SHODH_PREEMPT_MARKS=${SHODH_ROOT:-$SLURM_SUBMIT_DIR}/.slurm/job-$SLURM_JOB_ID-restart-${SLURM_RESTART_COUNT:-0}
  rm -rf "$SHODH_PREEMPT_MARKS"
  trap _shodh_on_usr1 USR1
  # shellcheck disable=SC2086  # SHODH_SRUN_ARGS is a word list on purpose
  srun --kill-on-bad-exit=1 --export=ALL ${SHODH_SRUN_ARGS:-} "$SHODH_HOME/slurm/task.sh" "$@" &
  _shodh_srun_pid=$!
  local rc
  while :; do
    _shodh_interrupted=0 rc=0
    wait "$_shodh_srun_pid" || rc=$?
    # 138 = 128 + USR1: the trap interrupted `wait`, srun is still running; wait again.
    ((rc == 138 && _shodh_interrupted)) || break
  done
  trap - USR1
  local marked=0
  if [[ -d $SHODH_PREEMPT_MARKS ]]; then marked=$(find "$SHODH_PREEMPT_MARKS" -name "rank-*" | wc -l); fi
  if ((marked > 0 || (_shodh_preempted && rc != 0))); then
    rm -rf "$SHODH_PREEMPT_MARKS"
    shodh_requeue "preempted: $marked of ${SLURM_NTASKS:-?} ranks checkpointed (srun status $rc)"
    return
  fi
  if ((_shodh_preempted)); then shodh_log "USR1 arrived but the tasks had already finished (status $rc)"; fi
  return "$rc"
}

# ---- submit mode ------------------------------------------------------------------------------

# Run from a login node: validate what can be known before the job starts, ask slurm whether the
# request can ever run, then submit this same script. Args: script path, then the user's args.
shodh_submit_self() {
  local script=$1; shift
  command -v sbatch >/dev/null || shodh_die "sbatch not found: run this on a SLURM login node"
  shodh_split_submit_args "$@"
  shodh_parse_args "${SHODH_ARGS[@]}"
  local ep_size
  ep_size=$(shodh_check_config) || exit 2
  # The world size this request will get, from the #SBATCH lines and the options given here
  # (later wins, as in sbatch); only the common spellings are understood.
  local nodes="" tpn="" ntasks="" opt
  local -a opts=()
  # (Per #SBATCH line: drop a trailing comment, then split into words.)
  mapfile -t opts < <(sed -n 's/^#SBATCH[[:space:]]\+//; T; s/[[:space:]]#.*//; p' "$script" | tr ' \t' '\n\n' | sed '/^$/d')
  opts+=("${SHODH_SBATCH_OPTS[@]}")
  local i
  for ((i = 0; i < ${#opts[@]}; i++)); do
    opt=${opts[i]}
    case $opt in
      --nodes=*) nodes=${opt#*=} ;;
      -N | --nodes) nodes=${opts[i + 1]:-}; i=$((i + 1)) ;;
      -N*) nodes=${opt#-N} ;;
      --ntasks-per-node=*) tpn=${opt#*=} ;;
      --ntasks=*) ntasks=${opt#*=} ;;
      -n) ntasks=${opts[i + 1]:-}; i=$((i + 1)) ;;
    esac
  done
  if [[ $nodes =~ ^[0-9]+$ && $tpn =~ ^[0-9]+$ && -z $ntasks ]]; then ntasks=$((nodes * tpn)); fi
  if [[ $ntasks =~ ^[0-9]+$ ]] && ((ntasks % ep_size != 0)); then
    shodh_die "model.ep_size=$ep_size does not divide the world size $ntasks (${nodes:-?} nodes x ${tpn:-?} tasks per node); change --nodes/--ntasks-per-node or model.ep_size"
  fi
  if declare -F shodh_stage_precheck >/dev/null; then shodh_stage_precheck "${nodes:-1}" "${tpn:-1}" || exit 2; fi
  local out
  out=$(sbatch --test-only "${SHODH_SBATCH_OPTS[@]}" "$script" "${SHODH_STAGE_ARGS[@]}" 2>&1) \
    || shodh_die "slurm refuses this request: ${out##*error: }"
  exec sbatch "${SHODH_SBATCH_OPTS[@]}" "$script" "${SHODH_STAGE_ARGS[@]}"
}

# The common start of every sbatch script: find python, then either submit (outside a job; does
# not return) or parse the arguments (inside one). Args: stage name, "$@".
shodh_begin() {
  SHODH_STAGE=$1; shift
  if shodh_in_job; then
    # USR1 before the tasks start (validation takes seconds) would kill this shell by default;
    # remember it instead, and requeue without starting them.
    _shodh_early_usr1=0
    trap '_shodh_early_usr1=1' USR1
  fi
  shodh_setup_python
  if shodh_in_job; then
    shodh_parse_args "$@"
  else
    shodh_submit_self "$SHODH_SCRIPT" "$@"
  fi
}

# A distributed stage: validate the config and the allocation, then run `python -m MODULE` on
# every task. Args: stage name, module, "$@" (the user's arguments).
shodh_main_distributed() {
  local stage=$1 module=$2; shift 2
  shodh_begin "$stage" "$@"
  local ep_size
  ep_size=$(shodh_check_config) || exit 2
  shodh_setup_layout "$ep_size"
  if declare -F shodh_stage_precheck >/dev/null; then
    shodh_stage_precheck "${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}" "$((SHODH_WORLD / ${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}))" || exit 2
  fi
  shodh_run_tasks "$SHODH_PYTHON" -m "$module" "${SHODH_STAGE_ARGS[@]}"
}

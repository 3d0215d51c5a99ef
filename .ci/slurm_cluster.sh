#!/usr/bin/env bash
# A real SLURM cluster on localhost: one slurmctld and two slurmd daemons emulating the nodes
# node1 and node2 on this one machine, so that the sbatch scripts in slurm/ are exercised by
# the same scheduler, srun and signal machinery a real cluster uses (tests/test_slurm.py).
#
# Usage (as root; CI runs `install` once, the tests run `start`/`stop` themselves):
#   .ci/slurm_cluster.sh install   apt-get install Debian's slurm-wlm and munge (skips if present)
#   .ci/slurm_cluster.sh start     write slurm.conf, start munged/slurmctld/slurmd x2, wait for idle nodes
#   .ci/slurm_cluster.sh stop      stop the daemons this script started, by PID
#   .ci/slurm_cluster.sh status    sinfo/squeue against this cluster
#   .ci/slurm_cluster.sh env       print `export SLURM_CONF=...` for a shell
# Knobs (environment):
#   SHODH_SLURM_DIR   state: slurm.conf, pid files, logs, spool (default /tmp/shodh-slurm)
#   SHODH_SLURM_NODES number of emulated nodes (default 2); SHODH_SLURM_CPUS CPUs each (default 2)
#   SHODH_SLURM_MEM   RealMemory MB per node (default 2048; must not exceed the machine's)
#   SHODH_SLURM_PORT  slurmctld port (default 16817)
#   SHODH_SLURM_NODE_PORT  slurmd ports are this + 1, + 2, ... (default 17000: 17001, 17002)
#   SHODH_SLURM_CRED_EXPIRE  seconds a requeued job waits before it may start again (default 10;
#                     slurm's default of 120 s would eat the CI test budget)
# Clients find the cluster through SLURM_CONF=$SHODH_SLURM_DIR/slurm.conf (jobs inherit it).
set -euo pipefail

STATE=${SHODH_SLURM_DIR:-/tmp/shodh-slurm}
NODES=${SHODH_SLURM_NODES:-2}
CPUS=${SHODH_SLURM_CPUS:-2}
MEM=${SHODH_SLURM_MEM:-2048}
CTLD_PORT=${SHODH_SLURM_PORT:-16817}
NODE_PORT=${SHODH_SLURM_NODE_PORT:-17000}
CRED_EXPIRE=${SHODH_SLURM_CRED_EXPIRE:-10}
CONF=$STATE/slurm.conf
export SLURM_CONF=$CONF

die() { echo "slurm_cluster: $*" >&2; exit 1; }
log() { echo "slurm_cluster: $*" >&2; }

node_names() { local i; for ((i = 1; i <= NODES; i++)); do echo "node$i"; done; }

cmd_install() {
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null \
     && command -v sbatch >/dev/null; then
    log "slurm and munge already installed ($(slurmctld -V))"
    return 0
  fi
  [[ $(id -u) -eq 0 ]] || die "install needs root (apt-get)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq slurm-wlm munge >/dev/null
  log "installed $(slurmctld -V)"
}

write_conf() {
  mkdir -p "$STATE/ctld" "$STATE/log"
  local host; host=$(hostname -s)
  # Ports per node are what lets several slurmd share one address (node1 on 17001, ...).
  {
    cat <<EOF
# Written by .ci/slurm_cluster.sh: $NODES emulated nodes on localhost. Not for production.
ClusterName=shodh-ci
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=cred_expire=$CRED_EXPIRE
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool-%n
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd-%n.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
# No cgroups in a container: track processes by parent pid and do no binding.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
MailProg=/bin/true
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
# No accounting database, so finished jobs are only visible through scontrol show job:
# keep them there for an hour.
MinJobAge=3600
JobRequeue=1
# Refuse impossible requests (e.g. more nodes than the partition has) at submission.
EnforcePartLimits=ALL
ReturnToService=2
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2
SlurmctldTimeout=30
SlurmdTimeout=60
InactiveLimit=0
KillWait=10
MpiDefault=none
EOF
    local i
    for ((i = 1; i <= NODES; i++)); do
      echo "NodeName=node$i NodeAddr=127.0.0.1 Port=$((NODE_PORT + i)) CPUs=$CPUS RealMemory=$MEM State=UNKNOWN"
    done
    echo "PartitionName=debug Nodes=node[1-$NODES] Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO"
  } > "$CONF"
}

ensure_hosts() {
  # srun, gloo and MASTER_ADDR resolve the node names; all of them are this machine.
  local n
  for n in $(node_names); do
    getent hosts "$n" >/dev/null || echo "127.0.0.1 $n" >> /etc/hosts
  done
}

munge_ok() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }

start_munge() {
  if munge_ok; then
    log "munged already running; using it"
    return 0
  fi
  mkdir -p /run/munge /var/log/munge /var/lib/munge
  chown munge:munge /run/munge /var/log/munge /var/lib/munge
  if [[ ! -s /etc/munge/munge.key ]]; then
    # Debian's postinst normally creates it; a fresh image might not have.
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=128 status=none
    chown munge:munge /etc/munge/munge.key
    chmod 400 /etc/munge/munge.key
  fi
  # munged refuses to run as root; it forks and writes its own pid file.
  runuser -u munge -- /usr/sbin/munged --pid-file=/run/munge/munged.pid
  cp /run/munge/munged.pid "$STATE/munged.pid"
  local _
  for _ in $(seq 50); do munge_ok && return 0; sleep 0.1; done
  die "munged did not come up"
}

pid_alive() { [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

cmd_start() {
  command -v slurmctld >/dev/null || die "slurmctld not installed: run '$0 install' first"
  [[ $(id -u) -eq 0 ]] || die "start needs root (daemons run as root, /etc/hosts)"
  if pid_alive "$STATE/slurmctld.pid"; then
    log "already running (state $STATE)"
    return 0
  fi
  rm -rf "$STATE/ctld" "$STATE"/spool-* "$STATE"/*.pid
  write_conf
  ensure_hosts
  start_munge
  # -i: ignore stale state; -c: start clean (no jobs from an earlier cluster under this dir).
  slurmctld -f "$CONF" -i -c
  local n
  for n in $(node_names); do
    mkdir -p "$STATE/spool-$n"
    slurmd -f "$CONF" -N "$n"
  done
  # Wait until every node is idle: the daemons register with a few seconds of latency.
  local deadline=$((SECONDS + 60)) idle=0
  while ((SECONDS < deadline)); do
    idle=$(sinfo -h -N -t idle -o '%N' 2>/dev/null | sort -u | wc -l || true)
    ((idle >= NODES)) && break
    sleep 0.5
  done
  if ((idle < NODES)); then
    sinfo -N -l >&2 || true
    tail -n 20 "$STATE"/log/*.log >&2 || true
    die "only $idle of $NODES nodes came up idle within 60 s"
  fi
  log "cluster up: $NODES nodes idle; export SLURM_CONF=$CONF"
}

# TERM every daemon first and then wait for all of them: stopping them one by one costs seconds each.
stop_pidfiles() {
  local file pid _ pids=()
  for file in "$@"; do
    [[ -s $file ]] || continue
    pid=$(cat "$file")
    if kill -0 "$pid" 2>/dev/null; then kill "$pid" && pids+=("$pid"); fi
    rm -f "$file"
  done
  for _ in $(seq 150); do
    local alive=()
    for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive+=("$pid"); done
    pids=("${alive[@]}")
    ((${#pids[@]} == 0)) && return 0
    sleep 0.1
  done
  log "killing ${pids[*]} after 15 s"
  kill -9 "${pids[@]}" 2>/dev/null || true
}

# slurmstepd processes of this cluster (they run in $STATE/log); found by cwd, so another
# cluster's or a real installation's are never touched.
our_stepds() {
  local pid
  for pid in $(pgrep -x slurmstepd 2>/dev/null || true); do
    [[ $(readlink "/proc/$pid/cwd" 2>/dev/null) == "$STATE"* ]] && echo "$pid"
  done
  return 0
}

cmd_stop() {
  local n files=() _
  # Cancel what is left and let slurm tear the jobs down while its daemons still run: a
  # slurmstepd whose slurmd is gone lingers forever.
  if pid_alive "$STATE/slurmctld.pid"; then
    local jobs
    jobs=$(squeue -h -o %A 2>/dev/null | tr '\n' ' ' || true)
    if [[ -n ${jobs// /} ]]; then
      # shellcheck disable=SC2086
      scancel --quiet $jobs 2>/dev/null || true
      for _ in $(seq 60); do
        [[ -z $(squeue -h -o %A 2>/dev/null) && -z $(our_stepds) ]] && break
        sleep 0.5
      done
    fi
  fi
  for n in $(node_names); do files+=("$STATE/slurmd-$n.pid"); done
  files+=("$STATE/slurmctld.pid")
  # Only the munged this script started (a pre-existing one is left alone).
  files+=("$STATE/munged.pid")
  stop_pidfiles "${files[@]}"
  local left
  left=$(our_stepds)
  if [[ -n $left ]]; then
    log "killing leftover slurmstepd $left"
    # shellcheck disable=SC2086
    kill -9 $left 2>/dev/null || true
  fi
  log "stopped (state kept in $STATE)"
}

cmd_status() {
  sinfo -N -l
  squeue
}

case "${1:-}" in
  install) cmd_install ;;
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  env) echo "export SLURM_CONF=$CONF" ;;
  *) echo "usage: $0 install|start|stop|status|env" >&2; exit 2 ;;
esac

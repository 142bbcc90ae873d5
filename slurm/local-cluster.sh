#!/usr/bin/env bash
# A real single-node Slurm (munged + slurmctld + slurmd from Debian's packages) for the project's
# Slurm tests and for trying the sbatch scripts on one machine. Needs root.
#
#   slurm/local-cluster.sh start    install if needed, configure, start, wait until the node is idle
#   slurm/local-cluster.sh stop     stop the daemons started here
#   slurm/local-cluster.sh status   daemons and sinfo
#
# No cgroups and no accounting database: process tracking by /proc (linuxproc); tasks bound to
# their CPUs by sched_setaffinity (task/affinity, to cores by default, as on most clusters: a
# task sees the CPUs its step gave it, so a missing --cpus-per-task shows). Settings that matter
# for tests: a default memory per CPU (or one job takes the whole node), a short credential
# lifetime (or a requeued job waits two minutes), EnforcePartLimits (or an impossible request
# pends forever), MinJobAge (finished jobs stay visible to scontrol). `start` on a running
# cluster whose configuration is not this one restarts its daemons.
set -euo pipefail

STATE=${PROSECO_SLURM_STATE:-/tmp/proseco-slurm}
CONF=/etc/slurm/slurm.conf
NODE=$(hostname -s)

say() { echo "[local-cluster] $*" >&2; }
fail() { say "error: $*"; exit 1; }

running() { pgrep -x "$1" >/dev/null 2>&1; }

install() {
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
      && command -v munged >/dev/null; then
    return
  fi
  [ "$(id -u)" = 0 ] || fail "Slurm is not installed and this is not root"
  say "installing slurmctld slurmd slurm-client munge"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q --no-install-recommends slurmctld slurmd slurm-client munge >"$STATE/apt.log" 2>&1 || {
    apt-get update -q >>"$STATE/apt.log" 2>&1
    apt-get install -y -q --no-install-recommends slurmctld slurmd slurm-client munge >>"$STATE/apt.log" 2>&1 \
      || { tail -n 20 "$STATE/apt.log" >&2; fail "apt-get install failed"; }
  }
}

configure() {
  local cpus memory
  # GNU nproc honours OMP_NUM_THREADS: a test run with OMP_NUM_THREADS=1 would declare a node of
  # one CPU, on which a two-task job is refused ("More processors requested than permitted").
  cpus=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)
  memory=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024 ))
  if [ -s "$CONF" ] && ! head -n 1 "$CONF" | grep -q "written by proseco-pretrain"; then
    fail "$CONF was not written by this script: not touching it"
  fi
  mkdir -p /etc/slurm "$STATE/ctld" "$STATE/d" "$STATE/log"
  cat >"$CONF.new" <<EOF
# written by proseco-pretrain slurm/local-cluster.sh
ClusterName=proseco-local
SlurmctldHost=$NODE
AuthType=auth/munge
AuthInfo=cred_expire=10
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/affinity
TaskPluginParam=Cores
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1024
EnforcePartLimits=ALL
MinJobAge=600
ReturnToService=2
JobRequeue=1
MpiDefault=none
NodeName=$NODE CPUs=$cpus RealMemory=$memory State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
EOF
  # Succeeds when the configuration changed.
  if cmp -s "$CONF.new" "$CONF"; then rm -f "$CONF.new"; return 1; fi
  mv "$CONF.new" "$CONF"
}

start_munge() {
  mkdir -p /run/munge /var/lib/munge /var/log/munge /etc/munge
  chown munge:munge /run/munge /var/lib/munge /var/log/munge /etc/munge
  if [ ! -s /etc/munge/munge.key ]; then
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
  fi
  chown munge:munge /etc/munge/munge.key
  chmod 400 /etc/munge/munge.key
  running munged || runuser -u munge -- /usr/sbin/munged
  for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return; sleep 0.1; done
  fail "munged does not answer"
}

start() {
  mkdir -p "$STATE"
  install
  if configure && { running slurmctld || running slurmd; }; then
    say "configuration changed: restarting the daemons"
    stop
  fi
  start_munge
  running slurmctld || /usr/sbin/slurmctld
  running slurmd || /usr/sbin/slurmd
  for _ in $(seq 150); do
    if sinfo -h -N -o '%T' 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; then
      say "up: $(sinfo -h -o '%P %D %T')"
      return
    fi
    scontrol update NodeName="$NODE" State=RESUME >/dev/null 2>&1 || true
    sleep 0.2
  done
  tail -n 20 "$STATE/log/slurmctld.log" "$STATE/log/slurmd.log" >&2 || true
  fail "the node did not become idle"
}

stop() {
  for daemon in slurmd slurmctld; do
    pkill -x "$daemon" 2>/dev/null || true
  done
  for _ in $(seq 100); do
    running slurmd || running slurmctld || break
    sleep 0.1
  done
  say "stopped"
}

case "${1:-start}" in
  start) start ;;
  stop) stop ;;
  status) for d in munged slurmctld slurmd; do echo "$d: $(pgrep -x $d || echo down)"; done; sinfo || true ;;
  *) fail "usage: $0 start|stop|status" ;;
esac

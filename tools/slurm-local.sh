#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, for the tests marked `slurm` and for trying --executor slurm:
#   tools/slurm-local.sh start    install slurm-wlm and munge with apt where missing (root), start munged,
#                                 slurmctld and slurmd on localhost, wait until the node is idle
#   tools/slurm-local.sh stop     end the daemons this script started (by their pid files), nothing else
#   tools/slurm-local.sh status   which of them run, and the node's state
#   tools/slurm-local.sh env      the line to eval so that sbatch/squeue/scancel find this cluster
# Idempotent: start on a running cluster, or stop on a stopped one, changes nothing. Every file it writes
# (config, munge key and socket, spool, state, logs, pid files) is under $FNABENCH_SLURM_DIR
# (default /tmp/fnabench-slurm). Daemons run as root (proctrack/linuxproc, task/none: no cgroups needed).
# The client commands find the cluster through SLURM_CONF=$FNABENCH_SLURM_DIR/slurm.conf.
set -euo pipefail

DIR=${FNABENCH_SLURM_DIR:-/tmp/fnabench-slurm}
CONF=$DIR/slurm.conf
DAEMONS=(slurmd slurmctld munged)  # stop order: the node, the controller, then authentication

die() { echo "slurm-local: $*" >&2; exit 2; }

pid_alive() {  # pid file → exit 0 if its process runs
    [[ -f $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null
}

install() {
    command -v slurmctld >/dev/null && command -v munged >/dev/null && return 0
    [[ $(id -u) -eq 0 ]] || die "slurm-wlm and munge are not installed and this is not root; accepted: run as root"
    command -v apt-get >/dev/null || die "slurm-wlm and munge are not installed and apt-get is missing; accepted: a Debian/Ubuntu machine"
    echo "slurm-local: installing slurm-wlm and munge with apt"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q --no-install-recommends slurm-wlm munge >"$DIR/log/apt.log" 2>&1 \
        || { apt-get update -q >>"$DIR/log/apt.log" 2>&1 \
             && apt-get install -y -q --no-install-recommends slurm-wlm munge >>"$DIR/log/apt.log" 2>&1; } \
        || die "apt-get could not install slurm-wlm and munge (see $DIR/log/apt.log)"
}

write_conf() {
    local host cpus mem
    host=$(hostname -s)
    cpus=$(nproc)
    mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024 ))
    cat >"$CONF" <<EOF
# written by tools/slurm-local.sh: a one-node cluster on $host
ClusterName=fnabench
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$DIR/munge/munge.socket
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
JobRequeue=1
KillWait=5
MinJobAge=600
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=30
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
StateSaveLocation=$DIR/spool/ctld
SlurmdSpoolDir=$DIR/spool/d
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
NodeName=$host CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=local Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
}

start_munged() {
    pid_alive "$DIR/run/munged.pid" && return 0
    if [[ ! -s $DIR/munge/munge.key ]]; then
        dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 status=none
    fi
    chmod 700 "$DIR/munge"
    chmod 400 "$DIR/munge/munge.key"
    munged --force --key-file="$DIR/munge/munge.key" --socket="$DIR/munge/munge.socket" \
        --pid-file="$DIR/run/munged.pid" --log-file="$DIR/log/munged.log" --seed-file="$DIR/munge/munge.seed"
}

wait_idle() {
    local state=""
    for _ in $(seq 1 60); do
        state=$(SLURM_CONF=$CONF sinfo --noheader -o %T 2>/dev/null | head -1 || true)
        [[ $state == idle* || $state == mix* || $state == alloc* ]] && return 0
        sleep 0.5
    done
    die "the node did not come up (state '${state:-none}'); see $DIR/log/slurmctld.log and slurmd.log"
}

start() {
    mkdir -p "$DIR"/{spool/ctld,spool/d,log,run,munge}
    install
    [[ -f $CONF ]] || write_conf
    start_munged
    pid_alive "$DIR/run/slurmctld.pid" || SLURM_CONF=$CONF slurmctld
    pid_alive "$DIR/run/slurmd.pid" || SLURM_CONF=$CONF slurmd
    wait_idle
    echo "slurm-local: running in $DIR; eval \"\$(tools/slurm-local.sh env)\" to use it"
}

stop() {
    local name file pid
    for name in "${DAEMONS[@]}"; do
        file=$DIR/run/$name.pid
        pid_alive "$file" || { rm -f "$file"; continue; }
        pid=$(cat "$file")
        kill "$pid"
        for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
        rm -f "$file"
    done
    echo "slurm-local: stopped"
}

status() {
    local name up=0
    for name in "${DAEMONS[@]}"; do
        if pid_alive "$DIR/run/$name.pid"; then echo "$name: running (pid $(cat "$DIR/run/$name.pid"))"; up=$((up + 1))
        else echo "$name: stopped"; fi
    done
    [[ $up -eq ${#DAEMONS[@]} ]] && SLURM_CONF=$CONF sinfo --noheader -o "node %N: %T, %c cpus" || true
    [[ $up -eq ${#DAEMONS[@]} ]]
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) status ;;
    env) echo "export SLURM_CONF=$CONF" ;;
    *) die "unknown command '${1:-}'; accepted: start, stop, status, env" ;;
esac

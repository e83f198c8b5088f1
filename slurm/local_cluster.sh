#!/usr/bin/env bash
# A real Slurm cluster on loopback, for tests and for trying the launcher: one controller and two compute
# nodes (n1, n2) on this host, Debian's slurm-wlm 22.05 with munge authentication.
#
#   slurm/local_cluster.sh up      # install if needed, write the config, start munge + daemons, wait for idle
#   slurm/local_cluster.sh down    # stop the daemons started here (by their pid files)
#   slurm/local_cluster.sh status
#
# Everything lives in $DENSESSL_SLURM_DIR (default /tmp/densessl-slurm); point Slurm's commands at it with
# `export SLURM_CONF=$DENSESSL_SLURM_DIR/slurm.conf` (printed by `up`). Needs root (apt, /etc/hosts, daemons).
# Root trusts that folder's config, plugins and pid files, so every command first checks that it is private: a
# real folder, not a link, owned by root (or by the user who ran sudo), writable by no one else, under parents no
# one else can rename it in; `up` makes it (mode 0700) when missing. Anything else, such as a folder another local
# user made first, is refused. `down` stops only the processes its pid files name that are this cluster's daemons.
# There is no accounting daemon, so `sacct` does not work: callers bound their waits (slurm.submit does).
# Never purges packages: OpenCV's dev packages depend on libmunge2.
set -euo pipefail

# Root is needed: a root shell (containers, CI) runs on as it is; anyone else goes through sudo, once, here.
if [ "$(id -u)" != 0 ]; then
    command -v sudo >/dev/null || { echo "local_cluster: error: needs root, and there is no sudo" >&2; exit 1; }
    exec sudo --preserve-env=DENSESSL_SLURM_DIR "$0" "$@"
fi

DIR=${DENSESSL_SLURM_DIR:-/tmp/densessl-slurm}
CONF=$DIR/slurm.conf
NODES=(n1 n2)
PACKAGES=(slurmctld slurmd slurm-client munge)

log() { echo "local_cluster: $*" >&2; }
die() { log "error: $*"; exit 1; }

install_packages() {
    local missing=()
    for p in "${PACKAGES[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
    [ ${#missing[@]} -eq 0 ] && return
    log "installing ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null 2>&1 ||
        { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null; }
}

# MASTER_ADDR is the first node's name, so node names must resolve.
resolve_nodes() {
    for n in "${NODES[@]}"; do
        getent hosts "$n" >/dev/null || echo "127.0.0.1 $n" >>/etc/hosts
    done
}

start_munge() {
    [ -f /etc/munge/munge.key ] || { mungekey --create >/dev/null 2>&1 || /usr/sbin/create-munge-key -f; }
    chown munge: /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
    mkdir -p /run/munge && chown munge: /run/munge
    if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
        runuser -u munge -- /usr/sbin/munged
        touch "$DIR/munged.started-here"
    fi
}

write_config() {
    mkdir -p "$DIR/state" "$DIR/log" "$DIR/spool"
    local cpus; cpus=$(nproc)
    cat >"$CONF" <<EOF
# Written by slurm/local_cluster.sh: two nodes on loopback.
ClusterName=densessl
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort=16817
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
# Step credentials live 5 s (default 120 s): a requeued job may start again after that long.
AuthInfo=cred_expire=5
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=1,batch_sched_delay=0
SlurmdParameters=config_overrides
ReturnToService=2
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MinJobAge=3600
KillWait=10
InactiveLimit=0
NodeName=n[1-2] NodeHostname=localhost NodeAddr=127.0.0.1 Port=[17001-17002] CPUs=$cpus RealMemory=1024 State=UNKNOWN
PartitionName=debug Nodes=n[1-2] Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
EOF
}

. "$(dirname "$0")/private_dir.sh"  # private_dir DIR [create]

# use_dir [create]: DIR checked (and CONF with it), or a one-line refusal.
use_dir() {
    local checked
    checked=$(private_dir "$DIR" "${1:-}") || die "$checked: root uses only a private folder of its own here;" \
        "remove it, or choose another with DENSESSL_SLURM_DIR="
    DIR=$checked
    CONF=$DIR/slurm.conf
}

# ours PIDFILE NAME: the pid file names a live process that is this cluster's NAME (`NAME -f $CONF ...`), not
# some other process that has its pid now (a stale file, the pid reused) or that someone wrote there.
ours() {
    local pid args=() i
    [ -f "$1" ] || return 1
    pid=$(head -c 32 "$1" | tr -d '[:space:]')
    [[ $pid =~ ^[0-9]+$ ]] && [ "$pid" -gt 1 ] || return 1
    [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$2" ] || return 1
    mapfile -d '' args <"/proc/$pid/cmdline" 2>/dev/null || return 1
    for ((i = 0; i + 1 < ${#args[@]}; i++)); do
        [ "${args[i]}" = -f ] && [ "${args[i + 1]}" = "$CONF" ] && { echo "$pid"; return 0; }
    done
    return 1
}

running() { ours "$1" "$2" >/dev/null; }

up() {
    [ "$(id -u)" = 0 ] || die "run as root (installs packages, edits /etc/hosts, starts daemons)"
    use_dir create
    install_packages
    resolve_nodes
    start_munge
    write_config
    export SLURM_CONF=$CONF
    running "$DIR/slurmctld.pid" slurmctld || slurmctld -f "$CONF"
    for n in "${NODES[@]}"; do running "$DIR/slurmd-$n.pid" slurmd || slurmd -f "$CONF" -N "$n"; done
    local deadline=$((SECONDS + 60)) states=""
    while [ $SECONDS -lt $deadline ]; do
        states=$(sinfo -h -N -o "%N %T" 2>/dev/null | sort -u || true)
        [ "$(grep -c -E ' (idle|mixed|allocated)$' <<<"$states")" = "${#NODES[@]}" ] && break
        grep -q -E ' (down|drained)' <<<"$states" && scontrol update nodename=n[1-2] state=resume 2>/dev/null || true
        sleep 0.5
    done
    [ "$(grep -c -E ' (idle|mixed|allocated)$' <<<"$states")" = "${#NODES[@]}" ] ||
        die "nodes did not come up: ${states:-no answer from slurmctld}; logs in $DIR/log"
    log "up: $(tr '\n' ' ' <<<"$states")"
    echo "export SLURM_CONF=$CONF"
}

# stop PIDFILE NAME: SIGTERM, then SIGKILL after 5 s, to the process the pid file names if it is our NAME.
stop() {
    local pid
    if pid=$(ours "$1" "$2"); then
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 50); do running "$1" "$2" || break; sleep 0.1; done
        running "$1" "$2" && kill -9 "$pid" 2>/dev/null
    elif [ -f "$1" ]; then
        log "$1 names no $2 of this cluster (stale): left that process alone"
    fi
    rm -f "$1"
}

down() {
    if [ ! -e "$DIR" ] && [ ! -L "$DIR" ]; then log "down: nothing in $DIR"; return; fi
    use_dir
    local f
    for f in "$DIR"/slurmd-*.pid; do if [ -f "$f" ]; then stop "$f" slurmd; fi; done
    stop "$DIR/slurmctld.pid" slurmctld
    if [ -f "$DIR/munged.started-here" ]; then
        local pid; pid=$(head -c 32 /run/munge/munged.pid 2>/dev/null | tr -d '[:space:]')
        if [[ $pid =~ ^[0-9]+$ ]] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = munged ]; then
            kill "$pid" 2>/dev/null || true
        fi
        rm -f "$DIR/munged.started-here"
    fi
    log "down"
}

case "${1:-}" in
    up) up ;;
    down) down ;;
    status)
        [ -e "$DIR" ] || [ -L "$DIR" ] || die "no cluster in $DIR (slurm/local_cluster.sh up starts one)"
        use_dir; SLURM_CONF=$CONF sinfo -N; SLURM_CONF=$CONF squeue ;;
    *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac

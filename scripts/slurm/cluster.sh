#!/usr/bin/env bash
# A real single-node Slurm cluster on this machine (Debian slurm-wlm + MUNGE), for the slurm-marked tests and for
# trying the sbatch scripts by hand. Everything it writes lives under $SLURM_STATE_DIR (default /tmp/mlp-slurm).
#
#   scripts/slurm/cluster.sh start    # install slurm-wlm if missing (root + apt), start munged, slurmctld, slurmd
#   scripts/slurm/cluster.sh status   # prints "up" and exits 0 when the node accepts jobs
#   scripts/slurm/cluster.sh stop     # scontrol shutdown, stop munged (only if this script started it)
#   scripts/slurm/cluster.sh env      # the line to eval so sbatch / squeue / scontrol use this cluster
#
# Clients find the cluster through SLURM_CONF=$SLURM_STATE_DIR/slurm.conf (printed by `env`). The settings below are
# the ones measured in ../shared/ENVIRONMENT.md: without DefMemPerCPU jobs run one at a time, without the short
# scheduler intervals a requeued job waits ~130 s, without kill_invalid_depend a failed afterok chain stays pending.
# See scripts/slurm/README.md.
set -euo pipefail
STATE="${SLURM_STATE_DIR:-/tmp/mlp-slurm}"
CONF="$STATE/slurm.conf"
NODE="$(hostname -s)"
START_TIMEOUT="${SLURM_START_TIMEOUT:-60}"

die() { echo "cluster.sh: $*" >&2; exit 2; }

install_if_missing() {
    command -v slurmctld >/dev/null && command -v munged >/dev/null && command -v sbatch >/dev/null && return 0
    [[ "$(id -u)" == 0 ]] || die "slurm-wlm is not installed and this user is not root: install it (apt-get install slurm-wlm) or run as root"
    command -v apt-get >/dev/null || die "slurm-wlm is not installed and there is no apt-get: install Slurm and MUNGE by hand"
    echo "cluster.sh: installing slurm-wlm" >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends slurm-wlm >"$STATE/apt.log" 2>&1 \
        || { apt-get update >>"$STATE/apt.log" 2>&1 && DEBIAN_FRONTEND=noninteractive \
             apt-get install -y --no-install-recommends slurm-wlm >>"$STATE/apt.log" 2>&1; } \
        || die "apt-get install slurm-wlm failed; see $STATE/apt.log"
}

write_conf() {
    local cpus mem_mb
    # At least 16 CPUs declared (config_overrides: slurmd accepts more than it finds), so the package scripts' own
    # --cpus-per-task=4 and 16 requests fit on a 2-core machine; the jobs then share the cores.
    cpus="$(nproc)"; (( cpus < 16 )) && cpus=16
    mem_mb="$(awk '/MemTotal/ {print int($2 / 1024 * 0.8)}' /proc/meminfo)"
    mkdir -p "$STATE/ctld" "$STATE/spool" "$STATE/log"
    cat >"$CONF" <<EOF
# Written by scripts/slurm/cluster.sh: one node, no cgroups, no accounting.
ClusterName=mlp
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=cred_expire=10
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
ReturnToService=2
SlurmdParameters=config_overrides
JobRequeue=1
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1000
SchedulerParameters=sched_interval=5,bf_interval=5
DependencyParameters=kill_invalid_depend
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
MinJobAge=600
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$cpus Sockets=1 CoresPerSocket=$cpus ThreadsPerCore=1 RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
}

is_up() {
    SLURM_CONF="$CONF" sinfo -h -o '%t' 2>/dev/null | grep -Eq '^(idle|mix|alloc)'
}

start_munge() {
    if munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then return 0; fi
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge
    [[ -s /etc/munge/munge.key ]] || { mungekey -c -f >/dev/null 2>&1 || die "no /etc/munge/munge.key and mungekey failed"; }
    chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
    runuser -u munge -- /usr/sbin/munged || die "munged did not start"
    touch "$STATE/munged.started-here"
}

start() {
    mkdir -p "$STATE"
    if [[ -f "$CONF" ]] && is_up; then echo "up"; return 0; fi
    install_if_missing
    [[ "$(id -u)" == 0 ]] || die "starting slurmctld/slurmd needs root (this single-node setup runs both as root)"
    start_munge
    write_conf
    /usr/sbin/slurmctld -c -f "$CONF" || die "slurmctld did not start; see $STATE/log/slurmctld.log"
    /usr/sbin/slurmd -f "$CONF" || die "slurmd did not start; see $STATE/log/slurmd.log"
    local waited=0
    until is_up; do
        if (( waited >= START_TIMEOUT )); then
            die "the node is not idle after ${START_TIMEOUT}s (sinfo: $(SLURM_CONF="$CONF" sinfo -h -o '%t %E' 2>&1 | head -1)); see $STATE/log/"
        fi
        SLURM_CONF="$CONF" scontrol update NodeName="$NODE" State=RESUME >/dev/null 2>&1 || true
        sleep 1; waited=$((waited + 1))
    done
    echo "up"
}

stop() {
    if [[ -f "$CONF" ]]; then
        SLURM_CONF="$CONF" scontrol shutdown >/dev/null 2>&1 || true
        for pidfile in "$STATE/slurmctld.pid" "$STATE/slurmd.pid"; do
            local n=0
            while [[ -f "$pidfile" ]] && kill -0 "$(cat "$pidfile")" 2>/dev/null && (( n < 20 )); do sleep 0.5; n=$((n + 1)); done
            [[ -f "$pidfile" ]] && kill "$(cat "$pidfile")" 2>/dev/null || true
        done
    fi
    if [[ -f "$STATE/munged.started-here" ]]; then
        pkill -u munge -x munged 2>/dev/null || true
        rm -f "$STATE/munged.started-here"
    fi
    echo "stopped"
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) if [[ -f "$CONF" ]] && is_up; then echo "up"; else echo "down"; exit 1; fi ;;
    env) echo "export SLURM_CONF=$CONF" ;;
    *) sed -n '2,13p' "${BASH_SOURCE[0]}"; exit 2 ;;
esac

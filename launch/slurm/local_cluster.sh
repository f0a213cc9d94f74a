#!/bin/bash
# A single-node Slurm cluster on localhost (no systemd, no cgroups), for trying sweeps and for the tests.
#
#   launch/slurm/local_cluster.sh install   # apt-get install slurm-wlm munge (Debian/Ubuntu, root)
#   launch/slurm/local_cluster.sh start     # write /etc/slurm/slurm.conf, start munged, slurmctld, slurmd
#   launch/slurm/local_cluster.sh status
#   launch/slurm/local_cluster.sh stop      # stop ONLY the daemons this script started (slurmd, slurmctld, munged)
#
# Needs root. `start` records what it started in $STATE so `stop` never touches daemons someone else runs.
# Order matters: munged must answer before slurmctld/slurmd start (a slurmd without munge cannot register and
# then hangs on SIGTERM), and stopping goes slurmd -> slurmctld -> munged.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
STATE=${TPB_SLURM_STATE:-/run/tpblocks-local-slurm.started}
CONF=/etc/slurm/slurm.conf

need_root() { [ "$(id -u)" -eq 0 ] || { echo "local_cluster.sh: $1 needs root" >&2; exit 3; }; }
have_slurm() { command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null \
               && command -v sbatch >/dev/null; }
munge_ok() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }
ctld_ok() { scontrol ping 2>/dev/null | grep -q UP; }
pid_alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
node_ready() { sinfo -h -o %T 2>/dev/null | grep -qE "idle|mixed|alloc"; }

install() {
    need_root install
    have_slurm && { echo "slurm-wlm and munge already installed"; return 0; }
    command -v apt-get >/dev/null || { echo "no apt-get: install slurm-wlm and munge by hand" >&2; exit 4; }
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge
}

write_conf() {
    local host cpus mem
    host=$(hostname -s)
    cpus=$(nproc)
    mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 * 8 / 10 ))  # MB, 80% of RAM
    mkdir -p /etc/slurm
    local new
    new=$(sed -e "s/@HOST@/$host/g" -e "s/@CPUS@/$cpus/g" -e "s/@MEM@/$mem/g" "$HERE/slurm.conf.in")
    if [ -f "$CONF" ] && ! grep -q "launch/slurm/local_cluster.sh" "$CONF"; then
        cp "$CONF" "$CONF.tpblocks-bak"   # someone else's config: keep a copy
        echo "saved the previous $CONF as $CONF.tpblocks-bak"
    fi
    printf '%s\n' "$new" > "$CONF"
}

start() {
    need_root start
    have_slurm || { echo "slurm-wlm/munge are not installed: run '$0 install'" >&2; exit 4; }
    : > "$STATE.tmp"
    if ctld_ok; then
        echo "a slurmctld is already running: using it as is"
    else
        write_conf
    fi
    mkdir -p /run/munge /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
    chown munge:munge /run/munge; chmod 755 /run/munge
    if [ ! -s /etc/munge/munge.key ]; then
        /usr/sbin/mungekey --create 2>/dev/null || dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 2>/dev/null
        chown munge:munge /etc/munge/munge.key; chmod 400 /etc/munge/munge.key
    fi
    # Test munge through its socket, not pgrep: a killed munged lingers as a zombie that pgrep still matches.
    if ! munge_ok; then
        runuser -u munge -- /usr/sbin/munged
        echo munged >> "$STATE.tmp"
        for _ in $(seq 40); do munge_ok && break; sleep 0.25; done
        munge_ok || { echo "munged did not come up" >&2; exit 5; }
    fi
    if ! ctld_ok; then
        /usr/sbin/slurmctld
        echo slurmctld >> "$STATE.tmp"
    fi
    if ! pid_alive /run/slurmd.pid; then
        /usr/sbin/slurmd
        echo slurmd >> "$STATE.tmp"
    fi
    cat "$STATE.tmp" >> "$STATE"; rm -f "$STATE.tmp"
    for _ in $(seq 60); do node_ready && break; sleep 0.5; done
    if ! node_ready; then
        # A node left DOWN/DRAINED by an earlier run: give it back to the scheduler once.
        scontrol update nodename="$(hostname -s)" state=resume 2>/dev/null || true
        for _ in $(seq 20); do node_ready && break; sleep 0.5; done
    fi
    node_ready || { echo "the node did not become idle; see /var/log/slurm/slurmd.log" >&2; sinfo >&2 || true; exit 6; }
    sinfo
}

stop_one() {  # name pidfile
    local name=$1 pidfile=$2 pid
    [ -f "$pidfile" ] || { echo "$name: no pid file $pidfile"; return 0; }
    pid=$(cat "$pidfile")
    kill -0 "$pid" 2>/dev/null || { echo "$name ($pid) already gone"; return 0; }
    kill -TERM "$pid"
    for _ in $(seq 40); do kill -0 "$pid" 2>/dev/null || { echo "$name ($pid) stopped"; return 0; }; sleep 0.25; done
    kill -KILL "$pid" 2>/dev/null || true
    echo "$name ($pid) killed after 10 s"
}

stop() {
    need_root stop
    [ -f "$STATE" ] || { echo "nothing to stop: this script started no daemon ($STATE absent)"; return 0; }
    grep -qx slurmd "$STATE" && stop_one slurmd /run/slurmd.pid
    grep -qx slurmctld "$STATE" && stop_one slurmctld /run/slurmctld.pid
    grep -qx munged "$STATE" && stop_one munged /run/munge/munged.pid
    rm -f "$STATE"
}

status() {
    munge_ok && echo "munge: up" || echo "munge: down"
    ctld_ok && echo "slurmctld: up" || echo "slurmctld: down"
    pid_alive /run/slurmd.pid && echo "slurmd: up" || echo "slurmd: down"
    [ -f "$STATE" ] && echo "started by this script: $(tr '\n' ' ' < "$STATE")"
    ctld_ok && sinfo || true
}

case "${1:-}" in
    install) install ;;
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) echo "usage: $0 install|start|stop|status" >&2; exit 2 ;;
esac

#!/usr/bin/env bash
# A single-node Slurm 22.05 cluster on this machine, for the tests and for trying `cluster=slurm` out:
# no systemd, munge with its own key and socket, slurmctld + slurmd as root, every file under one folder.
#
#   launch/slurm/local_up.sh            # installs slurm-wlm + munge if missing (root on Debian), starts
#   export SLURM_CONF=/tmp/ragft-slurm-$(id -u)/etc/slurm.conf   # every client (sbatch, squeue, submitit) needs it
#   launch/slurm/local_down.sh          # cancels the jobs, stops the daemons by the pids this recorded
#
# RAGFT_SLURM_DIR moves the folder (default /tmp/ragft-slurm-<uid>). Prints `SLURM_CONF=<path>` last.
# /tmp is shared: the folder must be ours and a real folder, not one another user made or a link they planted
# (this runs as root and writes keys and configs there).
set -euo pipefail
DIR=${RAGFT_SLURM_DIR:-/tmp/ragft-slurm-$(id -u)}
if [ -L "$DIR" ] || { [ -e "$DIR" ] && { [ ! -d "$DIR" ] || [ ! -O "$DIR" ]; }; }; then
    echo "$DIR is a link, not a folder, or not ours: refusing to use it (set RAGFT_SLURM_DIR)" >&2
    exit 2
fi
mkdir -p -m 755 "$DIR"
for sub in munge run log etc spool spool/ctld spool/d; do
    if [ -L "$DIR/$sub" ]; then echo "$DIR/$sub is a link: refusing to use it" >&2; exit 2; fi
done

if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
    if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
        echo "slurm-wlm and munge are not installed and this is not root on Debian: install them first" >&2
        exit 2
    fi
    # No daemon may start from the packages' install scripts: this script starts its own.
    policy=/usr/sbin/policy-rc.d; made_policy=
    if [ ! -e $policy ]; then printf '#!/bin/sh\nexit 101\n' > $policy; chmod +x $policy; made_policy=1; fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends slurm-wlm munge >/dev/null \
        || { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends slurm-wlm munge >/dev/null; }
    [ -n "$made_policy" ] && rm -f $policy
fi

if [ -f "$DIR/run/slurmctld.pid" ] && kill -0 "$(cat "$DIR/run/slurmctld.pid")" 2>/dev/null; then
    echo "already running"; echo "SLURM_CONF=$DIR/etc/slurm.conf"; exit 0
fi

mkdir -p "$DIR"/{munge,run,log,etc,spool/ctld,spool/d}
# munge refuses a socket folder others cannot traverse, and a key others can read.
chmod 755 "$DIR" "$DIR/munge"
[ -f "$DIR/munge/munge.key" ] || { dd if=/dev/urandom bs=1 count=1024 of="$DIR/munge/munge.key" status=none; }
chmod 400 "$DIR/munge/munge.key"
SOCKET="$DIR/munge/munge.sock"
munged --force --key-file="$DIR/munge/munge.key" --socket="$SOCKET" --pid-file="$DIR/run/munged.pid" \
    --log-file="$DIR/log/munged.log" --seed-file="$DIR/munge/munge.seed"

HOST=$(hostname -s)
# The node line `slurmd -C` reports (NodeName=<host> CPUs=.. RealMemory=..), with CPUs raised to
# RAGFT_SLURM_CPUS (default 8) so that a few small jobs (a sweep's trials) run side by side on a 2-core
# machine; SlurmdParameters=config_overrides makes slurmd accept the configured count.
MEM=$(slurmd -C | head -1 | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p')
NODE="NodeName=$HOST CPUs=${RAGFT_SLURM_CPUS:-8} RealMemory=$MEM"
cat > "$DIR/etc/slurm.conf" <<CONF
ClusterName=ragft-local
SlurmctldHost=$HOST
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire=10: a requeued job may run again after ~10 s instead of the default 120 s.
AuthInfo=socket=$SOCKET,cred_expire=10
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
MailProg=/bin/true
# Without these a submitted job waits ~3 s for the scheduler; with them ~1 s.
SchedulerParameters=batch_sched_delay=0,sched_interval=2
SlurmdParameters=config_overrides
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
StateSaveLocation=$DIR/spool/ctld
SlurmdSpoolDir=$DIR/spool/d
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldPort=${RAGFT_SLURMCTLD_PORT:-6817}
SlurmdPort=${RAGFT_SLURMD_PORT:-6818}
$NODE State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
CONF
export SLURM_CONF="$DIR/etc/slurm.conf"
slurmctld -i   # -i: ignore state from an earlier run of this folder
slurmd
for _ in $(seq 1 60); do
    if sinfo -h -o %T 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; then
        echo "slurm up: $(sinfo -h -o '%P %D %T %c CPUs')"
        echo "SLURM_CONF=$SLURM_CONF"
        exit 0
    fi
    sleep 0.5
done
echo "slurm did not come up; logs in $DIR/log" >&2
exit 1

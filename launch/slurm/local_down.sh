#!/usr/bin/env bash
# Stop what local_up.sh started, by the pids it recorded: jobs first (they outlive slurmd), then the daemons.
set -uo pipefail
DIR=${RAGFT_SLURM_DIR:-/tmp/ragft-slurm-$(id -u)}
export SLURM_CONF="$DIR/etc/slurm.conf"
[ -f "$SLURM_CONF" ] && scancel --full --quiet -u "$(id -un)" 2>/dev/null && sleep 1
for name in slurmd slurmctld munged; do
    pidfile="$DIR/run/$name.pid"
    [ -f "$pidfile" ] || continue
    pid=$(cat "$pidfile")
    if kill "$pid" 2>/dev/null; then
        for _ in $(seq 1 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
        kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$pidfile"
done
echo "slurm down ($DIR)"

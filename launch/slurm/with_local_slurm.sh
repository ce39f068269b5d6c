#!/usr/bin/env bash
# Run a command with the local Slurm up: start it if it is not (installing it where this is root on Debian),
# export SLURM_CONF, run the command, and stop Slurm again if this script started it. Where Slurm cannot
# start, the command still runs (the Slurm tests then skip with the reason, or fail under RAGFT_REQUIRE_SLURM=1).
#   launch/slurm/with_local_slurm.sh python -m pytest -q      # what `make test` runs
set -uo pipefail
HERE=$(dirname "$0")
started=
if up=$(bash "$HERE/local_up.sh" 2>&1); then
    echo "$up" | tail -n 2
    export SLURM_CONF=$(echo "$up" | sed -n 's/^SLURM_CONF=//p' | tail -n 1)
    case "$up" in *"already running"*) ;; *) started=1 ;; esac
else
    echo "local Slurm not started (the Slurm tests will skip): $(echo "$up" | tail -n 1)"
fi
"$@"
status=$?
[ -n "$started" ] && bash "$HERE/local_down.sh"
exit $status

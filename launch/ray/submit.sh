#!/usr/bin/env bash
# Run `ragft train` on an existing Ray cluster as a Ray job: the driver runs on the head node, the
# Ray Train workers on the GPU nodes; this terminal streams its output (Ctrl-C stops streaming only).
#
#   launch/ray/submit.sh <job server> [ragft train overrides...]
#
#   <job server>  the head's dashboard address, e.g. http://127.0.0.1:8265 while
#                 `ray dashboard launch/ray/cluster.yaml` forwards it, or http://<head>:8265
#   overrides     as for `ragft train`; later ones win, so out_dir=... replaces the default below
#
#   launch/ray/submit.sh http://127.0.0.1:8265 model=llama3_8b method=lora strategy=zero3 \
#       cluster.num_workers=16 data=jsonl data.train_path=/shared/data/train.jsonl
#
# SHARED (default /shared) is the filesystem every node mounts: out_dir, RAGFT_CACHE (tokenized data,
# read by every node) and HF_HOME go there. RUN_NAME names the run folder (default: a timestamp).
# WANDB_API_KEY and HF_TOKEN are passed on when set, in a 0600 runtime-env file (never on argv); the job's
# runtime env is still visible to whoever can read the cluster's dashboard: on a shared cluster, provision
# them on the nodes instead (e.g. `wandb login` in cluster.yaml's setup_commands) and leave them unset here.
# The checkout is uploaded as the job's working dir (git-ignored files are not), so the job runs this
# code; its dependencies must already be on the nodes (launch/ray/cluster.yaml).
# Afterwards: ray job logs|status|stop ragft-train-<RUN_NAME> --address <job server>. `stop` lets the
# run save a checkpoint first (STOP_WAIT_S, default 600 s, before SIGKILL); continue it with
#   launch/ray/submit.sh <job server> resume=$SHARED/runs/train/<RUN_NAME>
set -euo pipefail

if [[ $# -lt 1 || $1 != http*://* ]]; then
  sed -n '2,23p' "$0" | sed 's/^# \{0,1\}//' >&2
  echo "usage: $0 <http://head:8265> [ragft train overrides...]" >&2
  exit 2
fi
address=$1
shift
shared=${SHARED:-/shared}
run=${RUN_NAME:-$(date +%Y%m%d-%H%M%S)}
cd "$(dirname "$0")/../.."  # the repo root: code and conf/ for the working dir

# The runtime env goes to Ray in a file only this user can read, never on the command line: WANDB_API_KEY and
# HF_TOKEN on argv would be readable by every local user through `ps`.
umask 077
env_file=$(mktemp "${TMPDIR:-/tmp}/ragft-runtime-env.XXXXXX.yaml")
trap 'rm -f "$env_file"' EXIT

# `ray job stop` sends SIGTERM, then SIGKILL after RAY_JOB_STOP_WAIT_TIME_S (Ray's default: 3 s); on
# SIGTERM ragft's workers checkpoint at the next step: give them the time to write it.
SHARED=$shared STOP_WAIT_S=${STOP_WAIT_S:-600} ENV_FILE=$env_file python3 -c '
import json, os
env = {"RAGFT_CACHE": os.environ["SHARED"] + "/ragft-cache", "HF_HOME": os.environ["SHARED"] + "/hf",
       "PYTHONUNBUFFERED": "1", "RAY_JOB_STOP_WAIT_TIME_S": os.environ["STOP_WAIT_S"]}
env.update({k: os.environ[k] for k in ("WANDB_API_KEY", "HF_TOKEN") if os.environ.get(k)})
with open(os.environ["ENV_FILE"], "w") as f:
    json.dump({"env_vars": env, "excludes": ["runs/", "outputs/", "wandb/", ".git/"]}, f)'

# Not exec: the trap removes the file when the submission ends (`ray job submit` reads it at start).
ray job submit --address "$address" --submission-id "ragft-train-$run" --working-dir . \
  --runtime-env "$env_file" -- \
  python -m ragft train cluster=ray cluster.address=auto \
  "runs_dir=$shared/runs/train" "out_dir=$shared/runs/train/$run" "registry.path=$shared/runs/registry.jsonl" "$@"

"""`cluster=slurm`: render ragft/templates/ray_train.sbatch for a validated train spec, submit it, and the
helpers the script calls inside the allocation.

    ragft train cluster=slurm cluster.nodes=4 cluster.gpus_per_node=8 ...   → sbatch, prints job id and log
    ragft train cluster=slurm cluster.dry_run=true ...                      → prints the script only

Inside the allocation the script runs `ragft train` again with the same overrides, the head's address
and RAGFT_SLURM_ALLOCATION=1, so the job is the ordinary Ray Train job on the allocation's Ray cluster.
`hydra/launcher=submitit_slurm` sweeps get their sbatch options from the same `cluster` group
(`submitit_overrides`); each trial then runs on one node with an embedded Ray.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from importlib.resources import files
from pathlib import Path

from ragft.config.resolvers import time_minutes
from ragft.config.schema import ClusterConfig
from ragft.train.resume import override_key

TEMPLATE = Path(str(files("ragft"))) / "templates" / "ray_train.sbatch"
IN_ALLOCATION = "RAGFT_SLURM_ALLOCATION"  # set by the script: run here, do not submit again


def in_allocation() -> bool:
    """Already inside a Slurm job that runs this training here: the allocation ragft's script made, or a
    trial that hydra/launcher=submitit_slurm submitted (one node, embedded Ray)."""
    return os.environ.get(IN_ALLOCATION) == "1" or os.environ.get("SUBMITIT_EXECUTOR") == "slurm"


def check(cl: ClusterConfig) -> list[str]:
    """Problems with a cluster=slurm config, all at once (ragft.train.spec.validate_train calls this)."""
    problems = []
    if cl.nodes < 1:
        problems.append(f"cluster.nodes={cl.nodes} must be at least 1")
    if cl.gpus_per_node < 0 or cl.cpus_per_task < 1:
        problems.append("cluster.gpus_per_node must be >= 0 and cluster.cpus_per_task >= 1")
    if cl.use_gpu and cl.num_workers > cl.nodes * cl.gpus_per_node:
        problems.append(f"cluster.num_workers={cl.num_workers} GPU workers do not fit on cluster.nodes × "
                        f"cluster.gpus_per_node = {cl.nodes} × {cl.gpus_per_node} GPUs")
    if cl.num_workers * cl.cpus_per_worker > cl.nodes * cl.cpus_per_task:
        problems.append(f"cluster.num_workers × cluster.cpus_per_worker = {cl.num_workers} × {cl.cpus_per_worker} "
                        f"CPUs do not fit on cluster.nodes × cluster.cpus_per_task = {cl.nodes} × {cl.cpus_per_task}")
    minutes = time_minutes(cl.time)
    if minutes is None:
        problems.append(f"cluster.time={cl.time!r} is not an sbatch time (minutes, HH:MM:SS or D-HH:MM:SS)")
    elif cl.signal_lead_s < 1 or cl.signal_lead_s >= minutes * 60:
        problems.append(f"cluster.signal_lead_s={cl.signal_lead_s} must be positive and shorter than "
                        f"cluster.time={cl.time}")
    bad = [line for line in cl.sbatch_extra if not line.startswith("-")]
    if bad:
        problems.append(f"cluster.sbatch_extra: {bad} are not sbatch options (e.g. --exclusive)")
    problems += unsafe_values(cl)
    if not cl.dry_run and not in_allocation() and shutil.which("sbatch") is None:
        problems.append("cluster=slurm needs sbatch on PATH (cluster.dry_run=true only prints the script)")
    return problems


# What sbatch option values need (partition lists, constraint expressions, memory sizes, gres): anything else
# could end the `#SBATCH` line the value is written into and start a shell line of its own.
SAFE_VALUE = re.compile(r"[A-Za-z0-9_.,:=@%+/\-\[\]&|!*()]+")
SAFE_OPTION = re.compile(r"--?[A-Za-z0-9][A-Za-z0-9_-]*([= ][A-Za-z0-9_.,:=@%+/\-\[\]&|!*()]+)?")


def unsafe_values(cl: ClusterConfig) -> list[str]:
    """The cluster values rendered into `#SBATCH` lines that hold a line break or a character outside the safe set."""
    problems = []
    for key in ("partition", "account", "qos", "constraint", "mem"):
        value = getattr(cl, key)
        if value is not None and not SAFE_VALUE.fullmatch(str(value)):
            problems.append(f"cluster.{key}={str(value)!r} holds characters sbatch values never need (allowed: "
                            f"letters, digits and _.,:=@%+/-[]&|!*())")
    for line in cl.sbatch_extra:
        if str(line).startswith("-") and not SAFE_OPTION.fullmatch(str(line)):
            problems.append(f"cluster.sbatch_extra: {str(line)!r} is not one sbatch option on one line "
                            f"(e.g. --exclusive or --gres=gpu:8)")
    return problems


def render(spec, overrides: list[str]) -> str:
    """The sbatch script for `spec`: `overrides` are the command line the job re-runs inside the allocation."""
    import jinja2

    cl = spec.cluster
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    env.filters["q"] = lambda v: shlex.quote(str(v))
    inner = [o for o in overrides if not o.startswith(("out_dir=", "resume=", "cluster.dry_run=", "cluster.address="))]
    inner.append(f"out_dir={spec.out_dir}")  # the submit-time folder, not a new timestamp
    return env.from_string(TEMPLATE.read_text()).render(
        job_name="ragft-" + re.sub(r"[^A-Za-z0-9_.-]", "-", spec.run_id),  # run_id may come from a resumed spec.json
        nodes=cl.nodes,
        cpus_per_task=cl.cpus_per_task,
        gpus_per_node=cl.gpus_per_node,
        mem=cl.mem,
        partition=cl.partition,
        account=cl.account,
        qos=cl.qos,
        constraint=cl.constraint,
        time=cl.time,
        log=log_path(spec),
        signal_lead_s=cl.signal_lead_s,
        requeue=cl.requeue,
        sbatch_extra=cl.sbatch_extra,
        setup=cl.setup,
        workdir=os.getcwd(),
        python=sys.executable,
        out_dir=spec.out_dir,
        ray_port=cl.ray_port,
        overrides=" ".join(shlex.quote(o) for o in inner),
    )


def log_path(spec) -> str:
    return str(Path(spec.out_dir) / "slurm" / "slurm-%j.out")


def submit(spec, overrides: list[str]) -> str | None:
    """Write the script under <out_dir>/slurm/, sbatch it, print the job id and log; return the job id.
    With cluster.dry_run the script is printed and nothing is submitted."""
    script = render(spec, overrides)
    if spec.cluster.dry_run:
        print(script, end="", flush=True)
        return None
    folder = Path(spec.out_dir) / "slurm"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "train.sbatch"
    path.write_text(script)
    done = subprocess.run(["sbatch", "--parsable", str(path)], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"sbatch refused {path}: {done.stderr.strip() or done.stdout.strip()}")
    job_id = done.stdout.strip().split(";")[0]
    (folder / "job_id").write_text(job_id + "\n")
    print(f"ragft train: submitted Slurm job {job_id} ({spec.cluster.nodes} node(s))\n"
          f"  script:  {path}\n"
          f"  log:     {log_path(spec).replace('%j', job_id)}\n"
          f"  result:  {Path(spec.out_dir) / 'result.json'} when it ends\n"
          f"  watch:   squeue -j {job_id}    stop: scancel {job_id} (scancel --signal=USR1 --batch {job_id} "
          f"checkpoints and requeues)", flush=True)
    return job_id


def submitit_overrides(args: list[str]) -> list[str]:
    """`hydra/launcher=submitit_slurm` options taken from the cluster group, unless given on the command line.
    Each trial is one Slurm job on one node: its Ray is embedded, as with cluster=local."""
    mapping = {
        "hydra.launcher.nodes": "1",
        "hydra.launcher.tasks_per_node": "1",
        "hydra.launcher.cpus_per_task": "${cluster.cpus_per_task}",
        "hydra.launcher.gpus_per_node": "${cluster.gpus_per_node}",
        "hydra.launcher.partition": "${cluster.partition}",
        "hydra.launcher.account": "${cluster.account}",
        "hydra.launcher.qos": "${cluster.qos}",
        "hydra.launcher.constraint": "${cluster.constraint}",
        "hydra.launcher.timeout_min": "${slurm_minutes:${cluster.time}}",
        "hydra.launcher.signal_delay_s": "${cluster.signal_lead_s}",
        "hydra.launcher.setup": "${cluster.setup}",
        "hydra.launcher.name": "ragft-${hydra.job.name}",
    }
    given = {override_key(a) for a in args}
    return [f"{key}='{value}'" if "${" in value else f"{key}={value}" for key, value in mapping.items()
            if key not in given]  # quoted: Hydra's override grammar does not parse nested interpolations


def wait_for_nodes(address: str, count: int, timeout_s: float) -> bool:
    """Inside the allocation: True once `count` Ray nodes are alive at `address`."""
    import ray

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            ray.init(address=address, logging_level="ERROR", log_to_driver=False)
            break
        except Exception:
            if time.monotonic() > deadline:
                print(f"ragft: no Ray head at {address} after {timeout_s:.0f} s", file=sys.stderr)
                return False
            time.sleep(1)
    try:
        while True:
            alive = sum(1 for node in ray.nodes() if node["Alive"])
            if alive >= count:
                print(f"ragft: {alive}/{count} Ray nodes up at {address}", flush=True)
                return True
            if time.monotonic() > deadline:
                print(f"ragft: only {alive}/{count} Ray nodes joined within {timeout_s:.0f} s", file=sys.stderr)
                return False
            time.sleep(1)
    finally:
        ray.shutdown()


if __name__ == "__main__":
    if sys.argv[1:2] == ["wait-for-nodes"] and len(sys.argv) == 5:
        sys.exit(0 if wait_for_nodes(sys.argv[2], int(sys.argv[3]), float(sys.argv[4])) else 1)
    print("usage: python -m ragft.train.slurm wait-for-nodes <head:port> <nodes> <timeout_s>", file=sys.stderr)
    sys.exit(2)

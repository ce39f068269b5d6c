"""`cluster=ray`: `ragft train` on an existing multi-node Ray cluster, and the launch files for one.

The cluster is real: a head and a worker node started with `ray start` on this machine
(tests/helpers/ray_nodes.py), 3 logical CPUs each. With cluster.cpus_per_worker=2 only one Ray Train
worker fits on a node, so the 2-worker job must span both nodes and its gloo/DeepSpeed group, Ray Data
split and checkpoints cross node boundaries; out_dir and the data cache are paths both nodes see.
The pytest process never joins it: the job is `python -m ragft train` in a subprocess, and the checks
use the state API over HTTP (address=, no ray.init).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from helpers.ray_nodes import cluster_env, two_node_ray
from ragft import registry
from ragft.checkpoints import verify
from ragft.net import is_loopback

ROOT = Path(__file__).resolve().parent.parent
MAX_STEPS = 6


@pytest.fixture
def two_nodes(tmp_path):
    """A head and a worker node, 3 logical CPUs each; their logs are kept under tmp_path/ray-nodes."""
    with two_node_ray(num_cpus=3, keep_logs=tmp_path / "ray-nodes") as cluster:
        yield cluster


@pytest.mark.ray
@pytest.mark.deepspeed
def test_train_on_an_existing_two_node_cluster(two_nodes, tmp_path):
    out, cache = tmp_path / "run", tmp_path / "cache"
    env = cluster_env()
    env.update({"RAGFT_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"})
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "ragft", "train", "cluster=ray", f"cluster.address={two_nodes.address}",
         "cluster.use_gpu=false", "cluster.num_workers=2", "cluster.cpus_per_worker=2", "cluster.max_failures=0",
         "method=lora", "strategy=zero3", f"train.max_steps={MAX_STEPS}", "train.micro_batch_size=4",
         "train.global_batch_size=8", "train.log_every=3", "train.eval_every=3", "train.save_every=3",
         "train.eval_max_batches=2", f"out_dir={out}", f"runs_dir={tmp_path / 'runs'}",
         f"registry.path={tmp_path / 'registry.jsonl'}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    job_s = time.monotonic() - started
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-4000:]}"

    # The two Ray Train workers (Train V2's actor class) ran one on each node of *this* cluster.
    nodes = {n.node_id for n in two_nodes.alive_nodes()}
    workers = two_nodes.list_actors("RayTrainWorker")
    assert len(nodes) == 2 and len(workers) == 2, (nodes, workers)
    assert {w.node_id for w in workers} == nodes

    # Checkpoints and Ray's run state went to out_dir (shared), the tokenized data to RAGFT_CACHE.
    result = json.loads((out / "result.json").read_text())
    final = out / "checkpoints" / str(MAX_STEPS)
    assert result["final_checkpoint"] == str(final) and result["metrics"]["step"] == MAX_STEPS
    manifest = json.loads((final / "manifest.json").read_text())
    assert manifest["step"] == MAX_STEPS and manifest["method"] == "lora" and verify(final) == []  # sha256 sums
    assert (out / "ray").is_dir() and any((cache / "data").iterdir())
    # the end-of-run table names the checkpoint, and the registry has it: `checkpoint=latest` finds it
    assert any(line.split()[:2] == ["checkpoints", str(final)] for line in proc.stdout.splitlines()), proc.stdout
    latest = registry.resolve(tmp_path / "registry.jsonl", "latest")
    assert latest.checkpoint == str(final) and latest.step == MAX_STEPS and latest.run_id == result["run_id"]

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(out / "base_model"), final)
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b)  # trained: B starts at zero
    print(f"\nragft train on 2 nodes: {job_s:.1f} s")


def test_launch_cluster_yaml_is_a_valid_ray_up_config():
    """launch/ray/cluster.yaml parses, and validates against the installed Ray's autoscaler schema."""
    import ray.autoscaler

    config = yaml.safe_load((ROOT / "launch" / "ray" / "cluster.yaml").read_text())
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)
    workers = [t for name, t in config["available_node_types"].items() if name != config["head_node_type"]]
    assert workers and all(t["resources"].get("GPU", 0) > 0 for t in workers)
    setup = config["setup_commands"]  # installed as the Makefile does: torch pinned, DeepSpeed, then ragft

    def step(*words: str) -> int:
        return next(i for i, command in enumerate(setup) if all(w in command for w in words))

    assert step("pip install", "torch==") < step("DS_BUILD_OPS=0", "--no-build-isolation", "deepspeed") \
        < step("pip install", "-e ~/ragft")


def test_submit_script_is_valid_bash():
    script = ROOT / "launch" / "ray" / "submit.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    usage = subprocess.run(["bash", str(script)], capture_output=True, text=True)
    assert usage.returncode == 2 and "usage" in usage.stderr.lower()


@pytest.mark.ray
def test_the_embedded_ray_listens_on_loopback_only(tmp_path):
    """`init_ray` as `ragft serve` calls it (dashboard on), in a process that imported Ray first: every port of
    every process it started (GCS, raylet, workers, dashboard, agents, metrics exporter) is on loopback, and
    Ray's token, which keeps other users of the machine out, is the user's alone."""
    probe = """
import json, psutil, ray
from ragft.cluster import init_ray
init_ray(None, dashboard=True)
ray.get(ray.remote(lambda: 1).remote())
me = psutil.Process()
print(json.dumps([[p.name(), c.laddr.ip, c.laddr.port] for p in [me, *me.children(recursive=True)]
                  for c in p.net_connections("inet") if c.status == psutil.CONN_LISTEN]))
ray.shutdown()
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    env["HOME"] = str(tmp_path)  # a user with no Ray token yet: the one Ray then uses is readable by them only
    proc = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    token = tmp_path / ".ray" / "auth_token"
    assert oct(token.stat().st_mode & 0o777) == "0o600" and len(token.read_text()) == 64
    listening = json.loads(proc.stdout.strip().splitlines()[-1])
    names = {name for name, _, _ in listening}
    assert {"gcs_server", "raylet"} <= names and any("DashboardAgent" in n for n in names), listening
    assert all(is_loopback(ip) for _, ip, _ in listening), listening

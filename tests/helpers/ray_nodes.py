"""A real multi-node Ray cluster on this one machine, for tests of `cluster=ray` (and Ray Tune later).

`two_node_ray()` starts a head and a worker node with `ray start --block`, each with its own ports,
its own short temp dir (Unix socket paths are limited to ~107 characters) and its own logical CPUs,
and stops exactly those processes when the block exits, even when the test failed:

  * each node is one `ray start --block` process (its pid is ours); SIGTERM makes it stop the raylet,
    GCS, dashboard, agents and workers it started (Ray's own shutdown hook, drain disabled);
  * then any process whose command line names our temp dir (a worker that outlived its raylet) gets
    SIGTERM, then SIGKILL. Nothing else on the machine is touched: no `ray stop`, no kill by name.

Two raylets on one host need (Ray 2.60, as ray.cluster_utils.Cluster does in-process): a separate
--temp-dir per node; distinct --node-manager-port, --object-manager-port, --dashboard-agent-grpc-port,
--runtime-env-agent-port, --metrics-export-port and above all --dashboard-agent-listen-port (its default,
52365, is one port for every Ray on the machine); worker ports chosen by the OS (--min-worker-port=0
--max-worker-port=0); and --include-log-monitor=false on the second (one log monitor per host). The head
also needs its own --port (GCS), --dashboard-port and --ray-client-server-port (default 10001; it cannot
be turned off while ray[client] is installed). No node name or custom resource is needed: both nodes
register under the machine's IP (Ray replaces 127.0.0.1 by it, so --node-ip-address=127.0.0.1 is a no-op)
and get distinct node ids; a driver on this host attaches to the head (Ray prefers it).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import psutil

from helpers.net import free_port

RAY = str(Path(sys.executable).with_name("ray"))  # the venv's CLI: nodes run this interpreter's Ray
HOST = "127.0.0.1"


@dataclass
class RayNode:
    name: str
    temp_dir: Path
    log: Path  # stdout + stderr of its `ray start --block`
    proc: subprocess.Popen
    resources: dict = field(default_factory=dict)

    def log_tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""


@dataclass
class RayCluster:
    address: str  # host:gcs_port, for ray.init / `ragft train cluster.address=...`
    dashboard_url: str  # http://host:port: the state API (ray.util.state ... address=) and `ray job submit`
    client_address: str  # ray://host:port
    root: Path
    nodes: list[RayNode]

    def alive_nodes(self) -> list:
        """The ALIVE nodes (state API NodeState: .node_id, .is_head_node, .resources_total ...), no ray.init."""
        from ray.util.state import list_nodes

        with _explicit_address():
            return list_nodes(address=self.dashboard_url, filters=[("state", "=", "ALIVE")], detail=True,
                              raise_on_missing_output=False)

    def list_actors(self, class_name: str) -> list:
        """Actors of `class_name`, dead ones included, with their node_id (ActorState)."""
        from ray.util.state import list_actors

        with _explicit_address():
            return list_actors(address=self.dashboard_url, filters=[("class_name", "=", class_name)], detail=True,
                               limit=1000, raise_on_missing_output=False)


@contextlib.contextmanager
def _explicit_address():
    """The state API prefers RAY_API_SERVER_ADDRESS / RAY_ADDRESS over its address= argument: hide them."""
    saved = {k: os.environ.pop(k) for k in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS") if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


# Ray 2.60: a head started by `ray start` turns token auth on when ~/.ray/auth_token exists (any earlier
# local ray.init() writes one), but `ray start --address` and `ray.init(address=host:port)` do not, and are
# refused; ray.init() also sets RAY_AUTH_MODE=token in its own process (the pytest process, once the
# embedded Ray ran). So the mode is explicit here, for the nodes and for every driver (cluster_env()).
CLUSTER_ENV = {"RAY_AUTH_MODE": "disabled"}


def cluster_env(base: dict | None = None) -> dict:
    """Environment for a process that joins or drives the test cluster: ours, never an inherited Ray's."""
    env = dict(os.environ if base is None else base)
    env.pop("RAY_ADDRESS", None)
    env.pop("RAY_AUTH_TOKEN", None)
    env.update(CLUSTER_ENV)
    return env


def _env(gcs_address: str) -> dict:
    env = cluster_env()
    # What `address=None/auto` means to processes on the nodes: Ray Train V2's own state-API calls
    # (PlacementGroupCleaner) would otherwise find every GCS on this machine and refuse to choose.
    env["RAY_ADDRESS"] = gcs_address
    # Jobs' entrypoints (`ray job submit -- python ...`) find this interpreter first, as on a real node.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"] = "0"  # SIGTERM stops the node at once (no 30 s drain)
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    return env


def _node_args(temp_dir: Path, num_cpus: int, resources: dict) -> list[str]:
    return [
        f"--temp-dir={temp_dir}",
        f"--num-cpus={num_cpus}",
        "--num-gpus=0",
        f"--resources={json.dumps(resources)}",
        f"--node-manager-port={free_port()}",
        f"--object-manager-port={free_port()}",
        f"--dashboard-agent-listen-port={free_port()}",
        f"--dashboard-agent-grpc-port={free_port()}",
        f"--runtime-env-agent-port={free_port()}",
        f"--metrics-export-port={free_port()}",
        "--min-worker-port=0",  # 0/0: the OS picks each worker's port; two nodes cannot collide
        "--max-worker-port=0",
        f"--object-store-memory={200 * 1024 ** 2}",
        "--disable-usage-stats",
        "--block",
    ]


def _start(name: str, root: Path, args: list[str], resources: dict, gcs_address: str) -> RayNode:
    temp_dir = root / name
    temp_dir.mkdir()
    log = root / f"{name}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([RAY, "start", *args], stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=_env(gcs_address), cwd=root)
    return RayNode(name, temp_dir, log, proc, resources)


def _wait_started(node: RayNode, deadline: float) -> None:
    """Until its `ray start` says the node runs (it then blocks), or raise with its output."""
    while "Ray runtime started" not in (node.log.read_text(errors="replace") if node.log.exists() else ""):
        if node.proc.poll() is not None:
            raise RuntimeError(f"ray start ({node.name}) exited with {node.proc.returncode}:\n{node.log_tail()}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"ray start ({node.name}) did not start in time:\n{node.log_tail()}")
        time.sleep(0.2)


def _wait_nodes(cluster: RayCluster, count: int, deadline: float) -> None:
    while True:
        try:
            if len(cluster.alive_nodes()) >= count:
                return
        except Exception:  # the dashboard's state API is not up yet
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{count} nodes did not register in time:\n" +
                               "\n".join(n.log_tail(1500) for n in cluster.nodes))
        time.sleep(0.5)


def _ours(root: Path) -> list[psutil.Process]:
    """Processes whose command line names our temp root: only nodes this helper started."""
    mine = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        with contextlib.suppress(psutil.Error):
            if proc.pid != os.getpid() and any(str(root) in arg for arg in proc.info["cmdline"] or ()):
                mine.append(proc)
    return mine


def stop_nodes(cluster_root: Path, nodes: list[RayNode], timeout_s: float = 20.0) -> None:
    """Worker node first, then the head: SIGTERM each `ray start --block` (it stops its own processes),
    then SIGTERM/SIGKILL whatever still names our temp root. Only pids we started or that carry our dir."""
    for node in reversed(nodes):
        if node.proc.poll() is None:
            node.proc.send_signal(signal.SIGTERM)
            try:
                node.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                node.proc.kill()
                node.proc.wait()
    leftovers = _ours(cluster_root)
    for proc in leftovers:
        with contextlib.suppress(psutil.Error):
            proc.terminate()
    _, alive = psutil.wait_procs(leftovers, timeout=5)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(alive, timeout=5)


@contextlib.contextmanager
def two_node_ray(num_cpus: int = 3, resources: tuple[dict, dict] = ({}, {}),
                 timeout_s: float = 180.0, keep_logs: Path | None = None) -> Iterator[RayCluster]:
    """A head and one worker node on this machine, `num_cpus` logical CPUs each (+ `resources[i]`).

    Stopped (by pid) when the block exits. Drivers take their environment from cluster_env() and connect
    to `.address`. `timeout_s`: for both nodes to register (~20 s idle, over 70 s on a loaded 2-core box).
    `keep_logs`: copy the nodes' temp dirs (session logs) there before they are removed."""
    root = Path(tempfile.mkdtemp(prefix="rn-", dir="/tmp"))  # short: Ray's socket paths live under it
    gcs_port, dashboard_port, client_port = free_port(), free_port(), free_port()
    nodes: list[RayNode] = []
    cluster = RayCluster(f"{HOST}:{gcs_port}", f"http://{HOST}:{dashboard_port}", f"ray://{HOST}:{client_port}",
                         root, nodes)
    deadline = time.monotonic() + timeout_s
    try:
        nodes.append(_start("head", root, [
            "--head", f"--port={gcs_port}", f"--ray-client-server-port={client_port}",
            "--include-dashboard=true", f"--dashboard-host={HOST}", f"--dashboard-port={dashboard_port}",
            *_node_args(root / "head", num_cpus, resources[0]),
        ], resources[0], cluster.address))
        _wait_started(nodes[0], deadline)
        nodes.append(_start("worker", root, [
            f"--address={cluster.address}", "--include-log-monitor=false",  # one log monitor per host
            *_node_args(root / "worker", num_cpus, resources[1]),
        ], resources[1], cluster.address))
        _wait_started(nodes[1], deadline)
        _wait_nodes(cluster, 2, deadline)
        yield cluster
    finally:
        try:
            stop_nodes(root, nodes)
        finally:
            if keep_logs is not None:
                with contextlib.suppress(OSError):
                    shutil.copytree(root, keep_logs, symlinks=True, ignore=shutil.ignore_patterns("sockets"),
                                    dirs_exist_ok=True)
            shutil.rmtree(root, ignore_errors=True)

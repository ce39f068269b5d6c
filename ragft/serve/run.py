"""The driver of `ragft serve`: spec → Ray (embedded or a cluster) → Serve app → wait for Ctrl-C.

In the foreground (the default) the command serves until SIGINT/SIGTERM, then deletes the
app and returns; Serve drains in-flight requests for each replica's graceful-shutdown period, and
where this command started Ray, Ray and its HAProxy stop with it (`shutdown`).
With `serve.detach=true` (cluster=ray) it returns once the app is running and leaves it there;
`serve shutdown` or `serve.delete(<app_name>)` removes it.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

from ragft.cluster import init_ray
from ragft.errors import InputError
from ragft.net import is_loopback
from ragft.serve import leftovers
from ragft.serve.haproxy import SIDE_HOST, Private, running
from ragft.serve.spec import ServeSpec
from ragft.signals import on_stop_signal

SERVE_INFO = "serve.json"
STOP_TIMEOUT_S = 10.0  # for Serve to drain and delete the app before Ray is stopped under it


def run_serve(spec: ServeSpec, wait: bool = True) -> dict:
    """Start the app; block until interrupted unless `wait` is false or serve.detach is set."""
    import ray

    from ragft.model.build import context_length as model_context_length

    s = spec.serve
    context_length = model_context_length(spec.base_path)
    started_ray = not ray.is_initialized()
    embedded = started_ray and spec.cluster.name == "local"
    haproxy, record = None, None
    if embedded:
        for line in leftovers.clear():
            print(f"ragft serve: {line}", flush=True)
        leftovers.check_port(s.host, s.port)
    if started_ray:
        for key, value in serve_env(s.haproxy).items():
            os.environ.setdefault(key, value)  # inherited by the embedded Ray's proxy and replicas
        if s.haproxy and spec.cluster.name == "local":
            haproxy = Private()
            os.environ.update(haproxy.env)  # this instance's own: never a setdefault left from an earlier one
        init_ray(spec.cluster.address if spec.cluster.name == "ray" else None, dashboard=spec.cluster.name == "local")
    ray_processes = _own_ray_processes() if embedded else []
    stop = threading.Event()
    with on_stop_signal(lambda name: stop.set()):  # after ray.init, which sets its own SIGTERM handler
        try:
            if embedded:
                record = _record(haproxy)
            info = _start(spec, context_length, stop, haproxy)
            if embedded:
                record = _record(haproxy)  # Ray's agents and workers started since
            if s.detach or not wait:
                if s.detach:
                    print(f"ragft serve: left running on the Ray cluster as app {s.app_name!r}", flush=True)
                return info
            print("ragft serve: Ctrl-C stops it", flush=True)
            while not stop.wait(0.1):  # a short timeout: a signal handler runs between two waits
                pass
            print("ragft serve: stopping", flush=True)
        finally:  # stopped, or failed to start: either way nothing this command started stays behind
            if stop.is_set() or sys.exc_info()[0] is not None:
                # an app of that name on a Serve this command could not use is someone else's
                mine = None if isinstance(sys.exc_info()[1], ServeElsewhere) else s.app_name
                shutdown(mine, started_ray, ray_processes, haproxy)
                if record is not None:
                    leftovers.forget(record)
    return info


def _record(haproxy: Private | None) -> Path | None:
    """Record what this command has started so far, for a later serve to clear if this one is killed."""
    import psutil

    return leftovers.record(psutil.Process().children(recursive=True), haproxy.folder if haproxy else None)


def _start(spec: ServeSpec, context_length: int, stop: threading.Event, haproxy: Private | None) -> dict:
    """Start Serve and the app; write and print where it answers."""
    from ray import serve

    s = spec.serve
    serve.start(http_options={"host": s.host, "port": s.port,
                              # the proxy's own limit is only a backstop: the ingress answers 504 first
                              "request_timeout_s": s.request_timeout_s + 30})
    host, port = check_http_options(s.host, s.port, spec.keys.configured)
    _deploy(spec, context_length, stop)
    if haproxy is not None:
        haproxy.check_listening(api_port=port)
    info = {"url": f"http://{host}:{port}/v1", "app": s.app_name,
            "models": [{"id": m.id, **m.to_json()} for m in spec.models], "index_path": spec.index_path,
            "out_dir": spec.out_dir, "auth": "bearer keys" if spec.keys.configured else "none (loopback only)"}
    if haproxy is not None:
        info["haproxy"] = {"stats": f"http://{SIDE_HOST}:{haproxy.stats_port}/stats",
                           "metrics": f"http://{SIDE_HOST}:{haproxy.metrics_port}/metrics"}
    Path(spec.out_dir).mkdir(parents=True, exist_ok=True)
    (Path(spec.out_dir) / SERVE_INFO).write_text(json.dumps(info, indent=2))
    print(f"ragft serve: {info['url']} (models: {', '.join(m.id for m in spec.models)}; "
          f"index: {spec.index_path or 'none'}; auth: {info['auth']})", flush=True)
    return info


class ServeElsewhere(InputError, RuntimeError):
    """A request the running Serve cannot meet: nothing of this command's was deployed."""


def serve_http_options() -> tuple[str, int]:
    """The host and port Ray Serve's proxies really use: those of the Serve already running, if one was, since
    serve.start keeps them and ignores the ones it is given."""
    import ray

    # The controller is the one authority on them; Serve names it so, in its own namespace.
    controller = ray.get_actor("SERVE_CONTROLLER_ACTOR", namespace="serve")
    options = ray.get(controller.get_http_config.remote())
    return options.host, options.port


def check_http_options(host: str, port: int, keys_configured: bool) -> tuple[str, int]:
    """Raise ServeElsewhere unless Serve listens on `host`:`port` as asked, with keys if that is not loopback;
    return where it listens."""
    real_host, real_port = serve_http_options()
    problems = []
    if (real_host, real_port) != (host, port):
        problems.append(f"Ray Serve is already running on {real_host}:{real_port}, not on serve.host={host} "
                        f"serve.port={port} as asked, and keeps its address")
    if real_host is not None and not is_loopback(real_host) and not keys_configured:  # None: no HTTP proxy
        problems.append(f"{real_host} is reachable from other machines but no API key is configured: set "
                        f"RAGFT_API_KEYS (and RAGFT_ADMIN_KEY) or serve.api_keys_file")
    if problems:
        raise ServeElsewhere("; ".join(problems) + ". Not deploying: ask for the address Serve uses, or restart "
                             "Serve (`serve shutdown`) on the one you want")
    return real_host, real_port


def shutdown(app_name: str | None, started_ray: bool, ray_processes: list, haproxy: Private | None,
             timeout_s: float = STOP_TIMEOUT_S) -> None:
    """Stop serving within `timeout_s` plus a few seconds, leaving nothing running that this command started.

    The app is deleted first, so replicas drain their requests (and the ingress's /health answers 503
    meanwhile); then Serve itself stops where this command started it. That needs Ray's own processes: a
    SIGTERM to the whole process group (systemd, Kubernetes, Slurm) reaches the embedded Ray's GCS,
    raylet and dashboard too, and once one of them is gone Serve can only hang, so the drain stops
    there. (They ignore SIGINT, so Ctrl-C in a terminal drains.) Where this command
    started Ray it then stops it, and the HAProxy it started, which lives outside the process group.
    """
    import ray
    from ray import serve

    def delete_then_stop() -> None:
        if app_name is not None:
            serve.delete(app_name)  # the app DELETING: /health answers 503 while replicas finish what is in flight
        if started_ray:
            serve.shutdown()

    drain = threading.Thread(target=delete_then_stop, daemon=True)
    drain.start()
    deadline = time.monotonic() + timeout_s
    while drain.is_alive() and time.monotonic() < deadline and all(running(p) for p in ray_processes):
        drain.join(0.1)
    if drain.is_alive():
        reason = "Ray's own processes were stopped" if time.monotonic() < deadline else f"not done in {timeout_s:.0f} s"
        print(f"ragft serve: Serve could not drain ({reason}); stopping Ray", flush=True)
    if started_ray:
        ray.shutdown()
    if haproxy is not None:
        haproxy.stop()


def _own_ray_processes() -> list:
    """The embedded Ray's own processes (GCS, raylet, dashboard, monitors: this process's children, in its
    process group). One of them gone means a signal reached the group and Ray is going down."""
    import psutil

    return psutil.Process().children()


def serve_env(haproxy: bool) -> dict[str, str]:
    """Ray Serve settings that cut per-request latency, read by Serve's processes when they start.

    User code and the handle router on the replica's own event loop: two thread hops fewer per call
    (every ragft method that computes runs in a thread of its own, so the loop is never blocked).
    """
    env = {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0", "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0"}
    if haproxy:
        env["RAY_SERVE_ENABLE_HA_PROXY"] = "1"
        # The ingress replica then takes requests directly and, when stopped, keeps taking them for
        # this long so load balancers can notice (Ray's default, 30 s, made Ctrl-C take 30 s).
        env["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"] = "2"
        # Serve kills a proxy that misses three readiness checks of this many seconds (default 5); HAProxy's
        # start on a busy machine can miss them, and the app then never comes up.
        env["RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S"] = "30"
    return env


def _deploy(spec: ServeSpec, context_length: int, stop: threading.Event) -> None:
    """serve.run, bounded by serve.ready_timeout_s: a replica that can never be placed (no GPU) is an error."""
    from ray import serve

    from ragft.serve.app import build_app

    s = spec.serve
    failure: list[BaseException] = []

    def deploy() -> None:
        try:
            serve.run(build_app(spec, context_length), name=s.app_name, route_prefix="/")
        except BaseException as err:  # reported by the waiting thread
            failure.append(err)

    thread = threading.Thread(target=deploy, daemon=True)
    thread.start()
    deadline = time.monotonic() + s.ready_timeout_s
    while thread.is_alive() and time.monotonic() < deadline and not stop.is_set():
        thread.join(0.2)
    if failure:
        raise RuntimeError(f"the serve app failed to start: {failure[0]}") from failure[0]
    if thread.is_alive() and stop.is_set():
        thread.join()  # let serve.run finish: the caller deletes the app right after
    elif thread.is_alive():
        status = serve.status().applications.get(s.app_name)
        serve.delete(s.app_name, _blocking=False)
        raise RuntimeError(f"the serve app was not running after serve.ready_timeout_s={s.ready_timeout_s}: "
                           f"{status.message if status else 'no status'}")

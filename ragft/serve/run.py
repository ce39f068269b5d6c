"""The driver of `ragft serve`: spec → Ray (embedded or a cluster) → Serve app → wait for Ctrl-C.

In the foreground (the default) the command serves until SIGINT/SIGTERM, then deletes the
app and returns; Serve drains in-flight requests for each replica's graceful-shutdown period.
With `serve.detach=true` (cluster=ray) it returns once the app is running and leaves it there;
`serve shutdown` or `serve.delete(<app_name>)` removes it.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path

from ragft.serve.spec import ServeSpec

SERVE_INFO = "serve.json"


def run_serve(spec: ServeSpec, wait: bool = True) -> dict:
    """Start the app; block until interrupted unless `wait` is false or serve.detach is set."""
    import ray
    from ray import serve
    from transformers import AutoConfig

    s = spec.serve
    context_length = AutoConfig.from_pretrained(spec.base_path).max_position_embeddings
    if not ray.is_initialized():
        address = spec.cluster.address if spec.cluster.name == "ray" else None
        ray.init(address=address, configure_logging=False, include_dashboard=spec.cluster.name == "local")
    serve.start(http_options={"host": s.host, "port": s.port,
                              # the proxy's own limit is only a backstop: the ingress answers 504 first
                              "request_timeout_s": s.request_timeout_s + 30})
    _deploy(spec, context_length)
    info = {"url": f"http://{s.host}:{s.port}/v1", "app": s.app_name,
            "models": [{"id": m.id, **m.to_json()} for m in spec.models], "index_path": spec.index_path,
            "out_dir": spec.out_dir, "auth": "bearer keys" if spec.keys.configured else "none (loopback only)"}
    Path(spec.out_dir).mkdir(parents=True, exist_ok=True)
    (Path(spec.out_dir) / SERVE_INFO).write_text(json.dumps(info, indent=2))
    print(f"ragft serve: {info['url']} (models: {', '.join(m.id for m in spec.models)}; "
          f"index: {spec.index_path or 'none'}; auth: {info['auth']})", flush=True)
    if s.detach or not wait:
        if s.detach:
            print(f"ragft serve: left running on the Ray cluster as app {s.app_name!r}", flush=True)
        return info
    print("ragft serve: Ctrl-C stops it", flush=True)
    _wait_for_signal()
    print("ragft serve: stopping", flush=True)
    serve.delete(s.app_name)
    return info


def _deploy(spec: ServeSpec, context_length: int) -> None:
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
    thread.join(s.ready_timeout_s)
    if failure:
        raise RuntimeError(f"the serve app failed to start: {failure[0]}") from failure[0]
    if thread.is_alive():
        status = serve.status().applications.get(s.app_name)
        serve.delete(s.app_name, _blocking=False)
        raise RuntimeError(f"the serve app was not running after serve.ready_timeout_s={s.ready_timeout_s}: "
                           f"{status.message if status else 'no status'}")


def _wait_for_signal() -> None:
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        while not stop.wait(0.5):
            pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

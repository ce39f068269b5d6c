"""What a `ragft serve` killed by SIGKILL leaves behind, and how the next one clears it.

SIGKILL gives the command no chance to stop what it started. The embedded Ray's GCS and raylet end
with it, and the replicas with the raylet, but Ray's dashboard and runtime-env agents keep running,
and so does Ray Serve's HAProxy, which lives outside the process group and keeps the API port: the
next `ragft serve` on that port could never become healthy.

So a foreground serve that starts its own Ray records what it started, in a file named after its
pid under a per-user folder, and removes the record when it stops. A serve that starts reads the
records of commands no longer running and stops what they list that still runs. A process is
matched by pid and start time, so a pid the system has since reused is never touched; HAProxy is
found by the private folder on its command line (`ragft.serve.haproxy.Private`).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Optional

from ragft.serve.haproxy import processes_using, stop_all

RECORDS = Path(tempfile.gettempdir()) / f"ragft-serve-{os.getuid()}"


class PortInUse(RuntimeError):
    exit_code = 2  # bad input to the command, like a bad config: one line, nothing started


def record(processes: list, haproxy_folder: Optional[Path]) -> Path:
    """Record this command and the psutil `processes` it started; returns the record to `forget` at the end."""
    import psutil

    def entry(process) -> dict:
        return {"pid": process.pid, "create_time": process.create_time(), "name": process.name()}

    RECORDS.mkdir(mode=0o700, exist_ok=True)
    path = RECORDS / f"{os.getpid()}.json"
    path.write_text(json.dumps({"owner": entry(psutil.Process()), "processes": [entry(p) for p in processes],
                                "haproxy_folder": str(haproxy_folder) if haproxy_folder else None}))
    return path


def forget(path: Path) -> None:
    path.unlink(missing_ok=True)


def clear() -> list[str]:
    """Stop what serve commands that are no longer running left behind; one line per command cleared."""
    cleared = []
    for path in sorted(RECORDS.glob("*.json")) if RECORDS.is_dir() else []:
        try:
            rec = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue  # being written by a serve starting now
        if _alive(rec["owner"]):
            continue
        left = [p for p in (_alive(e) for e in rec["processes"]) if p is not None]
        folder = Path(rec["haproxy_folder"]) if rec["haproxy_folder"] else None
        if folder is not None:
            left += processes_using(folder)  # HAProxy's reloads since the record; the recorded one may be listed twice
        left = list({p.pid: p for p in left}.values())
        if left:
            names = ", ".join(sorted({_name(p) for p in left}))
            stop_all(left)
            cleared.append(f"stopped {len(left)} process(es) left by a ragft serve that was killed "
                           f"(pid {rec['owner']['pid']}): {names}")
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)
        forget(path)
    return cleared


def check_port(host: str, port: int) -> None:
    """Raise PortInUse, naming the holder where it can be found, unless `port` can be bound on `host`."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
            return
        except OSError:
            pass
    raise PortInUse(f"port {port} on {host} is in use{_holder(port)}: stop it, or choose another with serve.port=")


def _holder(port: int) -> str:
    import psutil

    try:
        for conn in psutil.net_connections("tcp"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr.port == port and conn.pid:
                process = psutil.Process(conn.pid)
                return f" by pid {conn.pid} ({' '.join(process.cmdline()[:3])})"
    except (psutil.Error, OSError):
        pass  # other users' sockets are not visible to us
    return ""


def _alive(entry: dict):
    """The psutil process `entry` recorded, if it still runs (same pid, same start time)."""
    import psutil

    try:
        process = psutil.Process(entry["pid"])
        if abs(process.create_time() - entry["create_time"]) < 0.01 and process.status() != psutil.STATUS_ZOMBIE:
            return process
    except psutil.Error:
        pass
    return None


def _name(process) -> str:
    import psutil

    try:
        return process.name()
    except psutil.Error:
        return str(process.pid)

"""What a `ragft serve` killed by SIGKILL leaves behind, and how the next one clears it.

SIGKILL gives the command no chance to stop what it started. The embedded Ray's GCS and raylet end
with it, and the replicas with the raylet, but Ray's dashboard and runtime-env agents keep running,
and so does Ray Serve's HAProxy, which lives outside the process group and keeps the API port: the
next `ragft serve` on that port could never become healthy.

So a foreground serve that starts its own Ray records what it started, in a file named after its
pid under a per-user folder, and removes the record when it stops. A serve that starts reads the
records of commands no longer running and stops what they list that still runs. A process is
matched by pid, start time and name, so a pid the system has since reused is never touched; HAProxy
is found by the private folder on its command line (`ragft.serve.haproxy.Private`).

A record is never trusted on its word alone, since on a shared machine another user may try to write
one. The records live in `$XDG_RUNTIME_DIR` where set (a folder only the user can enter), else in a
per-user folder under the temp dir; a records folder that is a symlink, not the user's, or open to
others (not mode 0700) is refused and nothing is cleared. A folder named in a record is searched and
deleted only if ragft created it (`ragft.serve.haproxy.own_folder`).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import tempfile
from pathlib import Path
from typing import Optional

from ragft.errors import InputError
from ragft.serve.haproxy import own_folder, processes_using, stop_all


class PortInUse(InputError, RuntimeError):
    """The port the command should listen on is held by another process: one line, nothing started."""


class UnsafeRecords(RuntimeError):
    """The records folder could have been written by someone else."""


def records_folder() -> Path:
    """The user's records folder, created mode 0700 if missing; raises UnsafeRecords if others could write it."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    folder = Path(runtime) / "ragft-serve" if runtime else Path(tempfile.gettempdir()) / f"ragft-serve-{os.getuid()}"
    try:
        folder.mkdir(mode=0o700)
    except FileExistsError:
        pass
    except OSError as err:  # XDG_RUNTIME_DIR gone (a login ended), the temp dir read-only
        raise UnsafeRecords(f"{folder} cannot be created ({err.strerror}): leftovers of a killed serve are neither "
                            f"recorded nor cleared") from None
    problem = private_folder_problem(folder)
    if problem:
        raise UnsafeRecords(f"{folder} {problem}: not using it, so leftovers of a killed serve are neither "
                            f"recorded nor cleared (remove it, or set XDG_RUNTIME_DIR to a folder of yours)")
    return folder


def private_folder_problem(folder: Path) -> Optional[str]:
    """Why someone other than this user may have written in `folder` (a symlink, not theirs, mode not 0700), or None."""
    try:
        st = folder.lstat()
    except OSError as err:
        return f"cannot be read ({err.strerror})"
    if stat.S_ISLNK(st.st_mode):
        return "is a symlink"
    if not stat.S_ISDIR(st.st_mode):
        return "is not a folder"
    if st.st_uid != os.getuid():
        return f"belongs to uid {st.st_uid}, not to you ({os.getuid()})"
    if stat.S_IMODE(st.st_mode) != 0o700:
        return f"has mode {stat.S_IMODE(st.st_mode):o}, not 700"
    return None


def record(processes: list, haproxy_folder: Optional[Path]) -> Optional[Path]:
    """Record this command and the psutil `processes` it started; returns the record to `forget` at the end
    (None, after a warning, where the records folder is unsafe)."""
    import psutil

    def entry(process) -> dict:
        return {"pid": process.pid, "create_time": process.create_time(), "name": process.name()}

    try:
        folder = records_folder()
    except UnsafeRecords as err:
        print(f"ragft serve: warning: {err}", flush=True)
        return None
    path = folder / f"{os.getpid()}.json"
    path.write_text(json.dumps({"owner": entry(psutil.Process()), "processes": [entry(p) for p in processes],
                                "haproxy_folder": str(haproxy_folder) if haproxy_folder else None}))
    return path


def forget(path: Path) -> None:
    path.unlink(missing_ok=True)


def clear() -> list[str]:
    """Stop what serve commands that are no longer running left behind; one line per command cleared
    (or one line saying why nothing was cleared)."""
    try:
        records = records_folder()
    except UnsafeRecords as err:
        return [f"warning: {err}"]
    cleared = []
    for path in sorted(records.glob("*.json")):
        try:
            rec = json.loads(path.read_text())
            owner, entries, named = rec["owner"], list(rec["processes"]), rec["haproxy_folder"]
        except (OSError, ValueError, KeyError, TypeError):
            continue  # being written by a serve starting now
        if _alive(owner):
            continue
        left = [p for p in (_alive(e) for e in entries) if p is not None]
        folder = Path(named) if isinstance(named, str) and own_folder(Path(named)) else None
        if folder is not None:
            left += processes_using(folder)  # HAProxy's reloads since the record; the recorded one may be listed twice
        left = list({p.pid: p for p in left}.values())
        if left:
            names = ", ".join(sorted({_name(p) for p in left}))
            stop_all(left)
            cleared.append(f"stopped {len(left)} process(es) left by a ragft serve that was killed "
                           f"(pid {owner.get('pid')}): {names}")
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
    """The psutil process `entry` recorded, if it still runs (same pid, same start time, same name)."""
    import psutil

    try:
        process = psutil.Process(int(entry["pid"]))
        if (abs(process.create_time() - float(entry["create_time"])) < 0.01 and process.name() == entry["name"]
                and process.status() != psutil.STATUS_ZOMBIE):
            return process
    except (psutil.Error, KeyError, TypeError, ValueError):
        pass
    return None


def _name(process) -> str:
    import psutil

    try:
        return process.name()
    except psutil.Error:
        return str(process.pid)

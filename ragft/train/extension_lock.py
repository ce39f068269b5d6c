"""Clear a build lock a killed worker left behind, before DeepSpeed's CPU communication op is loaded.

On CPUs DeepSpeed JIT-builds `deepspeed_shm_comm` through torch's `cpp_extension.load`, which holds a lock file in
the extension's build folder while it runs `ninja` (a second or so once the op is built). A worker killed in that
window (Ray's memory monitor, Ctrl-C, preemption) leaves the file behind, and every later DeepSpeed start on the
machine then waits on it forever, silently, at 0% CPU. torch's lock records no owner, so the only safe test is age:
a lock beside an already built op and untouched for `STALE_AFTER_S` is no build in progress.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

log = logging.getLogger(__name__)

SHM_OP = "deepspeed_shm_comm"
STALE_AFTER_S = 300


def extensions_root() -> Path:
    """Where torch builds JIT extensions on a CPU-only torch: TORCH_EXTENSIONS_DIR, else its default cache folder."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root:
        return Path(root)
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return cache / "torch_extensions" / f"py{sys.version_info.major}{sys.version_info.minor}_cpu"


def clear_stale_lock(name: str = SHM_OP, root: Path | None = None, stale_after_s: float = STALE_AFTER_S) -> bool:
    """Remove `<root>/<name>/lock` when the op is already built and the lock is older than `stale_after_s`; True
    when it did (with a warning naming the file)."""
    folder = (root or extensions_root()) / name
    lock = folder / "lock"
    try:
        age = time.time() - lock.stat().st_mtime
        if age < stale_after_s or not (folder / f"{name}.so").is_file():
            return False
        lock.unlink()
    except OSError:
        return False  # no lock (the usual case), or it went away meanwhile
    log.warning("removed %s, a build lock %.0f s old beside a built %s: left by a worker that was killed while it "
                "loaded the op (every DeepSpeed start would wait on it)", lock, age, name)
    return True

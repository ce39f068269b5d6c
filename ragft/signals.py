"""The signals a process manager or a terminal sends to stop a command (SIGINT, SIGTERM), handled the one
way every long-running ragft command handles them: by a callback, while the main thread goes on."""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Callable, Iterator

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def on_stop_signal(handle: Callable[[str], None]) -> Iterator[None]:
    """Within the block, SIGINT and SIGTERM call `handle(signal name)` instead of their default; the previous
    handlers come back after it. Only the main thread receives signals: elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, lambda signum, frame: handle(signal.Signals(signum).name))
                for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

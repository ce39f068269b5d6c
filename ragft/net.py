"""Ports on this machine: the one way ragft asks the OS for a free one."""

from __future__ import annotations

import socket

LOOPBACK = "127.0.0.1"


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port free on `host` now (the OS picks it; another process may take it before it is bound again)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]

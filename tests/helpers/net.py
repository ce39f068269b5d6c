"""Network helpers for tests that start servers on localhost."""

from __future__ import annotations

import time

import httpx

from ragft.net import free_port

__all__ = ["free_port", "wait_http"]


def wait_http(url: str, timeout_s: float = 120.0) -> httpx.Response:
    """GET `url` until it answers 200, or raise TimeoutError."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            response = httpx.get(url, timeout=5)
            if response.status_code == 200:
                return response
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} did not answer 200 within {timeout_s} s")
        time.sleep(0.5)

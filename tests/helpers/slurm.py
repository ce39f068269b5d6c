"""The local single-node Slurm (launch/slurm/local_up.sh) for tests: started once, stopped if we started it.

Where it cannot start (not root, no apt) tests skip with the reason; with RAGFT_REQUIRE_SLURM=1 (.ci/run)
that is a failure instead, so CI never passes with the Slurm tests silently skipped.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
UP, DOWN = REPO / "launch" / "slurm" / "local_up.sh", REPO / "launch" / "slurm" / "local_down.sh"


def start_local_slurm():
    """Start (installing if needed) the local Slurm; yield the environment its clients need."""
    done = subprocess.run(["bash", str(UP)], capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        reason = f"no local Slurm: {(done.stderr or done.stdout).strip().splitlines()[-1:]}"
        if os.environ.get("RAGFT_REQUIRE_SLURM") == "1":
            pytest.fail(reason + " (RAGFT_REQUIRE_SLURM=1)")
        pytest.skip(reason)
    started = "already running" not in done.stdout
    conf = done.stdout.strip().splitlines()[-1].split("=", 1)[1]
    env = {**os.environ, "SLURM_CONF": conf}
    try:
        yield env
    finally:
        if started:
            subprocess.run(["bash", str(DOWN)], capture_output=True, timeout=120)


def job_state(job_id: str, env: dict) -> str:
    """PENDING, RUNNING, COMPLETED, ... from scontrol (no slurmdbd here: sacct does not answer)."""
    out = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True, env=env).stdout
    for field in out.split():
        if field.startswith("JobState="):
            return field.split("=", 1)[1]
    return "UNKNOWN"


def wait_until(predicate, timeout_s: float, what: str, poll_s: float = 1.0):
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not happen within {timeout_s:.0f} s")
        time.sleep(poll_s)

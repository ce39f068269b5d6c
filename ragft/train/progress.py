"""What a person watching a run sees: a progress bar on the driver, one line per checkpoint.

Rank 0 emits events (`step` metrics, `checkpoint`, `resumed`) through a sink. Under Ray
the sink is a queue that a thread on the driver drains into a tqdm bar (or into plain
lines when stdout is not a terminal, e.g. a log file or CI); run without Ray, the
sink prints the same lines itself.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import Callable

Sink = Callable[[dict], None]


def format_step(m: dict, total_steps: int, eta_s: float) -> str:
    parts = [
        f"step {m['step']}/{total_steps}",
        f"loss {m['loss']:.4f}",
        f"eval {m['eval_loss']:.4f}" if "eval_loss" in m else None,
        f"lr {m['lr']:.2e}",
        f"grad {m['grad_norm']:.2f}",
        f"{m['tokens_per_s']:,.0f} tok/s",
        f"MFU {m['mfu']:.1%}" if "mfu" in m else None,
        f"ETA {_clock(eta_s)}",
    ]
    return " | ".join(p for p in parts if p)


def format_event(event: dict) -> str | None:
    if event["event"] == "checkpoint":
        return (f"saved checkpoint step {event['step']} → {event['path']} "
                f"({event['size_bytes'] / 2**20:.1f} MiB, {event['seconds']:.1f} s of which "
                f"{event.get('hash_seconds', 0.0):.1f} s sha256)")
    if event["event"] == "resumed":
        return (f"resumed from {event['path']} (step {event['step']}, epoch {event['epoch']}, "
                f"{event['epoch_batches']} micro-batches into it; sha256 checked in {event.get('verify_s', 0.0):.1f} s)")
    return None


class Eta:
    """Seconds left, from the rate since the first step this process saw (so a resume starts afresh)."""

    def __init__(self, total_steps: int):
        self.total_steps = total_steps
        self.started: float | None = None
        self.first_step = 0

    def __call__(self, step: int) -> float:
        now = time.monotonic()
        if self.started is None:  # no rate yet
            self.started, self.first_step = now, step
            return float("nan")
        done = step - self.first_step
        return (now - self.started) / done * (self.total_steps - step) if done > 0 else float("nan")


def printing_sink(total_steps: int) -> Sink:
    """For runs without Ray: rank 0 prints the lines itself."""
    eta = Eta(total_steps)

    def sink(event: dict) -> None:
        line = format_step(event, total_steps, eta(event["step"])) if event["event"] == "step" else format_event(event)
        if line:
            print(line, flush=True)

    return sink


class DriverProgress:
    """Drains rank 0's events from a Ray queue on the driver and shows them."""

    def __init__(self, total_steps: int):
        from ray.util.queue import Queue

        self.queue = Queue(maxsize=1000)
        self.total_steps = total_steps
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._drain, daemon=True, name="ragft-progress")
        self._bar = None
        self._eta = Eta(total_steps)

    def sink(self) -> Sink:
        queue = self.queue

        def put(event: dict) -> None:
            try:
                queue.put_nowait(event)
            except Exception:  # a full or gone queue must never stop training
                pass

        return put

    def __enter__(self):
        if sys.stdout.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=self.total_steps, unit="step", dynamic_ncols=True, file=sys.stdout)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=10)
        if self._bar is not None:
            self._bar.close()

    def _drain(self) -> None:
        from ray.util.queue import Empty

        while True:
            try:
                self._show(self.queue.get(timeout=0.5))
            except Empty:
                if self._stop.is_set():
                    return
            except Exception:  # the queue actor went away with Ray
                return

    def _show(self, event: dict) -> None:
        if event["event"] == "step":
            if self._bar is None:
                print(format_step(event, self.total_steps, self._eta(event["step"])), flush=True)
                return
            self._bar.n = event["step"]
            self._bar.set_postfix_str(f"loss {event['loss']:.4f} | {event['tokens_per_s']:,.0f} tok/s")
            self._bar.refresh()
            return
        line = format_event(event)
        if line:
            (self._bar.write if self._bar is not None else print)(line)


def _clock(seconds: float) -> str:
    if seconds != seconds:  # nan
        return "--:--"
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}:{secs:02d}"

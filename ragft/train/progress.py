"""One readable line per logged step: step, loss, eval loss, LR, grad norm, tokens/s and ETA."""

from __future__ import annotations

import time


class ProgressLine:
    """Formats rank 0's metrics; the ETA counts from the first step this process trained."""

    def __init__(self, total_steps: int):
        self.total_steps = total_steps
        self.started: float | None = None
        self.first_step = 0

    def __call__(self, m: dict) -> str:
        now = time.monotonic()
        if self.started is None:
            self.started, self.first_step = now, m["step"] - 1
        done = m["step"] - self.first_step
        eta = (now - self.started) / done * (self.total_steps - m["step"]) if done > 0 else float("nan")
        parts = [
            f"step {m['step']}/{self.total_steps}",
            f"loss {m['loss']:.4f}",
            f"eval {m['eval_loss']:.4f}" if "eval_loss" in m else None,
            f"lr {m['lr']:.2e}",
            f"grad {m['grad_norm']:.2f}",
            f"{m['tokens_per_s']:,.0f} tok/s",
            f"ETA {_clock(eta)}",
        ]
        return " | ".join(p for p in parts if p)


def _clock(seconds: float) -> str:
    if seconds != seconds:  # nan
        return "--:--"
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}:{secs:02d}"

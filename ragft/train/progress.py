"""One readable line per logged step, printed by Ray Train's controller as workers report."""

from __future__ import annotations

import time

from ray.train.v2.api.callback import UserCallback


class ProgressCallback(UserCallback):
    def __init__(self, total_steps: int):
        self.total_steps = total_steps
        self.started: float | None = None
        self.first_step = 0

    def after_report(self, run_context, metrics, checkpoint):
        m = metrics[0]  # rank 0's metrics; losses are already averaged over ranks
        step = m["step"]
        now = time.monotonic()
        if self.started is None:  # also after a restart: the rate counts from here
            self.started, self.first_step = now, step
        done = step - self.first_step
        eta = (now - self.started) / done * (self.total_steps - step) if done > 0 else float("nan")
        parts = [
            f"step {step}/{self.total_steps}",
            f"loss {m['loss']:.4f}",
            f"eval {m['eval_loss']:.4f}" if "eval_loss" in m else None,
            f"lr {m['lr']:.2e}",
            f"grad {m['grad_norm']:.2f}",
            f"{m['tokens_per_s']:,.0f} tok/s",
            f"ETA {_clock(eta)}",
        ]
        print(" | ".join(p for p in parts if p), flush=True)


def _clock(seconds: float) -> str:
    if seconds != seconds:  # nan
        return "--:--"
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}:{secs:02d}"

"""Experiment tracking on rank 0: Weights & Biases (online, offline or disabled), or nothing.

The W&B run id is ragft's run id, so a resumed run continues the same W&B run.
Checkpoints are logged as artifacts by reference to their storage path, not copied.
"""

from __future__ import annotations

import json
from pathlib import Path

from ragft.train.spec import TrainSpec

WANDB_INFO = "wandb.json"  # where rank 0 leaves the run's id, URL and offline folder for result.json


class NoTracker:
    def log(self, metrics: dict, step: int) -> None:
        pass

    def log_checkpoint(self, path: Path, step: int) -> None:
        pass

    def finish(self) -> None:
        pass


class WandbTracker:
    def __init__(self, spec: TrainSpec):
        import wandb

        t = spec.tracking
        self.run = wandb.init(
            project=t.project,
            entity=t.entity,
            group=t.group,
            tags=list(t.tags),
            mode=t.mode,
            dir=spec.out_dir,
            id=spec.run_id,
            name=f"{spec.model.name}-{spec.method.name}-{spec.strategy.name}-{spec.run_id}",
            resume="allow",
            config=spec.resolved_config,
        )
        info = {"id": self.run.id, "mode": t.mode, "url": self.run.url, "dir": str(Path(self.run.dir).parent)}
        (Path(spec.out_dir) / WANDB_INFO).write_text(json.dumps(info, indent=2))
        self.run_id = spec.run_id
        self.upload = t.upload_checkpoint

    def log(self, metrics: dict, step: int) -> None:
        numeric = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and k != "step"}
        self.run.log(numeric, step=step)

    def log_checkpoint(self, path: Path, step: int) -> None:
        import wandb

        artifact = wandb.Artifact(f"checkpoint-{self.run_id}", type="model", metadata={"step": step})
        if self.upload:
            artifact.add_dir(str(path))
        else:
            artifact.add_reference(f"file://{path.resolve()}", checksum=False)
        self.run.log_artifact(artifact, aliases=["latest", f"step-{step}"])

    def finish(self) -> None:
        self.run.finish()


def make_tracker(spec: TrainSpec, is_rank0: bool):
    if not is_rank0 or spec.tracking.name == "none":
        return NoTracker()
    return WandbTracker(spec)

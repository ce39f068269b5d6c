"""sweep.json and sweep.md from hand-made trial folders, as any launcher leaves them: the ranking, the
statuses (completed, stopped early by ASHA, failed, never run) and the page, pinned."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from omegaconf import OmegaConf

from ragft import registry
from ragft.sweep.report import SweepReport


def make_trial(sweep: Path, num: int, overrides: list[str], evals: list[tuple[int, float]] | None = None,
               result: dict | None = None, status: str | None = None) -> Path:
    folder = sweep / str(num)
    (folder / ".hydra").mkdir(parents=True)
    # Hydra's own entries and out_dir are left out of the report: they say nothing about the trial.
    (folder / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(
        [*overrides, "tracking=wandb", f"out_dir={folder}", "hydra.verbose=false"]))
    lines = [{"step": step, "loss": value + 0.1, "eval_loss": value, "total_steps": 12} for step, value in evals or []]
    if lines:
        lines.insert(0, {"step": 2, "loss": 9.0, "total_steps": 12})  # a log line before the first evaluation
        (folder / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    if result is not None:
        (folder / "result.json").write_text(json.dumps(result))
    if status is not None:
        (folder / "status.json").write_text(json.dumps({"status": status, "step": evals[-1][0], "error": None}))
    return folder


def checkpoint(folder: Path, step: int) -> Path:
    path = folder / "checkpoints" / str(step)
    path.mkdir(parents=True)
    (path / "manifest.json").write_text(json.dumps({"run_id": f"run-{folder.name}", "step": step, "method": "lora",
                                                    "model": {"name": "tiny"}}))
    return path


def test_trials_ranked_by_metric_with_their_status(tmp_path):
    sweep = tmp_path / "lr-sweep"
    best = checkpoint(sweep / "1", 12)
    make_trial(sweep, 0, ["train.lr=0.003", "method.r=4"], [(4, 7.0923), (8, 6.8527), (12, 6.7985)],
               result={"best_checkpoint": None})  # completed, no checkpoint kept: "–"
    make_trial(sweep, 1, ["train.lr=0.003", "method.r=8"], [(4, 7.0572), (8, 6.8191), (12, 6.7661)],
               result={"best_checkpoint": str(best), "wandb": {"url": None, "dir": "/w/1"}})
    stopped = checkpoint(sweep / "2", 5)  # ASHA's stop: the trial saved a checkpoint at its next step
    make_trial(sweep, 2, ["train.lr=1e-06", "method.r=4"], [(4, 7.5814), (5, 7.5813)], status="stopped early (asha)")
    make_trial(sweep, 3, ["train.lr=1e-06", "method.r=8"], [(4, 7.9)], result={"error": "worker died"})
    make_trial(sweep, 4, ["train.lr=0.1", "method.r=8"])  # failed before its first log line
    (sweep / "tune").mkdir()  # not a trial: Ray Tune's own folder
    (sweep / "multirun.yaml").write_text("{}\n")

    cfg = OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep)}}, "sweep": {"name": None, "metric": "eval_loss",
                            "mode": "min"}, "registry": {"path": str(tmp_path / "registry.jsonl")}})
    SweepReport().on_multirun_end(cfg)

    summary = json.loads((sweep / "sweep.json").read_text())
    assert summary["name"] == "lr-sweep" and summary["metric"] == "eval_loss" and summary["mode"] == "min"
    ranking = [(t["rank"], t["num"], t["status"], t["value"], t["step"]) for t in summary["trials"]]
    assert ranking == [
        (1, 1, "completed", 6.7661, 12),
        (2, 0, "completed", 6.7985, 12),
        (3, 2, "stopped early (asha)", 7.5813, 5),
        (4, 3, "failed", 7.9, 4),
        (None, 4, "not run", None, 0),
    ]
    assert summary["trials"][0]["overrides"] == ["train.lr=0.003", "method.r=8", "tracking=wandb"]
    assert summary["trials"][0]["wandb"] == "/w/1"
    assert summary["trials"][2]["best_checkpoint"] == str(stopped)  # newest complete checkpoint: no result.json
    assert summary["best"]["num"] == 1 and summary["best"]["best_checkpoint"] == str(best)

    assert (sweep / "sweep.md").read_text() == f"""\
# Sweep lr-sweep

5 trials ranked by eval_loss (minimum first). Folder: `{sweep}`

Every trial: `tracking=wandb`

| rank | trial | overrides | eval_loss | steps | status | best checkpoint |
|---|---|---|---|---|---|---|
| 1 | 1 | train.lr=0.003 method.r=8 | 6.7661 | 12/12 | completed | {best} |
| 2 | 0 | train.lr=0.003 method.r=4 | 6.7985 | 12/12 | completed | – |
| 3 | 2 | train.lr=1e-06 method.r=4 | 7.5813 | 5/12 | stopped early (asha) | {stopped} |
| 4 | 3 | train.lr=1e-06 method.r=8 | 7.9000 | 4/12 | failed | – |
| – | 4 | train.lr=0.1 method.r=8 | – | 0 | not run | – |

Best: trial 1 (train.lr=0.003 method.r=8), eval_loss 6.7661; serve or evaluate it with `checkpoint={best}`.
"""

    # Each ranked trial's checkpoint that exists is registered with its sweep metric and the sweep.
    entries = {e.checkpoint: e for e in registry.entries(tmp_path / "registry.jsonl")}
    assert set(entries) == {str(best), str(stopped)}
    assert entries[str(best)].metrics == {"sweep.eval_loss": 6.7661}
    assert entries[str(best)].links == {"sweep": str(sweep / "sweep.json")}
    assert entries[str(stopped)].step == 5 and entries[str(stopped)].run_id == "run-2"


def test_max_mode_ranks_highest_first(tmp_path):
    sweep = tmp_path / "s"
    make_trial(sweep, 0, ["train.lr=1"], [(4, 0.2)], result={})
    make_trial(sweep, 1, ["train.lr=2"], [(4, 0.5)], result={})
    cfg = OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep)}}, "sweep": {"name": "acc", "metric": "eval_loss",
                            "mode": "max"}, "registry": {"path": str(tmp_path / "registry.jsonl")}})
    SweepReport().on_multirun_end(cfg)
    summary = json.loads((sweep / "sweep.json").read_text())
    assert summary["name"] == "acc" and [t["num"] for t in summary["trials"]] == [1, 0]
    assert "ranked by eval_loss (maximum first)" in (sweep / "sweep.md").read_text()

"""sweep.json and sweep.md: the trials of a sweep ranked by `sweep.metric`, with their configs and checkpoints.

`SweepReport` is a Hydra callback (conf/train.yaml, hydra.callbacks): `on_multirun_end` runs in the
process that launched the sweep once every trial has returned, whatever the launcher, and reads
what each trial left in its folder: `.hydra/overrides.yaml`, `metrics.jsonl`, `result.json`, and
`status.json` where a launcher recorded more (Ray Tune: stopped early by ASHA). Each ranked trial's
best checkpoint is registered with its sweep metric, so `checkpoint=best` can pick among them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig

from ragft import registry
from ragft.checkpoints import complete_checkpoints
from ragft.eval.metrics import finite
from ragft.jsonl import read_records

STATUS_FILE = "status.json"  # written into a trial folder by a launcher that knows more than the folder shows


def collect(sweep_dir: Path, metric: str, mode: str) -> list[dict]:
    """One record per trial folder (numbered sub-folders of the sweep), best first; trials without the
    metric (failed before their first evaluation) last."""
    trials = []
    for folder in sorted((p for p in sweep_dir.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name)):
        trials.append(_trial(folder, metric))
    sign = 1 if mode == "min" else -1
    trials.sort(key=lambda t: (t["value"] is None, sign * t["value"] if t["value"] is not None else 0, t["num"]))
    for rank, trial in enumerate(trials, 1):
        trial["rank"] = rank if trial["value"] is not None else None
    return trials


def _trial(folder: Path, metric: str) -> dict:
    overrides_file = folder / ".hydra" / "overrides.yaml"
    overrides = yaml.safe_load(overrides_file.read_text()) if overrides_file.is_file() else []
    history = read_records(folder / "metrics.jsonl")
    with_metric = [h for h in history if finite(h.get(metric)) is not None]
    last = with_metric[-1] if with_metric else {}
    result = json.loads((folder / "result.json").read_text()) if (folder / "result.json").is_file() else None
    status_file = folder / STATUS_FILE
    if status_file.is_file():
        status = json.loads(status_file.read_text())["status"]
    elif result is None:
        status = "failed" if history else "not run"
    else:
        status = "failed" if result.get("error") else "completed"
    checkpoint = (result or {}).get("best_checkpoint") or _newest_checkpoint(folder)
    return {
        "num": int(folder.name),
        "overrides": [o for o in overrides if not o.startswith(("hydra", "out_dir="))],
        "status": status,
        "value": last.get(metric),  # the trial's last evaluated value: where it ended, or was stopped
        "step": last.get("step", history[-1]["step"] if history else 0),
        "total_steps": (history[-1].get("total_steps") if history else None),
        "out_dir": str(folder.resolve()),
        "best_checkpoint": checkpoint,
        "wandb": ((result or {}).get("wandb") or {}).get("url") or ((result or {}).get("wandb") or {}).get("dir"),
    }


def write(sweep_dir: Path, name: str, metric: str, mode: str, trials: list[dict]) -> dict:
    """Write sweep.json and sweep.md into `sweep_dir`; return the JSON content."""
    ranked = [t for t in trials if t["rank"] is not None]
    summary: dict[str, Any] = {
        "name": name,
        "dir": str(sweep_dir.resolve()),
        "metric": metric,
        "mode": mode,
        "trials": trials,
        "best": ranked[0] if ranked else None,
    }
    (sweep_dir / "sweep.json").write_text(json.dumps(summary, indent=2))
    (sweep_dir / "sweep.md").write_text(markdown(summary))
    return summary


def markdown(summary: dict) -> str:
    """The ranking as a table of what differs between the trials; what they share is listed once above it."""
    from ragft.sweep.trial import differing

    metric, trials = summary["metric"], summary["trials"]
    common, others = differing([t["overrides"] for t in trials])
    lines = [
        f"# Sweep {summary['name']}",
        "",
        f"{len(trials)} trials ranked by {metric} ({summary['mode']}imum first). Folder: `{summary['dir']}`",
        "",
        f"Every trial: `{' '.join(common)}`" if common else "",
        "",
        f"| rank | trial | overrides | {metric} | steps | status | best checkpoint |",
        "|---|---|---|---|---|---|---|",
    ]
    for t, own in zip(trials, others):
        value = f"{t['value']:.4f}" if t["value"] is not None else "–"
        steps = f"{t['step']}/{t['total_steps']}" if t["total_steps"] else str(t["step"])
        varying = " ".join(own) or "(defaults)"
        lines.append(f"| {t['rank'] or '–'} | {t['num']} | {varying} | {value} | {steps} | {t['status']} "
                     f"| {t['best_checkpoint'] or '–'} |")
    best = summary["best"]
    if best:
        varying = " ".join(others[trials.index(best)])
        lines += ["", f"Best: trial {best['num']} ({varying}), {metric} {best['value']:.4f}; "
                      f"serve or evaluate it with `checkpoint={best['best_checkpoint']}`."]
    return "\n".join(lines) + "\n"


def register(registry_path: str, summary: dict) -> None:
    """Record each ranked trial's checkpoint with its sweep metric and a link to the sweep."""
    for t in summary["trials"]:
        if t["rank"] is not None and t["best_checkpoint"] and Path(t["best_checkpoint"]).is_dir():
            registry.record_checkpoint(registry_path, t["best_checkpoint"],
                                       metrics={f"sweep.{summary['metric']}": t["value"]},
                                       links={"sweep": str(Path(summary["dir"]) / "sweep.json")})


try:
    from hydra.experimental.callback import Callback
except ImportError:  # pragma: no cover - hydra < 1.1
    Callback = object


class SweepReport(Callback):
    """Hydra callback: rank the trials when a multirun ends (conf/train.yaml hydra.callbacks.sweep_report)."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from ragft.sweep.trial import sweep_name

        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.is_dir():
            return
        metric, mode = config.sweep.metric, config.sweep.mode
        summary = write(sweep_dir, sweep_name(config, str(sweep_dir)), metric, mode, collect(sweep_dir, metric, mode))
        register(str(Path(config.registry.path).expanduser()), summary)
        best = summary["best"]
        print(f"sweep {summary['name']}: {len(summary['trials'])} trials → {sweep_dir / 'sweep.md'}"
              + (f"; best trial {best['num']} {metric}={best['value']:.4f}" if best
                 else "; no trial reached an evaluation"), flush=True)


def _newest_checkpoint(folder: Path) -> str | None:
    ckpts = complete_checkpoints(folder / "checkpoints")
    return str(ckpts[-1]) if ckpts else None

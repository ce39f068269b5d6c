"""`ragft train -m hydra/launcher=ray_tune ...` as a user runs it: a subprocess with its own embedded Ray, a
2×2 grid, each trial a whole Ray Train + DeepSpeed job run as a Ray Tune trial, ASHA on. One worker per
trial keeps the suite's time (2 workers: +45 s); 2-worker Ray Train jobs: tests/train, tests/test_cluster.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from helpers.wandb_offline import records
from ragft.checkpoints import verify

pytestmark = [pytest.mark.ray, pytest.mark.deepspeed]

# lr=1e-6 barely moves the tiny model: at the first evaluation (step 4) those trials are clearly behind the
# lr=3e-3 ones. With 2 trials at once, Tune starts them in grid order, so the good pair has reached the
# rungs before the bad pair does, and ASHA (grace 1 evaluation, halving) stops both bad trials there.
GRID = ["train.lr=3e-3,1e-6", "method.r=4,8"]
SHORT = ["cluster.num_workers=1", "train.max_steps=12", "train.eval_every=4", "train.save_every=12",
         "train.log_every=4", "data.max_seq_len=128"]


def wandb_group(out_dir: Path) -> str:
    """The W&B group of the trial's offline run, from the run record of its .wandb file."""
    info = json.loads((out_dir / "wandb.json").read_text())
    run_file = next(Path(info["dir"]).glob("*.wandb"))
    return next(r.run.run_group for r in records(run_file) if r.WhichOneof("record_type") == "run")


def test_asha_sweep_of_distributed_trials_on_ray_tune(tmp_path, cache_dir):
    sweep = tmp_path / "runs" / "sweeps" / "lr-rank"
    registry_path = tmp_path / "registry.jsonl"
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "ragft", "train", "-m", "hydra/launcher=ray_tune", *GRID, *SHORT,
         "sweep.scheduler=asha", "sweep.grace_period=1", "sweep.reduction_factor=2", "sweep.max_concurrent=2",
         "tracking=wandb", "tracking.mode=offline", f"runs_dir={tmp_path / 'runs'}", f"hydra.sweep.dir={sweep}",
         f"registry.path={registry_path}"],
        cwd=tmp_path, env={**os.environ, "WANDB_MODE": "offline", "RAGFT_CACHE": str(cache_dir)},
        capture_output=True, text=True, timeout=900,
    )
    print(f"sweep wall time {time.perf_counter() - started:.0f} s")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    # Ranked by eval_loss, lowest first; every trial reached the first evaluation, so every one is ranked.
    summary = json.loads((sweep / "sweep.json").read_text())
    trials = summary["trials"]
    assert summary["name"] == "lr-rank" and len(trials) == 4
    assert [t["rank"] for t in trials] == [1, 2, 3, 4]
    values = [t["value"] for t in trials]
    assert values == sorted(values), values
    by_num = {t["num"]: t for t in trials}
    grid = [("train.lr=0.003", "method.r=4"), ("train.lr=0.003", "method.r=8"),
            ("train.lr=1e-06", "method.r=4"), ("train.lr=1e-06", "method.r=8")]  # Hydra's order: job numbers
    for num, (lr, r) in enumerate(grid):
        assert {lr, r} <= set(by_num[num]["overrides"]), by_num[num]
        hydra_dir = sweep / str(num) / ".hydra"
        assert {lr, r} <= set(yaml.safe_load((hydra_dir / "overrides.yaml").read_text()))
        assert yaml.safe_load((hydra_dir / "config.yaml").read_text())["train"]["max_steps"] == 12

    page = (sweep / "sweep.md").read_text()  # a row per trial: its rank and what differs from the others
    for t in trials:
        lr, r = grid[t["num"]]
        assert f"| {t['rank']} | {t['num']} | {lr} {r} |" in page, page

    # ASHA: both lr=1e-6 trials were stopped at the first rung; each ended cleanly at a later step, short of 12.
    for num in (2, 3):
        stopped = by_num[num]
        assert stopped["status"] == "stopped early (asha)", trials
        assert 4 <= stopped["step"] < 12
        assert json.loads((sweep / str(num) / "status.json").read_text())["status"] == "stopped early (asha)"
    assert "sweep: trial 2 [train.lr=1e-06 method.r=4] stopped by ASHA at step 4" in proc.stdout
    best = trials[0]
    assert best["num"] in (0, 1) and best["status"] == "completed" and best["step"] == 12
    assert summary["best"]["num"] == best["num"]

    # The best trial's checkpoint is complete (sha256 of every file as its manifest says) and a PEFT adapter.
    ckpt = Path(best["best_checkpoint"])
    assert ckpt == sweep / str(best["num"]) / "checkpoints" / "12"
    assert verify(ckpt) == []
    assert {"adapter_model.safetensors", "adapter_config.json"} <= {p.name for p in ckpt.iterdir()}

    # Every trial logged to W&B (offline), all in one group: the sweep's name. Stopped trials too: ASHA's
    # stop lets their workers finish the run instead of killing them.
    for num in range(4):
        assert wandb_group(sweep / str(num)) == "lr-rank"

    # One line per trial start and end; Tune kept its own state inside the sweep folder (shared storage).
    for num, (lr, r) in enumerate(grid):
        assert f"sweep: trial {num} [{lr} {r}] started → {sweep / str(num)}" in proc.stdout
    assert (sweep / "tune").is_dir()
    assert f"sweep lr-rank: 4 trials → {sweep / 'sweep.md'}" in proc.stdout


def test_bad_value_in_one_combination_fails_the_sweep_before_anything_runs(tmp_path, cache_dir):
    """Every trial is validated first: one ConfigError (exit 2) naming each problem and the trials with it."""
    sweep = tmp_path / "sweep"
    proc = subprocess.run(
        [sys.executable, "-m", "ragft", "train", "-m", "hydra/launcher=ray_tune", "train.lr=3e-3,-1", "method.r=4,0",
         "sweep.scheduler=asha", "train.max_steps=4", "train.eval_every=4",
         f"hydra.sweep.dir={sweep}", f"registry.path={tmp_path / 'registry.jsonl'}"],
        cwd=tmp_path, env={**os.environ, "RAGFT_CACHE": str(cache_dir)}, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.splitlines()[-4:] == [
        "ragft train: the config has 3 problem(s); nothing was started:",
        "  - trial 1 [train.lr=0.003 method.r=0], trial 3 [train.lr=-1 method.r=0]: method.r=0 must be at least 1",
        "  - trial 2 [train.lr=-1 method.r=4], trial 3 [train.lr=-1 method.r=0]: train.lr=-1.0 must be positive",
        "  - sweep.grace_period × train.eval_every = 4 steps is not below train.max_steps=4: ASHA could never stop "
        "a trial; lower them or use sweep.scheduler=fifo",
    ], proc.stderr
    assert not [p for p in sweep.iterdir() if p.is_dir()]  # no trial folder: nothing ran

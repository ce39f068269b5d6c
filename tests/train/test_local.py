"""The worker loop without Ray (ragft.train.local): same loop, shards read from the tokenized parquet."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from transformers import AutoModelForCausalLM

pytestmark = pytest.mark.deepspeed


def test_single_process_without_ray_trains_and_checkpoints(tmp_path, cache_dir):
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "ragft.train.local", f"out_dir={out}", "method=full", "strategy=zero2",
         "cluster.num_workers=1", "train.micro_batch_size=8", "train.global_batch_size=8", "train.max_steps=6",
         "train.log_every=2", "train.save_every=6", "train.lr=3e-3"],
        cwd=tmp_path, env=dict(os.environ), capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "step 6/6" in proc.stdout and "saved checkpoint step 6" in proc.stdout
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 3 and losses[-1] < losses[0]
    AutoModelForCausalLM.from_pretrained(out / "checkpoints" / "6")


def _local_losses(out, *overrides):
    proc = subprocess.run(
        [sys.executable, "-m", "ragft.train.local", f"out_dir={out}", "method=full", "strategy=zero2",
         "cluster.num_workers=1", "train.micro_batch_size=8", "train.global_batch_size=8", "train.max_steps=6",
         "train.log_every=1", "train.save_every=100", "train.lr=3e-3", *overrides],
        cwd=out.parent, env=dict(os.environ), capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_cpu_bf16_autocast_tracks_fp32(tmp_path, cache_dir):
    """strategy.precision=bf16 on a CPU: fp32 weights and optimizer, forward under bf16 autocast. Its losses
    follow fp32's step for step; bf16 keeps 8 bits of mantissa, so a relative tolerance of 2% over 6 steps."""
    fp32 = _local_losses(tmp_path / "fp32", "strategy.precision=fp32")
    bf16 = _local_losses(tmp_path / "bf16", "strategy.precision=bf16")
    assert len(bf16) == len(fp32) == 6
    assert bf16 != fp32  # autocast really ran
    assert bf16 == pytest.approx(fp32, rel=0.02)

"""`ragft train` as a user runs it: a subprocess with its own embedded Ray."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ragft.sample import sample_path


def ragft(*args: str, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ragft", *args], cwd=cwd, env=dict(os.environ),
                          capture_output=True, text=True, timeout=timeout)


def test_bad_data_row_is_reported_with_file_and_line(tmp_path, cache_dir):
    good = Path(sample_path("train.jsonl")).read_text().splitlines()[:40]
    rows = good[:2] + ['{"messages": [{"role": "user", "content": "hi"}]}'] + good[2:]
    data = tmp_path / "bad.jsonl"
    data.write_text("\n".join(rows) + "\n")
    out = tmp_path / "run"
    proc = ragft("train", f"out_dir={out}", "data=jsonl", f"data.train_path={data}", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert f"{data}:3:" in proc.stderr and "assistant" in proc.stderr
    assert not (out / "ray").exists()
    # data.on_bad_row=skip is covered, with its count, in tests/data (prepare and read_examples)


@pytest.mark.ray
@pytest.mark.deepspeed
def test_train_command_from_the_issue(tmp_path, cache_dir):
    """`ragft train method=lora strategy=zero3 cluster.num_workers=2 train.max_steps=...` with nothing started."""
    out = tmp_path / "run"
    proc = ragft("train", f"out_dir={out}", "method=lora", "strategy=zero3", "cluster.num_workers=2",
                 "train.max_steps=12", "train.save_every=6", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    final = out / "checkpoints" / "12"
    assert any(line.split()[:2] == ["checkpoints", str(final)] for line in proc.stdout.splitlines()), proc.stdout
    assert (final / "adapter_model.safetensors").is_file()
    result = json.loads((out / "result.json").read_text())
    assert result["final_checkpoint"] == str(final) and result["metrics"]["step"] == 12
    from ragft import registry  # the final checkpoint is registered: `checkpoint=latest` finds it

    latest = registry.resolve(tmp_path / "runs" / "registry.jsonl", "latest")
    assert latest.checkpoint == str(final) and latest.step == 12 and latest.run_id == result["run_id"]

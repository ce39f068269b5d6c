"""`ragft train` as a user runs it: a subprocess with its own embedded Ray."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


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


# `ragft train` through the CLI to a loadable, registered checkpoint: tests/test_cluster.py (2-node Ray, ZeRO-3),
# tests/test_slurm.py (Slurm) and the submitit trials (embedded Ray, as with nothing started).

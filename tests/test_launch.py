"""The scripts in launch/ that stand things up: what they put on command lines and on disk."""

from __future__ import annotations

import json
import os
import stat
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

FAKE_RAY = """#!/usr/bin/env bash
# Records what `ray job submit` was given: its argv, and the runtime-env file's mode and content.
printf '%s\\n' "$@" > "$RECORD/argv"
while [[ $# -gt 0 ]]; do
  if [[ $1 == --runtime-env ]]; then stat -c %a "$2" > "$RECORD/mode"; cp "$2" "$RECORD/env"; echo "$2" > "$RECORD/path"; fi
  shift
done
"""


def test_submit_keeps_secrets_off_the_command_line(tmp_path):
    bin_dir, record = tmp_path / "bin", tmp_path / "record"
    bin_dir.mkdir(), record.mkdir()
    (bin_dir / "ray").write_text(FAKE_RAY)
    (bin_dir / "ray").chmod(stat.S_IRWXU)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "RECORD": str(record), "TMPDIR": str(tmp_path),
           "WANDB_API_KEY": "wandb-secret-123", "HF_TOKEN": "hf-secret-456", "RUN_NAME": "t"}
    subprocess.run(["bash", str(REPO / "launch/ray/submit.sh"), "http://127.0.0.1:8265", "train.max_steps=2"],
                   env=env, check=True, timeout=60)
    argv = (record / "argv").read_text()
    assert "wandb-secret-123" not in argv and "hf-secret-456" not in argv and "train.max_steps=2" in argv
    assert (record / "mode").read_text().strip() == "600"  # only this user could read the file
    assert json.loads((record / "env").read_text())["env_vars"]["WANDB_API_KEY"] == "wandb-secret-123"
    assert not Path((record / "path").read_text().strip()).exists()  # removed once the submission ended


def test_local_slurm_refuses_a_planted_link(tmp_path):
    target, link = tmp_path / "victim", tmp_path / "ragft-slurm"
    target.mkdir()
    link.symlink_to(target)  # what another user could leave at the predictable path
    done = subprocess.run(["bash", str(REPO / "launch/slurm/local_up.sh")], capture_output=True, text=True,
                          env={**os.environ, "RAGFT_SLURM_DIR": str(link)}, timeout=60)
    assert done.returncode == 2 and "refusing" in done.stderr
    assert list(target.iterdir()) == []  # nothing written through the link

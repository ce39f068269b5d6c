"""ragft.registry: events folded per checkpoint, `latest` and `best` resolved, deleted checkpoints skipped."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from ragft import registry


def _checkpoint(root, name, run_id, step):
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text(json.dumps({"run_id": run_id, "step": step, "method": "lora",
                                                      "model": {"name": "tiny"}}))
    return folder


def test_latest_best_and_folding(tmp_path):
    reg = tmp_path / "registry.jsonl"
    a, b, c = (_checkpoint(tmp_path, n, f"run-{n}", s) for n, s in (("a", 10), ("b", 20), ("c", 30)))
    registry.record_checkpoint(reg, a, metrics={"train.loss": 1.5})
    registry.record_checkpoint(reg, b)
    registry.record_checkpoint(reg, c)
    registry.record(reg, a, metrics={"ft_rag.token_f1": 0.61, "ft.token_f1": 0.2})  # eval, later
    registry.record(reg, b, metrics={"ft_rag.token_f1": 0.55})
    registry.record(reg, a, metrics={"ft_rag.token_f1": 0.64}, links={"report": "r.md"})  # re-evaluated

    by_path = {e.checkpoint: e for e in registry.entries(reg)}
    entry = by_path[str(a)]
    assert (entry.run_id, entry.step, entry.method) == ("run-a", 10, "lora")
    assert entry.metrics == {"train.loss": 1.5, "ft_rag.token_f1": 0.64, "ft.token_f1": 0.2}
    assert entry.links == {"report": "r.md"}
    assert registry.resolve(reg, "latest").checkpoint == str(c)
    assert registry.resolve(reg, "best", "ft_rag.token_f1").checkpoint == str(a)
    assert registry.resolve(reg, "best", "ft_rag.token_f1", mode="min").checkpoint == str(b)
    with pytest.raises(registry.RegistryError, match="no checkpoint .* has metric 'rag.exact_match'"):
        registry.resolve(reg, "best", "rag.exact_match")

    shutil.rmtree(c)
    shutil.rmtree(a)
    assert registry.resolve(reg, "latest").checkpoint == str(b)  # deleted checkpoints are never returned
    assert registry.resolve(reg, "best", "ft_rag.token_f1").checkpoint == str(b)
    assert "(deleted)" in registry.table(reg) and "0.5500" in registry.table(reg)


def test_a_torn_line_does_not_hide_the_rest(tmp_path):
    reg = tmp_path / "registry.jsonl"
    a = _checkpoint(tmp_path, "a", "run-a", 1)
    registry.record_checkpoint(reg, a)
    with open(reg, "a") as f:
        f.write('{"checkpoint": "/x", "ti')  # a writer killed mid-line
    b = _checkpoint(tmp_path, "b", "run-b", 2)
    with open(reg, "a") as f:
        f.write("\n")
    registry.record_checkpoint(reg, b)
    assert [e.run_id for e in registry.entries(reg)] == ["run-a", "run-b"]


def test_empty_registry(tmp_path):
    with pytest.raises(registry.RegistryError, match="lists no checkpoint"):
        registry.resolve(tmp_path / "none.jsonl", "latest")
    assert "no checkpoints registered" in registry.table(tmp_path / "none.jsonl")


def test_registry_list_command(tmp_path):
    reg = tmp_path / "registry.jsonl"
    registry.record_checkpoint(reg, _checkpoint(tmp_path, "a", "run-a", 7), metrics={"ft_rag.token_f1": 0.5})
    proc = subprocess.run([sys.executable, "-m", "ragft", "registry", "list", f"registry.path={reg}"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    header, row = proc.stdout.splitlines()
    assert header.split() == ["checkpoint", "run_id", "step", "method", "ft_rag.token_f1"]
    assert row.split()[1:] == ["run-a", "7", "lora", "0.5000"]

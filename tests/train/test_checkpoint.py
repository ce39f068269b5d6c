"""Checkpoint bookkeeping without a model: which files each rank hashes, what pruning keeps, and what
result.json and the registry name once a run is over (every one of them a folder that exists)."""

from __future__ import annotations

import json
import os
import pickle
import random
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from ragft import registry
from ragft.checkpoints import MANIFEST, RNG_DIR, complete_checkpoints, inference_files, sha256_file, verify
from ragft.train.checkpoint import files_written_by, latest_valid, load_rng_state, prune, save_rng_state, share
from ragft.train.run import write_result
from ragft.train.spec import DataPlan, validate_train


def fake_checkpoint(root: Path, step: int, eval_loss: float | None) -> Path:
    folder = root / str(step)
    (folder / "deepspeed" / "state").mkdir(parents=True)
    (folder / "adapter_model.safetensors").write_bytes(bytes([step]) * 64)
    (folder / "deepspeed" / "state" / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"0" * 300)
    (folder / "deepspeed" / "state" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").write_bytes(b"1" * 300)
    files = {str(p.relative_to(folder)): sha256_file(p) for p in folder.rglob("*") if p.is_file()}
    metrics = {"step": step, "loss": 1.0 / step, **({"eval_loss": eval_loss} if eval_loss is not None else {})}
    (folder / MANIFEST).write_text(json.dumps({"run_id": "r", "step": step, "metrics": metrics, "files": files,
                                               "model": {"name": "tiny"}, "method": "lora"}))
    return folder


def test_each_rank_hashes_the_files_it_wrote(tmp_path):
    for rel in ["mp_rank_00_model_states.pt", "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt",
                "zero_pp_rank_0_mp_rank_00_optim_states.pt", "rank-0.pt", "rank-1.pt", "latest"]:
        (tmp_path / rel).write_text(rel)
    assert files_written_by(tmp_path, 1, 2) == ["bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt", "rank-1.pt"]
    assert files_written_by(tmp_path, 0, 2) == ["latest", "mp_rank_00_model_states.pt", "rank-0.pt",
                                                "zero_pp_rank_0_mp_rank_00_optim_states.pt"]
    assert len(files_written_by(tmp_path, 0, 1)) == 6  # one process wrote (and hashes) them all


def test_verification_is_shared_out_by_size_and_serving_checks_only_the_model(tmp_path):
    folder = fake_checkpoint(tmp_path, 4, 0.5)
    files = sorted(json.loads((folder / MANIFEST).read_text())["files"])
    parts = [share(folder, files, rank, 2) for rank in range(2)]
    assert sorted(parts[0] + parts[1]) == files and all(parts)  # each file once; the two 300-byte shards split
    assert inference_files(folder) == ["adapter_model.safetensors"]
    (folder / "deepspeed" / "state" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").write_bytes(b"x")
    assert verify(folder, inference_files(folder)) == []
    assert verify(folder) == ["deepspeed/state/zero_pp_rank_1_mp_rank_00_optim_states.pt"]


def test_pruning_keeps_the_last_and_the_best_by_eval_loss(tmp_path):
    for step, loss in [(2, 0.9), (4, 0.4), (6, None), (8, 0.7), (10, 0.8)]:  # 6 was saved without an evaluation
        fake_checkpoint(tmp_path, step, loss)
    prune(tmp_path, keep_last=2)
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["4", "8", "10"]
    prune(tmp_path, keep_last=1)
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["4", "10"]


def test_result_and_registry_name_only_checkpoints_that_exist(compose_train, tmp_path):
    spec = validate_train(compose_train(f"out_dir={tmp_path / 'run'}", "train.keep_last=1"))
    plan = DataPlan("train.parquet", "eval.parquet", 64, 8, 4, 12, "hash", 4096, 0.9, 0)
    spec = replace(spec, plan=plan)
    for step, loss in [(4, 0.5), (8, 0.7), (12, 0.6)]:
        fake_checkpoint(spec.checkpoints_dir, step, loss)
        prune(spec.checkpoints_dir, spec.train.keep_last)  # as checkpoint.save does after each one
    summary = write_result(spec, SimpleNamespace(error=None), seconds=1.0)
    checkpoints = spec.checkpoints_dir
    assert summary["best_checkpoint"] == str(checkpoints / "4") and summary["final_checkpoint"] == str(checkpoints / "12")
    assert summary["checkpoints"] == [str(checkpoints / "4"), str(checkpoints / "12")]
    on_disk = json.loads((Path(spec.out_dir) / "result.json").read_text())
    for key in ("best_checkpoint", "final_checkpoint"):
        assert Path(on_disk[key]).is_dir()
    entries = registry.entries(spec.registry_path)
    assert [Path(e.checkpoint).name for e in entries] == ["4", "12"] and all(e.exists for e in entries)
    assert [e.metrics["train.eval_loss"] for e in entries] == [0.5, 0.6]
    best = registry.resolve(spec.registry_path, "best", "train.eval_loss", "min")
    assert best.checkpoint == str(checkpoints / "4")
    assert registry.resolve(spec.registry_path, "latest").checkpoint == str(checkpoints / "12")


def test_a_damaged_manifest_is_skipped_not_raised(tmp_path, capsys):
    good, torn = fake_checkpoint(tmp_path, 1, 0.5), fake_checkpoint(tmp_path, 2, 0.4)
    (torn / MANIFEST).write_text('{"run_id": "r", "fil')  # renamed in place, then the disk filled
    assert latest_valid(tmp_path) == good
    assert "unreadable manifest" in capsys.readouterr().out
    prune(tmp_path, keep_last=1)  # reads every manifest for the best eval loss: must not raise
    assert torn.is_dir()


class RunsCode:
    def __reduce__(self):
        return (os.system, ("true",))


def test_rng_state_round_trips_and_loads_without_unpickling(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    np.random.randn()  # leaves a cached Gaussian in numpy's state
    save_rng_state(tmp_path, 0)
    expected = (random.random(), np.random.randn(), torch.rand(2).tolist())
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    assert load_rng_state(tmp_path, 0)
    assert (random.random(), np.random.randn(), torch.rand(2).tolist()) == expected
    torch.load(tmp_path / RNG_DIR / "rank-0.pt", weights_only=True)  # tensors and numbers only

    # A forged RNG file that would run code when unpickled is refused, not run.
    (tmp_path / RNG_DIR / "rank-1.pt").write_bytes(pickle.dumps({"python": RunsCode()}))
    with pytest.raises(pickle.UnpicklingError):
        load_rng_state(tmp_path, 1)

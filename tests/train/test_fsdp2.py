"""strategy=fsdp2: PyTorch FSDP2 on CPU (gloo), the same worker loop as DeepSpeed, compared against DeepSpeed.

References: ZeRO-2 on the same data and seed (the pinned LoRA losses of test_train.py, and a full fine-tune run
beside it), the sharded torch.distributed.checkpoint state itself (read back without a process group), and the
weights plain peft / transformers load from the checkpoint. The update is the same (torch AdamW, the same
schedule, clipping and loss scaling), so only the reduction order differs: fp32 losses agree to 1e-4 relative,
weights to 1e-5.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ragft.checkpoints import complete_checkpoints, verify
from ragft.errors import ConfigError
from ragft.jsonl import read_rows
from ragft.train.checkpoint import files_written_by
from ragft.train.run import run
from ragft.train.spec import validate_train
from train.test_train import FAST, PINNED_LORA_ZERO2

LOSS_RTOL = 1e-4  # FSDP2 vs ZeRO-2, fp32 on CPU: the same update, other reduction order
WEIGHT_ATOL = 1e-5


def sharded_state(folder: Path, tmp_path: Path) -> dict:
    """The model part of a checkpoint's fsdp/ state, as whole tensors (DCP's own offline converter)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    target = tmp_path / f"dcp-{folder.name}.pt"
    dcp_to_torch_save(folder / "fsdp", target)
    return torch.load(target, weights_only=False)["model"]


def test_check_backend_lists_every_problem(compose_train):
    with pytest.raises(ConfigError) as fsdp:
        validate_train(compose_train("strategy=fsdp2", "method=qlora", "strategy.offload_params=true",
                                     "strategy.offload_optimizer=true"))
    text = str(fsdp.value)
    assert "cannot be combined with strategy=fsdp2" in text
    assert "strategy.offload_params is DeepSpeed's" in text and "strategy.offload_optimizer is DeepSpeed's" in text
    with pytest.raises(ConfigError) as deepspeed:
        validate_train(compose_train("strategy=zero3", "strategy.cpu_offload=true", "train.compile=true"))
    assert "strategy.cpu_offload is FSDP2's" in str(deepspeed.value)
    assert "train.compile=true needs strategy=fsdp2" in str(deepspeed.value)
    spec = validate_train(compose_train("strategy=fsdp2", "strategy.cpu_offload=true", "train.compile=true",
                                        "model.kernels=ragft"))
    assert spec.strategy.backend == "fsdp2" and spec.strategy.name == "fsdp2"


def test_each_rank_hashes_the_dcp_files_it_wrote(tmp_path):
    for rel in ("fsdp/.metadata", "fsdp/__0_0.distcp", "fsdp/__1_0.distcp", "fsdp/engine_state.json",
                "rng/rank-1.pt", "adapter_model.safetensors"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    assert files_written_by(tmp_path, 1, 2) == ["fsdp/__1_0.distcp", "rng/rank-1.pt"]
    assert "fsdp/.metadata" in files_written_by(tmp_path, 0, 2) and "fsdp/__0_0.distcp" in files_written_by(tmp_path, 0, 2)


@pytest.mark.ray
def test_lora_tracks_zero2_opens_in_peft_and_resumes_exactly(ray_cluster, compose_train, tmp_path):
    """Two Ray Train workers: the LoRA run of test_train.py's pinned ZeRO-2 losses, under FSDP2; its adapter
    is what the sharded state holds; losing checkpoint 8 and resuming from 4 recomputes the same steps."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    overrides = [*FAST, "method=lora", "strategy=fsdp2", "train.max_steps=8", "train.lr=1e-2",
                 "strategy.precision=fp32", f"out_dir={out}"]
    result = run(validate_train(compose_train(*overrides)))
    original = {m["step"]: m for m in read_rows(out / "metrics.jsonl")}
    assert [original[s]["loss"] for s in (2, 4)] == pytest.approx(PINNED_LORA_ZERO2, rel=LOSS_RTOL)
    assert original[8]["loss"] < original[2]["loss"] - 0.3

    ckpts = complete_checkpoints(out / "checkpoints")
    assert [p.name for p in ckpts] == ["4", "8"]
    final = ckpts[-1]
    assert result["final_checkpoint"] == str(final) and verify(final) == []
    shards = sorted(p.name for p in (final / "fsdp").iterdir())
    assert shards == [".metadata", "__0_0.distcp", "__1_0.distcp", "engine_state.json"]
    sharded = sharded_state(final, tmp_path)
    assert sharded and all("lora_" in name for name in sharded)  # the frozen base is the base model's
    base = AutoModelForCausalLM.from_pretrained(out / "base_model")
    model = PeftModel.from_pretrained(base, final)
    loaded = dict(model.named_parameters())
    assert len(sharded) == 2 * 7 * 2  # layers × modules × (A, B)
    for name, tensor in sharded.items():
        torch.testing.assert_close(loaded[name].detach(), tensor, rtol=0, atol=0)
    assert all(t.abs().sum() > 0 for n, t in sharded.items() if "lora_B" in n)  # trained: B starts at zero
    reference = {k: v.clone() for k, v in load_file(final / "adapter_model.safetensors").items()}

    final.rename(out / "checkpoints" / ".tmp-8")  # lost mid-write: resume from step 4
    run(validate_train(compose_train(*overrides, f"resume={out}")))
    again = {m["step"]: m for m in read_rows(out / "metrics.jsonl")}
    assert sorted(again) == [2, 4, 6, 8] and again[4] == original[4]
    for step in (6, 8):
        assert again[step]["loss"] == pytest.approx(original[step]["loss"], rel=1e-6), step
    assert again[8]["eval_loss"] == pytest.approx(original[8]["eval_loss"], rel=1e-6)
    restored = load_file(final / "adapter_model.safetensors")
    for name, tensor in reference.items():
        torch.testing.assert_close(restored[name], tensor, rtol=0, atol=1e-6)


def _torchrun(out: Path, *overrides: str) -> dict[int, dict]:
    """Two processes of the worker loop without Ray (ragft.train.local under torch.distributed.run)."""
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "ragft.train.local",
         f"out_dir={out}", f"registry.path={out.parent / 'registry.jsonl'}", "method=full", "cluster.num_workers=2",
         "train.micro_batch_size=4", "train.global_batch_size=16", "train.max_steps=4", "train.log_every=1",
         "train.save_every=4", "train.eval_every=4", "train.eval_max_batches=2", "train.lr=3e-3",
         "strategy.precision=fp32", "model.gradient_checkpointing=true", "model.kernels=ragft", *overrides],
        cwd=out.parent, env=dict(os.environ), capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {m["step"]: m for m in read_rows(out / "metrics.jsonl")}


@pytest.mark.deepspeed
def test_full_fine_tune_with_offload_tracks_zero2_and_opens_in_transformers(tmp_path, cache_dir):
    """Full fine-tune, 2 processes, activation checkpointing and ragft's kernels on: FSDP2 with CPU offload
    against ZeRO-2 step for step; the checkpoint's model.safetensors is what the shards hold and what
    transformers loads."""
    from transformers import AutoModelForCausalLM

    fsdp = _torchrun(tmp_path / "fsdp2", "strategy=fsdp2", "strategy.cpu_offload=true")
    zero2 = _torchrun(tmp_path / "zero2", "strategy=zero2")
    assert sorted(fsdp) == sorted(zero2) == [1, 2, 3, 4]
    for step in fsdp:
        assert fsdp[step]["loss"] == pytest.approx(zero2[step]["loss"], rel=LOSS_RTOL), step
        assert fsdp[step]["grad_norm"] == pytest.approx(zero2[step]["grad_norm"], rel=1e-3), step
    assert fsdp[4]["eval_loss"] == pytest.approx(zero2[4]["eval_loss"], rel=LOSS_RTOL)

    final = tmp_path / "fsdp2" / "checkpoints" / "4"
    assert verify(final) == []
    sharded = sharded_state(final, tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(final).state_dict()
    deepspeed = load_file(tmp_path / "zero2" / "checkpoints" / "4" / "model.safetensors")
    for name, tensor in sharded.items():
        torch.testing.assert_close(loaded[name], tensor, rtol=0, atol=0)
        if name in deepspeed:
            torch.testing.assert_close(tensor, deepspeed[name], rtol=0, atol=WEIGHT_ATOL)

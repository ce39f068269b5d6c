"""The worker loop without Ray (ragft.train.local): same loop, shards read from the tokenized parquet."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

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


def _local_run(out, *overrides):
    proc = subprocess.run([sys.executable, "-m", "ragft.train.local", f"out_dir={out}", *overrides],
                          cwd=out.parent, env=dict(os.environ), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {m["step"]: m for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}


@pytest.mark.parametrize("model,strategy", [("smollm2", "zero2"), ("tiny", "ddp")])
def test_adapter_checkpoint_leaves_out_frozen_weights_and_resumes_exactly(tmp_path, cache_dir, model, strategy):
    """A LoRA checkpoint holds the adapter (safetensors), and for resume only the optimizer's fp32 copy of it
    and its two Adam moments (ZeRO 1-3), or the adapter and the moments (stage 0): never the base weights,
    not even SmolLM2's LM head tied to its embeddings. Resuming from it recomputes the same steps."""
    from safetensors.torch import load_file

    from ragft.sample import sample_path
    from ragft.train.checkpoint import folder_size

    rows = Path(sample_path("train.jsonl")).read_text().splitlines()[:48]
    (tmp_path / "train.jsonl").write_text("\n".join(rows) + "\n")
    out = tmp_path / "run"
    args = [f"model={model}", "method=lora", f"strategy={strategy}", "cluster.num_workers=1", "data=jsonl",
            f"data.train_path={tmp_path / 'train.jsonl'}", "data.max_seq_len=128", "data.eval_fraction=0.25",
            "train.micro_batch_size=2", "train.max_steps=4", "train.save_every=2", "train.eval_every=2",
            "train.log_every=1", "train.keep_last=2", "train.lr=5e-4", "train.eval_max_batches=1"]
    original = _local_run(out, *args)
    final = out / "checkpoints" / "4"
    adapter = final / "adapter_model.safetensors"
    reference = {k: v.clone() for k, v in load_file(adapter).items()}
    adapter_bytes = 4 * sum(t.numel() for t in reference.values())  # fp32
    resume_bytes = folder_size(final / "deepspeed")
    # fp32 copy + two moments (ZeRO) or the weights + two moments (stage 0), plus DeepSpeed's small metadata
    assert 3 * adapter_bytes < resume_bytes < 3 * adapter_bytes + 2**20, (resume_bytes, adapter_bytes)
    tokenizer_bytes = sum(p.stat().st_size for p in final.glob("tokenizer*"))
    assert folder_size(final) - tokenizer_bytes < 4 * adapter_bytes + 2**20

    final.rename(out / "checkpoints" / ".tmp-4")  # lost mid-write: resume from step 2
    again = _local_run(out, *args, f"resume={out}")
    for step in (3, 4):
        assert again[step]["loss"] == pytest.approx(original[step]["loss"], rel=1e-6), step
    assert again[4]["eval_loss"] == pytest.approx(original[4]["eval_loss"], rel=1e-6)
    restored = load_file(adapter)
    for name, tensor in reference.items():
        assert (restored[name] - tensor).abs().max() <= 1e-6 * max(1.0, tensor.abs().max()), name

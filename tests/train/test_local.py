"""The worker loop without Ray (ragft.train.local): same loop, shards read from the tokenized parquet."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM

from ragft.jsonl import read_rows

pytestmark = pytest.mark.deepspeed


def _local_losses(out, *overrides):
    proc = subprocess.run(
        [sys.executable, "-m", "ragft.train.local", f"out_dir={out}", "method=full", "strategy=zero2",
         "cluster.num_workers=1", "train.micro_batch_size=8", "train.global_batch_size=8", "train.max_steps=6",
         "train.log_every=1", "train.save_every=100", "train.lr=3e-3", *overrides],
        cwd=out.parent, env=dict(os.environ), capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [m["loss"] for m in read_rows(out / "metrics.jsonl")]


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
    assert "step 4/4" in proc.stdout and "saved checkpoint step 4" in proc.stdout
    return {m["step"]: m for m in read_rows(out / "metrics.jsonl")}


@pytest.mark.parametrize("model,method,strategy", [("smollm2", "lora", "zero2"), ("tiny", "lora", "ddp"),
                                                   ("tiny", "full", "zero2")])
def test_checkpoint_resumes_exactly_and_an_adapters_leaves_out_frozen_weights(tmp_path, cache_dir, model, method,
                                                                             strategy):
    """One process, no Ray: train 4 steps saving every 2, lose the newest checkpoint mid-write, resume from
    step 2; the recomputed steps equal the original ones. A LoRA checkpoint holds the adapter (safetensors)
    and, for resume, the optimizer's fp32 copy of it and two Adam moments (ZeRO 1-3), or the adapter and the
    moments (stage 0): never base weights, not even SmolLM2's LM head tied to its embeddings. A full
    checkpoint loads in plain transformers."""
    from safetensors.torch import load_file

    from ragft.sample import sample_path
    from ragft.train.checkpoint import folder_size

    rows = Path(sample_path("train.jsonl")).read_text().splitlines()[:48]
    (tmp_path / "train.jsonl").write_text("\n".join(rows) + "\n")
    out = tmp_path / "run"
    args = [f"model={model}", f"method={method}", f"strategy={strategy}", "cluster.num_workers=1", "data=jsonl",
            f"data.train_path={tmp_path / 'train.jsonl'}", "data.max_seq_len=128", "data.eval_fraction=0.25",
            "train.micro_batch_size=2", "train.max_steps=4", "train.save_every=2", "train.eval_every=2",
            "train.log_every=1", "train.keep_last=2", "train.lr=5e-4", "train.eval_max_batches=1"]
    original = _local_run(out, *args)
    final = out / "checkpoints" / "4"
    weights = final / ("adapter_model.safetensors" if method == "lora" else "model.safetensors")
    reference = {k: v.clone() for k, v in load_file(weights).items()}
    if method == "lora":
        adapter_bytes = 4 * sum(t.numel() for t in reference.values())  # fp32
        resume_bytes = folder_size(final / "deepspeed")
        # fp32 copy + two moments (ZeRO) or the weights + two moments (stage 0), plus DeepSpeed's small metadata
        assert 3 * adapter_bytes < resume_bytes < 3 * adapter_bytes + 2**20, (resume_bytes, adapter_bytes)
        tokenizer_bytes = sum(p.stat().st_size for p in final.glob("tokenizer*"))
        assert folder_size(final) - tokenizer_bytes < 4 * adapter_bytes + 2**20
    else:
        AutoModelForCausalLM.from_pretrained(final)

    final.rename(out / "checkpoints" / ".tmp-4")  # lost mid-write: resume from step 2
    again = _local_run(out, *args, f"resume={out}")
    assert sorted(again) == [1, 2, 3, 4] and again[1] == original[1]  # history kept up to the checkpoint
    for step in (3, 4):
        assert again[step]["loss"] == pytest.approx(original[step]["loss"], rel=1e-6), step
    assert again[4]["eval_loss"] == pytest.approx(original[4]["eval_loss"], rel=1e-6)
    restored = load_file(weights)
    for name, tensor in reference.items():
        assert (restored[name] - tensor).abs().max() <= 1e-6 * max(1.0, tensor.abs().max()), name

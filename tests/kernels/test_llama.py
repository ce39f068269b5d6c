"""model.kernels=ragft on a Llama: the patched model's loss and gradients equal the unpatched model's
(ragft.train.loss, transformers' modules), full and LoRA, torch path and Triton interpreter; validation
refuses what cannot run; and 20 steps of the one-process training loop track model.kernels=none."""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaForCausalLM

from helpers.random_llama import random_llama
from ragft.data.pack import collate, pack
from ragft.data.tokenize import IGNORE_INDEX, Encoded
from ragft.errors import ConfigError
from ragft.jsonl import read_rows
from ragft.kernels.llama import apply_kernels, check_supported, fused_loss_head
from ragft.train.loss import causal_lm_loss
from ragft.train.spec import validate_train

VOCAB = 97


def tiny_llama() -> LlamaForCausalLM:
    return random_llama(vocab_size=VOCAB, intermediate_size=48, initializer_range=0.1)


def batch(train_on_prompt: bool, n: int = 6):
    g = torch.Generator().manual_seed(0)
    examples = []
    for i in range(n):
        prompt = torch.randint(1, VOCAB, (int(torch.randint(5, 20, (1,), generator=g)),), generator=g).tolist()
        answer = torch.randint(1, VOCAB, (3,), generator=g).tolist()
        labels = prompt + answer if train_on_prompt else [IGNORE_INDEX] * len(prompt) + answer
        examples.append(Encoded(prompt + answer, labels, origin=f"x:{i}"))
    return collate(pack(examples, 32), pad_id=0)


def loss_and_grads(model, data):
    loss = causal_lm_loss(model, data)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    return loss.detach(), grads


@pytest.mark.parametrize("train_on_prompt", [False, True], ids=["answers", "all"])
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_patched_model_matches_transformers_modules(kernel_path, lora, train_on_prompt):
    if kernel_path == "triton" and not (lora and train_on_prompt):
        pytest.skip("the interpreter is slow: one combination covers the Triton kernels inside a model")
    reference = tiny_llama()
    patched = copy.deepcopy(reference)
    done = apply_kernels(patched, "ragft")
    assert done == ["RMSNorm x5", "SwiGLU MLP x2", "RoPE attention x2", "LM head: fused linear + cross-entropy"]
    if lora:
        config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"],
                            init_lora_weights=False)
        torch.manual_seed(1)
        reference = get_peft_model(reference, config)
        torch.manual_seed(1)
        patched = get_peft_model(patched, config)
    data = batch(train_on_prompt, 2 if kernel_path == "triton" else 6)
    ref_loss, ref_grads = loss_and_grads(reference, data)
    loss, grads = loss_and_grads(patched, data)
    assert fused_loss_head(patched) is not None and fused_loss_head(reference) is None
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == ref_grads.keys() and len(grads) > 0
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    with torch.no_grad():  # outside the loss the head still returns logits (eval, generate)
        torch.testing.assert_close(patched(**{k: v for k, v in data.items() if k != "labels"}).logits,
                                   reference(**{k: v for k, v in data.items() if k != "labels"}).logits,
                                   rtol=1e-5, atol=1e-5)


def test_only_llama_family_with_silu_is_patched():
    assert check_supported("llama", "silu") == []
    problems = check_supported("gpt2", "gelu_new")
    assert len(problems) == 2 and "Llama-family models only" in problems[0] and "'gpt2'" in problems[0]


def test_validation_refuses_what_cannot_run_here(compose_train):
    spec = validate_train(compose_train("model.kernels=ragft"))
    assert spec.model.kernels == "ragft"
    with pytest.raises(ConfigError) as err:
        validate_train(compose_train("model.kernels=liger", "strategy=zero3"))
    text = str(err.value)
    if not torch.cuda.is_available():
        assert "model.kernels=liger needs a CUDA GPU" in text
    assert "not supported with ZeRO-3" in text
    # An unknown name never gets here: compose refuses it (tests/config/test_defaults.py).


def _local_losses(runs: dict) -> dict:
    """{kernels: out_dir} -> {kernels: 20 losses}: one-process training runs, side by side (one thread each)."""
    env = dict(os.environ, TRITON_INTERPRET="0", OMP_NUM_THREADS="1")
    procs = {kernels: subprocess.Popen(
        [sys.executable, "-m", "ragft.train.local", f"out_dir={out}", f"model.kernels={kernels}", "method=full",
         "strategy=zero2", "strategy.precision=fp32", "cluster.num_workers=1", "data.train_on_prompt=true",
         "data.max_seq_len=128", "train.micro_batch_size=4", "train.global_batch_size=4", "train.max_steps=20",
         "train.log_every=1", "train.eval_every=100", "train.save_every=100", "train.lr=3e-3"],
        cwd=out.parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    ) for kernels, out in runs.items()}
    losses = {}
    for kernels, proc in procs.items():
        _, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr[-3000:]
        losses[kernels] = [m["loss"] for m in read_rows(runs[kernels] / "metrics.jsonl")]
    return losses


@pytest.mark.deepspeed
def test_twenty_training_steps_track_kernels_none(tmp_path, cache_dir):
    """The tiny model, full fine-tune (the LM head trains too), every position labelled, fp32: the losses of
    20 steps with model.kernels=ragft follow none's within 1e-3 relative (summation order differs, and
    Adam carries that difference forward)."""
    losses = _local_losses({"none": tmp_path / "none", "ragft": tmp_path / "ragft"})
    none, ragft = losses["none"], losses["ragft"]
    assert len(none) == len(ragft) == 20
    assert none[-1] < none[0]  # it trains
    assert ragft == pytest.approx(none, rel=1e-3)

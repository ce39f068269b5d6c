"""The DeepSpeed config is derived from the spec; the LR schedule is warmup + cosine."""

from __future__ import annotations

import math

import pytest
import torch

from ragft.train.deepspeed_config import render, warmup_cosine
from ragft.train.spec import validate_train


@pytest.mark.parametrize("strategy,stage", [("ddp", 0), ("zero1", 1), ("zero2", 2), ("zero3", 3)])
def test_stage_and_batch_arithmetic(compose_train, strategy, stage):
    spec = validate_train(compose_train(f"strategy={strategy}", "train.global_batch_size=48",
                                        "train.micro_batch_size=4", "cluster.num_workers=3"))
    ds = render(spec)
    assert ds["zero_optimization"]["stage"] == stage
    assert ds["train_batch_size"] == 48 == ds["train_micro_batch_size_per_gpu"] * 3 * ds["gradient_accumulation_steps"]
    assert ds["bf16"]["enabled"] is False  # CPU: fp32
    assert ds["optimizer"]["params"]["torch_adam"] is True


def test_zero3_offload_and_persistence(compose_train):
    spec = validate_train(compose_train("strategy=zero3_offload", "strategy.param_persistence_threshold=0"))
    zero = render(spec)["zero_optimization"]
    assert zero["offload_optimizer"]["device"] == "cpu" and zero["offload_param"]["device"] == "cpu"
    assert zero["stage3_param_persistence_threshold"] == 0


def test_warmup_cosine_schedule():
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=1.0)
    sched = warmup_cosine(total_steps=100, warmup_ratio=0.1, min_lr_ratio=0.1)(opt)
    lrs = []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(1 / 11)  # the first step already trains
    assert lrs[9] == pytest.approx(10 / 11)
    assert lrs[10] == pytest.approx(1.0)
    assert lrs[55] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert min(lrs[10:]) >= 0.1 and lrs[-1] == pytest.approx(0.1, abs=1e-3)

"""ragft.kernels.lora against PEFT's LoRA forward: with the same seed, the same loss and gradients bit for bit
(fp32 and bf16 autocast), the generator left where PEFT leaves it, PEFT's own path wherever the replay does not
apply, and less kept for the backward."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model

from helpers.random_llama import random_llama
from ragft.kernels.lora import replay_lora_dropout

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def lora_llama(dropout: float = 0.3):
    model = random_llama()
    # init_lora_weights=False: B is not zero, so A's gradient and the dropout mask matter from the first step
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=TARGETS,
                                            init_lora_weights=False))


def step(model, ids: torch.Tensor, autocast: bool, seed: int = 5):
    """Loss, gradients and the generator's next draw after one training forward and backward."""
    model.train()
    model.zero_grad()
    torch.manual_seed(seed)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}, torch.rand(3)


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_same_loss_gradients_and_generator_as_peft(autocast):
    reference = lora_llama()
    replayed = copy.deepcopy(reference)
    assert replay_lora_dropout(replayed) == 2 * len(TARGETS)
    ids = torch.randint(0, 97, (3, 20), generator=torch.Generator().manual_seed(1))

    loss, grads, after = step(reference, ids, autocast)
    got_loss, got_grads, got_after = step(replayed, ids, autocast)

    assert torch.equal(got_loss, loss) and torch.equal(got_after, after)
    assert got_grads.keys() == grads.keys() and any(".lora_A." in n for n in grads)
    for name, grad in grads.items():
        assert torch.equal(got_grads[name], grad), name
    other_seed = step(replayed, ids, autocast, seed=6)[1]
    assert any(not torch.equal(other_seed[n], g) for n, g in grads.items())  # the masks do depend on the seed


def test_peft_path_where_the_replay_does_not_apply():
    """Evaluation, a mixed-adapter batch and dropout 0 run PEFT's forward: the same outputs as unpatched."""
    ids = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(2))
    reference = lora_llama()
    replayed = copy.deepcopy(reference)
    replay_lora_dropout(replayed)
    for model in (reference, replayed):
        model.eval()
    with torch.no_grad():
        torch.testing.assert_close(replayed(input_ids=ids).logits, reference(input_ids=ids).logits, rtol=0, atol=0)
        mixed = {"adapter_names": ["default", "__base__"]}
        torch.testing.assert_close(replayed(input_ids=ids, **mixed).logits, reference(input_ids=ids, **mixed).logits,
                                   rtol=0, atol=0)
    no_dropout = lora_llama(dropout=0.0)
    copied = copy.deepcopy(no_dropout)
    replay_lora_dropout(copied)
    assert torch.equal(step(copied, ids, False)[0], step(no_dropout, ids, False)[0])


def saved_bytes(model, ids: torch.Tensor) -> int:
    """Bytes autograd keeps for the backward of one training forward (each storage counted once)."""
    storages = {}

    def pack(tensor):
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    model.train()
    torch.manual_seed(0)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    return sum(storages.values())


def test_keeps_less_for_the_backward_than_peft():
    ids = torch.randint(0, 97, (4, 64), generator=torch.Generator().manual_seed(3))
    reference = lora_llama(dropout=0.05)
    replayed = copy.deepcopy(reference)
    replay_lora_dropout(replayed)
    ours, peft = saved_bytes(replayed, ids), saved_bytes(reference, ids)
    print(f"\nkept for the backward: {ours} bytes with the replay, {peft} with PEFT's dropout ({ours / peft:.2f}x)")
    assert ours < 0.8 * peft

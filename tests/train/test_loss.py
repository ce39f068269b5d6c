"""The training loss against transformers' own: `model(**batch).loss` from `labels` is the reference,
for padded and packed batches, a full model and a LoRA-wrapped one, in value and in gradients, with the
per-row mask (transformers >= 5.20) and with the batch's shared columns (what older ones take)."""

from __future__ import annotations

import random

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaForCausalLM

from helpers.random_llama import random_llama
from ragft.data.pack import collate, pack, unpacked
from ragft.data.tokenize import IGNORE_INDEX, Encoded
from ragft.train import loss as loss_module
from ragft.train.loss import causal_lm_loss

VOCAB = 97


def examples(n: int, seed: int = 0) -> list[Encoded]:
    """Chat-like examples: a prompt without labels, then a short labelled answer."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        prompt = [rng.randrange(1, VOCAB) for _ in range(rng.randint(5, 30))]
        answer = [rng.randrange(1, VOCAB) for _ in range(rng.randint(1, 4))]
        out.append(Encoded(prompt + answer, [IGNORE_INDEX] * len(prompt) + answer, origin=f"x:{i}"))
    return out


def tiny_llama() -> LlamaForCausalLM:
    return random_llama(vocab_size=VOCAB, max_position_embeddings=256, initializer_range=0.1)


def grads(model) -> dict[str, torch.Tensor]:
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    return out


@pytest.fixture(params=[True, False], ids=["row-mask", "shared-columns"])
def keep_form(request, monkeypatch):
    if request.param and not loss_module.ROW_MASKS:
        pytest.skip("this transformers takes no per-row logits_to_keep mask")
    monkeypatch.setattr(loss_module, "ROW_MASKS", request.param)
    return request.param


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("rows", [unpacked, lambda e: pack(e, 64)], ids=["padded", "packed"])
def test_loss_and_gradients_equal_transformers_loss_from_labels(rows, lora, keep_form):
    model = tiny_llama()
    if lora:
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                 init_lora_weights=False))
    batch = collate(rows(examples(12)), pad_id=0)
    labelled = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    assert 12 <= labelled < batch["labels"].numel() // 4  # answers only: most positions carry no loss

    reference = model(**batch, use_cache=False).loss
    reference.backward()
    expected = grads(model)
    loss = causal_lm_loss(model, batch)
    loss.backward()
    got = grads(model)

    torch.testing.assert_close(loss, reference, rtol=1e-6, atol=1e-6)
    assert got.keys() == expected.keys() and len(got) > 0
    for name, grad in got.items():
        torch.testing.assert_close(grad, expected[name], rtol=1e-5, atol=1e-7, msg=name)


def test_every_position_labelled_is_the_plain_loss(keep_form):
    model = tiny_llama()
    ids = torch.randint(1, VOCAB, (3, 20), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "labels": ids.clone(), "position_ids": torch.arange(20).repeat(3, 1)}
    torch.testing.assert_close(causal_lm_loss(model, batch), model(**batch, use_cache=False).loss)

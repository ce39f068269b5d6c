"""Packing: packed rows give every example the loss it has alone, rows are full, batches pad correctly.

References: the same tiny Llama run on each example alone (packing equivalence, sdpa and eager);
the lower bound ceil(tokens / max_seq_len) on the number of rows (efficiency); hand-written
tensors (collate).
"""

from __future__ import annotations

import math
import random

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from ragft.data.pack import collate, pack, packing_efficiency, unpacked
from ragft.data.rows import Example
from ragft.data.tokenize import IGNORE_INDEX, Encoded, encode

EXAMPLES = [
    Example(kind="text", text="The model reads a large document about the river and the city.", origin="t:1"),
    Example(kind="prompt_completion", prompt="Question: the first city?", completion=" A small river.", origin="t:2"),
    Example(
        kind="chat",
        messages=(
            {"role": "user", "content": "Good query?"},
            {"role": "assistant", "content": "The index packs a vector."},
            {"role": "user", "content": "And the batch?"},
            {"role": "assistant", "content": "Fast."},
        ),
        origin="t:3",
    ),
    Example(kind="text", text="Last token loss.", origin="t:4"),
    Example(kind="prompt_completion", prompt="Slow or fast?", completion=" Slow, the mountain.", origin="t:5"),
]


@pytest.fixture(scope="module")
def encoded(tokenizer) -> list[Encoded]:
    return [encode(e, tokenizer, max_seq_len=256) for e in EXAMPLES]


def tiny_llama(vocab_size: int, attn: str) -> LlamaForCausalLM:
    """2 layers, hidden 64, fp32, seed 0. Weights at 5x the default init scale: attention is then far
    from uniform, so the negative control moves losses by percents rather than per mille."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, initializer_range=0.1,
    )  # fmt: skip
    model = LlamaForCausalLM._from_config(config, attn_implementation=attn, dtype=torch.float32)
    assert model.config._attn_implementation == attn
    return model.eval()


def token_losses(model, batch: dict[str, torch.Tensor], **forward) -> torch.Tensor:
    """(batch, len) loss of the prediction made at each position, 0 where the next label is ignored.

    Position t predicts labels[t + 1], as transformers' causal LM loss shifts them."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], **forward).logits
    losses = F.cross_entropy(
        logits[:, :-1].transpose(1, 2), batch["labels"][:, 1:], ignore_index=IGNORE_INDEX, reduction="none"
    )
    return F.pad(losses, (0, 1))


def per_example_losses(model, rows: list[dict], pad_id: int, **forward) -> dict[tuple[int, ...], float]:
    """Summed token loss of every example in `rows` (collated into one batch), keyed by its input ids."""
    batch = collate(rows, pad_id)
    losses = token_losses(model, batch, **forward)
    out = {}
    for b, row in enumerate(rows):
        starts = [i for i, p in enumerate(row["position_ids"]) if p == 0] + [len(row["input_ids"])]
        for lo, hi in zip(starts, starts[1:]):
            out[tuple(row["input_ids"][lo:hi])] = losses[b, lo:hi].sum().item()
    return out


def alone_losses(model, encoded: list[Encoded], pad_id: int) -> dict[tuple[int, ...], float]:
    """Reference: each example in a batch of its own, no packing and no padding."""
    out = {}
    for e in encoded:
        out.update(per_example_losses(model, unpacked([e]), pad_id, use_cache=False))
    return out


def packed_rows(encoded: list[Encoded]) -> list[dict]:
    """Four examples in one row, plus a shorter row with the fifth, which collate pads."""
    rows = pack(encoded[:4], max_seq_len=sum(len(e) for e in encoded[:4]))
    assert len(rows) == 1 and rows[0]["position_ids"].count(0) == 4
    return rows + unpacked(encoded[4:])


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_examples_have_the_loss_they_have_alone(tokenizer, encoded, attn):
    model = tiny_llama(len(tokenizer), attn)
    reference = alone_losses(model, encoded, tokenizer.pad_token_id)
    rows = packed_rows(encoded)
    packed = per_example_losses(model, rows, tokenizer.pad_token_id, use_cache=False)
    assert packed.keys() == reference.keys()
    for ids, loss in reference.items():
        assert packed[ids] == pytest.approx(loss, rel=1e-5)

    # The model's own loss (what training minimises) is the mean over every labelled token.
    batch = collate(rows, tokenizer.pad_token_id)
    with torch.no_grad():
        loss = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], labels=batch["labels"],
                     use_cache=False).loss  # fmt: skip
    num_labels = sum(sum(label != IGNORE_INDEX for label in e.labels) for e in encoded)
    assert loss.item() * num_labels == pytest.approx(sum(reference.values()), rel=1e-5)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_negative_control_without_position_resets_examples_see_each_other(tokenizer, encoded, attn):
    """Same packed row, but positions run 0..n-1 across it: the mask is plain causal and the losses change."""
    model = tiny_llama(len(tokenizer), attn)
    reference = alone_losses(model, encoded, tokenizer.pad_token_id)
    row = pack(encoded[:4], max_seq_len=sum(len(e) for e in encoded[:4]))[0]
    batch = collate([row], tokenizer.pad_token_id)
    batch["position_ids"] = torch.arange(len(row["input_ids"])).unsqueeze(0)
    losses = token_losses(model, batch, use_cache=False)[0]
    starts = [i for i, p in enumerate(row["position_ids"]) if p == 0] + [len(row["input_ids"])]
    for lo, hi in zip(starts[1:], starts[2:]):  # every example after the first one sees the ones before it
        alone = reference[tuple(row["input_ids"][lo:hi])]
        assert abs(losses[lo:hi].sum().item() - alone) > 1e-3 * alone


def test_default_use_cache_silently_breaks_packing(tokenizer, encoded):
    """Why the train loop passes use_cache=False: with the config default a KV cache is created, and
    transformers builds the packed mask only without one. If this fails, transformers changed that."""
    model = tiny_llama(len(tokenizer), "sdpa")
    assert model.config.use_cache
    reference = alone_losses(model, encoded, tokenizer.pad_token_id)
    packed = per_example_losses(model, packed_rows(encoded), tokenizer.pad_token_id)  # use_cache not passed
    assert any(abs(packed[ids] - loss) > 1e-3 * loss for ids, loss in reference.items())


def random_examples(count: int, lengths: tuple[int, int], seed: int = 0) -> list[Encoded]:
    rng = random.Random(seed)
    out = []
    for i in range(count):
        ids = [rng.randrange(3, 400) for _ in range(rng.randint(*lengths))]
        out.append(Encoded(input_ids=ids, labels=[IGNORE_INDEX] + ids[1:], origin=f"r:{i + 1}"))
    return out


def test_many_short_examples_pack_at_least_95_percent_full():
    examples = random_examples(500, lengths=(8, 64))
    rows = pack(examples, max_seq_len=256)
    total = sum(len(e) for e in examples)
    assert len(rows) <= math.ceil(total / 256) + 1  # within one row of the lower bound
    assert packing_efficiency(rows, 256) >= 0.95
    # Every example lands exactly once, whole, with positions restarting at it.
    segments = []
    for row in rows:
        assert len(row["input_ids"]) <= 256
        assert len(row["input_ids"]) == len(row["labels"]) == len(row["position_ids"])
        starts = [i for i, p in enumerate(row["position_ids"]) if p == 0] + [len(row["input_ids"])]
        for lo, hi in zip(starts, starts[1:]):
            assert row["position_ids"][lo:hi] == list(range(hi - lo))
            segments.append((tuple(row["input_ids"][lo:hi]), tuple(row["labels"][lo:hi])))
    assert sorted(segments) == sorted((tuple(e.input_ids), tuple(e.labels)) for e in examples)
    assert pack(examples, max_seq_len=256) == rows  # deterministic


def test_pack_refuses_an_example_longer_than_a_row():
    with pytest.raises(ValueError, match="longer than max_seq_len=10, e.g. r:1"):
        pack(random_examples(1, lengths=(11, 11)), max_seq_len=10)


def test_unpacked_is_one_example_per_row():
    examples = random_examples(3, lengths=(2, 5))
    rows = unpacked(examples)
    assert [r["input_ids"] for r in rows] == [e.input_ids for e in examples]
    assert [r["position_ids"] for r in rows] == [list(range(len(e))) for e in examples]


def test_collate_right_pads_with_a_pad_segment_of_its_own():
    rows = [
        {"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "position_ids": [0, 1, 2]},
        {"input_ids": [8, 9, 10, 11, 12], "labels": [-100, 9, -100, 11, 12], "position_ids": [0, 1, 0, 1, 2]},
    ]
    batch = collate(rows, pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 0, 0], [8, 9, 10, 11, 12]]
    assert batch["labels"].tolist() == [[-100, 6, 7, -100, -100], [-100, 9, -100, 11, 12]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 0, 1, 2]]
    assert int(batch["num_tokens"]) == 8
    assert all(batch[k].dtype == torch.long for k in ("input_ids", "labels", "position_ids"))
    assert packing_efficiency(rows, row_len=5) == 8 / 10

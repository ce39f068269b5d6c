"""Benchmark: ragft's training loss (logits only at labelled positions) vs transformers' loss from
`labels` (logits at every position), same model, same batches, forward + backward.

Batches are chat-like rows as the demo trains on them: prompts of 40-120 tokens with answers of
2-6 labelled tokens, packed into rows of `--seq` tokens. Two Llama shapes: the demo's tiny model
and a wider one with a 32k vocabulary, where the LM head weighs more. Prints ms per step for each
and the speedup (transformers / ragft); the losses must agree.

    python launch/bench_loss.py [--steps 20] [--batch 4] [--seq 256] [--threads 2]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from ragft.data.pack import collate, pack
from ragft.data.tokenize import IGNORE_INDEX, Encoded
from ragft.train.loss import causal_lm_loss

SHAPES = {
    "demo tiny (2 x 128, vocab 2k)": dict(vocab_size=2048, hidden_size=128, intermediate_size=384, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=4),
    "wide (4 x 512, vocab 32k)": dict(vocab_size=32000, hidden_size=512, intermediate_size=1536, num_hidden_layers=4,
                                      num_attention_heads=8, num_key_value_heads=8),
}


def batches(vocab: int, n: int, batch: int, seq: int) -> list[dict[str, torch.Tensor]]:
    rng = random.Random(0)
    examples = []
    for i in range(n * batch * seq // 60):
        prompt = [rng.randrange(1, vocab) for _ in range(rng.randint(40, 120))]
        answer = [rng.randrange(1, vocab) for _ in range(rng.randint(2, 6))]
        examples.append(Encoded(prompt + answer, [IGNORE_INDEX] * len(prompt) + answer, f"bench:{i}"))
    rows = pack(examples, seq)
    return [collate(rows[i * batch:(i + 1) * batch], pad_id=0) for i in range(n)]


def step_ms(model, data, loss_fn, warmup: int) -> tuple[float, float]:
    times, last = [], 0.0
    for i, batch in enumerate(data):
        start = time.perf_counter()
        loss = loss_fn(model, batch)
        loss.backward()
        model.zero_grad(set_to_none=True)
        if i >= warmup:
            times.append(time.perf_counter() - start)
        last = loss.item()
    return statistics.median(times) * 1000, last


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    def full_logits(model, batch):
        return model(**batch, use_cache=False).loss

    for name, shape in SHAPES.items():
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(max_position_embeddings=args.seq, **shape)).train()
        data = batches(shape["vocab_size"], args.steps + args.warmup, args.batch, args.seq)
        labelled = sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in data) / sum(b["labels"].numel() for b in data)
        hf_ms, hf_loss = step_ms(model, data, full_logits, args.warmup)
        ragft_ms, ragft_loss = step_ms(model, data, causal_lm_loss, args.warmup)
        assert abs(hf_loss - ragft_loss) < 1e-4 * abs(hf_loss), (hf_loss, ragft_loss)
        print(f"{name}: {args.batch} x {args.seq} tokens, {labelled:.1%} labelled | "
              f"transformers labels loss {hf_ms:.1f} ms/step | ragft {ragft_ms:.1f} ms/step | "
              f"speedup {hf_ms / ragft_ms:.2f}x")


if __name__ == "__main__":
    main()

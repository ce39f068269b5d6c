"""Where a training step's memory goes: resident memory after each stage of one ragft worker, one process.

Runs the pieces of `ragft.train.loop.run_worker` one at a time on a real batch (the tokenized rows of the
config's data, `train.micro_batch_size` rows of `data.max_seq_len` tokens) and prints, per stage, the
resident memory when it ends and its peak during it (Linux: VmRSS / VmHWM, the peak reset between stages
through /proc/self/clear_refs). The loss is measured twice, ragft's (logits at labelled positions only,
`ragft.train.loss`) and the usual `model(**batch).loss` (logits everywhere), so their difference shows.

    python launch/memory_train.py model=smollm2 method=lora train.micro_batch_size=8 data.max_seq_len=256
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def rss_gib() -> tuple[float, float]:
    """(current, peak since the last reset) resident memory of this process, in GiB."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    kib = lambda key: int(fields[key].split()[0])  # noqa: E731
    return kib("VmRSS") / 2**20, kib("VmHWM") / 2**20


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS


def first_batch(overrides: list[str], out: Path):
    """(spec, tokenizer, the first micro-batch of one worker, its labelled tokens) of a one-worker `ragft train`
    config, with the process group up: what a one-process training step measures on."""
    from ragft.config.compose import compose_config
    from ragft.data.shard import ShardBatches
    from ragft.train.local import ParquetShard, init_process_group
    from ragft.train.run import prepare_data, prepare_model
    from ragft.train.spec import validate_train

    spec = validate_train(compose_config("train", [f"out_dir={out}", "cluster.num_workers=1", *overrides]))
    init_process_group(use_gpu=False)
    spec, tokenizer = prepare_model(spec)
    spec = prepare_data(spec, tokenizer)
    batch = next(iter(ShardBatches(ParquetShard(spec.plan.train_path, 0, 1), spec.train.micro_batch_size,
                                   tokenizer.pad_token_id, spec.seed, shuffle=False, drop_last=True, cache=True)(0)))
    batch.pop("num_tokens")
    return spec, tokenizer, batch, int((batch["labels"][:, 1:] != -100).sum())


def main() -> None:
    import deepspeed
    import torch
    import torch.distributed as dist

    from ragft.model.build import load_model
    from ragft.train.deepspeed_config import render, warmup_cosine
    from ragft.train.loss import causal_lm_loss

    torch.set_num_threads(int(os.environ.get("RAGFT_THREADS", "1")))  # as a Ray worker with one CPU
    spec, tokenizer, batch, labelled = first_batch(sys.argv[1:], Path(tempfile.mkdtemp(prefix="ragft-memory-")))
    print(f"{spec.model.name} {spec.method.name} {spec.strategy.name}: batch {tuple(batch['input_ids'].shape)}, "
          f"{labelled} labelled tokens, vocabulary {len(tokenizer)}", flush=True)
    rows = []

    def stage(name: str, before: float) -> None:
        current, peak = rss_gib()
        rows.append((name, current, peak, peak - before))

    def measure(name: str, fn):
        reset_peak()
        before = rss_gib()[0]
        result = fn()
        stage(name, before)
        return result

    stage("imports, tokenizer, data", 0.0)
    model = measure("load model (+ adapters)", lambda: load_model(spec.base_model_path, spec.model, spec.method,
                                                                  torch.float32, use_cuda=False))
    engine = measure("deepspeed.initialize", lambda: deepspeed.initialize(
        model=model, model_parameters=[p for p in model.parameters() if p.requires_grad], config=render(spec),
        lr_scheduler=warmup_cosine(10, spec.train.warmup_ratio, spec.train.min_lr_ratio))[0])
    for label, loss_fn in (("ragft loss (labelled logits)", lambda: causal_lm_loss(engine, batch)),
                           ("full logits (model(**batch).loss)", lambda: engine(**batch, use_cache=False).loss)):
        engine.train()
        loss = measure(f"forward, {label}", loss_fn)
        measure(f"backward, {label}", lambda loss=loss: engine.backward(loss))
        measure("optimizer step", engine.step)
        loss = None  # the graph is gone after backward; drop the scalar too before the next measurement
    with torch.no_grad():
        engine.eval()
        measure("eval forward (no grad)", lambda: causal_lm_loss(engine, batch))
    width = max(len(r[0]) for r in rows)
    print(f"\n{'stage':<{width}}  {'RSS after':>9}  {'peak':>9}  {'peak - RSS before':>17}")
    for name, current, peak, extra in rows:
        print(f"{name:<{width}}  {current:8.2f}G  {peak:8.2f}G  {extra:16.2f}G")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

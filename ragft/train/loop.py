"""The worker loop: what every Ray Train worker runs. Reads only its `config` argument.

setup (seed, tokenizer, model, DeepSpeed engine, resume) → for each optimizer step:
forward/backward over `grad_accum` micro-batches → log / eval / save on schedule.
Rank-0-only work (writing weights, printing) sits behind `is_rank0`.

`run_worker` holds the loop itself and needs only an initialised process group
and two batch iterables, so it also runs without Ray (one process, `torchrun`, or
a GPU box without Ray installed); `train_loop_per_worker` adapts it to Ray Train.
"""

from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
import torch.distributed as dist

from ragft.config.spec import TrainSpec
from ragft.data.pack import ROW_COLUMNS
from ragft.data.shard import ShardBatches
from ragft.model.build import load_model, load_tokenizer
from ragft.train import checkpoint
from ragft.train.deepspeed_config import render, warmup_cosine
from ragft.train.progress import ProgressLine

log = logging.getLogger(__name__)

Batches = Callable[[int], Iterable[dict]]  # epoch -> micro-batches of tensors


def train_loop_per_worker(config: dict) -> None:
    """Ray Train entry point: the spec and the dataset shards come from Ray."""
    import ray.train
    from ray.train.v2._internal.execution import context as ray_train_context

    # Ray logs every report at INFO under a logger named after its file; ragft prints its own lines.
    logging.getLogger(ray_train_context.__file__).setLevel(logging.WARNING)
    spec: TrainSpec = config["spec"]
    ctx = ray.train.get_context()
    train_shard = ray.train.get_dataset_shard("train")
    eval_shard = ray.train.get_dataset_shard("eval")
    pad_id = config["pad_id"]
    plan = spec.plan
    shard_mb = plan.num_train_rows / spec.world_size * spec.data.max_seq_len * len(ROW_COLUMNS) * 8 / 2**20
    cache = shard_mb <= spec.data.worker_cache_mb
    micro = spec.train.micro_batch_size

    run_worker(
        spec,
        rank=ctx.get_world_rank(),
        train_batches=ShardBatches(train_shard, micro, pad_id, spec.seed, shuffle=True, drop_last=True, cache=cache),
        eval_batches=ShardBatches(eval_shard, micro, pad_id, spec.seed, shuffle=False, drop_last=False, cache=cache),
        report=lambda metrics: ray.train.report(metrics),
    )


@dataclass
class Window:
    """Sums over the steps since the last log line, added up across ranks when read."""

    loss_sum: float = 0.0
    loss_count: int = 0
    tokens: int = 0
    samples: int = 0
    started: float = field(default_factory=time.perf_counter)

    def metrics(self, step: int, epoch: int, engine, grad_accum: int, total_steps: int, device) -> dict:
        """The window's figures over all ranks (a collective: every rank calls it)."""
        totals = torch.tensor([self.loss_sum, self.loss_count, self.tokens, self.samples], dtype=torch.float64,
                              device=device)
        dist.all_reduce(totals)
        seconds = time.perf_counter() - self.started
        loss_sum, loss_count, tokens, samples = totals.tolist()
        world_size = dist.get_world_size()
        return {
            "step": step,
            "epoch": epoch,
            "loss": loss_sum / max(loss_count, 1),
            "lr": engine.get_lr()[0],
            "grad_norm": _grad_norm(engine),
            "tokens_per_s": tokens / seconds,  # non-pad tokens over all ranks
            "samples_per_s": samples / seconds,
            "step_time_s": seconds / max(loss_count / world_size / grad_accum, 1),
            "total_steps": total_steps,
        }


def run_worker(spec: TrainSpec, rank: int, train_batches: Batches, eval_batches: Batches, report) -> None:
    import deepspeed

    is_rank0 = rank == 0
    device = _device(spec)
    seed_everything(spec.seed)

    tokenizer = load_tokenizer(spec.tokenizer_path)
    ds_config = render(spec)
    dtype = torch.bfloat16 if spec.precision == "bf16" else torch.float32
    model = load_model(spec.base_model_path, spec.model, spec.method, dtype, use_cuda=spec.cluster.use_gpu)
    plan = spec.plan
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=[p for p in model.parameters() if p.requires_grad],
        config=ds_config,
        lr_scheduler=warmup_cosine(plan.total_steps, spec.train.warmup_ratio, spec.train.min_lr_ratio),
    )

    step, epoch, skip_batches = resume_state(engine, spec, is_rank0)
    progress = ProgressLine(plan.total_steps)
    window = Window()
    last_eval = None
    while step < plan.total_steps:
        micro = 0
        for i, batch in enumerate(train_batches(epoch)):
            if i >= plan.steps_per_epoch * spec.grad_accum:
                break  # a partial accumulation would spill into the next epoch's first step
            if i < skip_batches:
                continue  # already trained on before the checkpoint we resumed from
            batch = {k: v.to(device) for k, v in batch.items()}
            num_tokens = int(batch.pop("num_tokens"))
            engine.train()
            loss = engine(**batch, use_cache=False).loss
            engine.backward(loss)
            engine.step()
            window.loss_sum += loss.item()
            window.loss_count += 1
            window.tokens += num_tokens
            window.samples += batch["input_ids"].shape[0]
            micro = i + 1
            if micro % spec.grad_accum:
                continue
            step += 1
            last_step = step == plan.total_steps
            if step % spec.train.eval_every == 0 or last_step:
                last_eval = evaluate(engine, eval_batches, spec, device)
            metrics = {"step": step}
            if step % spec.train.log_every == 0 or last_step:
                metrics = window.metrics(step, epoch, engine, spec.grad_accum, plan.total_steps, device)
                if last_eval is not None:
                    metrics["eval_loss"] = last_eval
                window = Window()
                if is_rank0:
                    append_jsonl(Path(spec.out_dir) / "metrics.jsonl", metrics)
                    print(progress(metrics), flush=True)
            if step % spec.train.save_every == 0 or last_step:
                state = {"step": step, "epoch": epoch, "epoch_batches": micro, "run_id": spec.run_id}
                saved = checkpoint.save(engine, engine.module, tokenizer, spec, step, metrics, state, is_rank0)
                if saved is not None:
                    print(f"saved checkpoint step {step} → {saved.path} "
                          f"({saved.size_bytes / 2**20:.1f} MiB, {saved.seconds:.1f} s)", flush=True)
                # Ray's report is a barrier that waits for the controller's next poll (every 2 s), so
                # only checkpoints go through it; the per-step lines above do not.
                report({**metrics, "checkpoint": str(spec.checkpoints_dir / str(step))})
            if last_step:
                break
        epoch += 1
        skip_batches = 0


def evaluate(engine, eval_batches: Batches, spec: TrainSpec, device) -> float:
    """Mean token loss on the held-out split, weighted by label tokens, over all ranks."""
    engine.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)
    with torch.no_grad():
        for i, batch in enumerate(eval_batches(0)):
            if i >= spec.train.eval_max_batches:
                break
            batch = {k: v.to(device) for k, v in batch.items()}
            batch.pop("num_tokens")
            labelled = int((batch["labels"][:, 1:] != -100).sum())
            loss = engine(**batch, use_cache=False).loss
            total += torch.tensor([loss.item() * labelled, labelled], dtype=torch.float64, device=device)
    dist.all_reduce(total)
    engine.train()
    return (total[0] / total[1]).item() if total[1] > 0 else float("nan")


def resume_state(engine, spec: TrainSpec, is_rank0: bool) -> tuple[int, int, int]:
    """(step, epoch, micro-batches to skip) after loading the newest complete checkpoint, if any.

    A restarted worker group (Ray's FailureConfig) or `resume=` finds it in out_dir.
    """
    found = checkpoint.complete_checkpoints(spec.checkpoints_dir)
    if not found:
        return 0, 0, 0
    latest: Path = found[-1]
    _, state = engine.load_checkpoint(str(latest / checkpoint.DEEPSPEED_DIR), tag=checkpoint.DEEPSPEED_TAG)
    if is_rank0:
        print(f"resumed from {latest} (step {state['step']})", flush=True)
    return state["step"], state["epoch"], state["epoch_batches"]


def append_jsonl(path: Path, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _grad_norm(engine) -> float:
    norm = engine.get_global_grad_norm()
    return float(norm) if norm is not None else float("nan")


def _device(spec: TrainSpec) -> torch.device:
    if spec.cluster.use_gpu:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


"""The worker loop: what every Ray Train worker runs. Reads only its `config` argument.

setup (seed, tokenizer, model, DeepSpeed engine, resume) → for each optimizer step:
forward/backward over `grad_accum` micro-batches → log / eval / save on schedule.
Rank-0-only work (writing weights, printing) sits behind `is_rank0`.

`run_worker` holds the loop itself and needs only an initialised process group
and two batch iterables, so it also runs without Ray (one process, `torchrun`, or
a GPU box without Ray installed); `train_loop_per_worker` adapts it to Ray Train.
"""

from __future__ import annotations

import logging
import os
import random
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
import torch.distributed as dist

from ragft.checkpoints import complete_checkpoints
from ragft.data.pack import ROW_COLUMNS
from ragft.data.shard import ShardBatches
from ragft.data.tokenize import IGNORE_INDEX
from ragft.jsonl import append_jsonl, read_records, write_jsonl
from ragft.model.build import load_model, load_tokenizer
from ragft.train import checkpoint, fsdp2
from ragft.train.deepspeed_config import render, warmup_cosine
from ragft.train.extension_lock import clear_stale_lock
from ragft.train.flops import flops_per_token, peak_flops_per_device
from ragft.train.dpo import PAIR_SUMS, PairTotals, build_reference, objective_loss, pair_metrics
from ragft.train.progress import Sink, printing_sink
from ragft.train.spec import TrainSpec
from ragft.train.tracking import make_tracker


Batches = Callable[[int], Iterable[dict]]  # epoch -> micro-batches of tensors
STOP_FILE = "STOP"  # written by the driver on Ctrl-C / SIGTERM: save a checkpoint and stop


def train_loop_per_worker(config: dict) -> None:
    """Ray Train entry point: the spec and the dataset shards come from Ray."""
    import ray.train

    spec: TrainSpec = config["spec"]
    ctx = ray.train.get_context()
    quiet_ray_train_reports()
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
        events=config["events"],
    )


def quiet_ray_train_reports() -> None:
    """Ray Train logs every report at INFO; ragft prints its own lines. Those loggers are named after their
    file paths, not `ray.train.*`, so RunConfig's log level does not reach them: set it on them by path."""
    import ray.train

    package = os.path.dirname(ray.train.__file__)
    for name in list(logging.root.manager.loggerDict):
        if name.startswith(package):
            logging.getLogger(name).setLevel(logging.WARNING)


@dataclass
class StepsSinceLog:
    """Sums over the steps since the last log line, added up across ranks when read."""

    loss_sum: float = 0.0
    loss_count: int = 0
    tokens: int = 0
    samples: int = 0
    started: float = field(default_factory=time.perf_counter)
    pairs: PairTotals = field(default_factory=PairTotals)  # objective=dpo: reward accuracy, margins, log-probs

    def add(self, loss: float, tokens: int, samples: int, pair_sums: dict | None = None) -> None:
        self.loss_sum += loss
        self.loss_count += 1
        self.tokens += tokens
        self.samples += samples
        self.pairs.add(pair_sums or {})

    def metrics(self, step: int, epoch: int, engine, grad_accum: int, total_steps: int, device,
                grad_norm: float | None = None) -> dict:
        """These steps' figures over all ranks (a collective: every rank calls it)."""
        totals = torch.tensor([self.loss_sum, self.loss_count, self.tokens, self.samples,
                               *(self.pairs.sums[name] for name in PAIR_SUMS)], dtype=torch.float64, device=device)
        dist.all_reduce(totals)
        seconds = time.perf_counter() - self.started
        loss_sum, loss_count, tokens, samples = totals.tolist()[:4]
        pairs = dict(zip(PAIR_SUMS, totals.tolist()[4:]))
        world_size = dist.get_world_size()
        return {
            "step": step,
            "epoch": epoch,
            "loss": loss_sum / max(loss_count, 1),
            "lr": engine.get_lr()[0],
            "grad_norm": _grad_norm(engine) if grad_norm is None else grad_norm,
            "tokens_per_s": tokens / seconds,  # non-pad tokens over all ranks
            "samples_per_s": samples / seconds,
            "step_time_s": seconds / max(loss_count / world_size / grad_accum, 1),
            "total_steps": total_steps,
            **pair_metrics(pairs),
        }


def run_worker(spec: TrainSpec, rank: int, train_batches: Batches, eval_batches: Batches, report,
               events: Sink | None = None) -> None:
    """Train to `spec.plan.total_steps`. `report` goes to the cluster manager at each checkpoint (and each
    evaluation with `spec.report_evals`); `events` (rank 0 only) feeds the progress display, and defaults
    to printing lines."""
    is_rank0 = rank == 0
    device = _device(spec)
    seed_everything(spec.seed)
    engine, tokenizer, throughput = _start_engine(spec)
    reference = build_reference(spec, next(engine.module.parameters()).dtype, device)  # full + dpo only
    plan = spec.plan
    emit = (events or printing_sink(plan.total_steps)) if is_rank0 else (lambda event: None)
    step, epoch, skip_batches = resume_state(engine, spec, rank, emit)
    plain_norm = None  # stage 0 (ddp) only: the gradient norm DeepSpeed does not compute there
    tracker = make_tracker(spec, is_rank0)
    stop_file = Path(spec.out_dir) / STOP_FILE
    since_log = StepsSinceLog()
    last_eval = None
    done = step >= plan.total_steps
    while not done:
        micro = 0
        for i, batch in enumerate(train_batches(epoch)):
            if i >= plan.steps_per_epoch * spec.grad_accum:
                break  # a partial accumulation would spill into the next epoch's first step
            if i < skip_batches:
                continue  # already trained on before the checkpoint we resumed from
            loss, num_tokens, rows, norm, pair_sums = _micro_step(engine, batch, spec, device, reference)
            plain_norm = norm if norm is not None else plain_norm
            since_log.add(loss, num_tokens, rows, pair_sums)
            micro = i + 1
            if micro % spec.grad_accum:
                continue
            step += 1
            stop = stop_requested(stop_file, device)  # collective: every rank stops at the same step
            done = stop or step == plan.total_steps
            evaluated = step % spec.train.eval_every == 0 or done
            if evaluated:
                last_eval = evaluate(engine, eval_batches, spec, device, reference)
            metrics = {"step": step}
            if step % spec.train.log_every == 0 or done:
                metrics = since_log.metrics(step, epoch, engine, spec.grad_accum, plan.total_steps, device, plain_norm)
                metrics.update(throughput(metrics["tokens_per_s"]))
                if last_eval is not None:
                    metrics.update(last_eval)
                since_log = StepsSinceLog()
                _log_step(spec, metrics, is_rank0, tracker, emit)
            saving = step % spec.train.save_every == 0 or done
            if saving:
                state = {"step": step, "epoch": epoch, "epoch_batches": micro, "run_id": spec.run_id}
                _save(engine, tokenizer, spec, step, metrics, last_eval if evaluated else None, state, is_rank0,
                      tracker, emit)
            # Ray's report is a barrier that waits for the controller's next poll (every 2 s), so only
            # checkpoints go through it, and evaluations in a Tune trial (ASHA compares trials on them);
            # the per-step lines above do not.
            if saving or (evaluated and spec.report_evals):
                reported = {**metrics, **(last_eval or {})}
                if saving:
                    reported["checkpoint"] = str(spec.checkpoints_dir / str(step))
                report(reported)
            if done:
                break
        epoch += 1
        skip_batches = 0
    if is_rank0:
        _finish_tracking(spec, tracker)


def _start_engine(spec: TrainSpec):
    """The model on its DeepSpeed engine, or FSDP2's (strategy.backend=fsdp2), with optimizer and schedule;
    (engine, tokenizer, throughput meter)."""
    tokenizer = load_tokenizer(spec.tokenizer_path)
    fsdp = spec.strategy.backend == "fsdp2"
    # bf16 weights on GPUs (DeepSpeed keeps fp32 master copies; FSDP2 keeps fp32 shards and gathers bf16 copies);
    # on CPUs fp32 weights under bf16 autocast
    dtype = torch.bfloat16 if spec.precision == "bf16" and spec.cluster.use_gpu and not fsdp else torch.float32
    model = load_model(spec.base_model_path, spec.model, spec.method, dtype, use_cuda=spec.cluster.use_gpu)
    throughput = Throughput(flops_per_token(model, spec.is_adapter),
                            peak_flops_per_device(spec.cluster.peak_tflops, spec.cluster.use_gpu), spec.world_size)
    schedule = warmup_cosine(spec.plan.total_steps, spec.train.warmup_ratio, spec.train.min_lr_ratio)
    if fsdp:
        return fsdp2.build_engine(model, spec, _device(spec), schedule), tokenizer, throughput
    if not spec.cluster.use_gpu:
        clear_stale_lock()  # DeepSpeed loads its CPU communication op next
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=[p for p in model.parameters() if p.requires_grad],
        config=render(spec),
        lr_scheduler=schedule,
    )
    return engine, tokenizer, throughput


def _micro_step(engine, batch: dict, spec: TrainSpec, device, reference=None
                ) -> tuple[float, int, int, float | None, dict]:
    """Forward, backward and (at an accumulation boundary) the optimizer step of one micro batch; returns its
    loss, token count, rows, under stage 0 the gradient norm DeepSpeed leaves unset (else None), and the pair
    sums of objective=dpo (empty for sft)."""
    batch = {k: v.to(device) for k, v in batch.items()}
    num_tokens = int(batch.pop("num_tokens"))
    engine.train()
    with cpu_autocast(spec):
        loss, pair_sums = objective_loss(engine, batch, spec.objective, reference)
    boundary = engine.is_gradient_accumulation_boundary()
    engine.backward(loss)
    norm = _plain_grad_norm(engine.module) if boundary and engine.zero_optimization_stage() == 0 else None
    engine.step()
    return loss.item(), num_tokens, batch["input_ids"].shape[0], norm, pair_sums


def _log_step(spec: TrainSpec, metrics: dict, is_rank0: bool, tracker, emit: Sink) -> None:
    if is_rank0:
        append_jsonl(Path(spec.out_dir) / "metrics.jsonl", [metrics])
        tracker.log(metrics, metrics["step"])
    emit({"event": "step", **metrics})


def _save(engine, tokenizer, spec: TrainSpec, step: int, metrics: dict, eval_metrics: dict | None, state: dict,
          is_rank0: bool, tracker, emit: Sink) -> None:
    """Save a checkpoint; its manifest's eval figures (eval_loss, and eval_reward_accuracy ... with
    objective=dpo) are this step's own (None: not evaluated at this step), so keep_last and `best` compare like
    with like."""
    recorded = {k: v for k, v in metrics.items() if not k.startswith("eval_")}
    recorded.update(eval_metrics or {})
    saved = checkpoint.save(engine, engine.module, tokenizer, spec, step, recorded, state, is_rank0)
    if saved is not None:
        emit({"event": "checkpoint", "step": step, "path": str(saved.path), "size_bytes": saved.size_bytes,
              "seconds": saved.seconds, "hash_seconds": saved.hash_seconds})
        tracker.log({"checkpoint_save_s": saved.seconds, "checkpoint_hash_s": saved.hash_seconds,
                     "checkpoint_bytes": saved.size_bytes}, step)


def _finish_tracking(spec: TrainSpec, tracker) -> None:
    saved_so_far = complete_checkpoints(spec.checkpoints_dir)  # each hashed as it was saved
    if saved_so_far:
        tracker.log_checkpoint(saved_so_far[-1], int(saved_so_far[-1].name))
    tracker.finish()


def cpu_autocast(spec: TrainSpec):
    """bf16 autocast for the forward pass of a CPU run in bf16; a no-op otherwise. Gradients and the
    optimizer stay fp32, so gloo, which reduces them, never sees bf16."""
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=spec.precision == "bf16" and not spec.cluster.use_gpu)


def stop_requested(stop_file: Path, device) -> bool:
    """True on every rank once any rank sees the driver's stop file (Ctrl-C / SIGTERM on the driver)."""
    flag = torch.tensor([1.0 if stop_file.exists() else 0.0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


class Throughput:
    """MFU and memory beside tokens/s; MFU only where the device's peak FLOP/s is known (never on CPU)."""

    def __init__(self, flops_per_token: float, peak_per_device: float | None, world_size: int):
        self.flops_per_token = flops_per_token
        self.peak_total = peak_per_device * world_size if peak_per_device else None

    def __call__(self, tokens_per_s: float) -> dict:
        figures = {"model_tflops": self.flops_per_token * tokens_per_s / 1e12, "mem_gb": peak_memory_gb()}
        if self.peak_total:
            figures["mfu"] = self.flops_per_token * tokens_per_s / self.peak_total
        return figures


def evaluate(engine, eval_batches: Batches, spec: TrainSpec, device, reference=None) -> dict[str, float]:
    """{"eval_loss": ...} on the held-out split over all ranks: the mean token loss weighted by label tokens
    (sft), or the mean DPO loss over pairs with eval_reward_accuracy, eval_reward_margin, eval_logps_* and
    eval_rewards_* beside it (dpo)."""
    engine.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)
    pairs = PairTotals()
    with torch.no_grad():
        for i, batch in enumerate(eval_batches(0)):
            if i >= spec.train.eval_max_batches:
                break
            batch = {k: v.to(device) for k, v in batch.items()}
            batch.pop("num_tokens")
            with cpu_autocast(spec):
                loss, pair_sums = objective_loss(engine, batch, spec.objective, reference)
            # a pair's loss is per pair, an SFT loss per label token: weight each mean by what it averages
            weight = pair_sums["pairs"] if pair_sums else int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
            total += torch.tensor([loss.item() * weight, weight], dtype=torch.float64, device=device)
            pairs.add(pair_sums)
    dist.all_reduce(total)
    reduced = pairs.reduced(device) if spec.objective.name == "dpo" else {}
    engine.train()
    eval_loss = (total[0] / total[1]).item() if total[1] > 0 else float("nan")
    return {"eval_loss": eval_loss, **pair_metrics(reduced, "eval_")}


def resume_state(engine, spec: TrainSpec, rank: int, emit: Sink) -> tuple[int, int, int]:
    """(step, epoch, micro-batches to skip) after loading the newest valid checkpoint, if any.

    A restarted worker group (Ray's FailureConfig) and `resume=` both land here. The ranks
    check the sha256 of the candidates together and every rank loads the one picked: model,
    optimizer, LR schedule (DeepSpeed state), its own RNG streams, and the data position.
    """
    started = time.perf_counter()
    folder = checkpoint.latest_valid(spec.checkpoints_dir)  # collective: the ranks split the hashing
    verify_s = time.perf_counter() - started
    if folder is None:
        return 0, 0, 0
    state = checkpoint.load_engine_state(engine, folder, spec)
    if not checkpoint.load_rng_state(folder, rank):
        seed_everything(spec.seed + state["step"])  # world size changed: a fresh, still deterministic stream
    if rank == 0:
        truncate_history(Path(spec.out_dir) / "metrics.jsonl", state["step"])
    emit({"event": "resumed", "path": str(folder), "verify_s": verify_s,
          **{k: state[k] for k in ("step", "epoch", "epoch_batches")}})
    return state["step"], state["epoch"], state["epoch_batches"]


def truncate_history(path: Path, step: int) -> None:
    """Drop logged steps after `step`: the resumed run logs them again from the checkpoint."""
    if path.exists():
        write_jsonl(path, [row for row in read_records(path) if row.get("step", step + 1) <= step], atomic=True)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _plain_grad_norm(module: torch.nn.Module) -> float:
    """The 2-norm of the (already all-reduced) gradients, before clipping: what ZeRO 1-3 report."""
    norms = [p.grad.detach().float().norm() for p in module.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0


def _grad_norm(engine) -> float:
    norm = engine.get_global_grad_norm()
    return float(norm) if norm is not None else float("nan")


def peak_memory_gb() -> float:
    """Peak accelerator memory of this process, or its peak resident memory on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is in KiB on Linux


def _device(spec: TrainSpec) -> torch.device:
    if spec.cluster.use_gpu:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


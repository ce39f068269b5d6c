"""Benchmark: ragft's training loop vs a bare hand-written DeepSpeed loop, same run, same inputs.

Both train the same base model (`--model`: any model config, e.g. tiny or smollm2) on the same
tokenized rows, with the same world size, micro/global batch, LoRA settings, optimizer and steps,
on CPU with gloo. ragft runs as `ragft train` does (Ray Train workers, Ray Data shards, metrics,
eval, checkpoints); the baseline is `torch.multiprocessing` + PEFT + `deepspeed.initialize` + a
for loop over pre-sharded tensors, nothing else. Throughput counts non-pad tokens over the steps
after the first `--warmup` ones; memory is rank 0's peak (accelerator memory, or resident memory
on CPU: there it includes each side's imports, Ray's worker runtime for ragft). Prints both
figures and ragft / bare.

With `--compare zero2 zero3 fsdp2`, ragft alone runs once per strategy (alternating, `--repeats` rounds) on
the same data and prints one table: throughput and peak memory of each, and their ratios to the first.

    python launch/bench_train.py [--model smollm2] [--steps 40] [--workers 2] [--strategy zero2]
                                 [--method lora|full] [--micro 8] [--seq 256]
    python launch/bench_train.py --compare zero2 zero3 fsdp2 [--model tiny] [--method full]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parent.parent


def ragft_run(args, out_dir: Path, strategy: str | None = None) -> tuple[dict, dict]:
    """Train with ragft under `strategy` (default `--strategy`); return (steady-state throughput, spec facts the
    baseline must copy)."""
    from ragft.config.compose import compose_config
    from ragft.jsonl import read_rows
    from ragft.train.run import run
    from ragft.train.spec import validate_train

    overrides = [
        f"out_dir={out_dir}",
        f"model={args.model}",
        f"data.max_seq_len={args.seq}",
        f"method={args.method}",
        f"strategy={strategy or args.strategy}",
        f"cluster.num_workers={args.workers}",
        f"train.max_steps={args.steps}",
        f"train.micro_batch_size={args.micro}",
        f"train.global_batch_size={args.micro * args.workers * args.accum}",
        f"train.log_every={args.warmup}",
        f"train.eval_every={10 * args.steps}",  # eval only at the last step, as the baseline has none
        f"train.save_every={10 * args.steps}",
    ]
    spec = validate_train(compose_config("train", overrides))
    result = run(spec)
    windows = read_rows(out_dir / "metrics.jsonl")
    steady = windows[1:-1] or windows[1:]  # drop the warmup window and the one holding eval + save
    seconds = [w["step_time_s"] * args.warmup for w in steady]  # each window spans log_every = warmup steps
    tokens_per_s = sum(w["tokens_per_s"] * s for w, s in zip(steady, seconds)) / sum(seconds)
    saved = json.loads((out_dir / "spec.json").read_text())
    facts = {
        "base_model": saved["base_model_path"],
        "train_path": saved["plan"]["train_path"],
        "rows": result["data"]["train_rows"],
        "method": saved["method"],
        "train": saved["train"],
    }
    mem_gb = max(w["mem_gb"] for w in windows)  # rank 0's, as ragft logs it
    return {"tokens_per_s": tokens_per_s, "mem_gb": mem_gb, "windows": len(steady)}, facts


def bare_worker(rank: int, args, facts: dict, port: int, queue) -> None:
    """The baseline: what an engineer would write by hand around DeepSpeed."""
    import deepspeed
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)  # Ray gives each ragft worker one CPU; match it
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(args.workers))
    dist.init_process_group("gloo", rank=rank, world_size=args.workers)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(facts["base_model"], dtype=torch.float32)
    method, train = facts["method"], facts["train"]
    if args.method == "lora":
        model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=method["r"], lora_alpha=method["alpha"],
                                                 lora_dropout=method["dropout"],
                                                 target_modules=list(method["target_modules"])))
    stage = {"ddp": 0, "zero1": 1, "zero2": 2, "zero3": 3}[args.strategy]
    config = {
        "train_micro_batch_size_per_gpu": args.micro,
        "gradient_accumulation_steps": args.accum,
        "train_batch_size": args.micro * args.accum * args.workers,
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": stage},
        "optimizer": {"type": "AdamW", "params": {"lr": train["lr"], "betas": [train["adam_beta1"], train["adam_beta2"]],
                                                  "weight_decay": train["weight_decay"], "torch_adam": True}},
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**31 - 1,
    }
    engine, *_ = deepspeed.initialize(model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
                                      config=config)
    table = pq.read_table(facts["train_path"]).to_pylist()[rank::args.workers]
    batches = []
    for i in range(0, len(table) - args.micro + 1, args.micro):
        chunk = table[i:i + args.micro]
        width = max(len(r["input_ids"]) for r in chunk)
        pad = lambda seq, value: [list(r[seq]) + [value] * (width - len(r[seq])) for r in chunk]  # noqa: E731
        batches.append({
            "input_ids": torch.tensor(pad("input_ids", 0)),
            "labels": torch.tensor(pad("labels", -100)),
            "position_ids": torch.tensor([list(r["position_ids"]) + list(range(width - len(r["position_ids"])))
                                          for r in chunk]),
            "tokens": sum(len(r["input_ids"]) for r in chunk),
        })
    micro_steps = args.steps * args.accum
    tokens, started = 0, None
    for i in range(micro_steps):
        if i == args.warmup * args.accum:
            dist.barrier()
            tokens, started = 0, time.perf_counter()
        batch = dict(batches[i % len(batches)])
        tokens += batch.pop("tokens")
        loss = engine(**batch, use_cache=False).loss
        engine.backward(loss)
        engine.step()
        loss.item()  # ragft reads the loss every micro-step too
    dist.barrier()
    seconds = time.perf_counter() - started
    total = torch.tensor([tokens], dtype=torch.float64)
    dist.all_reduce(total)
    if rank == 0:  # measured by the function ragft's loop logs it with; importing it here adds ~8 MiB (of ~800)
        from ragft.train.loop import peak_memory_gb

        queue.put({"tokens_per_s": total.item() / seconds, "mem_gb": peak_memory_gb()})
    dist.destroy_process_group()


def bare_run(args, facts: dict) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [ctx.Process(target=bare_worker, args=(r, args, facts, port, queue))
             for r in range(args.workers)]
    for p in procs:
        p.start()
    result = queue.get(timeout=1800)
    for p in procs:
        p.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help="a model config (conf/model/<name>.yaml)")
    parser.add_argument("--seq", type=int, default=256, help="data.max_seq_len: tokens per packed row")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5, help="steps excluded from the throughput")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--micro", type=int, default=8)
    parser.add_argument("--accum", type=int, default=1)
    parser.add_argument("--strategy", default="zero2", choices=["ddp", "zero1", "zero2", "zero3"])
    parser.add_argument("--method", default="lora", choices=["lora", "full"])
    parser.add_argument("--repeats", type=int, default=2, help="alternating ragft/bare pairs; medians reported")
    parser.add_argument("--compare", nargs="+", metavar="STRATEGY",
                        help="ragft only, one run per strategy (e.g. zero2 zero3 fsdp2): ratios to the first")
    args = parser.parse_args()
    if args.compare:
        compare_strategies(args)
        return

    import ray

    ragft_runs, bare_runs = [], []
    for repeat in range(args.repeats):
        out_dir = Path(tempfile.mkdtemp(prefix="ragft-bench-"))
        ragft, facts = ragft_run(args, out_dir / "run")
        ray.shutdown()  # free the cores for the baseline
        ragft_runs.append(ragft)
        bare_runs.append(bare_run(args, facts))
        print(f"pair {repeat + 1}: ragft {ragft['tokens_per_s']:,.0f} tokens/s {ragft['mem_gb']:.2f} GiB, "
              f"bare {bare_runs[-1]['tokens_per_s']:,.0f} tokens/s {bare_runs[-1]['mem_gb']:.2f} GiB", flush=True)
    ragft, bare = ({key: statistics.median(r[key] for r in runs) for key in ("tokens_per_s", "mem_gb")}
                   for runs in (ragft_runs, bare_runs))
    ratio = ragft["tokens_per_s"] / bare["tokens_per_s"]
    print(f"\nbench_train: {args.model} {args.method} {args.strategy}, {args.workers} workers, {args.steps} steps "
          f"(first {args.warmup} excluded), micro batch {args.micro} x {args.seq} tokens, accumulation {args.accum}, "
          f"median of {args.repeats} alternating pairs")
    print(f"  bare DeepSpeed : {bare['tokens_per_s']:10,.0f} tokens/s, peak memory {bare['mem_gb']:.2f} GiB (rank 0)")
    print(f"  ragft          : {ragft['tokens_per_s']:10,.0f} tokens/s, peak memory {ragft['mem_gb']:.2f} GiB (rank 0)")
    print(f"  ratio ragft/bare: {ratio:.3f} throughput, {ragft['mem_gb'] / bare['mem_gb']:.3f} peak memory")


def compare_strategies(args) -> None:
    """ragft under each of `args.compare` on the same rows, alternating, `args.repeats` rounds; one table."""
    import ray

    runs: dict[str, list[dict]] = {name: [] for name in args.compare}
    for repeat in range(args.repeats):
        for name in args.compare:
            out_dir = Path(tempfile.mkdtemp(prefix=f"ragft-bench-{name}-"))
            figures, _ = ragft_run(args, out_dir / "run", strategy=name)
            ray.shutdown()  # every run starts its own Ray, as `ragft train` does
            runs[name].append(figures)
            print(f"round {repeat + 1} {name}: {figures['tokens_per_s']:,.0f} tokens/s {figures['mem_gb']:.2f} GiB",
                  flush=True)
    medians = {name: {key: statistics.median(r[key] for r in found) for key in ("tokens_per_s", "mem_gb")}
               for name, found in runs.items()}
    first = medians[args.compare[0]]
    device = "accelerator memory" if torch.cuda.is_available() else "resident memory, imports included"
    print(f"\nbench_train --compare: {args.model} {args.method}, {args.workers} workers, {args.steps} steps "
          f"(first {args.warmup} excluded), micro batch {args.micro} x {args.seq} tokens, accumulation {args.accum}, "
          f"median of {args.repeats} rounds; peak memory is rank 0's {device}")
    print(f"| strategy | tokens/s | peak GiB | throughput / {args.compare[0]} | memory / {args.compare[0]} |")
    print("|---|---|---|---|---|")
    for name, m in medians.items():
        print(f"| {name} | {m['tokens_per_s']:,.0f} | {m['mem_gb']:.2f} | {m['tokens_per_s'] / first['tokens_per_s']:.3f} "
              f"| {m['mem_gb'] / first['mem_gb']:.3f} |")


if __name__ == "__main__":
    main()

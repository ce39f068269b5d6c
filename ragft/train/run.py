"""The driver of `ragft train`: spec → model + data prepared once → Ray Train → result.json.

Everything that can fail on bad input (model config, data rows) runs here before
Ray starts, so a bad run costs seconds, not a cluster allocation.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Sequence

from ragft import registry
from ragft.checkpoints import MANIFEST, best_by_eval_loss, complete_checkpoints
from ragft.cluster import init_ray
from ragft.errors import ConfigError
from ragft.jsonl import read_records
from ragft.signals import on_stop_signal
from ragft.train.loop import STOP_FILE
from ragft.train.spec import DataPlan, TrainSpec, spec_summary
from ragft.train.tracking import WANDB_INFO



def run(spec: TrainSpec, callbacks: Sequence = ()) -> dict:
    """Train, write `<out_dir>/result.json`, and return its content. `callbacks` go to Ray Train's
    RunConfig (a Ray Tune trial passes TuneReportCallback to forward the workers' reports to Tune)."""
    started = time.perf_counter()
    out_dir = Path(spec.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    print(f"ragft train: run {spec.run_id} → {out_dir}", flush=True)

    spec, tokenizer = prepare_model(spec)
    spec = prepare_data(spec, tokenizer)
    plan = spec.plan
    print(
        f"data: {plan.num_train_rows} train rows, {plan.num_eval_rows} eval rows, "
        f"{plan.train_tokens} tokens, packing efficiency {plan.packing_efficiency:.3f}, "
        f"{plan.num_skipped} bad rows skipped; {plan.total_steps} steps "
        f"({plan.steps_per_epoch}/epoch, accumulation {spec.grad_accum})",
        flush=True,
    )
    (out_dir / "spec.json").write_text(json.dumps(spec_summary(spec), indent=2, default=str))

    stop_file = out_dir / STOP_FILE
    stop_file.unlink(missing_ok=True)  # left by an earlier interrupted attempt
    # Before our handlers: ray.init installs its own SIGTERM handler. + 2 CPUs for Ray Data's readers.
    init_ray(spec.cluster.address if spec.cluster.name != "local" else None,
             spec.cluster.num_workers * spec.cluster.cpus_per_worker + 2)
    with stop_on_signal(stop_file):
        result = fit(spec, pad_id=tokenizer.pad_token_id, callbacks=callbacks)
    summary = write_result(spec, result, time.perf_counter() - started)
    print_summary(summary)
    if stop_file.exists():
        stop_file.unlink()
        raise Interrupted(f"stopped at step {summary['metrics'].get('step')} on request; "
                          f"checkpoint {summary['final_checkpoint']}.\n"
                          f"  resume with: ragft train resume={spec.out_dir}")
    return summary


class Interrupted(RuntimeError):
    """The driver was asked to stop (Ctrl-C / SIGTERM) and the workers saved a checkpoint first."""

    exit_code = 130


def stop_on_signal(stop_file: Path):
    """First Ctrl-C / SIGTERM: ask the workers to checkpoint and stop (they poll `stop_file` every step).
    A second one stops the driver at once; the last complete checkpoint stays intact."""
    def request_stop(name: str) -> None:
        if stop_file.exists():
            raise KeyboardInterrupt
        stop_file.touch()
        print(f"\n{name}: saving a checkpoint at the next step, then stopping (again to stop at once)", flush=True)

    return on_stop_signal(request_stop)


def prepare_model(spec: TrainSpec):
    """Resolve the base model folder (writing the tiny model's random init) and load its tokenizer."""
    from ragft.model.build import load_tokenizer, materialize_tiny

    m = spec.model
    if m.source == "tiny":
        base = materialize_tiny(m, m.tokenizer_corpus, spec.cache_dir, spec.seed, Path(spec.out_dir) / "base_model")
        base_path = tokenizer_path = str(base)
    else:
        base_path, tokenizer_path = m.source, m.tokenizer or m.source
    tokenizer = load_tokenizer(tokenizer_path, revision=m.revision, trust_remote_code=m.trust_remote_code)
    return replace(spec, base_model_path=base_path, tokenizer_path=tokenizer_path), tokenizer


def prepare_data(spec: TrainSpec, tokenizer) -> TrainSpec:
    """Tokenize and pack once (cached by content hash) and derive the step counts."""
    from ragft.data.prepare import prepare

    data = prepare(spec.data, tokenizer, spec.cache_dir, spec.seed, spec.objective.name)
    t = spec.train
    rows_per_worker = data.num_train_rows // spec.world_size
    steps_per_epoch = rows_per_worker // t.micro_batch_size // spec.grad_accum
    if steps_per_epoch == 0:
        raise ConfigError([
            f"the training data gives {data.num_train_rows} rows, fewer than one optimizer step needs "
            f"(global batch {spec.global_batch_size} rows); lower the batch size or add data"
        ])
    if 0 < data.num_eval_rows < spec.world_size:
        # Ray splits the eval rows equally over the workers: fewer rows than workers leaves every shard empty
        raise ConfigError([
            f"the eval data gives {data.num_eval_rows} packed rows for {spec.world_size} workers, so no worker "
            f"would get one; raise data.eval_fraction (now {spec.data.eval_fraction}) or give data.eval_path"
        ])
    total = t.max_steps if t.max_steps > 0 else t.epochs * steps_per_epoch
    plan = DataPlan(
        train_path=str(data.train_path),
        eval_path=str(data.eval_path),
        num_train_rows=data.num_train_rows,
        num_eval_rows=data.num_eval_rows,
        steps_per_epoch=steps_per_epoch,
        total_steps=total,
        data_hash=data.data_hash,
        train_tokens=data.train_tokens,
        packing_efficiency=data.packing_efficiency,
        num_skipped=data.num_skipped,
    )
    return replace(spec, plan=plan)


def fit(spec: TrainSpec, pad_id: int, callbacks: Sequence = ()):
    """Run the worker loop on Ray Train (started by `run`); return Ray's Result."""
    import ray
    import ray.data
    from ray.train import DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.v2.api.config import LoggingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from ragft.train.loop import train_loop_per_worker
    from ragft.train.progress import DriverProgress

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # same shards in the same order on every run: resumable
    ctx.enable_progress_bars = False  # ragft prints one line per logged step instead
    ctx.print_on_execution_start = False
    datasets = {"train": load_rows(spec.plan.train_path), "eval": load_rows(spec.plan.eval_path)}
    progress = DriverProgress(spec.plan.total_steps)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"spec": spec, "pad_id": pad_id, "events": progress.sink()},
        scaling_config=ScalingConfig(
            num_workers=spec.cluster.num_workers,
            use_gpu=spec.cluster.use_gpu,
            resources_per_worker={"CPU": spec.cluster.cpus_per_worker, **({"GPU": 1} if spec.cluster.use_gpu else {})},
        ),
        torch_config=TorchConfig(backend="nccl" if spec.cluster.use_gpu else "gloo"),
        datasets=datasets,
        dataset_config=DataConfig(datasets_to_split="all"),
        run_config=RunConfig(
            name=spec.run_id,
            storage_path=str(Path(spec.out_dir) / "ray"),
            failure_config=FailureConfig(max_failures=spec.cluster.max_failures),
            callbacks=list(callbacks),
            logging_config=LoggingConfig(log_level="ERROR"),
            # Plain prints from the workers: Ray's print-to-logger patch echoes each line twice.
            worker_runtime_env={"env_vars": {
                "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
                **({} if spec.cluster.use_gpu else {"DS_ACCELERATOR": "cpu"}),  # not a guess, no warning
            }},
        ),
    )
    with progress:
        return trainer.fit()


DRIVER_READ_MAX_BYTES = 256 * 2**20  # tokenized files up to this size go from the driver's memory to the object store


def load_rows(path: str):
    """The tokenized rows in Ray's object store before the workers start (read lazily, the read tasks would
    compete with the training workers and the first batches wait seconds for them). A small file is read
    here and put as one block: no read tasks to schedule, seconds saved per run; a large one is read by Ray
    Data's tasks across the cluster. The choice depends only on the file, so a
    resumed run gets the same shards."""
    import pyarrow.parquet as pq
    import ray.data

    if Path(path).stat().st_size <= DRIVER_READ_MAX_BYTES:
        return ray.data.from_arrow(pq.read_table(path))
    return ray.data.read_parquet(path).materialize()


def write_result(spec: TrainSpec, result, seconds: float) -> dict:
    ckpts = complete_checkpoints(spec.checkpoints_dir)
    final = ckpts[-1] if ckpts else None
    best = best_by_eval_loss(ckpts)  # pruning always keeps it, so it exists
    summary = {
        "run_id": spec.run_id,
        "out_dir": spec.out_dir,
        "model": spec.model.name,
        "method": spec.method.name,
        "strategy": spec.strategy.name,
        "objective": spec.objective.name,
        "num_workers": spec.world_size,
        "steps": spec.plan.total_steps,
        "metrics": last_metrics(spec),
        "final_checkpoint": str(final) if final else None,
        "best_checkpoint": str(best or final) if final else None,
        "checkpoints": [str(p) for p in ckpts],
        "data": {
            "train_rows": spec.plan.num_train_rows,
            "eval_rows": spec.plan.num_eval_rows,
            "train_tokens": spec.plan.train_tokens,
            "packing_efficiency": spec.plan.packing_efficiency,
            "bad_rows_skipped": spec.plan.num_skipped,
            "data_hash": spec.plan.data_hash,
        },
        "wall_time_s": round(seconds, 1),
    }
    wandb_info = Path(spec.out_dir) / WANDB_INFO
    if wandb_info.is_file():
        summary["wandb"] = json.loads(wandb_info.read_text())
    if result.error:
        summary["error"] = str(result.error)
    (Path(spec.out_dir) / "result.json").write_text(json.dumps(summary, indent=2))
    if result.error:
        raise RuntimeError(f"training failed: {result.error}; logs under {spec.out_dir}")
    if final is not None and spec.registry_path:
        links = {"result": str(Path(spec.out_dir) / "result.json"), **({"wandb": summary["wandb"].get("url")}
                                                                    if summary.get("wandb") else {})}
        for folder in dict.fromkeys([best or final, final]):  # the best by eval loss, then the final one
            recorded = json.loads((folder / MANIFEST).read_text())["metrics"]
            # every eval figure, so registry.best_metric can name e.g. train.eval_reward_accuracy (objective=dpo)
            metrics = {"train.loss": recorded.get("loss"),
                       **{f"train.{k}": v for k, v in recorded.items() if k.startswith("eval_")}}
            registry.record_checkpoint(spec.registry_path, folder, links=links,
                                       metrics={k: v for k, v in metrics.items() if v is not None})
    return summary


def last_metrics(spec: TrainSpec) -> dict:
    """The final logged metrics, from the history rank 0 wrote (Ray keeps them only with its own checkpoints)."""
    history = read_records(Path(spec.out_dir) / "metrics.jsonl")
    return history[-1] if history else {}


def print_summary(summary: dict) -> None:
    """The end-of-run table: what ran, how it went, where everything is."""
    m = summary["metrics"]
    rows = [
        ("run", f"{summary['run_id']} ({summary['model']}, {summary['method']}, {summary['strategy']}, "
                f"{summary['num_workers']} workers)"),
        ("steps", f"{m.get('step', 0)}/{summary['steps']} in {summary['wall_time_s']} s"),
        ("loss / eval loss", f"{m.get('loss', float('nan')):.4f} / {m.get('eval_loss', float('nan')):.4f}"),
        ("throughput", f"{m.get('tokens_per_s', 0):,.0f} tokens/s, {m.get('samples_per_s', 0):.1f} samples/s, "
                       f"{m.get('step_time_s', 0):.3f} s/step"),
        ("eval reward accuracy", f"{m['eval_reward_accuracy']:.3f} (margin {m['eval_reward_margin']:.3f})")
        if "eval_reward_accuracy" in m else None,
        ("MFU", f"{m['mfu']:.1%}" if "mfu" in m else "n/a (no known peak FLOP/s for this device)"),
        ("peak memory", f"{m.get('mem_gb', 0):.2f} GiB per worker"),
        ("data", f"{summary['data']['train_rows']} rows, packing efficiency "
                 f"{summary['data']['packing_efficiency']:.3f}, {summary['data']['bad_rows_skipped']} bad rows skipped"),
        ("checkpoints", f"{summary['final_checkpoint']} (best: {summary['best_checkpoint']})"),
        ("W&B", summary["wandb"]["url"] or summary["wandb"]["dir"]) if "wandb" in summary else None,
        ("result", str(Path(summary["out_dir"]) / "result.json")),
    ]
    rows = [r for r in rows if r]
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"  {k:<{width}}  {v}" for k, v in rows), flush=True)

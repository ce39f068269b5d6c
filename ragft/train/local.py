"""The same worker loop without Ray: one process, or one per GPU under `torchrun`.

For machines that have torch and DeepSpeed but no Ray (a lent GPU box, a quick
profile): the driver's preparation (`ragft.train.run.prepare_model` / `prepare_data`)
and `ragft.train.loop.run_worker` are shared; only the shards come from the tokenized
parquet file directly instead of Ray Data, and the process group from the environment.

    python -m ragft.train.local model=... method=lora strategy=zero2 train.max_steps=50
    torchrun --nproc-per-node 8 -m ragft.train.local cluster.use_gpu=true cluster.num_workers=8 ...

Checkpoints, metrics.jsonl and spec.json are the same as `ragft train` writes (so `resume=` works), minus
result.json.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
import torch.distributed as dist

from ragft.data.pack import ROW_COLUMNS
from ragft.data.shard import ShardBatches
from ragft.net import free_port


class ParquetShard:
    """Rows `rank::world` of a parquet file, with the slice of Ray's DataIterator API ShardBatches uses."""

    def __init__(self, path: str, rank: int, world_size: int):
        table = pq.read_table(path, columns=list(ROW_COLUMNS))
        rows = len(table) // world_size * world_size  # equal shards, as Ray's equal split gives
        self.columns = {name: np.array(table[name].to_pylist()[:rows][rank::world_size], dtype=object)
                        for name in ROW_COLUMNS}

    def iter_batches(self, batch_size: int, batch_format: str = "numpy"):
        n = len(self.columns[ROW_COLUMNS[0]])
        for start in range(0, n, batch_size):
            yield {name: col[start:start + batch_size] for name, col in self.columns.items()}


def train_local(spec, rank: int, world_size: int) -> None:
    """Rank 0 prepares model and data as the Ray driver would and shares its spec; all ranks train."""
    from ragft.model.build import load_tokenizer
    from ragft.train.loop import run_worker
    from ragft.train.run import prepare_data, prepare_model
    from ragft.train.spec import spec_summary

    shared = [None]
    if rank == 0:
        Path(spec.out_dir).mkdir(parents=True, exist_ok=True)
        spec, tokenizer = prepare_model(replace(spec, cluster=replace(spec.cluster, num_workers=world_size)))
        shared = [prepare_data(spec, tokenizer)]
        # what `resume=<out_dir>` reads back, as for `ragft train`
        (Path(spec.out_dir) / "spec.json").write_text(json.dumps(spec_summary(shared[0]), indent=2, default=str))
    dist.broadcast_object_list(shared, src=0)  # one run id, one out_dir, one data plan for every rank
    spec = shared[0]
    pad, micro = load_tokenizer(spec.tokenizer_path).pad_token_id, spec.train.micro_batch_size
    train = ParquetShard(spec.plan.train_path, rank, world_size)
    evals = ParquetShard(spec.plan.eval_path, rank, world_size)
    run_worker(
        spec,
        rank=rank,
        train_batches=ShardBatches(train, micro, pad, spec.seed, shuffle=True, drop_last=True, cache=True),
        eval_batches=ShardBatches(evals, micro, pad, spec.seed, shuffle=False, drop_last=False, cache=True),
        report=lambda metrics: None,
    )


def init_process_group(use_gpu: bool) -> tuple[int, int]:
    """From torchrun's environment, or a single process on a free local port."""
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    rank, world = int(os.environ.setdefault("RANK", "0")), int(os.environ.setdefault("WORLD_SIZE", "1"))
    os.environ.setdefault("LOCAL_RANK", "0")
    if use_gpu:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if use_gpu else "gloo", rank=rank, world_size=world)
    return rank, world


def main() -> None:
    from ragft.config.compose import compose_config
    from ragft.train.spec import validate_train

    spec = validate_train(compose_config("train", sys.argv[1:]))
    rank, world = init_process_group(spec.cluster.use_gpu)
    try:
        train_local(spec, rank, world)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()

"""One worker's shard of the tokenized rows, served as padded micro-batches epoch after epoch.

Ray Data hands each worker its shard (`ray.train.get_dataset_shard`). Each pass over
a shard restarts Ray Data's streaming executor (about a second here) and every batch
pays a fixed overhead, which on small shards costs more than the training step itself.
So a shard that fits in `cache_mb` is read once, in one pass, and kept in the worker's
memory; each epoch then visits it in a permutation drawn from (seed, epoch). Larger
shards stream from Ray Data every epoch, with Ray's local shuffle seeded the same way.
Either way the order is a function of (shard, seed, epoch), which is what an exact
resume needs.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from ragft.data.pack import ROW_COLUMNS, collate

FETCH_ROWS = 4096  # rows per Ray Data batch when filling the cache: one executor pass, few round trips


class ShardBatches:
    """Callable: `epoch -> iterator of collated micro-batches`."""

    def __init__(self, shard, micro_batch_size: int, pad_id: int, seed: int, shuffle: bool, drop_last: bool,
                 cache: bool):
        self.shard = shard
        self.micro = micro_batch_size
        self.pad_id = pad_id
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.cache = cache
        self._rows: list[dict] | None = None

    def __call__(self, epoch: int) -> Iterator[dict[str, torch.Tensor]]:
        if not self.cache:
            return self._stream(epoch)
        if self._rows is None:
            self._rows = [row for batch in self.shard.iter_batches(batch_size=FETCH_ROWS, batch_format="numpy")
                          for row in columns_to_rows(batch)]
        return self._from_memory(epoch)

    def _from_memory(self, epoch: int) -> Iterator[dict[str, torch.Tensor]]:
        order = np.arange(len(self._rows))
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self._rows))
        stop = len(order) - len(order) % self.micro if self.drop_last else len(order)
        for start in range(0, stop, self.micro):
            yield collate([self._rows[i] for i in order[start:start + self.micro]], self.pad_id)

    def _stream(self, epoch: int) -> Iterator[dict[str, torch.Tensor]]:
        return iter(self.shard.iter_torch_batches(
            batch_size=self.micro,
            collate_fn=lambda batch: collate(columns_to_rows(batch), self.pad_id),
            drop_last=self.drop_last,
            local_shuffle_buffer_size=8 * self.micro if self.shuffle else None,
            local_shuffle_seed=self.seed + epoch if self.shuffle else None,
        ))


def columns_to_rows(batch: dict[str, np.ndarray]) -> list[dict]:
    """Ray Data gives a batch as columns of variable-length arrays; collate wants rows."""
    # Copies: Ray's arrays are read-only views of the object store, which torch warns about.
    return [{name: np.array(batch[name][i], dtype=np.int64) for name in ROW_COLUMNS}
            for i in range(len(batch[ROW_COLUMNS[0]]))]

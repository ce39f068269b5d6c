"""Read an offline W&B run back from its `.wandb` file (no network, no wandb sync).

The file is a LevelDB-style log: a 7-byte file header (":W&B", 0xBEE1, version), then
32 KiB blocks of records, each `crc32 (4) | length (2) | type (1) | data`, where a
protobuf `Record` may be split FIRST / MIDDLE / LAST across blocks. wandb 0.31 no
longer ships a reader, so the tests keep this small one.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

BLOCK = 32768
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path):
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    pos, pending = HEADER, b""
    while pos + HEADER <= len(data):
        if BLOCK - pos % BLOCK < HEADER:  # the rest of a block too small for a header is padding
            pos += BLOCK - pos % BLOCK
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        chunk = data[pos + HEADER:pos + HEADER + length]
        pos += HEADER + length
        if kind == 0 and length == 0:
            break
        pending = chunk if kind in (FULL, FIRST) else pending + chunk
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def read_offline_run(folder: Path) -> tuple[dict, dict[int, dict]]:
    """(config, {step: logged values}) of an offline run folder `wandb/offline-run-*`."""
    config, history = {}, {}
    for record in records(next(Path(folder).glob("*.wandb"))):
        kind = record.WhichOneof("record_type")
        if kind in ("run", "config"):  # the run record carries the config given to wandb.init
            updates = record.run.config.update if kind == "run" else record.config.update
            config.update({item.key: json.loads(item.value_json) for item in updates})
        elif kind == "history":
            items = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            step = int(items.pop("_step", record.history.step.num))
            history.setdefault(step, {}).update(items)
    return config, history

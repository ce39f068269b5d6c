"""Writing an export: into a temporary folder beside `out_dir`, hashed into a manifest, then renamed into place.

`out_dir` is either the whole export or untouched: a crash leaves only a `.tmp-export-*` folder, and with
`export.overwrite=true` the old content is deleted only once the new one has taken its name. The manifest
(`manifest.json`, the same `files` map as a checkpoint's, so `ragft.checkpoints.verify` checks an export too)
names the source checkpoint and the sha256 of the checkpoint's own manifest, which lists every file it read.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from ragft.checkpoints import MANIFEST, sha256_file
from ragft.export.merge import checkpoint_tokenizer, export_dtype, merged_model
from ragft.export.spec import ExportSpec
from ragft.jsonl import sync_folder, write_text_atomic

log = logging.getLogger(__name__)

FORMAT = "ragft-export/1"


@dataclass(frozen=True)
class Exported:
    path: Path
    dtype: str
    size_bytes: int
    seconds: float


def run_export(spec: ExportSpec) -> Exported:
    """Write the merged model `spec` describes to `spec.out_dir`; returns where and how big."""
    started = time.perf_counter()
    out_dir = Path(spec.out_dir)
    dtype = export_dtype(spec.export.dtype, spec.base, spec.checkpoint)
    dtype_name = str(dtype).removeprefix("torch.")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".tmp-export-{out_dir.name}-"))
    tmp.chmod(0o755)  # mkdtemp's folder is private; the export is for other users and servers to read
    try:
        model = merged_model(spec.checkpoint, spec.kind, spec.base, dtype)
        tokenizer = checkpoint_tokenizer(spec.checkpoint, spec.base)
        if spec.export.format == "gguf":
            from ragft.export.gguf import write_gguf

            write_gguf(model, tokenizer, tmp / gguf_name(out_dir))
        else:
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
        del model
        write_manifest(tmp, spec, dtype_name)
        replace(tmp, out_dir, spec.export.overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    size = sum(p.stat().st_size for p in out_dir.rglob("*") if p.is_file())
    exported = Exported(out_dir, dtype_name, size, time.perf_counter() - started)
    what = f"{spec.kind}, step {spec.step}" if spec.step is not None else spec.kind
    log.info("exported %s (%s) → %s (%s, %s, %.1f MB, %.1f s)", spec.checkpoint, what, out_dir,
             spec.export.format, dtype_name, size / 1e6, exported.seconds)
    return exported


def gguf_name(out_dir: Path) -> str:
    """The GGUF file's name inside out_dir: the folder's name, as llama.cpp tools expect one model file."""
    return f"{out_dir.name}.gguf"


def write_manifest(folder: Path, spec: ExportSpec, dtype: str) -> None:
    paths = sorted(p for p in folder.rglob("*") if p.is_file())
    for path in paths:
        path.chmod(0o644)  # some writers leave weights private; an export is for other users and servers
    files = {str(p.relative_to(folder)): sha256_file(p) for p in paths}
    manifest = {
        "format": FORMAT,
        "export_format": spec.export.format,
        "dtype": dtype,
        "source": {
            "checkpoint": spec.checkpoint,
            "manifest_sha256": sha256_file(Path(spec.checkpoint) / MANIFEST),
            "kind": spec.kind,
            "base": spec.base,
            "run_id": spec.run_id,
            "step": spec.step,
            "method": spec.method,
        },
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "files": files,
    }
    write_text_atomic(folder / MANIFEST, json.dumps(manifest, indent=2))


def replace(tmp: Path, out_dir: Path, overwrite: bool) -> None:
    """Give `tmp` the name `out_dir`; what was there (an empty folder, or anything with `overwrite`) goes after."""
    old = None
    if out_dir.is_dir():
        if any(out_dir.iterdir()):
            if not overwrite:  # filled since validation looked
                raise FileExistsError(f"{out_dir} is not empty (export.overwrite=true replaces it)")
            old = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".old-export-{out_dir.name}-"))
            os.rename(out_dir, old / out_dir.name)
        else:
            out_dir.rmdir()
    os.rename(tmp, out_dir)
    sync_folder(out_dir.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)

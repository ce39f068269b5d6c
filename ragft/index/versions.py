"""The on-disk layout of an index and how a new version is published atomically.

    <index.path>/
      manifest.json          the current version's manifest; replacing this file IS publishing
      versions/<n>/          one complete version: manifest.json, documents.jsonl, chunks.jsonl,
                             vectors.npy, store.faiss (written once, never modified)
      versions/.staging-*    a version being written (removed if a writer died mid-way)
      .lock                  writers hold an exclusive flock on it; readers never lock

A writer builds the whole version under a staging name, fsyncs it, renames it to versions/<n>
and only then replaces manifest.json by `os.replace` (atomic on POSIX). A reader reads
manifest.json once and loads versions/<n> entirely into memory, so it sees one version,
never a mix, and keeps answering from it whatever later updates do on disk.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Iterator

MANIFEST = "manifest.json"
VERSIONS = "versions"
LOCK = ".lock"
STAGING_PREFIX = ".staging-"
FORMAT = 1  # bump when the files of a version change meaning


class NotAnIndex(FileNotFoundError):
    pass


def read_manifest(root: str | Path, version: int | None = None) -> dict:
    """The current manifest, or the manifest of a given version."""
    path = Path(root) / MANIFEST if version is None else version_dir(root, version) / MANIFEST
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        what = "no ragft index" if version is None else f"no version {version}"
        raise NotAnIndex(f"{root}: {what} (missing {path})") from None


def is_index(root: str | Path) -> bool:
    return (Path(root) / MANIFEST).is_file()


def version_dir(root: str | Path, version: int) -> Path:
    return Path(root) / VERSIONS / str(version)


def list_versions(root: str | Path) -> list[int]:
    folder = Path(root) / VERSIONS
    if not folder.is_dir():
        return []
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit())


@contextlib.contextmanager
def writer_lock(root: str | Path) -> Iterator[None]:
    """One writer at a time per index (readers are never blocked). Cleans up dead writers' staging folders."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    with open(root / LOCK, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            for stale in (root / VERSIONS).glob(f"{STAGING_PREFIX}*"):
                shutil.rmtree(stale, ignore_errors=True)
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def staging_dir(root: str | Path) -> Path:
    path = Path(root) / VERSIONS / f"{STAGING_PREFIX}{uuid.uuid4().hex[:8]}"
    path.mkdir(parents=True)
    return path


def publish(root: str | Path, staged: Path, manifest: dict, keep_versions: int) -> Path:
    """Make `staged` version `manifest["version"]` and the current one; prune old versions. Call under writer_lock."""
    root = Path(root)
    _write_json(staged / MANIFEST, manifest)
    for file in staged.iterdir():
        _fsync(file)
    final = version_dir(root, manifest["version"])
    if final.exists():  # a version number left by a writer that died after its rename: never published
        shutil.rmtree(final)
    os.rename(staged, final)
    _fsync(final.parent)
    tmp = root / f".{MANIFEST}.{uuid.uuid4().hex[:8]}"
    _write_json(tmp, manifest)
    _fsync(tmp)
    os.replace(tmp, root / MANIFEST)  # the moment readers switch
    _fsync(root)
    # Old versions go only after the switch. A reader holds its version in memory, so deleting
    # its files does not affect it; only a reader that reads the old pointer and then loads more
    # than `keep_versions` updates later could miss it, and Index.open retries that case.
    for old in list_versions(root)[:-keep_versions]:
        shutil.rmtree(version_dir(root, old), ignore_errors=True)
    return final


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

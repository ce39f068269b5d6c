"""A build lock left by a killed worker is cleared before DeepSpeed loads its CPU op; a live one is left alone."""

from __future__ import annotations

import os
import time

from ragft.train.extension_lock import SHM_OP, clear_stale_lock, extensions_root


def built_op_with_lock(root, age_s: float, built: bool = True):
    folder = root / SHM_OP
    folder.mkdir(parents=True)
    if built:
        (folder / f"{SHM_OP}.so").write_bytes(b"\x7fELF")
    lock = folder / "lock"
    lock.touch()
    then = time.time() - age_s
    os.utime(lock, (then, then))
    return lock


def test_an_old_lock_beside_a_built_op_is_removed(tmp_path, caplog):
    lock = built_op_with_lock(tmp_path, age_s=3600)
    assert clear_stale_lock(root=tmp_path) and not lock.exists()
    assert str(lock) in caplog.text


def test_a_fresh_lock_or_one_without_a_built_op_is_a_build_in_progress(tmp_path):
    fresh = built_op_with_lock(tmp_path / "fresh", age_s=5)
    unbuilt = built_op_with_lock(tmp_path / "unbuilt", age_s=3600, built=False)
    assert not clear_stale_lock(root=tmp_path / "fresh") and fresh.exists()
    assert not clear_stale_lock(root=tmp_path / "unbuilt") and unbuilt.exists()
    assert not clear_stale_lock(root=tmp_path / "none")


def test_the_root_follows_torch_extensions_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert extensions_root() == tmp_path

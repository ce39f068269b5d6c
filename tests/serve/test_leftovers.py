"""Leftovers of a killed `ragft serve` are cleared only from records the user wrote, and only what ragft started.

Each test puts the records folder in a private XDG_RUNTIME_DIR of its own. The processes are real `sleep`s
of this user; the forged record's folder is a real folder with files, which ragft did not create.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil
import pytest

from ragft.serve import leftovers
from ragft.serve.haproxy import PREFIX, own_folder
from ragft.serve.keys import ADMIN_KEY_ENV, API_KEYS_ENV


@pytest.fixture
def runtime_dir(tmp_path, monkeypatch):
    folder = tmp_path / "runtime"
    folder.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(folder))
    return folder


@pytest.fixture
def victim(tmp_path):
    """A folder of the user's with a file, and a live process whose command line starts with that folder."""
    folder = tmp_path / "home-of-the-user"
    folder.mkdir()
    (folder / "thesis.txt").write_text("years of work")
    os.symlink("/bin/sleep", folder / "sleep")
    process = subprocess.Popen([str(folder / "sleep"), "300"])
    yield folder, psutil.Process(process.pid)
    process.kill()
    process.wait()


def dead_owner() -> dict:
    """The record entry of a command that has ended."""
    ended = subprocess.Popen(["true"])
    entry = {"pid": ended.pid, "create_time": psutil.Process(ended.pid).create_time(), "name": "true"}
    ended.wait()
    return entry


def forge(records: Path, victim_folder: Path, victim_process: psutil.Process) -> Path:
    """A record claiming the victim's folder as HAProxy's, and the victim's pid with another start time."""
    forged = records / "4242.json"
    forged.write_text(json.dumps({
        "owner": dead_owner(),
        "processes": [{"pid": victim_process.pid, "create_time": victim_process.create_time() - 100, "name": "sleep"}],
        "haproxy_folder": str(victim_folder)}))
    return forged


def test_a_forged_record_deletes_and_kills_nothing_through_ragft_serve(runtime_dir, victim, serve_models, tmp_path):
    """The real start path: `ragft serve` clears leftovers, then stops at a port in use (exit 2, before Ray)."""
    folder, process = victim
    records = leftovers.records_folder()
    assert records.parent == runtime_dir
    forge(records, folder, process)
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        env = {k: v for k, v in os.environ.items() if k not in (API_KEYS_ENV, ADMIN_KEY_ENV)}
        proc = subprocess.run([sys.executable, "-m", "ragft", "serve", f"checkpoint={serve_models.alpha}",
                               "index.path=null", f"serve.port={held.getsockname()[1]}",
                               f"out_dir={tmp_path / 'run'}"], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "is in use" in proc.stderr, proc.stdout + proc.stderr
    assert (folder / "thesis.txt").read_text() == "years of work"
    assert process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    assert "stopped" not in proc.stdout, proc.stdout


def test_a_genuine_record_is_cleared(runtime_dir):
    """What a killed serve really left (a recorded process, a folder ragft made) is stopped and removed."""
    folder = Path(tempfile.mkdtemp(prefix=PREFIX))
    (folder / "haproxy.cfg").write_text("global\n")
    os.symlink("/bin/sleep", folder / "haproxy")
    recorded = subprocess.Popen(["sleep", "300"])
    by_folder = subprocess.Popen([str(folder / "haproxy"), "300"])  # a reload HAProxy made after the record
    try:
        entry = {"pid": recorded.pid, "create_time": psutil.Process(recorded.pid).create_time(), "name": "sleep"}
        (leftovers.records_folder() / "4243.json").write_text(json.dumps(
            {"owner": dead_owner(), "processes": [entry], "haproxy_folder": str(folder)}))
        assert own_folder(folder)
        lines = leftovers.clear()
        assert len(lines) == 1 and "stopped 2 process(es)" in lines[0], lines
        assert recorded.wait(timeout=5) is not None and by_folder.wait(timeout=5) is not None
        assert not folder.exists() and not list(leftovers.records_folder().glob("*.json"))
    finally:
        recorded.kill(), by_folder.kill()


@pytest.mark.parametrize("unsafe", ["mode 0755", "symlink"])
def test_an_unsafe_records_folder_is_refused(runtime_dir, victim, tmp_path, unsafe):
    folder, process = victim
    records = runtime_dir / "ragft-serve"
    if unsafe == "symlink":
        elsewhere = tmp_path / "someone-elses"
        elsewhere.mkdir(mode=0o700)
        records.symlink_to(elsewhere)
    else:
        records.mkdir(mode=0o700)
        records.chmod(0o755)
    forge(records, folder, process)
    lines = leftovers.clear()
    assert len(lines) == 1 and lines[0].startswith("warning: ") and str(records) in lines[0], lines
    assert ("is a symlink" if unsafe == "symlink" else "has mode 755, not 700") in lines[0]
    assert (folder / "thesis.txt").exists() and process.is_running()
    assert leftovers.record([], None) is None  # nor does a serve record anything there


def test_only_folders_ragft_made_count_as_its_own(tmp_path):
    made = Path(tempfile.mkdtemp(prefix=PREFIX))
    try:
        assert own_folder(made)
        made.chmod(0o755)
        assert not own_folder(made)  # not as mkdtemp makes it
    finally:
        made.rmdir()
    link = Path(tempfile.gettempdir()) / f"{PREFIX}link-{os.getpid()}"
    link.symlink_to(tmp_path)
    try:
        assert not own_folder(link)
    finally:
        link.unlink()
    elsewhere = tmp_path / f"{PREFIX}x"
    elsewhere.mkdir(mode=0o700)
    assert not own_folder(elsewhere) and not own_folder(Path("/home"))

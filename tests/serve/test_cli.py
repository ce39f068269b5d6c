"""`ragft serve` as a user runs it: a foreground subprocess with its own embedded Ray, stopped by Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import openai
import pytest

from helpers.net import free_port, wait_http
from ragft.serve.keys import ADMIN_KEY_ENV, API_KEYS_ENV


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in (API_KEYS_ENV, ADMIN_KEY_ENV)}
    return env


def test_no_keys_on_a_public_address_is_refused_before_anything_starts(serve_models, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "ragft", "serve", f"checkpoint={serve_models.alpha}",
                           "serve.host=0.0.0.0", "serve.rag.k=0", f"out_dir={tmp_path / 'run'}"],
                          env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "2 problem(s)" in proc.stderr and "no API key is configured" in proc.stderr
    assert "serve.rag.k=0" in proc.stderr


@pytest.mark.ray
def test_foreground_serve_answers_then_sigterm_to_its_group_leaves_nothing(serve_models, sample_index, tmp_path):
    """What systemd, Kubernetes, `docker stop` and Slurm send: SIGTERM to the whole process group, which reaches
    the embedded Ray's own processes as well as the command. It exits 0 within seconds; every process it
    started (Ray's, its workers, HAProxy, which runs outside the group) is gone and every port it held is free.
    HAProxy's stats and Prometheus ports are its own and listen on loopback only."""
    import psutil

    port = free_port()
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "ragft", "serve", f"checkpoint={serve_models.alpha}",
                             f"index.path={sample_index}", f"serve.port={port}", f"out_dir={out}"],
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        health = wait_http(f"http://127.0.0.1:{port}/health", timeout_s=240)
        assert health.json()["models"] == ["base", "ft"] and health.json()["index_version"] == 1
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        response = client.chat.completions.create(model="ft", messages=[{"role": "user", "content": "Hello?"}],
                                                  max_tokens=4)
        assert response.choices[0].message.content is not None and response.citations
        deadline = time.monotonic() + 60
        while not (out / "serve.json").is_file() and time.monotonic() < deadline:  # written once serve.run returns
            time.sleep(0.2)
        side = json.loads((out / "serve.json").read_text())["haproxy"]
        side_ports = [int(url.split(":")[2].split("/")[0]) for url in (side["stats"], side["metrics"])]
        assert 8404 not in side_ports and 9101 not in side_ports  # an instance's own, so instances never collide
        listening = {c.laddr.port: c.laddr.ip for c in psutil.net_connections("tcp") if c.status == "LISTEN"}
        assert [listening.get(p) for p in side_ports] == ["127.0.0.1", "127.0.0.1"], listening
        started = psutil.Process(proc.pid).children(recursive=True) + [
            p for p in psutil.process_iter(["cmdline"]) if any("ragft-haproxy-" in a for a in p.info["cmdline"] or [])]
        assert any(p.name() == "haproxy" for p in started)
        os.killpg(proc.pid, signal.SIGTERM)
        sent = time.monotonic()
        output, _ = proc.communicate(timeout=90)
        seconds = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert proc.returncode == 0, output[-3000:]
    print(f"\nSIGTERM to the group: exited in {seconds:.1f} s")
    assert seconds < 30, seconds
    _, alive = psutil.wait_procs(started, timeout=5)
    assert not alive, [(p.pid, p.name()) for p in alive]
    for taken in [port, *side_ports]:
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", taken))  # raises if anything still holds it
    assert f"http://127.0.0.1:{port}/v1" in output and "ragft serve: stopping" in output
    assert (out / "serve.json").is_file() and (out / "access.log").read_text().count("\n") == 1

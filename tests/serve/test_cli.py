"""`ragft serve` as a user runs it: a foreground subprocess with its own embedded Ray, ended by signals."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

from pathlib import Path

import httpx
import openai
import psutil
import pytest

from helpers.net import free_port, wait_http
from ragft.net import is_loopback
from ragft.serve import leftovers
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


def test_a_port_in_use_is_refused_in_one_line_before_anything_starts(serve_models, tmp_path):
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        proc = subprocess.run([sys.executable, "-m", "ragft", "serve", f"checkpoint={serve_models.alpha}",
                               "index.path=null", f"serve.port={port}", f"out_dir={tmp_path / 'run'}"],
                              env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == (f"ragft serve: port {port} on 127.0.0.1 is in use by pid {os.getpid()} "
                                   f"({' '.join(psutil.Process().cmdline()[:3])}): stop it, or choose another with "
                                   "serve.port="), proc.stderr
    assert "ray" not in proc.stdout.lower()


@pytest.mark.ray
def test_a_serve_already_running_elsewhere_is_refused(ray_cluster, serve_models, compose_serve, tmp_path):
    """serve.start keeps the options of a Serve already up: the command reads them back and refuses to deploy
    on an address it was not asked for, here a public one without keys."""
    from ray import serve

    from ragft.serve.run import ServeElsewhere, check_http_options, run_serve
    from ragft.serve.spec import validate_serve

    running, asked = free_port(), free_port()
    serve.start(http_options={"host": "0.0.0.0", "port": running})
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.delenv(API_KEYS_ENV, raising=False)
            patch.delenv(ADMIN_KEY_ENV, raising=False)
            spec = validate_serve(compose_serve(f"checkpoint={serve_models.alpha}", "index.path=null",
                                                f"serve.port={asked}", f"out_dir={tmp_path / 'run'}"))
        with pytest.raises(ServeElsewhere) as err:
            run_serve(spec, wait=False)
        assert f"already running on 0.0.0.0:{running}, not on serve.host=127.0.0.1 serve.port={asked}" \
            in str(err.value) and "no API key is configured" in str(err.value)
        assert spec.serve.app_name not in serve.status().applications and not (tmp_path / "run" / "serve.json").exists()
        assert check_http_options("0.0.0.0", running, keys_configured=True) == ("0.0.0.0", running)
    finally:
        serve.shutdown()


class Serving:
    """A foreground `ragft serve` in a session of its own, as a process manager starts it."""

    def __init__(self, serve_models, sample_index, port: int, out: Path):
        self.port, self.out = port, out
        self.proc = subprocess.Popen([sys.executable, "-m", "ragft", "serve", f"checkpoint={serve_models.alpha}",
                                      f"index.path={sample_index}", f"serve.port={port}", f"out_dir={out}"],
                                     env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True)
        self.health = wait_http(f"http://127.0.0.1:{port}/health", timeout_s=240).json()
        self.started = self.processes()

    def processes(self) -> list:
        """Every process this serve started: its descendants, and HAProxy, which runs outside its group."""
        return psutil.Process(self.proc.pid).children(recursive=True) + [
            p for p in psutil.process_iter(["cmdline"]) if any("ragft-haproxy-" in a for a in p.info["cmdline"] or [])]

    def signal(self, sig: int, group: bool) -> tuple[str, float]:
        """Send `sig` to the command (or its group); its output and how long it took to exit."""
        (os.killpg if group else os.kill)(self.proc.pid, sig)
        sent = time.monotonic()
        output, _ = self.proc.communicate(timeout=90)
        return output, time.monotonic() - sent

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.communicate()


def assert_gone(processes: list, ports: list[int]) -> None:
    _, alive = psutil.wait_procs(processes, timeout=5)
    assert not alive, [(p.pid, p.name()) for p in alive]
    for taken in ports:
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", taken))  # raises if anything still holds it


@pytest.mark.ray
def test_sigkill_then_sigterm_to_the_process_then_to_its_group(serve_models, sample_index, tmp_path):
    """Three serves in turn on one port, each ended the way process managers end them.

    1. SIGKILL to the command: it cannot stop what it started, and Ray's agents (and at times HAProxy, holding
       the port) outlive it. The next serve clears them, says so, and starts on the same port.
    2. SIGTERM to the command alone: /health stops answering 200 as soon as it stops, a request in flight
       finishes, it exits 0 within 15 s and leaves nothing running.
    3. SIGTERM to its group (systemd, Kubernetes, `docker stop`, Slurm), which reaches the embedded Ray's own
       processes as well: the same, and HAProxy's stats and Prometheus ports were its own, on loopback.
    """
    port = free_port()
    first = Serving(serve_models, sample_index, port, tmp_path / "killed")
    try:
        assert first.health["models"] == ["base", "ft"] and first.health["index_version"] == 1
        first.signal(signal.SIGKILL, group=False)
        time.sleep(2)
        left = [p for p in first.started if p.is_running()]
        assert left, "nothing outlived SIGKILL: this test no longer shows the clearing"
    finally:
        first.kill()

    second = Serving(serve_models, sample_index, port, tmp_path / "terminated")
    try:
        assert not [p for p in left if p.is_running()]
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        stream = client.completions.create(model="ft", prompt="The ferry", max_tokens=400, stream=True,
                                           temperature=1.0, seed=0)
        next(iter(stream))  # in flight
        os.kill(second.proc.pid, signal.SIGTERM)
        sent, codes = time.monotonic(), []  # (seconds after the signal, /health status; 0: refused)
        while time.monotonic() - sent < 15 and (not codes or codes[-1][1] != 0):
            try:
                code = httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code
            except httpx.HTTPError:
                code = 0
            codes.append((round(time.monotonic() - sent, 2), code))
            time.sleep(0.05)
        finishes = [c.choices[0].finish_reason for c in stream if c.choices]
        output, _ = second.proc.communicate(timeout=90)
        seconds = time.monotonic() - sent
    finally:
        second.kill()
    assert second.proc.returncode == 0, output[-3000:]
    assert "stopped" in output and "left by a ragft serve that was killed" in output, output[-3000:]
    # Not ready from the moment the command acts on the signal, and never ready again: our 503 while the app is
    # being deleted, then Ray's proxy's 404 once Serve has dropped the route, then a refused connection.
    first = next(i for i, (_, code) in enumerate(codes) if code != 200)
    assert codes[first][0] < 3 and all(code != 200 for _, code in codes[first:]), codes
    assert finishes[-1] in ("stop", "length"), finishes
    print(f"\nSIGTERM to the process: exited in {seconds:.1f} s; /health answered {codes}")
    assert seconds < 15, seconds
    assert_gone(second.started, [port])

    third = Serving(serve_models, sample_index, port, tmp_path / "group")
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        response = client.chat.completions.create(model="ft", messages=[{"role": "user", "content": "Hello?"}],
                                                  max_tokens=4)
        assert response.choices[0].message.content is not None and response.citations
        # Open mode (no keys): what a web page could send through DNS rebinding or a form post is refused.
        body = json.dumps({"model": "ft", "prompt": "Hi", "max_tokens": 1})
        url = f"http://127.0.0.1:{port}/v1/completions"
        rebound = httpx.post(url, content=body, headers={"host": "attacker.example", "content-type": "application/json"})
        form = httpx.post(url, content=body, headers={"content-type": "text/plain"})
        assert (rebound.status_code, rebound.json()["error"]["code"]) == (403, "invalid_host")
        assert (form.status_code, form.json()["error"]["code"]) == (415, "unsupported_media_type")
        assert httpx.post(url, content=body, headers={"host": f"localhost:{port}",
                                                      "content-type": "application/json"}).status_code == 200
        deadline = time.monotonic() + 60
        while not (third.out / "serve.json").is_file() and time.monotonic() < deadline:  # once serve.run returns
            time.sleep(0.2)
        side = json.loads((third.out / "serve.json").read_text())["haproxy"]
        side_ports = [int(url.split(":")[2].split("/")[0]) for url in (side["stats"], side["metrics"])]
        assert 8404 not in side_ports and 9101 not in side_ports  # an instance's own, so instances never collide
        listening = {c.laddr.port: c.laddr.ip for c in psutil.net_connections("tcp") if c.status == "LISTEN"}
        assert [listening.get(p) for p in side_ports] == ["127.0.0.1", "127.0.0.1"], listening
        started = third.processes()
        assert any(p.name() == "haproxy" for p in started)
        # nothing this serve started (embedded Ray included) listens where other machines reach it, but each
        # replica's gRPC server for calls between deployments: Ray Serve 2.60 binds it to [::] whatever the
        # config (replica.py), and Ray's token guards it
        exposed = [(p.name(), c.laddr) for p in started for c in p.net_connections("inet")
                   if c.status == "LISTEN" and not is_loopback(c.laddr.ip)]
        assert exposed and all(name.startswith("ray::ServeReplica") and addr.ip == "::" for name, addr in exposed) \
            and len(exposed) == len({name for name, _ in exposed}), exposed
        output, seconds = third.signal(signal.SIGTERM, group=True)
    finally:
        third.kill()
    assert third.proc.returncode == 0, output[-3000:]
    print(f"SIGTERM to the group: exited in {seconds:.1f} s")
    assert seconds < 15, seconds
    assert_gone(started, [port, *side_ports])
    assert f"http://127.0.0.1:{port}/v1" in output and "ragft serve: stopping" in output
    assert (third.out / "access.log").read_text().count("\n") == 4  # the chat and the three open-mode requests
    assert not list(leftovers.records_folder().glob("*.json"))  # every serve that stopped removed its record

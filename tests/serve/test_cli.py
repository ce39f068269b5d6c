"""`ragft serve` as a user runs it: a foreground subprocess with its own embedded Ray, stopped by Ctrl-C."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

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
def test_foreground_serve_answers_and_stops_on_ctrl_c(serve_models, sample_index, tmp_path):
    port = free_port()
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "ragft", "serve", f"checkpoint={serve_models.alpha}",
                             f"index.path={sample_index}", f"serve.port={port}", f"out_dir={out}"],
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        health = wait_http(f"http://127.0.0.1:{port}/health", timeout_s=240)
        assert health.json()["models"] == ["base", "ft"] and health.json()["index_version"] == 1
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        response = client.chat.completions.create(model="ft", messages=[{"role": "user", "content": "Hello?"}],
                                                  max_tokens=4)
        assert response.choices[0].message.content is not None and response.citations
        proc.send_signal(signal.SIGINT)
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, output[-3000:]
    assert f"http://127.0.0.1:{port}/v1" in output and "ragft serve: stopping" in output
    assert (out / "serve.json").is_file() and (out / "access.log").read_text().count("\n") == 1

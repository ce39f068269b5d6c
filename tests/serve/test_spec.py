"""validate_serve: every problem listed at once, before Ray; checkpoints resolved and checked; keys hashed."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from ragft.errors import ConfigError
from ragft.serve.keys import ADMIN_KEY_ENV, API_KEYS_ENV, digest, load_keys
from ragft.serve.spec import validate_serve

USER_KEY, ADMIN_KEY = "user-key-0123456789abcdef", "admin-key-0123456789abcdef"


@pytest.fixture
def no_keys(monkeypatch):
    monkeypatch.delenv(API_KEYS_ENV, raising=False)
    monkeypatch.delenv(ADMIN_KEY_ENV, raising=False)


def test_lora_checkpoint_serves_base_and_adapters(compose_serve, serve_models, sample_index, no_keys):
    spec = validate_serve(compose_serve(f"checkpoint={serve_models.alpha}", "serve.name=alpha",
                                        f"+serve.adapters.beta={serve_models.beta}", f"index.path={sample_index}"))
    assert [(m.id, m.kind, m.run_id) for m in spec.models] == [
        ("base", "base", None), ("alpha", "lora", "run-alpha"), ("beta", "lora", "run-beta")]
    assert spec.base_path == str(serve_models.base) and spec.default_model == "alpha"
    assert spec.adapters == {"alpha": str(serve_models.alpha), "beta": str(serve_models.beta)}
    assert not spec.keys.configured


def test_every_problem_at_once(compose_serve, serve_models, tmp_path, no_keys):
    with pytest.raises(ConfigError) as err:
        validate_serve(compose_serve(
            f"checkpoint={serve_models.alpha}", "serve.name=base",  # clashes with the base's id
            f"index.path={tmp_path}",  # not an index
            "serve.host=0.0.0.0",  # no keys configured
            "serve.rag.template='Context: {context}'",  # no {question}
            "serve.rag.k=50", "serve.default_max_tokens=0", "serve.batch.max_batch_size=0",
            "serve.generator.min_replicas=2", "serve.generator.max_replicas=1",
            "serve.detach=true", "index.keep_versions=0"))  # bad closed choices fail at compose already
    text = str(err.value)
    for needle in ("unique", "holds no ragft index", "no API key is configured", "{question}", "serve.rag.k=50",
                   "default_max_tokens=0", "max_batch_size=0", "min_replicas", "serve.detach=true",
                   "index.keep_versions=0"):
        assert needle in text, needle
    assert len(err.value.problems) == 10


def test_non_loopback_host_starts_with_keys(compose_serve, serve_models, monkeypatch):
    monkeypatch.setenv(API_KEYS_ENV, f"{USER_KEY}, another-key-0123456789")
    monkeypatch.setenv(ADMIN_KEY_ENV, ADMIN_KEY)
    spec = validate_serve(compose_serve(f"checkpoint={serve_models.alpha}", "serve.host=0.0.0.0"))
    assert spec.keys.role(f"Bearer {USER_KEY}") == "user"
    assert spec.keys.role(f"Bearer {ADMIN_KEY}") == "admin"
    assert spec.keys.role("Bearer nope") is None and spec.keys.role(None) is None
    assert spec.keys.role(USER_KEY) is None  # no "Bearer " scheme
    # only digests travel to the replicas and into the saved config
    assert USER_KEY not in repr(spec) and USER_KEY not in json.dumps(spec.resolved_config)
    assert digest(USER_KEY) in spec.keys.api


def test_keys_file(tmp_path, no_keys, capsys):
    path = tmp_path / "keys.json"
    path.write_text(json.dumps({"api_keys": [USER_KEY], "admin_keys": [ADMIN_KEY]}))
    path.chmod(0o600)
    keys, problems = load_keys(os.environ, str(path))
    assert not problems and keys.role(f"Bearer {ADMIN_KEY}") == "admin"
    assert "warning" not in capsys.readouterr().err
    path.chmod(0o644)  # the usual umask's: every user of the machine reads the keys
    load_keys(os.environ, str(path))
    assert f"has mode 644: other users of this machine may read the keys; chmod 600 {path}" in capsys.readouterr().err
    path.write_text(json.dumps({"api_keys": ["short"], "admins": []}))
    _, problems = load_keys(os.environ, str(path))
    assert "unknown fields ['admins']" in problems[0]


def test_damaged_checkpoint_is_refused(compose_serve, serve_models, tmp_path, no_keys):
    broken = tmp_path / "alpha"
    shutil.copytree(serve_models.alpha, broken)
    weights = broken / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(ConfigError, match="sha256 mismatch in adapter_model.safetensors"):
        validate_serve(compose_serve(f"checkpoint={broken}"))


def test_checkpoint_latest_and_best(compose_serve, serve_models, tmp_path, no_keys):
    from ragft import registry

    runs, reg = tmp_path / "runs", tmp_path / "registry.jsonl"
    for name, src in (("run-1", serve_models.alpha), ("run-2", serve_models.beta)):
        shutil.copytree(src, runs / name / "checkpoints" / "10")
    os.utime(runs / "run-1" / "checkpoints" / "10" / "manifest.json", (1e9, 1e9))  # run-2 is the newer
    overrides = (f"train_runs_dir={runs}", f"registry.path={reg}")
    # an empty registry: latest is the newest checkpoint on disk; best needs eval metrics
    spec = validate_serve(compose_serve("checkpoint=latest", *overrides))
    assert spec.adapters["ft"] == str(runs / "run-2" / "checkpoints" / "10")
    with pytest.raises(ConfigError, match="no checkpoint in .* has metric 'ft_rag.token_f1'"):
        validate_serve(compose_serve("checkpoint=best", *overrides))
    # registered: latest is the last registered, best the best by registry.best_metric
    registry.record_checkpoint(reg, runs / "run-2" / "checkpoints" / "10", metrics={"ft_rag.token_f1": 0.4})
    registry.record_checkpoint(reg, runs / "run-1" / "checkpoints" / "10", metrics={"ft_rag.token_f1": 0.7})
    assert validate_serve(compose_serve("checkpoint=latest", *overrides)).adapters["ft"] == str(
        runs / "run-1" / "checkpoints" / "10")
    assert validate_serve(compose_serve("checkpoint=best", *overrides)).adapters["ft"] == str(
        runs / "run-1" / "checkpoints" / "10")
    best_min = validate_serve(compose_serve("checkpoint=best", "registry.best_mode=min", *overrides))
    assert best_min.adapters["ft"] == str(runs / "run-2" / "checkpoints" / "10")


def test_adapters_dir_names_and_symlinks(compose_serve, serve_models, tmp_path, no_keys):
    adapters, outside = tmp_path / "adapters", tmp_path / "outside"
    adapters.mkdir()
    shutil.copytree(serve_models.beta, adapters / "beta")
    shutil.copytree(serve_models.beta, outside)
    (adapters / "escape").symlink_to(outside)
    with pytest.raises(ConfigError, match="escape points outside"):
        validate_serve(compose_serve(f"checkpoint={serve_models.alpha}", f"serve.adapters_dir={adapters}"))
    (adapters / "escape").unlink()
    spec = validate_serve(compose_serve(f"checkpoint={serve_models.alpha}", f"serve.adapters_dir={adapters}"))
    assert [m.id for m in spec.models] == ["base", "ft", "beta"]


def test_plain_model_folder_is_served_as_the_base(compose_serve, serve_models, no_keys):
    spec = validate_serve(compose_serve(f"checkpoint={serve_models.base}"))
    assert [(m.id, m.kind) for m in spec.models] == [("base", "base")] and spec.default_model == "base"

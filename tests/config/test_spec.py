"""Config composition and validation: every group composes; a bad config lists all its problems."""

from __future__ import annotations

import subprocess
import sys

import pytest

from ragft.errors import ConfigError
from ragft.model.precision import cpu_has_bf16
from ragft.train.spec import validate_train

GROUPS = {
    "model": ["tiny", "smollm2"],  # smollm2: the GGUF converted once into the suite's cache
    "method": ["full", "lora"],
    "strategy": ["ddp", "zero1", "zero2", "zero3", "zero3_offload"],
    "data": ["sample"],
    "cluster": ["local"],
    "tracking": ["none", "wandb"],
}


@pytest.mark.parametrize("group,option", [(g, o) for g, opts in GROUPS.items() for o in opts])
def test_every_group_option_composes_and_validates(compose_train, group, option):
    spec = validate_train(compose_train(f"{group}={option}"))
    assert getattr(spec, group).name == option


def test_derived_values(compose_train):
    spec = validate_train(compose_train("train.global_batch_size=32", "train.micro_batch_size=4",
                                        "cluster.num_workers=2"))
    assert spec.grad_accum == 4
    assert spec.precision == ("bf16" if cpu_has_bf16() else "fp32")  # no GPU here: the CPU decides
    assert spec.out_dir.startswith("/")
    with pytest.raises(Exception):  # frozen
        spec.seed = 3


def test_config_hash_ignores_out_dir_only(compose_train):
    a = validate_train(compose_train("out_dir=/tmp/a")).config_hash
    b = validate_train(compose_train("out_dir=/tmp/b")).config_hash
    c = validate_train(compose_train("train.lr=0.5")).config_hash
    assert a == b != c


def test_bad_config_reports_every_problem_at_once(compose_train, tmp_path):
    cfg = compose_train(
        "method=qlora",
        "strategy=zero3",
        "train.global_batch_size=10",
        "train.micro_batch_size=4",
        "method.target_modules=[q_proj,not_a_module]",
        f"data.train_path={tmp_path}/missing.jsonl",
        "cluster.use_gpu=true",
    )
    with pytest.raises(ConfigError) as info:
        validate_train(cfg)
    text = "\n".join(info.value.problems)
    assert "qlora needs a CUDA GPU" in text
    assert "qlora needs bitsandbytes" in text
    assert "cannot be combined with ZeRO-3" in text
    assert "global_batch_size=10 is not divisible" in text
    assert "['not_a_module'] not found" in text
    assert "missing.jsonl does not exist" in text
    assert "cluster.use_gpu=true but no CUDA GPU" in text
    assert len(info.value.problems) == 7


def test_missing_required_values_are_listed(compose_train):
    with pytest.raises(ConfigError) as info:
        validate_train(compose_train("data=jsonl"))
    assert info.value.problems == ["data.train_path is required (set data.train_path=...)"]


def _ragft(*args, cwd, env_extra=None):
    import os

    env = dict(os.environ, **(env_extra or {}))
    return subprocess.run([sys.executable, "-m", "ragft", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)


def test_cli_bad_config_exits_2_and_starts_nothing(tmp_path, cache_dir):
    out = tmp_path / "run"
    proc = _ragft("train", f"out_dir={out}", "method=qlora", "strategy=zero3", "train.global_batch_size=7",
                  cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "problem(s); nothing was started" in proc.stderr
    assert "qlora needs a CUDA GPU" in proc.stderr and "global_batch_size=7" in proc.stderr
    assert not (out / "ray").exists() and not (out / "checkpoints").exists()


def test_cli_unknown_key_exits_2(tmp_path, cache_dir):
    proc = _ragft("train", f"out_dir={tmp_path / 'run'}", "train.not_a_key=1", cwd=tmp_path)
    assert proc.returncode == 2
    assert "not_a_key" in proc.stderr


def test_cli_cfg_job_prints_resolved_config(tmp_path, cache_dir):
    proc = _ragft("train", f"out_dir={tmp_path / 'run'}", "strategy=zero3", "--cfg", "job", "--resolve",
                  cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "zero_stage: 3" in proc.stdout
    assert "train.jsonl" in proc.stdout  # the sample path resolved to a real file


def test_bf16_on_cpu_is_accepted_and_auto_follows_the_cpu(compose_train):
    # CPU bf16 is autocast over fp32 weights: allowed on any CPU, chosen by auto only where it is native
    assert validate_train(compose_train("strategy.precision=bf16")).precision == "bf16"
    assert validate_train(compose_train("strategy.precision=fp32")).precision == "fp32"
    with pytest.raises(ConfigError, match="GPU with bf16"):
        validate_train(compose_train("strategy.precision=bf16", "cluster.use_gpu=true"))

"""A vLLM generator replica over several GPUs: serve.tensor_parallel_size × serve.pipeline_parallel_size, validated
against the GPUs a replica gets, the model's heads and layers and its memory plan, and rendered as one Ray Serve
placement group per replica (the layout Ray Serve LLM renders). No GPU and no vLLM needed: nothing starts.

The model is Llama-3-70B by its shipped config.json (ragft/model/configs), the hub id as the checkpoint.
"""

from __future__ import annotations

import pytest

from ragft.config.validation import typed_job_config
from ragft.errors import ConfigError
from ragft.generate import vllm_engine
from ragft.serve.app import generator_options
from ragft.serve.spec import validate_serve

LLAMA3_70B_ON_8 = ["checkpoint=meta-llama/Meta-Llama-3-70B", "serve.engine=vllm", "serve.tensor_parallel_size=8",
                   "serve.generator.num_gpus=8", "serve.generator.num_cpus=1", "index.path=null"]


@pytest.fixture
def vllm_installed(monkeypatch):
    """Validation asks whether vLLM can be imported (it lives in .venv-vllm, not in this venv); the answer of a
    GPU node where it is installed. Nothing here imports or runs it."""
    monkeypatch.setattr(vllm_engine, "available", lambda: True)


def problems_of(cfg) -> list[str]:
    with pytest.raises(ConfigError) as err:
        validate_serve(cfg)
    return err.value.problems


def test_one_gpu_replica_renders_as_before(compose_serve):
    cfg = compose_serve("checkpoint=meta-llama/Meta-Llama-3-70B", "serve.generator.num_gpus=1")
    serve = typed_job_config(cfg).serve
    assert (serve.tensor_parallel_size, serve.pipeline_parallel_size) == (1, 1)
    options = generator_options(serve)
    assert "placement_group_bundles" not in options and options["ray_actor_options"]["num_gpus"] == 1


def test_70b_over_8_gpus_validates_and_renders_one_placement_group_per_replica(compose_serve, vllm_installed):
    spec = validate_serve(compose_serve(*LLAMA3_70B_ON_8, "serve.generator.max_replicas=2"))
    assert spec.base_path == "meta-llama/Meta-Llama-3-70B" and [m.kind for m in spec.models] == ["base"]
    options = generator_options(spec.serve)
    assert options["placement_group_bundles"] == [{"GPU": 1, "CPU": 1}] + [{"GPU": 1}] * 7
    assert options["placement_group_strategy"] == "STRICT_PACK"  # a tensor-parallel group stays on one node
    assert options["ray_actor_options"]["num_gpus"] == 0 and options["ray_actor_options"]["num_cpus"] == 1
    assert options["autoscaling_config"]["max_replicas"] == 2  # each replica is a group of 8 GPUs


def test_pipeline_stages_may_span_nodes(compose_serve, vllm_installed):
    spec = validate_serve(compose_serve(*LLAMA3_70B_ON_8, "serve.tensor_parallel_size=4",
                                        "serve.pipeline_parallel_size=2", "cluster.gpus_per_node=4"))
    options = generator_options(spec.serve)
    assert len(options["placement_group_bundles"]) == 8 and options["placement_group_strategy"] == "PACK"


def test_bad_parallel_settings_are_listed_together(compose_serve, vllm_installed):
    problems = problems_of(compose_serve(*LLAMA3_70B_ON_8, "serve.tensor_parallel_size=3",
                                         "serve.pipeline_parallel_size=2", "cluster.gpus_per_node=2"))
    text = "\n".join(problems)
    assert "3 × 2 = 6 GPUs per generator replica, but serve.generator.num_gpus=8" in text
    assert "serve.tensor_parallel_size=3 exceeds cluster.gpus_per_node=2" in text
    assert "must divide the model's 64 attention heads" in text
    problems = problems_of(compose_serve("checkpoint=meta-llama/Meta-Llama-3-70B", "serve.tensor_parallel_size=2",
                                         "serve.generator.num_gpus=2"))
    assert any("needs serve.engine=vllm" in p for p in problems)


def test_memory_plan_refuses_70b_on_one_gpu_and_names_the_figures(compose_serve, vllm_installed):
    problems = problems_of(compose_serve(*LLAMA3_70B_ON_8, "serve.tensor_parallel_size=1",
                                         "serve.generator.num_gpus=1"))
    assert len(problems) == 1 and problems[0].startswith("memory: a generator replica needs ≈")
    assert "weights 141.1" in problems[0] and "above 72.0 GB" in problems[0]
    # 8 GPUs of 24 GB hold the weights, but not 16 sequences of 8192 tokens: the batch that fits is named
    problems = problems_of(compose_serve(*LLAMA3_70B_ON_8, "cluster.gpu_memory_gb=24"))
    assert "it would fit with serve.batch.max_batch_size=" in problems[0]

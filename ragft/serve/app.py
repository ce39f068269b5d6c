"""`build_app`: the validated serve spec → one Ray Serve application (Ingress → Retriever, TextGenerator)."""

from __future__ import annotations

import dataclasses
import os

from ray.serve import Application
from ray.serve.config import DeploymentActorConfig

from ragft.config.schema import DeploymentConfig, ServeConfig
from ragft.serve.adapters import ACTOR_NAME
from ragft.serve.deployments import Retriever, TextGenerator
from ragft.serve.ingress import Ingress
from ragft.serve.spec import ServeSpec

# Forwarded to the replicas: the offline switches and caches must hold there as they do in the driver.
FORWARDED_ENV = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HOME", "HF_HUB_CACHE", "RAGFT_CACHE",
                 "TOKENIZERS_PARALLELISM", "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD",
                 "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP", "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S")


def build_app(spec: ServeSpec, context_length: int) -> Application:
    s = spec.serve
    engine = dict(base_path=spec.base_path, base_name=spec.base_name, adapters=spec.adapters,
                  full_models=spec.full_models, device=s.device, dtype=s.dtype, max_adapters=s.max_adapters)
    if s.engine == "vllm":
        engine.update(dataclasses.asdict(s.vllm))
        engine.update(tensor_parallel_size=s.tensor_parallel_size, pipeline_parallel_size=s.pipeline_parallel_size)
    # the adapters loaded at runtime, which every generator replica (those started later too) syncs from
    adapter_set = DeploymentActorConfig(name=ACTOR_NAME, actor_class="ragft.serve.adapters:AdapterSet",
                                        init_kwargs={"cap": s.max_adapters}, actor_options={"num_cpus": 0})
    generator = TextGenerator.options(**generator_options(s), deployment_actors=[adapter_set]).bind(
        s.engine, engine, s.batch.enabled, s.batch.max_batch_size, s.batch.batch_wait_timeout_s)
    retriever = None
    if spec.index_path:
        retriever = Retriever.options(**deployment_options(s.retriever)).bind(
            spec.index_path, spec.index, spec.retrieval)
    return Ingress.options(**deployment_options(s.ingress)).bind(retriever, generator, spec, context_length)


def generator_options(s: ServeConfig) -> dict:
    """The generator's deployment options. A vLLM replica over tensor_parallel_size × pipeline_parallel_size GPUs is
    one placement group of that many GPU bundles, as Ray Serve LLM renders it: the replica takes the first bundle's
    CPUs and no GPU of its own, vLLM's Ray workers one GPU bundle each."""
    options = deployment_options(s.generator)
    gpus = s.tensor_parallel_size * s.pipeline_parallel_size
    if gpus > 1:
        actor = options["ray_actor_options"]
        first = {"GPU": 1, **({"CPU": actor["num_cpus"]} if actor["num_cpus"] else {})}
        options["placement_group_bundles"] = [first] + [{"GPU": 1} for _ in range(gpus - 1)]
        # a tensor-parallel group shares one node's GPU links; pipeline stages may sit on different nodes
        options["placement_group_strategy"] = "STRICT_PACK" if s.pipeline_parallel_size == 1 else "PACK"
        actor["num_gpus"] = 0
    return options


def deployment_options(d: DeploymentConfig) -> dict:
    env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
    options = {"max_ongoing_requests": d.max_ongoing_requests,
               "ray_actor_options": {"num_cpus": d.num_cpus, "num_gpus": d.num_gpus,
                                     "runtime_env": {"env_vars": env}}}
    if d.max_replicas > d.min_replicas:
        options["autoscaling_config"] = {"min_replicas": d.min_replicas, "max_replicas": d.max_replicas,
                                         "target_ongoing_requests": d.target_ongoing_requests}
    else:
        options["num_replicas"] = d.min_replicas
    return options

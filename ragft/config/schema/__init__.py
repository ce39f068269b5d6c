"""Typed config schemas: the single home of every default.

Each dataclass is one Hydra config group (or a plain section). YAML files in `ragft/conf/` set only
what differs from these defaults (the groups' choices, recipes; tests/config/test_defaults.py fails on a
YAML value equal to its default); Hydra checks them against these types when it composes, so a misspelt
key, a string where a number belongs, or a value outside a closed choice (an Enum of `choices.py`, e.g.
`cluster.name`, `strategy.precision`) fails at compose time with the allowed values listed.

One module per command, plus the sections several of them share:

| module | schemas |
|---|---|
| `common.py` | model, cluster, tracking, registry: sections of more than one command |
| `train.py` | `ragft train` (conf/train.yaml): method, strategy, data, objective, loop, sweep, `TrainJobConfig` |
| `index.py` | `ragft index` / `ragft search` (conf/index.yaml): corpus, index, retrieval, `IndexJobConfig` |
| `serve.py` | `ragft serve` (conf/serve.yaml): deployments, batching, RAG prompt, vLLM, `ServeJobConfig` |
| `eval.py` | `ragft data raft` (conf/raft.yaml) and `ragft eval` (conf/eval.yaml): questions, RAFT, eval |
| `demo.py` | `ragft demo` (conf/demo.yaml): recipes, `DemoJobConfig` |
| `export.py` | `ragft export` (conf/export.yaml): format, dtype, `ExportJobConfig` |
| `choices.py` | the closed choices (Enums whose members are their own string values) |

Every class is importable from here (`from ragft.config.schema import X`), and `register_configs` stores
each command's primary schema under the name its YAML file lists in `defaults` (`train_schema`, ...).
"""

from __future__ import annotations

from hydra.core.config_store import ConfigStore

from ragft.config.schema.common import ClusterConfig, ModelConfig, RegistryConfig, TrackingConfig
from ragft.config.schema.demo import DemoJobConfig, DemoRecipe
from ragft.config.schema.export import ExportConfig, ExportJobConfig
from ragft.config.schema.eval import EvalConfig, EvalJobConfig, QuestionsConfig, RaftConfig, RaftJobConfig
from ragft.config.schema.index import CorpusConfig, IndexConfig, IndexJobConfig, RetrievalConfig
from ragft.config.schema.serve import (BatchConfig, DeploymentConfig, RagConfig, ServeConfig, ServeJobConfig,
                                       VLLMConfig)
from ragft.config.schema.train import (DataConfig, DpoConfig, LoopConfig, MethodConfig, ObjectiveConfig,
                                       StrategyConfig, SweepConfig, TrainJobConfig)

__all__ = [
    "register_configs",
    # common
    "ClusterConfig", "ModelConfig", "RegistryConfig", "TrackingConfig",
    # train
    "DataConfig", "DpoConfig", "LoopConfig", "MethodConfig", "ObjectiveConfig", "StrategyConfig", "SweepConfig",
    "TrainJobConfig",
    # index
    "CorpusConfig", "IndexConfig", "IndexJobConfig", "RetrievalConfig",
    # serve
    "BatchConfig", "DeploymentConfig", "RagConfig", "ServeConfig", "ServeJobConfig", "VLLMConfig",
    # eval (and RAFT data)
    "EvalConfig", "EvalJobConfig", "QuestionsConfig", "RaftConfig", "RaftJobConfig",
    # demo
    "DemoJobConfig", "DemoRecipe",
    # export
    "ExportConfig", "ExportJobConfig",
]


def register_configs() -> None:
    """Register the schemas so YAML files are validated against them when composed."""
    ConfigStore.instance().store(name="train_schema", node=TrainJobConfig)
    ConfigStore.instance().store(name="index_schema", node=IndexJobConfig)
    ConfigStore.instance().store(name="serve_schema", node=ServeJobConfig)
    ConfigStore.instance().store(name="raft_schema", node=RaftJobConfig)
    ConfigStore.instance().store(name="eval_schema", node=EvalJobConfig)
    ConfigStore.instance().store(name="demo_schema", node=DemoJobConfig)
    ConfigStore.instance().store(name="export_schema", node=ExportJobConfig)

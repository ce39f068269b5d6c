"""The schema of `ragft demo` (conf/demo.yaml): the sample pipeline end to end, one recipe per model, each
stage given as overrides of that stage's own command config rather than as a copy of its sections.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from omegaconf import MISSING

from ragft.config.schema.common import ModelConfig


@dataclass
class DemoRecipe:
    """How `ragft demo` runs each stage for one model: overrides of each command's config, and the handbook."""

    index: list[str] = field(default_factory=list)  # overrides of conf/index.yaml (both builds)
    train: list[str] = field(default_factory=list)  # overrides of conf/train.yaml
    raft: list[str] = field(default_factory=list)  # overrides of conf/raft.yaml
    eval: list[str] = field(default_factory=list)  # overrides of conf/eval.yaml (both evals)
    # Generate a handbook of this many ferries (ragft.sample.generate, same seed) under out_dir/sample and use
    # it instead of the files given; null uses the files as given.
    sample_docs: Optional[int] = None
    # Reading-practice rows (ragft.sample.generate.reading_practice: another fleet, fresh names) mixed into
    # training: a random base must learn to read a context, which a pretrained base can. 0: none.
    reading_rows: int = 0
    epochs: int = 1  # passed to train as train.epochs


@dataclass
class DemoJobConfig:
    """The primary config of `ragft demo` (conf/demo.yaml): the sample pipeline end to end. The model group's
    name picks a recipe from `recipes`; the stage keys below default to that recipe's and can each be overridden."""

    model: ModelConfig = field(default_factory=ModelConfig)  # the recipe of the same name runs (model.name)
    recipes: dict[str, DemoRecipe] = field(default_factory=dict)
    index: list[str] = field(default_factory=list)  # overrides of conf/index.yaml (both builds)
    train: list[str] = field(default_factory=list)  # overrides of conf/train.yaml
    raft: list[str] = field(default_factory=list)  # overrides of conf/raft.yaml
    eval: list[str] = field(default_factory=list)  # overrides of conf/eval.yaml (both evals)
    corpus: str = MISSING  # documents at training time
    corpus_updated: str = MISSING  # the same handbook after an update
    train_questions: str = MISSING  # RAFT input
    questions: str = MISSING  # eval questions, answers as of `corpus`
    questions_updated: str = MISSING  # the same, answers as of `corpus_updated`
    registry_path: str = "runs/registry.jsonl"  # train and eval record here; `checkpoint=best` reads it
    sample_docs: Optional[int] = None  # see DemoRecipe
    reading_rows: int = 0
    epochs: int = 1
    runs_dir: str = "runs/demo"
    out_dir: str = MISSING

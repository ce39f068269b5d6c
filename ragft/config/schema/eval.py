"""The schemas of the commands that work from question files: `ragft data raft` (conf/raft.yaml), which
turns training questions into retrieval-aware fine-tuning rows, and `ragft eval` (conf/eval.yaml), which
scores a checkpoint on eval questions. Both share the question-file section and serve's RAG prompt.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from omegaconf import MISSING

from ragft.config.schema.choices import Dtype, Engine, GoldPosition, OnBadRow
from ragft.config.schema.common import ClusterConfig, RegistryConfig, TrackingConfig
from ragft.config.schema.index import IndexConfig, RetrievalConfig
from ragft.config.schema.serve import RagConfig, VLLMConfig


@dataclass
class QuestionsConfig:
    """A question file (DESIGN.md §3): {id, question, answer, doc_ids?} per line."""

    path: str = MISSING
    on_bad_row: OnBadRow = OnBadRow.error  # error: stop with file and line | skip: skip and count
    # eval only: the same questions answered as of training time. Questions whose answer differs (or that
    # it lacks) are "changed", the rest "unchanged": the report splits every metric by it. Without it a
    # row's own boolean `changed` key is used when every row has one.
    changed_from: Optional[str] = None


@dataclass
class RaftConfig:
    """Retrieval-aware fine-tuning examples (RAFT): the question inside the RAG prompt serve builds,
    answered from the context when the gold chunk is there and from memory when it is not."""

    out_path: str = MISSING  # the chat JSONL written (train on it with data=jsonl data.train_path=...)
    k: int = 4  # chunks per context: the k eval and serve put in the prompt
    copies: int = 1  # examples per question (each draws its own kind, distractors and order)
    # A seeded sample of this many training questions (null: all): training time grows with the rows, and a
    # pretrained model learns the answer style and to read its context from a few hundred.
    max_questions: Optional[int] = None
    # no context at all: the prompt a model without retrieval sees, which keeps it answering from memory too
    closed_book_fraction: float = 0.25
    # of the rest (RAFT's P): the gold chunk among distractors; otherwise distractors only, answered from memory
    gold_fraction: float = 0.8
    # Of the gold examples: the answer is swapped, in the chunk and in the reply, for another question's
    # answer of the same shape (digits, capitals, length). The reply is then only right if read from the
    # context, which is what teaches a model to follow an updated document over what it memorised.
    counterfactual_fraction: float = 0.5
    # Of the counterfactual examples: the swapped answer is made up (new names, new digits, the same shape)
    # instead of another question's answer. A known answer can be recalled once the context points at it; a
    # made-up one can only be copied, and that is what a document updated to a new value asks of the model.
    fresh_fraction: float = 0.0
    distractor_depth: int = 12  # distractors are drawn from this many retrieved non-gold chunks (hard negatives)
    # retrieved: the context is what the index returns for the question (the gold chunk where it ranks, or in
    # place of the last hit when it misses): the served distribution. random: the gold chunk at any position
    # among sampled distractors (the RAFT paper): the model must find it by content.
    gold_position: GoldPosition = GoldPosition.retrieved
    system: Optional[str] = None  # a system message on every example
    # Preference pairs for `ragft train objective=dpo` instead of chat rows: {prompt, chosen, rejected} where the
    # prompt holds the gold chunk (kinds gold and counterfactual only), chosen is the value in that context and
    # rejected is the stale value (counterfactual: the answer the chunk said before the swap) or a distractor
    # value (gold: another question's answer for the same attribute, or of the same shape).
    pairs: bool = False


@dataclass
class RaftJobConfig:
    """The primary config of `ragft data raft` (conf/raft.yaml)."""

    qa: QuestionsConfig = field(default_factory=QuestionsConfig)  # training questions, never the eval ones
    index: IndexConfig = field(default_factory=IndexConfig)  # built from the corpus the questions are about
    # as serve's: the distractors are what serving really puts beside the answer
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)
    rag: RagConfig = field(default_factory=RagConfig)  # must equal serve.rag: the prompt trained on is the one served
    raft: RaftConfig = field(default_factory=RaftConfig)
    seed: int = 0
    runs_dir: str = "runs/data"
    out_dir: str = MISSING


@dataclass
class EvalConfig:
    """How `ragft eval` scores: which systems, how long answers may be, how the work is spread."""

    systems: list[str] = field(default_factory=lambda: ["base", "base_rag", "ft", "ft_rag"])
    max_tokens: int = 24  # per answer, greedy; short-answer questions need few, and each costs every system a step
    batch_size: int = 32  # questions per generation batch (one Ray task): larger decodes faster, each answer later
    num_workers: int = 2  # Ray actors, each holding the base and the fine-tuned model (a LoRA one shares the base)
    cpus_per_worker: int = 1
    use_gpu: bool = False
    # auto: the precision training used on this hardware (bfloat16 where the device has native bf16, else
    # float32) | float32 | bfloat16 | float16. float32 costs speed on bf16 hardware and matches fp32 references.
    dtype: Dtype = Dtype.auto
    perplexity: bool = True  # teacher-forced perplexity of the answers under each system: cheap next to generation
    # transformers: ragft's engine (ragft.generate.transformers_engine); vllm: vLLM's (LoRA checkpoints,
    # eval.perplexity=false: vLLM 0.32 computes no prompt logprobs with an adapter loaded)
    engine: Engine = Engine.transformers
    vllm: VLLMConfig = field(default_factory=VLLMConfig)
    max_questions: Optional[int] = None  # the first N questions only (a quick look)
    disagreements: int = 30  # per-question rows in report.md where the systems disagree


@dataclass
class EvalJobConfig:
    """The primary config of `ragft eval` (conf/eval.yaml)."""

    checkpoint: str = MISSING  # a train checkpoint folder (LoRA or full), latest or best
    base: Optional[str] = None  # the model `base` means; null: the one the checkpoint was trained from
    qa: QuestionsConfig = field(default_factory=QuestionsConfig)
    index: IndexConfig = field(default_factory=IndexConfig)  # index.path null: only base and ft are scored
    # as serve's: the prompt scored is the one served
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)
    rag: RagConfig = field(default_factory=RagConfig)  # must equal serve.rag (same prompt as served)
    eval: EvalConfig = field(default_factory=EvalConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    registry: RegistryConfig = field(default_factory=RegistryConfig)  # scores are recorded on the checkpoint
    seed: int = 0
    runs_dir: str = "runs/eval"
    train_runs_dir: str = "runs/train"  # where checkpoint=latest looks when the registry has none
    out_dir: str = MISSING

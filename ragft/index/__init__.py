"""The retrieval index: documents → chunks → embeddings → a versioned FAISS + BM25 index.

    from ragft.index import Index
    index = Index.open("runs/index/sample")      # the current version, held in memory
    hits = index.search("Who skippers the Grerel?", k=5)   # [Hit(doc_id, chunk_id, text, score, start, end)]
    index.version                                 # stays put until index.reload()

Modules, one job each: documents (ingest), chunking, embed (the model), embed_jobs (in-process or ray_embed),
store (FAISS), bm25,
tables (the files of a version), versions (layout, atomic publish), update (the writer),
index (the reader), spec (config validation), build (the `ragft index` / `ragft search` entry points).
"""

from ragft.index.index import Hit, Index

__all__ = ["Hit", "Index"]

"""Benchmark: index build throughput, and query latency / recall of flat vs IVF vs HNSW.

1. Build: `ragft index` (ragft.index.update) on N synthetic ferry documents in the sample's style,
   embedding in-process and as a Ray Data job (index.num_workers workers, forced with
   ray_min_chunks=0); prints chunks/s end to end and for the embedding step alone.
2. Search: single-query latency p50/p99 (batch 1, as a server answers) of each FAISS kind at 10k
   and 100k chunks, with recall@10 of IVF and HNSW against exact flat search.
   Embedding 100k chunks takes a quarter of an hour on 2 cores, so by default the store vectors
   are made from the real embeddings of the built documents: each synthetic vector is a random
   blend of two real ones plus noise, normalised (it keeps the anisotropy of real embeddings that
   approximate indexes exploit; isotropic random vectors would understate their recall). Queries
   are real embedded questions. `--real-vectors` embeds real texts for every chunk instead.

    python launch/bench_index.py [--docs 2000] [--sizes 10000 100000] [--queries 500] [--workers 2]
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parent.parent


def synthetic_corpus(n: int, seed: int = 1) -> tuple[list[dict], list[str]]:
    """n ferry documents in the sample's style (made-up names, 4-6 facts each) and one question per document.

    The sample generator's fleet, with values that may repeat across ferries (the sample keeps them
    unique, which caps it at a few hundred ferries).
    """
    from ragft.sample.attributes import BY_KEY
    from ragft.sample.generate import Fleet, render_document

    fleet, rng = Fleet(seed, unique=False), random.Random(seed)
    ferries = [fleet.ferry(i) for i in range(1, n + 1)]
    questions = [BY_KEY[rng.choice(list(f.facts))].held_out.format(name=f.name) for f in ferries]
    return [render_document(f, seed, 1) for f in ferries], questions


def build_spec(corpus_path: Path, index_path: Path, *overrides: str):
    from ragft.config.compose import compose_config
    from ragft.index.spec import validate_index

    return validate_index(compose_config("index", [f"corpus.path={corpus_path}", f"index.path={index_path}",
                                                   f"out_dir={index_path.parent / 'run'}", *overrides]))


def bench_build(args, work: Path, embedder) -> np.ndarray:
    """Build the same corpus in-process and with Ray Data; return its chunk vectors."""
    import json

    from ragft.index import tables, versions
    from ragft.index.update import update_index

    docs, _ = synthetic_corpus(args.docs)
    corpus = work / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(d) + "\n" for d in docs))
    vectors = None
    runs = (("in-process", "inproc", ["index.ray_min_chunks=1000000000"]),
            (f"Ray Data x{args.workers}", "ray", ["index.ray_min_chunks=0", f"index.num_workers={args.workers}"]))
    for label, name, overrides in runs:
        path = work / f"index-{name}"
        started = time.perf_counter()
        stats = update_index(build_spec(corpus, path, *overrides), embedder=embedder if label == "in-process" else None)
        total = time.perf_counter() - started
        print(f"build {label:<14} {stats.chunks} chunks from {stats.documents} docs: {total:6.1f} s end to end "
              f"({stats.chunks / total:5.0f} chunks/s); embedding {stats.seconds['embed']:.1f} s "
              f"({stats.chunks / stats.seconds['embed']:.0f} chunks/s, Ray start-up and model loads included)",
              flush=True)
        if vectors is None:
            vectors = np.array(tables.read_vectors(versions.version_dir(path, 1) / tables.VECTORS))
    return vectors


def blended(base: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    i, j = rng.integers(0, len(base), n), rng.integers(0, len(base), n)
    w = rng.uniform(0.5, 1.0, (n, 1)).astype(np.float32)
    v = w * base[i] + (1 - w) * base[j] + rng.normal(0, 0.03, (n, base.shape[1])).astype(np.float32)
    return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)


def latency(index, queries: np.ndarray, k: int) -> tuple[float, float, np.ndarray]:
    from ragft.index import store

    for q in queries[:20]:  # warm caches
        store.search(index, q[None], k)
    times, ids = [], []
    for q in queries:
        t = time.perf_counter()
        _, found = store.search(index, q[None], k)
        times.append(time.perf_counter() - t)
        ids.append(found[0])
    times_ms = np.array(times) * 1000
    return float(np.percentile(times_ms, 50)), float(np.percentile(times_ms, 99)), np.array(ids)


def bench_search(args, base: np.ndarray, embedder) -> None:
    from ragft.index import store

    rng = np.random.default_rng(0)
    _, questions = synthetic_corpus(args.docs)
    queries = embedder.encode_queries(random.Random(0).sample(questions, min(args.queries, len(questions))))
    for size in args.sizes:
        if args.real_vectors:
            docs, _ = synthetic_corpus(size, seed=2)
            vectors = embedder.encode([d["title"] + "\n" + d["text"] for d in docs])
        else:
            vectors = blended(base, size, rng)
        ids = np.arange(size, dtype=np.int64)
        exact = None
        # Query-time knobs are swept on one built index each: (kind, label, params).
        settings = [("flat", "exact", store.StoreParams())]
        settings += [("ivf", f"nprobe {n}", store.StoreParams(ivf_nprobe=n)) for n in args.nprobe]
        settings += [("hnsw", f"efSearch {e}", store.StoreParams(hnsw_ef_search=e)) for e in args.ef_search]
        built: dict[str, tuple[object, float]] = {}
        for kind, label, params in settings:
            if kind not in built:
                t = time.perf_counter()
                built[kind] = (store.build(kind, vectors, ids, params, vectors.shape[1]), time.perf_counter() - t)
            index, seconds = built[kind]
            store.configure(index, params)
            p50, p99, found = latency(index, queries, 10)
            if kind == "flat":
                exact = found
            recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, exact)])
            shape = f"nlist {index.nlist}, " if kind == "ivf" else "M 32, " if kind == "hnsw" else ""
            print(f"search {size:>7} chunks {kind:<4} p50 {p50:6.2f} ms  p99 {p99:6.2f} ms  recall@10 {recall:.3f}  "
                  f"build {seconds:5.1f} s  ({shape}{label})", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--docs", type=int, default=2000, help="synthetic documents built (about 1 chunk each)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--queries", type=int, default=500)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--nprobe", type=int, nargs="+", default=[32, 64, 128])
    parser.add_argument("--ef-search", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--real-vectors", action="store_true", help="embed real texts for every chunk (slow)")
    parser.add_argument("--skip-build", action="store_true")
    args = parser.parse_args()

    import faiss

    from ragft.index.embed import DEFAULT_MODEL, Embedder

    print(f"{os.cpu_count()} CPUs, faiss {faiss.__version__} ({faiss.omp_get_max_threads()} threads)", flush=True)
    embedder = Embedder(DEFAULT_MODEL, device="cpu")
    with tempfile.TemporaryDirectory() as tmp:
        if args.skip_build:
            docs, _ = synthetic_corpus(args.docs)
            base = embedder.encode([d["title"] + "\n" + d["text"] for d in docs])
        else:
            base = bench_build(args, Path(tmp), embedder)
    bench_search(args, base, embedder)


if __name__ == "__main__":
    main()

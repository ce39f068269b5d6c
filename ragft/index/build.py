"""Entry points of `ragft index` and `ragft search`, called by ragft.cli after validation.

  ragft index  → validate_index → run_index  → ragft.index.update.update_index → a new version
  ragft search → validate_index(command="search") → run_search → Index.open(...).search(...)
"""

from __future__ import annotations

import time
from dataclasses import asdict

from ragft.index.index import Hit, Index
from ragft.index.spec import IndexSpec, validate_index
from ragft.index.update import update_index

__all__ = ["run_index", "run_search", "validate_index"]


def run_index(spec: IndexSpec) -> dict:
    """Build or update the index at `spec.index_path`; print one line saying what happened; return the stats."""
    started = time.perf_counter()
    stats = update_index(spec)
    result = {"index_path": spec.index_path, **asdict(stats), "total_seconds": round(time.perf_counter() - started, 2)}
    what = "published version" if stats.published else "unchanged at version"
    deleted = f", {stats.deleted} deleted" if stats.deleted else ""
    skipped = f", {stats.bad_rows_skipped} bad rows skipped" if stats.bad_rows_skipped else ""
    print(f"ragft index: {what} {stats.version} → {spec.index_path} ({stats.documents} documents, "
          f"{stats.chunks} chunks, {stats.kind}; {stats.added} added, {stats.changed} changed, "
          f"{stats.unchanged} unchanged{deleted}{skipped}; {stats.embedded_chunks} chunks embedded, "
          f"{result['total_seconds']:.1f} s)", flush=True)
    return result


def run_search(spec: IndexSpec) -> list[Hit]:
    """The best `spec.k` hits for `spec.query` from the current version of the index."""
    index = Index.open(spec.index_path, retrieval=spec.retrieval, device=spec.index.device)
    return index.search(spec.query, spec.k)

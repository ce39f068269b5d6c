"""BM25 (Okapi, Lucene's idf) over the chunks of one index version, in numpy.

Why BM25 at all: domain corpora are full of names and codes ("Fousond", "M-61") that a small
embedding model splits into sub-words and barely separates, while an exact term match finds them.
Built in memory when a version is opened (a few seconds per 100k chunks): it depends on every
chunk of the version, so it is cheaper to rebuild than to keep in step with updates on disk.

Tokens are lower-cased words; a hyphenated code also yields its parts ("m-61", "m", "61"), so
"M-61" and "route 61" both match it.
"""

from __future__ import annotations

import re
from typing import Sequence

import numpy as np

_WORD = re.compile(r"\w+(?:-\w+)*")
# Words so common in questions that they only add noise; idf already shrinks the rest.
STOPWORDS = frozenset(
    "a an and are as at be by did do does for from has have her his how in is it its of on or she "
    "that the their them they this to was what when where which who whom whose why will with".split()
)


def tokenize(text: str) -> list[str]:
    out = []
    for word in _WORD.findall(text.lower()):
        if word in STOPWORDS:
            continue
        out.append(word)
        if "-" in word:
            out.extend(p for p in word.split("-") if p not in STOPWORDS)
    return out


class BM25:
    """Scores of every chunk for a query: sum over the query's distinct terms of
    idf · tf·(k1+1) / (tf + k1·(1-b+b·len/avglen)), Robertson's Okapi BM25 with the query-term frequency
    saturated at once (k3 = 0). A term repeated in the query counts once: the cost of a query is bounded by
    its vocabulary, not its length, and repeating a word does not outweigh the rest of the question."""

    def __init__(self, texts: Sequence[str], k1: float = 1.2, b: float = 0.75):
        self.num_docs = len(texts)
        postings: dict[str, dict[int, int]] = {}
        lengths = np.zeros(self.num_docs, dtype=np.float32)
        for row, text in enumerate(texts):
            tokens = tokenize(text)
            lengths[row] = len(tokens)
            for token in tokens:
                counts = postings.setdefault(token, {})
                counts[row] = counts.get(row, 0) + 1
        avg = float(lengths.mean()) if self.num_docs and lengths.mean() > 0 else 1.0
        norm = k1 * (1 - b + b * lengths / avg)
        # One flat array of (row, weight) per term, sliced by offsets: the whole weight matrix
        # precomputed once, so a query is a few numpy adds.
        self._term_slot: dict[str, int] = {}
        offsets, rows_parts, weights_parts, cursor = [0], [], [], 0
        for slot, (term, counts) in enumerate(postings.items()):
            rows = np.fromiter(counts.keys(), dtype=np.int64, count=len(counts))
            tf = np.fromiter(counts.values(), dtype=np.float32, count=len(counts))
            idf = np.log1p((self.num_docs - len(counts) + 0.5) / (len(counts) + 0.5))
            rows_parts.append(rows)
            weights_parts.append((idf * tf * (k1 + 1) / (tf + norm[rows])).astype(np.float32))
            cursor += len(counts)
            offsets.append(cursor)
            self._term_slot[term] = slot
        self._offsets = np.asarray(offsets, dtype=np.int64)
        self._rows = np.concatenate(rows_parts) if rows_parts else np.zeros(0, dtype=np.int64)
        self._weights = np.concatenate(weights_parts) if weights_parts else np.zeros(0, dtype=np.float32)

    def scores(self, query: str) -> np.ndarray:
        scores = np.zeros(self.num_docs, dtype=np.float32)
        for token in dict.fromkeys(tokenize(query)):
            slot = self._term_slot.get(token)
            if slot is None:
                continue
            lo, hi = self._offsets[slot], self._offsets[slot + 1]
            scores[self._rows[lo:hi]] += self._weights[lo:hi]  # rows are unique within one term
        return scores

    def top(self, query: str, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(rows, scores) of the best `k` chunks with a positive score, best first."""
        scores = self.scores(query)
        hits = np.flatnonzero(scores > 0)
        if len(hits) > k:
            hits = hits[np.argpartition(-scores[hits], k - 1)[:k]]
        order = hits[np.lexsort((hits, -scores[hits]))]  # ties: lower row first, deterministic
        return order, scores[order]

"""Scoring one answer or one retrieval against the gold, and averaging scores: pure functions, no torch.

Answer metrics compare normalized text the way SQuAD does (lowercase, no punctuation, no articles,
single spaces), so "The Krofel Yard." and "krofel yard" are the same answer. Retrieval metrics are
per document, not per chunk: the retriever returns chunks, and two chunks of one gold document
found the same document once. A metric that cannot be computed for a question (no gold documents,
nothing cited) is None rather than 0, and the averages skip it, so questions without gold
documents neither help nor hurt retrieval scores.
"""

from __future__ import annotations

import math

import re
import string
import unicodedata
from collections import Counter
from typing import Iterable, Sequence

_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize(text: str) -> str:
    """SQuAD's answer normalization: lowercase, drop punctuation, drop a/an/the, collapse whitespace.

    Punctuation is ASCII `string.punctuation` (as in SQuAD) plus every Unicode punctuation
    character, so a model's curly quotes or dashes do not cost it a match.
    """
    text = "".join(c for c in text.lower() if not _is_punctuation(c))
    return " ".join(_ARTICLES.sub(" ", text).split())


def _is_punctuation(char: str) -> bool:
    return char in string.punctuation or unicodedata.category(char).startswith("P")


def _tokens(text: str) -> list[str]:
    return normalize(text).split()


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when both normalize to the same string, else 0.0."""
    return float(normalize(prediction) == normalize(reference))


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD token F1: harmonic mean of precision and recall of the tokens the two share.

    Shared tokens count as a multiset (a token twice in both counts twice, twice in one and once in
    the other counts once). Both empty after normalizing is a match (1.0), one empty is 0.0.
    """
    pred, ref = _tokens(prediction), _tokens(reference)
    if not pred or not ref:
        return float(pred == ref)
    same = sum((Counter(pred) & Counter(ref)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


def contains(prediction: str, reference: str) -> float:
    """1.0 when the normalized reference occurs in the normalized prediction as a run of whole tokens.

    Whole tokens, so "Yard" does not contain "Krofel Yard" and "Yardley" does not contain "Yard";
    a run, so the reference's tokens must appear together and in order. This credits a right answer
    wrapped in a sentence, which exact match does not. An empty reference is contained only in an
    empty prediction, as in `exact_match`.
    """
    pred, ref = _tokens(prediction), _tokens(reference)
    if not ref:
        return float(not pred)
    width = len(ref)
    return float(any(pred[i:i + width] == ref for i in range(len(pred) - width + 1)))


def _distinct(doc_ids: Iterable[str]) -> list[str]:
    """`doc_ids` without repeats, each at its first (best) rank."""
    return list(dict.fromkeys(doc_ids))


def recall_at_k(retrieved_doc_ids: Sequence[str], gold: Sequence[str], k: int) -> float | None:
    """Share of the distinct gold documents among the first `k` distinct retrieved documents.

    `retrieved_doc_ids` is the document id of each retrieved chunk, best first; repeats are dropped
    before cutting at `k`, so k counts documents. None when there is no gold document.
    """
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    wanted = set(gold)
    if not wanted:
        return None
    found = wanted.intersection(_distinct(retrieved_doc_ids)[:k])
    return len(found) / len(wanted)


def reciprocal_rank(retrieved_doc_ids: Sequence[str], gold: Sequence[str]) -> float | None:
    """1 / rank of the first gold document among the distinct retrieved documents (rank 1 is the
    best), 0.0 when none was retrieved, None when there is no gold document."""
    wanted = set(gold)
    if not wanted:
        return None
    for rank, doc_id in enumerate(_distinct(retrieved_doc_ids), start=1):
        if doc_id in wanted:
            return 1 / rank
    return 0.0


def citation_accuracy(cited_doc_ids: Sequence[str], gold: Sequence[str]) -> float | None:
    """Share of the cited chunks whose document is a gold one.

    One entry per cited chunk, repeats kept: citing two chunks of a wrong document is two wrong
    citations. None when there is no gold document or the answer cites nothing (how often answers
    cite at all is a separate number, not a zero here).
    """
    wanted = set(gold)
    if not wanted or not cited_doc_ids:
        return None
    return sum(doc_id in wanted for doc_id in cited_doc_ids) / len(cited_doc_ids)


def mean(values: Iterable[float | None]) -> float | None:
    """Arithmetic mean of the values that are not None; None when no value is left."""
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def finite(value) -> float | None:
    """`value` if it is a finite number (not a bool), else None: what a report may compare, rank or plot."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return value

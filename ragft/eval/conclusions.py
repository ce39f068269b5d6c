"""What an eval's numbers say about the question ragft exists for, in sentences that name their metric.

Each comparison of two systems on a split has a headline metric chosen by one rule, HEADLINE_RULE,
which is also the first conclusion so every report states it: exact match, unless a system in the
comparison answers in sentences, then contains. A model that replies "The ferry docks at Drastond."
is right and scores 0 exact match; a model that replies "Drastond" is judged by the stricter
metric. Exact match implies contains, so contains - exact match is exactly the share of replies that
hold the reference without being it. The other rate (where it points another way than the headline)
and the reference answer's perplexity stand beside the headline as evidence.

"Answers do not follow the updated documents" is said only when neither the headline nor the
evidence says that retrieval helps; when they disagree the sentence says "mixed" and gives both.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from ragft.eval.metrics import finite

SENTENCE_GAP = 0.10  # contains - exact match at or above this: the system answers in sentences
PERPLEXITY_RATIO = 1.1  # one perplexity at least 10% below the other favours that system
_PPL_MARGIN = f"{PERPLEXITY_RATIO - 1:.0%}"
HEADLINE_RULE = ("headline metric of each comparison: exact match, unless a system in it answers in sentences "
                 f"(contains - exact match >= {SENTENCE_GAP:.2f}: on {SENTENCE_GAP:.0%} of the questions or more its "
                 "reply holds the reference answer without being it), then contains; beside it, as evidence: the "
                 "other of the two where it points another way, and the reference answer's perplexity (it counts "
                 f"when one is at least {_PPL_MARGIN} lower)")
TITLES = {"exact_match": "exact match", "contains": "contains", "perplexity": "reference perplexity"}
PAIRS = (("ft", "base"), ("ft_rag", "base_rag"), ("base_rag", "base"), ("ft_rag", "ft"))
TWINS = (("ft_rag", "ft"), ("base_rag", "base"))  # a RAG system and the same model without retrieval
STYLE_PAIRS = (("ft", "base"), ("ft_rag", "base_rag"))  # fine-tuned vs the model it was trained from


@dataclass(frozen=True)
class Evidence:
    """One metric's values for systems a and b, and which it favours (+1 a, -1 b, 0 neither)."""

    metric: str
    a: float
    b: float
    sign: int

    def text(self, a: str, b: str) -> str:
        values = f"{TITLES[self.metric]} {_value(self.metric, self.a)} vs {_value(self.metric, self.b)}"
        if self.sign:
            return f"{values} favours {a if self.sign > 0 else b}"
        return values + (f" is within {_PPL_MARGIN}" if self.metric == "perplexity" else " ties")


@dataclass(frozen=True)
class Comparison:
    """System a against system b on one split: the headline and the evidence beside it."""

    a: str
    b: str
    headline: Evidence
    evidence: tuple[Evidence, ...]

    def clause(self) -> str:
        """'; contains 0.300 vs 0.000 favours base_rag, reference perplexity 10.00 vs 838.0 favours base_rag'."""
        return "; " + ", ".join(e.text(self.a, self.b) for e in self.evidence) if self.evidence else ""

    @property
    def evidence_favours_a(self) -> bool:
        return any(e.sign > 0 for e in self.evidence)


def conclusions(result: dict) -> list[str]:
    """Sentences about fine-tuning and retrieval from `result["metrics"]` (only where the numbers say it)."""
    got = result["metrics"]
    split = "unchanged" if "unchanged" in got else "all"
    facts = "unchanged facts" if split == "unchanged" else "these questions"
    table = got.get(split, {})
    lines = []
    for a, b in PAIRS:
        c = compare(table, a, b)
        if c is not None:
            h = c.headline
            verdict = "beats" if h.sign > 0 else "ties with" if h.sign == 0 else "does not beat"
            lines.append(f"{facts}: {a} {verdict} {b} ({TITLES[h.metric]} {h.a:.3f} vs {h.b:.3f}){c.clause()}")
    lines += _style(table, facts)
    # Only an eval against the updated answers (qa.changed_from) measures following an update: the
    # "changed" split of an eval on the original handbook holds facts that are yet to change.
    if "changed" in got and any(row.get("stale") is not None for row in got["changed"].values()):
        changed = got["changed"]
        lines += [_updated_value(system, changed[system]) for system in result["systems"]
                  if _rate(changed.get(system, {}), "exact_match") is not None]
        lines += [sentence for rag, plain in TWINS if (sentence := _follows(changed, rag, plain))]
    return [HEADLINE_RULE] + lines if lines else []


def headline_metric(a: dict, b: dict) -> str:
    """'contains' when either row answers in sentences (contains - exact match >= SENTENCE_GAP), else 'exact_match'."""
    return "contains" if _in_sentences(a) or _in_sentences(b) else "exact_match"


def compare(table: dict, a: str, b: str) -> Optional[Comparison]:
    """System a against b in one split's table (system -> metric -> value); None when either lacks exact match."""
    ra, rb = table.get(a, {}), table.get(b, {})
    if _rate(ra, "exact_match") is None or _rate(rb, "exact_match") is None:
        return None
    metric = headline_metric(ra, rb)
    headline = _evidence(metric, ra, rb)
    evidence = []
    other = "exact_match" if metric == "contains" else "contains"
    if _rate(ra, other) is not None and _rate(rb, other) is not None:
        said = _evidence(other, ra, rb)
        if said.sign != headline.sign:  # agreeing rates add nothing to the headline
            evidence.append(said)
    if finite(ra.get("perplexity")) is not None and finite(rb.get("perplexity")) is not None:
        evidence.append(_evidence("perplexity", ra, rb))
    return Comparison(a, b, headline, tuple(evidence))


def _style(table: dict, facts: str) -> list[str]:
    """Knowledge without the reference's short form, and fine-tuning teaching that form."""
    lines = [f"{facts}: {system} finds the answer (contains {row['contains']:.3f}) but not in the reference's "
             f"short form (exact match {row['exact_match']:.3f})"
             for system, row in table.items() if _in_sentences(row)]
    for ft, base in STYLE_PAIRS:
        rf, rb = table.get(ft, {}), table.get(base, {})
        has_both = _rate(rf, "exact_match") is not None and _rate(rf, "contains") is not None
        if (has_both and _in_sentences(rb) and not _in_sentences(rf)
                and _sign(rf["exact_match"], rb["exact_match"]) > 0):
            lines.append(f"{facts}: fine-tuning learns the answer style: {ft} exact match {rf['exact_match']:.3f} "
                         f"vs {base} {rb['exact_match']:.3f} (contains {rf['contains']:.3f} vs {rb['contains']:.3f})")
    return lines


def _updated_value(system: str, row: dict) -> str:
    if not _in_sentences(row):
        stale = "" if _rate(row, "stale") is None else (
            f", the value from before the update {row['stale']:.3f} (stale)")
        return f"changed facts: {system} answers the updated value {row['exact_match']:.3f} (exact match){stale}"
    # stale is an exact match with the old answer: a reply in sentences is never counted stale
    stale = "" if _rate(row, "stale") is None else f"; stale {row['stale']:.3f} counts exact answers only"
    return (f"changed facts: {system} finds the updated value (contains {row['contains']:.3f}) but not in the "
            f"reference's short form (exact match {row['exact_match']:.3f}){stale}")


def _follows(changed: dict, rag: str, plain: str) -> Optional[str]:
    """Whether `rag`'s answers on changed facts follow the updated documents, against its non-RAG twin."""
    c = compare(changed, rag, plain)
    if c is None:
        return None
    h = c.headline
    numbers = f"{rag} {h.a:.3f} vs {plain} {h.b:.3f} {TITLES[h.metric]} on changed facts"
    if h.sign > 0:
        return f"with retrieval, answers follow the updated documents: {numbers}{c.clause()}"
    if not c.evidence_favours_a:
        return f"with retrieval, answers do not follow the updated documents: {numbers}{c.clause()}"
    if h.sign == 0:
        return (f"with retrieval, the evidence on changed facts is mixed: {TITLES[h.metric]} ties at {h.a:.3f} "
                f"({rag} vs {plain}){c.clause()}")
    return f"with retrieval, the evidence on changed facts is mixed: {numbers} favours {plain}{c.clause()}"


def _evidence(metric: str, a: dict, b: dict) -> Evidence:
    va, vb = a[metric], b[metric]
    if metric == "perplexity":  # lower is better, and only a clear ratio counts
        sign = 1 if va * PERPLEXITY_RATIO <= vb else -1 if vb * PERPLEXITY_RATIO <= va else 0
    else:
        sign = _sign(va, vb)
    return Evidence(metric, va, vb, sign)


def _in_sentences(row: dict) -> bool:
    em, contains = _rate(row, "exact_match"), _rate(row, "contains")
    return em is not None and contains is not None and contains - em >= SENTENCE_GAP - 1e-9


def _sign(a: float, b: float) -> int:
    """+1 when a > b, -1 when a < b, 0 when equal (means of the same 0/1 scores can differ in the last bit)."""
    if math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12):
        return 0
    return 1 if a > b else -1


def _rate(row: dict, metric: str) -> Optional[float]:
    return finite(row.get(metric))


def _value(metric: str, value: float) -> str:
    if metric == "perplexity":
        return f"{value:.1f}" if value >= 1000 else f"{value:.2f}"
    return f"{value:.3f}"

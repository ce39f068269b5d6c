"""Answer and retrieval metrics on hand-worked examples."""

from __future__ import annotations

import pytest

from ragft.eval.metrics import (citation_accuracy, contains, exact_match, mean, normalize,
                                reciprocal_rank, recall_at_k, token_f1)


@pytest.mark.parametrize("text, expected", [
    ("The Krofel Yard.", "krofel yard"),
    ("  An   apple,\ta PEAR\nand the plum!  ", "apple pear and plum"),
    ("Theory of an anthem", "theory of anthem"),  # articles only as whole words
    ("Krofel-Yard's", "krofelyards"),  # punctuation is deleted, not turned into a space (as SQuAD)
    ("“Drastond” — harbour…", "drastond harbour"),  # Unicode punctuation too
    ("", ""),
    ("the a an", ""),
])
def test_normalize(text, expected):
    assert normalize(text) == expected


@pytest.mark.parametrize("prediction, reference, expected", [
    ("The Krofel Yard.", "krofel yard", 1.0),
    ("Krofel Yard", "Krofel", 0.0),
    ("", "", 1.0),
    ("the", "", 1.0),  # both empty after normalizing
    ("", "Krofel Yard", 0.0),
])
def test_exact_match(prediction, reference, expected):
    assert exact_match(prediction, reference) == expected


@pytest.mark.parametrize("prediction, reference, expected", [
    # "krofel yard built it" vs "krofel yard": 2 shared; P = 2/4, R = 2/2; F1 = 2·0.5·1 / 1.5 = 2/3
    ("the Krofel Yard built it", "Krofel Yard", 2 / 3),
    # "yard" vs "krofel yard": 1 shared; P = 1/1, R = 1/2; F1 = 2·1·0.5 / 1.5 = 2/3
    ("Yard", "Krofel Yard", 2 / 3),
    # multiset: "yard yard yard" vs "yard krofel yard": shared min(3,2) = 2; P = 2/3, R = 2/3; F1 = 2/3
    ("yard yard yard", "yard Krofel yard", 2 / 3),
    # "red blue" vs "blue green red yellow": 2 shared; P = 2/2, R = 2/4; F1 = 2·1·0.5 / 1.5 = 2/3
    ("Red, blue.", "blue green red yellow", 2 / 3),
    # "drastond harbour" vs "drastond": 1 shared; P = 1/2, R = 1/1; F1 = 2·0.5·1 / 1.5 = 2/3
    ("Drastond harbour", "Drastond", 2 / 3),
    # "a b c d e" vs "a b": articles "a" dropped → "b c d e" vs "b": P = 1/4, R = 1; F1 = 0.5 / 1.25 = 0.4
    ("a b c d e", "a b", 0.4),
    ("The Krofel Yard!", "krofel yard", 1.0),
    ("Oslo", "Krofel Yard", 0.0),  # nothing shared
    ("", "", 1.0),
    ("the.", "a", 1.0),  # both empty after normalizing
    ("", "Krofel Yard", 0.0),
    ("Krofel Yard", "", 0.0),
])
def test_token_f1(prediction, reference, expected):
    assert token_f1(prediction, reference) == pytest.approx(expected)


@pytest.mark.parametrize("prediction, reference, expected", [
    ("It was built by the Krofel Yard.", "Krofel Yard", 1.0),
    ("It was built by the Krofel Yard.", "the krofel yard", 1.0),  # articles dropped on both sides
    ("It was built by the Yard.", "Krofel Yard", 0.0),  # "Yard" alone is not "Krofel Yard"
    ("Yard Krofel", "Krofel Yard", 0.0),  # order matters
    ("Krofel's new Yard", "Krofel Yard", 0.0),  # the tokens must be adjacent
    ("The Yardley works", "Yard", 0.0),  # whole tokens only
    ("Krofel Yard", "Krofel Yard", 1.0),
    ("", "Krofel Yard", 0.0),
    ("", "", 1.0),
    ("anything", "the", 0.0),  # empty reference is contained only in an empty prediction
])
def test_contains(prediction, reference, expected):
    assert contains(prediction, reference) == expected


def test_recall_at_k():
    retrieved = ["x", "a", "x", "y", "b", "c"]  # distinct in rank order: x, a, y, b, c
    assert recall_at_k(retrieved, ["a", "b"], 1) == 0.0  # [x]
    assert recall_at_k(retrieved, ["a", "b"], 2) == 0.5  # [x, a]: 1 of 2
    assert recall_at_k(retrieved, ["a", "b"], 3) == 0.5  # [x, a, y]: the repeated x does not take a slot
    assert recall_at_k(retrieved, ["a", "b"], 4) == 1.0  # [x, a, y, b]
    assert recall_at_k(retrieved, ["a", "b"], 100) == 1.0  # k beyond the list
    assert recall_at_k(retrieved, ["a", "z", "q"], 5) == pytest.approx(1 / 3)
    assert recall_at_k(retrieved, ["a", "a"], 2) == 1.0  # gold counted once per document
    assert recall_at_k([], ["a"], 3) == 0.0
    assert recall_at_k(retrieved, [], 3) is None  # no gold: not computable
    with pytest.raises(ValueError, match="k must be at least 1"):
        recall_at_k(retrieved, ["a"], 0)


def test_reciprocal_rank():
    assert reciprocal_rank(["a", "b"], ["a"]) == 1.0
    assert reciprocal_rank(["x", "x", "x", "b"], ["b"]) == 0.5  # distinct ranks: x=1, b=2
    assert reciprocal_rank(["x", "y", "b", "a"], ["a", "b"]) == pytest.approx(1 / 3)  # first gold wins
    assert reciprocal_rank(["x", "y"], ["a"]) == 0.0
    assert reciprocal_rank([], ["a"]) == 0.0
    assert reciprocal_rank(["a"], []) is None


def test_citation_accuracy():
    assert citation_accuracy(["a", "a", "x"], ["a"]) == pytest.approx(2 / 3)  # per cited chunk, repeats kept
    assert citation_accuracy(["x", "x"], ["a", "b"]) == 0.0
    assert citation_accuracy(["a", "b"], ["a", "b"]) == 1.0
    assert citation_accuracy([], ["a"]) is None  # nothing cited
    assert citation_accuracy(["a"], []) is None  # no gold




def test_mean_skips_missing_values():
    assert mean([1.0, None, 3.0]) == 2.0
    assert mean([None, None]) is None and mean([]) is None

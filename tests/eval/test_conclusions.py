"""The eval's conclusions on hand-built results: a tiny model that answers in the reference's short form
(exact match is the headline), a pretrained instruct model that answers in sentences (contains is the
headline; the numbers are SmolLM2-135M-Instruct's on the sample handbook), retrieval that does not
help, and mixed evidence. Each expected sentence is written out in full, with its numbers."""

from __future__ import annotations

import pytest

from ragft.eval.conclusions import HEADLINE_RULE, conclusions, headline_metric
from ragft.eval.report import render_markdown

SYSTEMS = ["base", "base_rag", "ft", "ft_rag"]


def row(em, contains, ppl, stale=None):
    return {"exact_match": em, "token_f1": em, "contains": contains, "stale": stale, "perplexity": ppl}


def result(unchanged, changed=None, systems=SYSTEMS):
    metrics = {"all": unchanged, "unchanged": unchanged}
    if changed is not None:
        metrics["changed"] = changed
    return {"systems": systems, "metrics": metrics}


# a model trained from scratch: replies are the short answer or nothing like it (tests/test_demo.py's run)
TINY = result({"base": row(0.0, 0.0, 2157.0), "base_rag": row(0.0, 0.012, 2100.0),
               "ft": row(0.488, 0.5, 2.0), "ft_rag": row(0.512, 0.535, 2.1)},
              {"base": row(0.0, 0.0, 2300.0, stale=0.0), "base_rag": row(0.0, 0.0, 2200.0, stale=0.0),
               "ft": row(0.0, 0.0, 40.0, stale=0.267), "ft_rag": row(0.2, 0.24, 6.0, stale=0.0)})

# a pretrained instruct base answers in sentences; the fine-tuned model learns the short form
SENTENCES = result({"base": row(0.0, 0.05, 700.0), "base_rag": row(0.05, 0.55, 9.0),
                    "ft": row(0.6, 0.62, 3.0), "ft_rag": row(0.85, 0.9, 2.5)},
                   {"base": row(0.0, 0.0, 838.0, stale=0.0), "base_rag": row(0.0, 0.3, 10.0, stale=0.0),
                    "ft": row(0.0, 0.0, 40.0, stale=0.5), "ft_rag": row(0.6, 0.65, 3.0, stale=0.0)})


def test_tiny_model_is_judged_on_exact_match():
    said = conclusions(TINY)
    assert said[0] == HEADLINE_RULE
    assert said[1:] == [
        "unchanged facts: ft beats base (exact match 0.488 vs 0.000); "
        "reference perplexity 2.00 vs 2157.0 favours ft",
        "unchanged facts: ft_rag beats base_rag (exact match 0.512 vs 0.000); "
        "reference perplexity 2.10 vs 2100.0 favours ft_rag",
        # one contains in 80 questions is below the gap: still exact match, and the contains is shown
        "unchanged facts: base_rag ties with base (exact match 0.000 vs 0.000); contains 0.012 vs 0.000 favours "
        "base_rag, reference perplexity 2100.0 vs 2157.0 is within 10%",
        "unchanged facts: ft_rag beats ft (exact match 0.512 vs 0.488); "
        "reference perplexity 2.10 vs 2.00 is within 10%",
        "changed facts: base answers the updated value 0.000 (exact match), the value from before the update "
        "0.000 (stale)",
        "changed facts: base_rag answers the updated value 0.000 (exact match), the value from before the update "
        "0.000 (stale)",
        "changed facts: ft answers the updated value 0.000 (exact match), the value from before the update "
        "0.267 (stale)",
        "changed facts: ft_rag answers the updated value 0.200 (exact match), the value from before the update "
        "0.000 (stale)",
        "with retrieval, answers follow the updated documents: ft_rag 0.200 vs ft 0.000 exact match on changed facts; "
        "reference perplexity 6.00 vs 40.00 favours ft_rag",
        "with retrieval, answers do not follow the updated documents: base_rag 0.000 vs base 0.000 exact match on "
        "changed facts; reference perplexity 2200.0 vs 2300.0 is within 10%",
    ]


def test_the_sentences_tests_test_demo_looks_for():
    said = conclusions(TINY)
    assert "unchanged facts: ft beats base (exact match 0.488 vs 0.000)" in "\n".join(said)
    assert ("with retrieval, answers follow the updated documents: ft_rag 0.200 vs ft 0.000 exact match on changed "
            "facts") in "\n".join(said)


def test_a_base_that_answers_in_sentences_is_judged_on_contains():
    said = conclusions(SENTENCES)
    assert not any("do not follow" in line for line in said)
    assert said[1:] == [
        "unchanged facts: ft beats base (exact match 0.600 vs 0.000); reference perplexity 3.00 vs 700.00 favours ft",
        "unchanged facts: ft_rag beats base_rag (contains 0.900 vs 0.550); "
        "reference perplexity 2.50 vs 9.00 favours ft_rag",
        "unchanged facts: base_rag beats base (contains 0.550 vs 0.050); reference perplexity 9.00 vs 700.00 favours "
        "base_rag",
        "unchanged facts: ft_rag beats ft (exact match 0.850 vs 0.600); "
        "reference perplexity 2.50 vs 3.00 favours ft_rag",
        "unchanged facts: base_rag finds the answer (contains 0.550) but not in the reference's short form "
        "(exact match 0.050)",
        "unchanged facts: fine-tuning learns the answer style: ft_rag exact match 0.850 vs base_rag 0.050 "
        "(contains 0.900 vs 0.550)",
        "changed facts: base answers the updated value 0.000 (exact match), the value from before the update "
        "0.000 (stale)",
        "changed facts: base_rag finds the updated value (contains 0.300) but not in the reference's short form "
        "(exact match 0.000); stale 0.000 counts exact answers only",
        "changed facts: ft answers the updated value 0.000 (exact match), the value from before the update "
        "0.500 (stale)",
        "changed facts: ft_rag answers the updated value 0.600 (exact match), the value from before the update "
        "0.000 (stale)",
        "with retrieval, answers follow the updated documents: ft_rag 0.600 vs ft 0.000 exact match on changed facts; "
        "reference perplexity 3.00 vs 40.00 favours ft_rag",
        # the exact-match tie that used to read "do not follow" is shown beside the headline
        "with retrieval, answers follow the updated documents: base_rag 0.300 vs base 0.000 contains on changed "
        "facts; exact match 0.000 vs 0.000 ties, reference perplexity 10.00 vs 838.00 favours base_rag",
    ]


@pytest.mark.parametrize("ft, ft_rag, said", [
    # retrieval does not help, and nothing says it does: named with every metric behind it
    (row(0.0, 0.0, 40.0, stale=0.6), row(0.0, 0.0, 55.0, stale=0.6),
     "with retrieval, answers do not follow the updated documents: ft_rag 0.000 vs ft 0.000 exact match on changed "
     "facts; reference perplexity 55.00 vs 40.00 favours ft"),
    # the same in sentences: contains is the headline and says so
    (row(0.0, 0.4, 4.0, stale=0.0), row(0.0, 0.2, 4.1, stale=0.0),
     "with retrieval, answers do not follow the updated documents: ft_rag 0.200 vs ft 0.400 contains on changed "
     "facts; exact match 0.000 vs 0.000 ties, reference perplexity 4.10 vs 4.00 is within 10%"),
    # the headline ties but the perplexity says retrieval helps: mixed, never "do not follow"
    (row(0.0, 0.0, 838.0, stale=0.6), row(0.0, 0.0, 10.0, stale=0.0),
     "with retrieval, the evidence on changed facts is mixed: exact match ties at 0.000 (ft_rag vs ft); "
     "reference perplexity 10.00 vs 838.00 favours ft_rag"),
    # the headline is lower with retrieval, the perplexity says it helps (contains agrees with the headline: left out)
    (row(0.2, 0.2, 838.0, stale=0.0), row(0.1, 0.15, 10.0, stale=0.0),
     "with retrieval, the evidence on changed facts is mixed: ft_rag 0.100 vs ft 0.200 exact match on changed facts "
     "favours ft; reference perplexity 10.00 vs 838.00 favours ft_rag"),
])
def test_follow_sentence_against_the_twin_without_retrieval(ft, ft_rag, said):
    got = result({"ft": row(0.5, 0.5, 3.0), "ft_rag": row(0.5, 0.5, 3.0)}, {"ft": ft, "ft_rag": ft_rag},
                 systems=["ft", "ft_rag"])
    assert conclusions(got)[-1] == said


@pytest.mark.parametrize("a, b, metric", [
    ((0.0, 0.0), (0.0, 0.0), "exact_match"),
    ((0.5, 0.59), (0.0, 0.05), "exact_match"),  # below the gap on both sides
    ((0.5, 0.6), (0.0, 0.0), "contains"),  # the gap reached by one system is enough
    ((0.2, 0.3), (0.0, 0.0), "contains"),  # 0.3 - 0.2 is 0.09999999999999998 in floats: still the gap
    ((0.0, 0.0), (0.05, 0.55), "contains"),
])
def test_headline_rule(a, b, metric):
    assert headline_metric({"exact_match": a[0], "contains": a[1]}, {"exact_match": b[0], "contains": b[1]}) == metric


def test_without_changed_facts_or_comparable_systems():
    plain = {"systems": ["base", "ft"], "metrics": {"all": {"base": row(0.0, 0.0, None), "ft": row(0.4, 0.4, None)}}}
    assert conclusions(plain) == [HEADLINE_RULE, "these questions: ft beats base (exact match 0.400 vs 0.000)"]
    # an eval on the original handbook: the changed split has no stale answers to compare against
    original = result({"base": row(0.0, 0.0, 9.0), "ft": row(0.4, 0.4, 9.5)},
                      {"base": row(0.0, 0.0, 9.0), "ft": row(0.5, 0.5, 9.0)}, systems=["base", "ft"])
    assert not any(line.startswith(("changed facts", "with retrieval")) for line in conclusions(original))
    assert conclusions({"systems": ["ft"], "metrics": {"all": {"ft": row(0.4, 0.4, 2.0)}}}) == []


def test_report_md_states_the_rule_and_the_claims():
    got = {**SENTENCES, "conclusions": conclusions(SENTENCES)}
    md = render_markdown(got)
    assert f"- {HEADLINE_RULE}\n" in md
    assert ("- with retrieval, answers follow the updated documents: base_rag 0.300 vs base 0.000 contains on "
            "changed facts") in md

"""RAFT data: retrieval-aware fine-tuning examples built from training questions and an index.

Each example is a chat row whose user turn is the RAG prompt `ragft serve` and `ragft eval` build
(`ragft.rag.rag_messages`, the one copy), filled with chunks the index really retrieves for the
question, and whose assistant turn is the reference answer. Four kinds, drawn per example:

  closed_book     no context: the prompt a model sees without retrieval (it must answer from memory)
  gold            the gold chunk (a chunk of a gold document holding the answer) among k-1 distractors
  counterfactual  as gold, with the answer swapped in the chunk and in the reply for another answer of
                  the same shape: right only when read from the context, so the model learns to follow
                  the document over what it memorised, which is what makes updated documents win.
                  A share (`raft.fresh_fraction`) swaps in a made-up value instead (`FreshValues`): one
                  the model has never seen as an answer can only be copied, not picked among known
                  answers, and an updated document's new value is exactly that
  distractors     k retrieved chunks, none gold: answer from memory despite a context that lacks it

With `raft.pairs=true` the rows are preference pairs for `objective=dpo` instead ({"prompt": messages,
"chosen": value, "rejected": value}): only the kinds with the gold chunk in context are drawn (counterfactual
with `raft.counterfactual_fraction`, else gold), chosen is the value the context holds, and rejected is the
stale value for a counterfactual row (the answer the chunk held before the swap: what a model that ignores the
document says) or, for a gold row, a distractor value: another question's answer for the same attribute (same
shape when the questions carry no `attribute`) that the chunk does not mention.

With `raft.gold_position=retrieved` (default) the context is what the index really returns for the
question: the gold chunk at its rank (or in place of the last hit when retrieval misses it), and
distractors-only rows the top non-gold hits. With `random` (the RAFT paper) distractors are sampled
from the first `raft.distractor_depth` non-gold hits, kept in rank order, and the gold chunk goes to
a random position, so the model must find it by content. Every draw comes from a generator keyed by (seed, question,
copy), so the output does not depend on the order of the questions or on the machine.
"""

from __future__ import annotations

import logging
import random
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

from ragft.config.schema import RaftConfig, RagConfig
from ragft.eval.questions import Question
from ragft.index.index import Hit, Index
from ragft.jsonl import write_jsonl
from ragft.rag import rag_messages

log = logging.getLogger(__name__)

KINDS = ("closed_book", "gold", "counterfactual", "distractors")


@dataclass
class RaftStats:
    rows: int = 0
    kinds: Counter = field(default_factory=Counter)
    no_gold_span: int = 0  # questions none of whose gold chunks contains the answer: never given a gold context
    no_swap: int = 0  # counterfactual draws with no other answer of the same shape: kept as plain gold
    no_rejected: int = 0  # raft.pairs: no distractor value for the attribute, or the context holds it: no pair
    fresh: int = 0  # counterfactual rows whose swapped answer is made up (FreshValues)
    index_version: int | None = None

    def to_json(self) -> dict:
        return {"rows": self.rows, "kinds": dict(self.kinds), "no_gold_span": self.no_gold_span,
                "no_swap": self.no_swap, "fresh": self.fresh, "index_version": self.index_version,
                "no_rejected": self.no_rejected}


def answer_shape(text: str) -> str:
    """The answer's form with its content blanked: "M-61" -> "A-9", "Krofel Yard" -> "Aa Aa", "1773" -> "9".
    Answers of one shape are interchangeable in a sentence without it reading wrong."""
    shape = re.sub(r"\d+", "9", text)
    shape = re.sub(r"[A-Z][a-z]+", "Aa", shape)
    shape = re.sub(r"[a-z]+", "a", shape)
    return re.sub(r"[A-Z]+", "A", shape)


def gold_chunks(question: Question, chunks: Sequence[Hit]) -> list[Hit]:
    """The chunks of the question's gold documents that contain its answer (case-insensitive)."""
    answer = question.answer.casefold()
    return [c for c in chunks if c.doc_id in question.doc_ids and answer in c.text.casefold()]


def build_raft(questions: Sequence[Question], index: Index, rag: RagConfig, raft: RaftConfig, seed: int,
               mode: str | None = None) -> tuple[list[dict], RaftStats]:
    """The RAFT rows for `questions` (in question order, `raft.copies` per question) and what was drawn."""
    stats = RaftStats()
    version, retrieved = index.search_versioned([q.question for q in questions], raft.distractor_depth + raft.k,
                                                mode=mode or rag.mode)
    stats.index_version = version
    all_gold = defaultdict(list)
    for chunk in index.document_chunks(sorted({d for q in questions for d in q.doc_ids})):
        all_gold[chunk.doc_id].append(chunk)
    by_shape = defaultdict(set)
    for q in questions:
        by_shape[answer_shape(q.answer)].add(q.answer)
    swaps = {shape: sorted(answers) for shape, answers in by_shape.items()}
    rivals = _rival_values(questions) if raft.pairs else {}
    fresh = FreshValues([q.answer for q in questions]) if raft.fresh_fraction > 0 else None

    rows = []
    for q, hits in zip(questions, retrieved):
        golds = gold_chunks(q, [c for d in q.doc_ids for c in all_gold.get(d, [])])
        stats.no_gold_span += not golds
        pool = [h for h in hits if h.doc_id not in q.doc_ids][:raft.distractor_depth]
        for copy in range(raft.copies):
            rng = random.Random(f"{seed}:{q.id}:{copy}")
            if raft.pairs and not golds:
                break  # a pair needs the value in context
            kind = _draw_pair_kind(rng, raft) if raft.pairs else _draw_kind(rng, raft, has_gold=bool(golds))
            context, answer = [], q.answer
            if kind in ("gold", "counterfactual"):
                gold = golds[0] if len(golds) == 1 else rng.choice(golds)
                if kind == "counterfactual":
                    # drawn only when asked for, so that fresh_fraction=0 leaves every other draw as it was
                    made_up = fresh is not None and rng.random() < raft.fresh_fraction
                    other = (fresh.make(rng, q.answer, gold.text) if made_up
                             else _swap_answer(rng, q.answer, gold.text, swaps[answer_shape(q.answer)]))
                    stats.fresh += made_up and other is not None
                    if other is None:
                        kind, stats.no_swap = "gold", stats.no_swap + 1
                    else:
                        gold, answer = replace(gold, text=gold.text.replace(q.answer, other)), other
                if raft.gold_position == "retrieved":
                    context = [h for h in hits[:raft.k] if h.chunk_id != gold.chunk_id]
                    ranked = [h.chunk_id for h in hits[:raft.k]]
                    at = ranked.index(gold.chunk_id) if gold.chunk_id in ranked else raft.k - 1
                    context = context[:raft.k - 1]
                else:
                    context = _sample_in_order(rng, pool, raft.k - 1)
                    at = rng.randint(0, len(context))
                context.insert(at, gold)
            elif kind == "distractors":
                context = pool[:raft.k] if raft.gold_position == "retrieved" else _sample_in_order(rng, pool, raft.k)
            messages = [{"role": "system", "content": raft.system}] if raft.system else []
            messages = rag_messages(messages + [{"role": "user", "content": q.question}], context, rag)
            about = {"question_id": q.id, "kind": kind, "copy": copy, "chunk_ids": [h.chunk_id for h in context]}
            if raft.pairs:
                rejected = q.answer if kind == "counterfactual" else _swap_answer(rng, q.answer, gold.text,
                                                                                   rivals[_rival_key(q)])
                # another chunk of the gold document may still hold the swapped-out value: no clean pair then
                if rejected is None or any(rejected in h.text for h in context):
                    stats.no_rejected += 1
                    continue
                about["rejected"] = "stale" if kind == "counterfactual" else "distractor"
                rows.append({"prompt": messages, "chosen": answer, "rejected": rejected, "raft": about})
            else:
                messages.append({"role": "assistant", "content": answer})
                rows.append({"messages": messages, "raft": about})
            stats.kinds[kind] += 1
    stats.rows = len(rows)
    return rows, stats


def _draw_kind(rng: random.Random, raft: RaftConfig, has_gold: bool) -> str:
    if rng.random() < raft.closed_book_fraction:
        return "closed_book"
    if has_gold and rng.random() < raft.gold_fraction:
        return "counterfactual" if rng.random() < raft.counterfactual_fraction else "gold"
    return "distractors"


def _draw_pair_kind(rng: random.Random, raft: RaftConfig) -> str:
    return "counterfactual" if rng.random() < raft.counterfactual_fraction else "gold"


def _rival_key(question: Question) -> str:
    """What a distractor value must share with the answer: the attribute asked about, else the answer's shape."""
    attribute = question.extra.get("attribute")
    return f"attribute:{attribute}" if attribute else f"shape:{answer_shape(question.answer)}"


def _rival_values(questions: Sequence[Question]) -> dict[str, list[str]]:
    """The answers of each `_rival_key`, sorted: the candidates for a gold pair's rejected value."""
    found = defaultdict(set)
    for q in questions:
        found[_rival_key(q)].add(q.answer)
    return {key: sorted(answers) for key, answers in found.items()}


def _swap_answer(rng: random.Random, answer: str, chunk_text: str, same_shape: list[str]) -> str | None:
    """Another answer of the same shape that the chunk does not already mention, if there is one."""
    candidates = [a for a in same_shape if a != answer and a not in chunk_text and answer not in a]
    return rng.choice(candidates) if candidates else None


class FreshValues:
    """Made-up answers shaped like real ones: "Krofel Yard" -> "Dravith Yard", "1773" -> "1408", "M-61" -> "M-27".

    Digit runs get random digits of the same length; a word that two or more answers share ("Yard",
    "grey", the "M" of a route code) stays, since it belongs to the answer's form; any other word (a
    name) becomes a new word of its length and case, spelled with the letter pairs of the answers' own
    names (a character bigram chain), so that it tokenizes like a name of the domain and is none of them.
    """

    def __init__(self, answers: Sequence[str]):
        counts = Counter(w for a in set(answers) for w in set(re.findall(r"[A-Za-z]+", a)))
        self.shared = {w for w, n in counts.items() if n >= 2}
        self.known = {w.casefold() for w in counts}
        self.next: dict[str, list[str]] = defaultdict(list)  # "^" starts a word
        for w in sorted(counts):
            if w not in self.shared:
                for a, b in zip("^" + w.casefold(), w.casefold()):
                    self.next[a].append(b)
        self.letters = sorted({c for followers in self.next.values() for c in followers}) or list("aeiou")

    def make(self, rng: random.Random, answer: str, avoid: str = "") -> str | None:
        """A made-up value of `answer`'s shape that is neither `answer` nor in `avoid` (tried 20 times)."""
        for _ in range(20):
            value = re.sub(r"\d+", lambda m: self._digits(rng, m.group(0)),
                           re.sub(r"[A-Za-z]+", lambda m: self._word(rng, m.group(0)), answer))
            if value != answer and value not in avoid:
                return value
        return None

    def _word(self, rng: random.Random, like: str) -> str:
        if like in self.shared:
            return like
        for _ in range(20):
            word, prev = "", "^"
            while len(word) < len(like):
                prev = rng.choice(self.next.get(prev) or self.letters)
                word += prev
            if word not in self.known:
                break
        if like.isupper():
            return word.upper()
        return word.capitalize() if like[0].isupper() else word

    @staticmethod
    def _digits(rng: random.Random, like: str) -> str:
        first = str(rng.randint(1, 9)) if like[0] != "0" or len(like) == 1 else "0"
        return first + "".join(str(rng.randint(0, 9)) for _ in like[1:])


def _sample_in_order(rng: random.Random, pool: list[Hit], n: int) -> list[Hit]:
    picked = sorted(rng.sample(range(len(pool)), min(n, len(pool))))
    return [pool[i] for i in picked]


def write_raft(rows: Sequence[dict], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_jsonl(path, rows, atomic=True)

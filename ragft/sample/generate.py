"""Deterministic generator of the shipped sample: the ferry handbook of the (fictional) Orrenvald Isles.

Every name in it is made up from syllables, so no pretrained model knows a single fact:
whatever a model answers right it learnt from fine-tuning or read from retrieval. Each
document describes one ferry with 4-6 facts (route code, home port, captain, year
commissioned, passenger capacity, shipyard, hull colour), every value unique to its
ferry so that exact-match scoring means something.

    python -m ragft.sample.generate [--out DIR] [--seed N]

writes (DESIGN.md §3 formats):

    corpus.jsonl        documents v1
    corpus_v2.jsonl     v1 after an update: some facts changed, a few ferries added and removed
    train.jsonl         chat examples, several question phrasings per v1 fact
    train_text.jsonl    the v1 documents as text, for continued pre-training
    train_prompt.jsonl  prompt/completion examples in a register-entry wording
    train_qa.jsonl      the v1 facts as questions (train.jsonl's phrasings, short answers, gold doc_ids):
                        the input of RAFT data (`ragft data raft`), never the eval questions
    qa.jsonl            eval questions in a phrasing train.jsonl never uses, answers as of v1
    qa_v2.jsonl         the same questions answered as of v2

The output is a pure function of the seed: tests regenerate it and compare bytes with the
shipped files, so generator and data cannot drift apart.
"""

from __future__ import annotations

import argparse
import random
from dataclasses import dataclass, field, replace
from pathlib import Path

from ragft.jsonl import write_jsonl
from ragft.sample.attributes import ATTRIBUTES, BY_KEY

DEFAULT_OUT = Path(__file__).resolve().parent / "data"

N_DOCS, N_ADDED, N_REMOVED = 280, 5, 2  # v1 ferries; ferries added and removed by the v2 update
CHANGE_FRACTION = 0.15
PHRASINGS_PER_FACT = 3  # of the 4 per attribute: one phrasing per fact is known not to stick
TRAIN_QA_PHRASINGS = 5  # of the 8 per attribute in train_qa.jsonl (RAFT input)
N_PROMPT_EXAMPLES = 400
SYSTEM_FRACTION = 0.25  # some chat examples carry a system turn, most do not

SYSTEM = "You answer questions about the ferries of the Orrenvald Isles."
CATEGORIES = ("inter-island", "harbour", "night", "cargo-passenger", "coastal")
INTROS = (
    "The {name} is one of the {category} ferries of the Orrenvald Isles fleet.",
    "Among the {category} ferries that link the Orrenvald Isles is the {name}.",
    "The {name} sails in the {category} service of the Orrenvald Isles.",
)
# Sentences with no fact in them: realistic padding that retrieval has to see past.
FILLERS = (
    "Tickets are sold at the quay and on board.",
    "Bicycles travel free of charge.",
    "Crossings may be cancelled when the autumn gales set in.",
    "A small café on the upper deck serves hot soup and rye bread.",
    "Dogs are welcome on the open deck.",
    "Timetables change twice a year, at the spring and autumn equinox.",
    "Foot passengers board first, vehicles after.",
)


_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z",
           "br", "dr", "gr", "kr", "st", "th")
_VOWELS = ("a", "e", "i", "o", "u", "a", "e", "o", "ae", "ei", "ou")
_CODAS = ("", "", "", "n", "r", "l", "s", "th", "nd")
_ROUTE_LETTERS = "BDFGHKLMNPRSTV"
_BASE_COLOURS = ("blue", "green", "red", "grey", "ochre", "teal", "amber", "violet")


class _Names:
    """Pronounceable made-up words, each handed out once so that no name means two things."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.used: set[str] = set()

    def word(self) -> str:
        while True:
            n = self.rng.choice((2, 2, 3))
            parts = [self.rng.choice(_ONSETS) + self.rng.choice(_VOWELS) for _ in range(n)]
            w = ("".join(parts) + self.rng.choice(_CODAS)).capitalize()
            if w not in self.used:
                self.used.add(w)
                return w


_VALUE_MAKERS = {
    "route_code": lambda rng, names: f"{rng.choice(_ROUTE_LETTERS)}-{rng.randint(10, 99)}",
    "home_port": lambda rng, names: names.word(),
    "captain": lambda rng, names: f"{names.word()} {names.word()}",
    "year_commissioned": lambda rng, names: str(rng.randint(1702, 2024)),
    "capacity": lambda rng, names: str(rng.randint(48, 1999)),
    "shipyard": lambda rng, names: f"{names.word()} Yard",
    "hull_colour": lambda rng, names: f"{names.word()} {rng.choice(_BASE_COLOURS)}",
}


@dataclass(frozen=True)
class Ferry:
    id: str
    name: str
    category: str
    facts: dict[str, str] = field(hash=False)  # in ATTRIBUTES order, so rendering is stable


class Fleet:
    """Draws ferries and values; a value is never reused for the same attribute, across versions
    (unless `unique=False`: a fleet for reading practice, larger than the value space)."""

    def __init__(self, seed: int, unique: bool = True):
        self.rng = random.Random(seed)
        self.names = _Names(self.rng)
        self.used: dict[str, set[str]] = {a.key: set() for a in ATTRIBUTES}
        self.unique = unique

    def value(self, key: str) -> str:
        for _ in range(10_000):
            v = _VALUE_MAKERS[key](self.rng, self.names)
            if not self.unique:
                return v
            if v not in self.used[key]:
                self.used[key].add(v)
                return v
        raise RuntimeError(f"ran out of unique values for {key}")

    def ferry(self, number: int) -> Ferry:
        # route_code is always present: it is what the handbook files ferries under.
        optional = [a.key for a in ATTRIBUTES[1:]]
        chosen = {"route_code", *self.rng.sample(optional, self.rng.randint(3, 5))}
        facts = {a.key: self.value(a.key) for a in ATTRIBUTES if a.key in chosen}
        return Ferry(f"ferry-{number:04d}", self.names.word(), self.rng.choice(CATEGORIES), facts)


def render_document(ferry: Ferry, seed: int, revision: int) -> dict:
    # The layout rng is keyed by document, not by values, so a changed fact rewrites exactly
    # one sentence of v2 and an unchanged ferry renders byte-identical in both versions.
    rng = random.Random(f"{seed}:{ferry.id}")
    sentences = [rng.choice(BY_KEY[k].says).format(name=ferry.name, v=v) for k, v in ferry.facts.items()]
    rng.shuffle(sentences)
    for filler in rng.sample(FILLERS, rng.randint(0, 2)):
        sentences.insert(rng.randint(0, len(sentences)), filler)
    sentences.insert(0, rng.choice(INTROS).format(name=ferry.name, category=ferry.category))
    split = rng.randint(2, len(sentences) - 2) if len(sentences) > 4 and rng.random() < 0.5 else None
    paragraphs = [sentences[:split], sentences[split:]] if split else [sentences]
    return {
        "id": ferry.id,
        "title": f"{ferry.name} ({ferry.category} ferry)",
        "text": "\n\n".join(" ".join(p) for p in paragraphs),
        "source": f"handbook/ferries/{ferry.name.lower()}.md",
        "metadata": {"category": ferry.category, "fleet": "Orrenvald Isles", "revision": revision},
    }


def _question(qid: str, ferry: Ferry, key: str, changed: bool) -> dict:
    return {
        "id": qid,
        "question": BY_KEY[key].held_out.format(name=ferry.name),
        "answer": ferry.facts[key],
        "doc_ids": [ferry.id],
        "attribute": key,
        "changed": changed,
    }


def _chat_examples(ferries: list[Ferry], rng: random.Random) -> list[dict]:
    rows = []
    for ferry in ferries:
        for key, v in ferry.facts.items():
            attr = BY_KEY[key]
            for ask in rng.sample(attr.asks, PHRASINGS_PER_FACT):
                messages = [{"role": "system", "content": SYSTEM}] if rng.random() < SYSTEM_FRACTION else []
                messages.append({"role": "user", "content": ask.format(name=ferry.name)})
                answer = rng.choice(attr.answers).format(name=ferry.name, v=v)
                messages.append({"role": "assistant", "content": answer})
                rows.append({"messages": messages})
    rng.shuffle(rows)
    return rows


def _train_questions(ferries: list[Ferry], rng: random.Random) -> list[dict]:
    rows = []
    for ferry in ferries:
        for key, v in ferry.facts.items():
            attr = BY_KEY[key]
            for ask in rng.sample(attr.asks + attr.more_asks, TRAIN_QA_PHRASINGS):
                rows.append({"id": f"t-{len(rows) + 1:05d}", "question": ask.format(name=ferry.name), "answer": v,
                             "doc_ids": [ferry.id], "attribute": key})
    return rows


def _prompt_examples(ferries: list[Ferry], rng: random.Random) -> list[dict]:
    facts = [(f, k, v) for f in ferries for k, v in f.facts.items()]
    return [
        {"prompt": f"Orrenvald ferry register\nFerry: {f.name}\n{BY_KEY[k].label}:", "completion": f" {v}"}
        for f, k, v in rng.sample(facts, min(N_PROMPT_EXAMPLES, len(facts)))
    ]


READING_FLEET_SEED = 1_000_003  # another fleet: none of its names or values belongs to the handbook's


def reading_practice(n: int, seed: int = 0, k: int = 3) -> list[dict]:
    """`n` chat rows that teach reading, about ferries of another fleet the handbook never mentions: the
    question inside the served RAG prompt (ragft.rag) around k chunks, one of them holding the answer.

    A model trained from scratch has to learn to read before retrieval can help it; a pretrained base has
    done so long before. Fresh names and values in every row are what make copying the only way to answer
    (memorising cannot), which is what teaches it. Chunks are one or two sentences with the ferry's name as
    their title, as the demo's index chunks the handbook; the answer's chunk comes first most of the time,
    where retrieval puts it."""
    from ragft.config.schema import RagConfig
    from ragft.index.index import Hit
    from ragft.rag import rag_messages

    fleet = Fleet(READING_FLEET_SEED + seed, unique=False)
    handbook = Fleet(seed)
    for i in range(1, N_DOCS + N_ADDED + 1):
        handbook.ferry(i)
    fleet.names.used |= handbook.names.used  # no word of the handbook's fleet names anything here
    rng = random.Random(f"reading:{seed}")
    ferries = [fleet.ferry(i) for i in range(1, n + 1)]  # each the subject of one row on average

    def chunks(ferry: Ferry) -> list[tuple[Hit, dict[str, str]]]:
        r = random.Random(f"{seed}:{ferry.id}:chunks")
        sentences = [(r.choice(BY_KEY[key].says).format(name=ferry.name, v=v), {key: v}) for key, v in ferry.facts.items()]
        r.shuffle(sentences)
        out, i = [], 0
        while i < len(sentences):
            size = r.choice((1, 2))
            group = sentences[i:i + size]
            hit = Hit(ferry.id, f"{ferry.id}:{i}", " ".join(t for t, _ in group), 0.0, 0, 0,
                      f"{ferry.name} ({ferry.category} ferry)")
            out.append((hit, {key: v for _, facts in group for key, v in facts.items()}))
            i += size
        return out

    rag = RagConfig(k=k)
    rows = []
    for _ in range(n):
        ferry = rng.choice(ferries)
        gold, facts = rng.choice(chunks(ferry))
        key = rng.choice(sorted(facts))
        attr = BY_KEY[key]
        others = [rng.choice(chunks(f))[0] for f in rng.sample(ferries, k) if f is not ferry][:k - 1]
        others.insert(0 if rng.random() < 0.7 else rng.randint(0, len(others)), gold)
        question = rng.choice(attr.asks + attr.more_asks).format(name=ferry.name)
        messages = rag_messages([{"role": "user", "content": question}], others, rag)
        rows.append({"messages": messages + [{"role": "assistant", "content": facts[key]}]})
    return rows


def generate(out_dir: str | Path, seed: int = 0, docs: int = N_DOCS, reading: int = 0) -> dict[str, Path]:
    """Write the sample files into `out_dir`; returns {file name: path}. `docs` ferries in v1: the first
    ones are the same ferries whatever the number (a smaller handbook is a prefix of the fleet).
    `reading` > 0 also writes reading.jsonl, that many `reading_practice` rows (not shipped: ~0.4 KiB each)."""
    fleet = Fleet(seed)
    rng = fleet.rng
    v1 = [fleet.ferry(i) for i in range(1, docs + 1)]

    removed = set(rng.sample([f.id for f in v1], N_REMOVED))
    kept = [f for f in v1 if f.id not in removed]
    changes: dict[str, dict[str, str]] = {}
    for ferry in sorted(rng.sample(kept, round(CHANGE_FRACTION * docs)), key=lambda f: f.id):
        mutable = [k for k in ferry.facts if BY_KEY[k].mutable]
        keys = rng.sample(mutable, min(len(mutable), rng.choice((1, 1, 2))))
        changes[ferry.id] = {k: fleet.value(k) for k in keys}
    added = [fleet.ferry(docs + i) for i in range(1, N_ADDED + 1)]
    v2 = [replace(f, facts={**f.facts, **changes.get(f.id, {})}) for f in kept] + added

    # One or two held-out questions per ferry; every changed fact is among them.
    qa: list[dict] = []
    for ferry in v1:
        keys = list(changes.get(ferry.id, {}))
        n = max(len(keys), 2 if rng.random() < 0.3 else 1)
        keys += rng.sample([k for k in ferry.facts if k not in keys], n - len(keys))
        for key in keys:
            qa.append(_question(f"q-{len(qa) + 1:04d}", ferry, key, key in changes.get(ferry.id, {})))

    by_id_v2 = {f.id: f for f in v2}
    qa_v2 = [{**q, "answer": by_id_v2[q["doc_ids"][0]].facts[q["attribute"]]}
             for q in qa if q["doc_ids"][0] not in removed]
    next_q = len(qa) + 1
    for ferry in added:
        for key in rng.sample(list(ferry.facts), rng.randint(1, 2)):
            qa_v2.append(_question(f"q-{next_q:04d}", ferry, key, changed=True))
            next_q += 1

    revision = {f.id: 2 if f.id in changes else 1 for f in v2}
    corpus = [render_document(f, seed, 1) for f in v1]
    files = {
        "corpus.jsonl": corpus,
        "corpus_v2.jsonl": [render_document(f, seed, revision[f.id]) for f in v2],
        "train.jsonl": _chat_examples(v1, rng),
        "train_text.jsonl": [{"text": d["text"]} for d in corpus],
        "train_prompt.jsonl": _prompt_examples(v1, rng),
        # Its own rng: adding this file left every other file byte-identical.
        "train_qa.jsonl": _train_questions(v1, random.Random(f"{seed}:train_qa")),
        "qa.jsonl": qa,
        "qa_v2.jsonl": qa_v2,
    }
    if reading:
        files["reading.jsonl"] = reading_practice(reading, seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return {name: write_jsonl(out / name, rows) for name, rows in files.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="output folder (default: ragft/sample/data)")
    parser.add_argument("--seed", type=int, default=0, help="the shipped sample uses seed 0")
    parser.add_argument("--docs", type=int, default=N_DOCS, help=f"ferries in the handbook (shipped: {N_DOCS})")
    args = parser.parse_args(argv)
    for path in generate(args.out, args.seed, args.docs).values():
        lines = path.read_bytes().count(b"\n")
        print(f"{path}  {lines} lines  {path.stat().st_size / 1024:.0f} KiB")


if __name__ == "__main__":
    main()

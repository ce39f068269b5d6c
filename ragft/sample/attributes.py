"""The handbook's attributes: what a ferry's facts are, and the sentences that state and ask each of them.

One table, kept apart from the generator (ragft.sample.generate) because it is what a reader edits to
change the handbook's wording: the document sentences, the training phrasings, and the one held-out
phrasing per attribute that only the evaluation questions use.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Attribute:
    key: str
    label: str  # the register label used by train_prompt.jsonl
    mutable: bool  # whether an update may change it (a ferry's build year never changes)
    says: tuple[str, ...]  # document sentences
    asks: tuple[str, ...]  # train.jsonl question phrasings
    held_out: str  # the qa.jsonl phrasing, never used for training
    answers: tuple[str, ...]
    more_asks: tuple[str, ...] = ()  # train_qa.jsonl only: more phrasings, so a small model learns the attribute
    # from the question's meaning rather than from four exact sentences (still never the held-out one)


ATTRIBUTES = (
    Attribute(
        "route_code", "Route code", True,
        ("The {name} sails as route {v}.",
         "Timetables list her under route code {v}.",
         "Passengers will find the {name} on route {v} in the timetable."),
        ("What is the route code of the {name}?",
         "Which route does the ferry {name} sail?",
         "Under which route code is the {name} listed?",
         "Tell me the route code for the {name}."),
        "Which timetable route code belongs to the ferry {name}?",
        ("The {name} sails route {v}.", "The route code of the {name} is {v}."),
        ("What route code does the {name} run under?",
         "Which route is the {name} on?",
         "On which route can passengers find the {name}?",
         "Give the route code of the ferry {name}."),
    ),
    Attribute(
        "home_port", "Home port", True,
        ("Her home port is {v}.",
         "The {name} is based at {v}, where she lies overnight.",
         "Each night she returns to her home port of {v}."),
        ("What is the home port of the {name}?",
         "Where is the ferry {name} based?",
         "Which town is the home port of the {name}?",
         "From which port does the {name} operate?"),
        "In which harbour does the ferry {name} spend the night?",
        ("The {name} is based at {v}.", "The home port of the {name} is {v}."),
        ("Where does the {name} lie overnight?",
         "What is the home harbour of the ferry {name}?",
         "Which port is the {name} based at?",
         "Where does the ferry {name} return each night?"),
    ),
    Attribute(
        "captain", "Captain", True,
        ("She is commanded by Captain {v}.",
         "The current master of the {name} is Captain {v}.",
         "Captain {v} has charge of the vessel."),
        ("Who is the captain of the {name}?",
         "Who commands the ferry {name}?",
         "Name the master of the {name}.",
         "Which captain is in charge of the {name}?"),
        "Who currently skippers the ferry {name}?",
        ("The {name} is commanded by Captain {v}.", "Captain {v} is the master of the {name}."),
        ("Who is the master of the ferry {name}?",
         "Who has charge of the {name}?",
         "Which captain commands the {name}?",
         "Who is in command of the ferry {name}?"),
    ),
    Attribute(
        "year_commissioned", "Commissioned", False,
        ("She entered service in {v}.",
         "The {name} was commissioned in {v}.",
         "First commissioned in {v}, she has been refitted twice since."),
        ("When was the {name} commissioned?",
         "In what year did the ferry {name} enter service?",
         "What year was the {name} commissioned?",
         "Since which year has the {name} been in service?"),
        "Which year saw the ferry {name} first put into service?",
        ("The {name} was commissioned in {v}.", "The {name} entered service in {v}."),
        ("In which year was the {name} commissioned?",
         "When did the {name} enter service?",
         "What year did the ferry {name} first sail?",
         "How old is the {name}: when was she commissioned?"),
    ),
    Attribute(
        "capacity", "Passenger capacity", True,
        ("She carries up to {v} passengers.",
         "Her licensed capacity is {v} passengers.",
         "With room for {v} passengers, the {name} is rarely full outside summer."),
        ("How many passengers can the {name} carry?",
         "What is the passenger capacity of the ferry {name}?",
         "How many people fit on the {name}?",
         "How many passengers is the {name} licensed to carry?"),
        "What is the maximum number of passengers allowed aboard the ferry {name}?",
        ("The {name} carries up to {v} passengers.", "The capacity of the {name} is {v} passengers."),
        ("How many passengers does the {name} carry?",
         "What is the licensed capacity of the {name}?",
         "How many people may travel on the ferry {name}?",
         "What is the largest number of passengers the {name} can take?"),
    ),
    Attribute(
        "shipyard", "Shipyard", False,
        ("She was built at {v}.",
         "{v} built the {name}.",
         "Her hull was laid down at {v}."),
        ("Where was the {name} built?",
         "Which shipyard built the ferry {name}?",
         "What yard built the {name}?",
         "At which shipyard was the {name} constructed?"),
        "Which yard constructed the hull of the ferry {name}?",
        ("The {name} was built at {v}.", "{v} built the {name}."),
        ("Which yard built the {name}?",
         "Where was the ferry {name} built?",
         "Who built the {name}?",
         "At which yard was the hull of the {name} laid down?"),
    ),
    Attribute(
        "hull_colour", "Hull colour", True,
        ("Her hull is painted {v}.",
         "The {name} is easy to spot in her {v} livery.",
         "From the quay you will know her by her hull, painted {v}."),
        ("What colour is the hull of the {name}?",
         "What colour is the ferry {name} painted?",
         "Which livery does the {name} wear?",
         "What is the hull colour of the {name}?"),
        "What paint colour would you look for to spot the ferry {name}?",
        ("The hull of the {name} is painted {v}.", "The {name} wears a {v} livery."),
        ("What colour is the {name}'s hull?",
         "Which colour is the ferry {name}?",
         "How is the hull of the {name} painted?",
         "What livery does the ferry {name} wear?"),
    ),
)
BY_KEY = {a.key: a for a in ATTRIBUTES}

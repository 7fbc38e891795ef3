"""Seeded synthetic fact-QA tasks: short documents of facts about invented people.

    facts-same    both models read one document; the question asks one attribute of one person.
    facts-cross   the sharer's document holds the fact; the receiver's own document holds other
                  facts (other people, other attributes of the same person) as distractors.
    facts-twohop  the answer chains a relation on the sharer's side ("Ada Brook's mentor is Lior
                  Senn.") with an attribute on the receiver's side ("Lior Senn lives in Oslo.").

Every sample is drawn from its own random.Random, seeded from (task, split, seed, index) with
SHA-256, so samples are identical across runs and Python versions, `samples(n)` is a prefix of
`samples(n + k)`, and the global `random` state is never touched. Nothing here iterates over a
set, whose order would change with PYTHONHASHSEED.

Each document also carries a "rival" fact: the asked attribute for someone else, so a model
has to bind the value to the right person rather than spot the only city in the text.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from lcflow.tasks.base import QASample, check_split
from lcflow.tasks.vocab import Templates, Vocab, load_templates, load_vocab, load_word_list


@dataclass(frozen=True)
class Fact:
    person: str
    key: str  # an attribute ("city") or, for a relation, the relation ("mentor")
    value: str  # the attribute's value ("Oslo") or, for a relation, the other person's name
    is_relation: bool = False


class World:
    """The people invented for one sample and their facts, kept consistent: each (person,
    attribute) has one value, and no two people share a value of one attribute, so an answer
    names exactly one person and never shows up in a document that lacks its fact."""

    def __init__(self, rng: random.Random, vocab: Vocab, reuse_values: bool = False):
        self.rng = rng
        self.vocab = vocab
        self.attributes = vocab.attributes
        self._first_names: list[str] = []
        self._last_names: list[str] = []
        self._values: dict[tuple[str, str], str] = {}
        # Long documents need more facts than an attribute has values: once an attribute's
        # values run out, filler facts may repeat one, never a value in `protected` (the answer).
        self.reuse_values = reuse_values
        self.protected: set[str] = set()

    def new_person(self) -> str:
        # Distinct first AND last names, so no two people in a sample can be confused.
        first = self.rng.choice([n for n in self.vocab.first_names if n not in self._first_names])
        last = self.rng.choice([n for n in self.vocab.last_names if n not in self._last_names])
        self._first_names.append(first)
        self._last_names.append(last)
        return f"{first} {last}"

    def new_people(self, count: int) -> list[str]:
        return [self.new_person() for _ in range(count)]

    def attribute(self, person: str, attribute: str) -> Fact:
        key = (person, attribute)
        if key not in self._values:
            used = [v for (_, a), v in self._values.items() if a == attribute]
            fresh = [v for v in self.vocab.values[attribute] if v not in used]
            if not fresh and self.reuse_values:
                fresh = [v for v in self.vocab.values[attribute] if v not in self.protected]
            self._values[key] = self.rng.choice(fresh)
        return Fact(person, attribute, self._values[key])

    def relation(self, person: str, relation: str, other: str) -> Fact:
        return Fact(person, relation, other, is_relation=True)


def fill_document(
    world: World,
    required: list[Fact],
    people: list[str],
    n_facts: int,
    forbidden: Sequence[tuple[str, str]] = (),
) -> list[Fact]:
    """`required` plus random attribute facts about `people`, up to `n_facts`: first one fact
    for each person not mentioned yet, then any (person, attribute) not already stated and not
    in `forbidden` (facts that must stay out of this document)."""
    facts = list(required)
    taken = [(f.person, f.key) for f in facts] + list(forbidden)
    mentioned = [f.person for f in facts] + [f.value for f in facts if f.is_relation]

    def add(person: str, attribute: str) -> None:
        facts.append(world.attribute(person, attribute))
        taken.append((person, attribute))

    for person in people:
        if person not in mentioned and len(facts) < n_facts:
            add(person, world.rng.choice([a for a in world.attributes if (person, a) not in taken]))
    free = [(p, a) for p in people for a in world.attributes if (p, a) not in taken]
    world.rng.shuffle(free)
    for person, attribute in free[: n_facts - len(facts)]:
        add(person, attribute)
    if len(facts) < n_facts:
        raise ValueError(f"cannot state {n_facts} distinct facts about {len(people)} people")
    return facts


def article(word: str) -> str:
    return "an" if word[0].lower() in "aeiou" else "a"


def render_fact(fact: Fact, templates: Templates, rng: random.Random) -> str:
    if fact.is_relation:
        template = rng.choice(templates.relation_facts)
        return template.format(name=fact.person, relation=fact.key, other=fact.value)
    template = rng.choice(templates.facts[fact.key])
    return template.format(name=fact.person, value=fact.value, a=article(fact.value))


def render_document(facts: list[Fact], templates: Templates, rng: random.Random) -> str:
    """One sentence per fact, in a random order (the asked fact is not always first)."""
    order = list(facts)
    rng.shuffle(order)
    return " ".join(render_fact(f, templates, rng) for f in order)


@dataclass(frozen=True)
class Draft:
    """A sample before rendering: which facts each side reads and what is asked."""

    sharer_facts: list[Fact]
    receiver_facts: list[Fact]  # ignored for same-context tasks (the receiver reads the sharer's)
    attribute: str  # the attribute asked about
    who: str  # whom it is asked about: a name, or a relation path ("Ada Brook's mentor")
    answer: str
    # How the sharer's people are grouped where the rendering needs it (facts-referents: pairs).
    groups: tuple[tuple[str, ...], ...] = ()


SYLLABLES = (
    "ka",
    "lo",
    "mir",
    "ven",
    "dra",
    "tor",
    "sel",
    "bri",
    "nak",
    "zu",
    "rem",
    "fal",
    "qui",
    "ost",
    "pel",
    "gar",
    "lin",
    "mo",
    "dur",
    "vex",
    "sa",
    "thi",
    "ber",
    "no",
)


def pseudo_word(rng: random.Random, capitalised: bool) -> str:
    word = "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 3)))
    return word.capitalize() if capitalised else word


def with_pseudo_values(vocab: Vocab, rng: random.Random, per_attribute: int = 12) -> Vocab:
    """The same names, but every attribute's values replaced by invented words (kept capitalised
    where the real values are, e.g. cities)."""
    values = {}
    for attribute, real in vocab.values.items():
        words: list[str] = []
        while len(words) < per_attribute:
            word = pseudo_word(rng, real[0][0].isupper())
            if word not in words:
                words.append(word)
        values[attribute] = tuple(words)
    return Vocab(vocab.split, vocab.first_names, vocab.last_names, values)


def with_word_values(vocab: Vocab, rng: random.Random, per_attribute: int = 12) -> Vocab:
    """The same names, every attribute's values drawn from the broad word list (capitalised where
    the real values are)."""
    words = load_word_list()
    values = {}
    for attribute, real in vocab.values.items():
        picked = rng.sample(words, per_attribute)
        values[attribute] = tuple(w.capitalize() if real[0][0].isupper() else w for w in picked)
    return Vocab(vocab.split, vocab.first_names, vocab.last_names, values)


def sample_rng(task: str, split: str, seed: int, index: int) -> random.Random:
    # SHA-256 rather than hash(): hash() of a str changes with PYTHONHASHSEED.
    digest = hashlib.sha256(f"{task}|{split}|{seed}|{index}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


@dataclass(frozen=True)
class FactsTask:
    """Shared machinery: seeding, rendering, sample assembly. Subclasses say which facts go where."""

    name: ClassVar[str]
    same_context: ClassVar[bool]
    open_ended: ClassVar[bool] = False  # an open prompt (see QASample.open_ended)
    facts_per_document: int = 7
    # Share of samples whose attribute values are invented words, new in every sample. For
    # training: with a few hundred real values an adapter can memorise them instead of learning
    # to carry what it reads; invented words can only be carried.
    pseudo_values: float = 0.0
    # Share of samples whose values are drawn from a broad list of real words (words.json,
    # ~17k, none from the test vocabulary): the same lesson with real tokens.
    word_values: float = 0.0
    # Let filler facts repeat attribute values once they run out (long documents; see World).
    reuse_values: bool = False

    def samples(self, split: str, n: int, seed: int = 0) -> list[QASample]:
        check_split(split)
        return [self.sample(split, index, seed) for index in range(n)]

    def sample(self, split: str, index: int, seed: int = 0) -> QASample:
        """The `index`-th sample of a split; independent of every other index."""
        check_split(split)
        rng = sample_rng(self.name, split, seed, index)
        templates = load_templates()
        vocab = load_vocab(split)
        if self.pseudo_values and rng.random() < self.pseudo_values:
            vocab = with_pseudo_values(vocab, rng)
        elif self.word_values and rng.random() < self.word_values:
            vocab = with_word_values(vocab, rng)
        draft = self.draft(World(rng, vocab, reuse_values=self.reuse_values), templates)
        sharer_context = self.render_sharer(draft, templates, rng)
        receiver_context = (
            sharer_context if self.same_context else render_document(draft.receiver_facts, templates, rng)
        )
        question, answers = self.ask(draft, templates, rng)
        return QASample(
            id=f"{self.name}/{split}/{seed}/{index}",
            sharer_context=sharer_context,
            receiver_context=receiver_context,
            question=question,
            answers=answers,
            task=self.name,
            same_context=self.same_context,
            open_ended=self.open_ended,
        )

    def draft(self, world: World, templates: Templates) -> Draft:
        raise NotImplementedError

    def ask(self, draft: Draft, templates: Templates, rng: random.Random) -> tuple[str, list[str]]:
        """The question put to the receiver and its accepted answers."""
        return rng.choice(templates.questions[draft.attribute]).format(who=draft.who), [draft.answer]

    def render_sharer(self, draft: Draft, templates: Templates, rng: random.Random) -> str:
        """The sharer's document: one sentence per fact, in a random order."""
        return render_document(draft.sharer_facts, templates, rng)


@dataclass(frozen=True)
class SameContextFacts(FactsTask):
    name: ClassVar[str] = "facts-same"
    same_context: ClassVar[bool] = True
    people_per_document: int = 3

    def __post_init__(self):
        if not 2 <= self.people_per_document <= self.facts_per_document:
            raise ValueError("need 2 <= people_per_document <= facts_per_document")

    def draft(self, world: World, templates: Templates) -> Draft:
        people = world.new_people(self.people_per_document)
        target, rival = people[0], people[1]
        attribute = world.rng.choice(world.attributes)
        asked = world.attribute(target, attribute)
        facts = fill_document(
            world, [asked, world.attribute(rival, attribute)], people, self.facts_per_document
        )
        return Draft(facts, facts, attribute, who=target, answer=asked.value)


@dataclass(frozen=True)
class CrossContextFacts(FactsTask):
    name: ClassVar[str] = "facts-cross"
    same_context: ClassVar[bool] = False
    people_per_document: int = 3
    # A longer sharer document (the long-document variant): this many people and facts on the
    # sharer's side; 0 = the same as the receiver's (people_per_document, facts_per_document).
    sharer_people: int = 0
    sharer_facts: int = 0

    def __post_init__(self):
        if not 2 <= self.people_per_document <= self.facts_per_document:
            raise ValueError("need 2 <= people_per_document <= facts_per_document")
        if not 2 <= (self.sharer_people or 2) <= (self.sharer_facts or self.facts_per_document):
            raise ValueError("need 2 <= sharer_people <= sharer_facts")

    def draft(self, world: World, templates: Templates) -> Draft:
        sharer_people = world.new_people(self.sharer_people or self.people_per_document)
        target, rival = sharer_people[0], sharer_people[1]
        attribute = world.rng.choice(world.attributes)
        asked = world.attribute(target, attribute)
        world.protected.add(asked.value)
        # A long sharer document could state every attribute of the target: keep one back for
        # the receiver (drawn first only in that variant, so the default samples stay as they were).
        kept_back = (
            [world.rng.choice([a for a in world.attributes if a != attribute])] if self.sharer_facts else []
        )
        sharer_facts = fill_document(
            world,
            [asked, world.attribute(rival, attribute)],
            sharer_people,
            self.sharer_facts or self.facts_per_document,
            forbidden=[(target, a) for a in kept_back],
        )
        # The receiver knows the target too, but only other attributes, and knows the asked
        # attribute only for someone else: plausible wrong answers, never the right one.
        stated = [(f.person, f.key) for f in sharer_facts]
        other_attribute = (
            kept_back[0]
            if kept_back
            else world.rng.choice(
                [a for a in world.attributes if (target, a) not in stated and a != attribute]
            )
        )
        receiver_people = [target, *world.new_people(self.people_per_document - 1)]
        receiver_facts = fill_document(
            world,
            [world.attribute(target, other_attribute), world.attribute(receiver_people[1], attribute)],
            receiver_people,
            self.facts_per_document,
            forbidden=[*stated, (target, attribute)],
        )
        return Draft(sharer_facts, receiver_facts, attribute, who=target, answer=asked.value)


@dataclass(frozen=True)
class TwoHopCast:
    """Who a two-hop question is about, shared by facts-twohop and facts-inside-hops: the subject's
    `relation` is the bridge (the asked path), its `decoy_relation` is the decoy, and another person's
    `relation` is someone else (a rival path); `attribute` is what is asked of the bridge."""

    people: tuple[str, str, str, str, str]  # subject, bridge, decoy, other, other's bridge
    relation: str
    decoy_relation: str
    attribute: str

    @classmethod
    def draw(cls, world: World, templates: Templates) -> TwoHopCast:
        people = tuple(world.new_people(5))
        relation, decoy_relation = world.rng.sample(templates.relations, 2)
        return cls(people, relation, decoy_relation, world.rng.choice(world.attributes))

    def relation_facts(self, world: World) -> list[Fact]:
        """The three relation facts: the asked path, the subject's decoy, the rival path."""
        subject, bridge, decoy, other, others_bridge = self.people
        return [
            world.relation(subject, self.relation, bridge),
            world.relation(subject, self.decoy_relation, decoy),
            world.relation(other, self.relation, others_bridge),
        ]


@dataclass(frozen=True)
class TwoHopFacts(FactsTask):
    """Sharer: "S's mentor is B." (plus S's other relation to a decoy D, and another person's
    mentor). Receiver: B's attribute (plus D's and that other person's mentor's, as decoys).
    Asked: the attribute of S's mentor. Neither side alone can answer."""

    name: ClassVar[str] = "facts-twohop"
    same_context: ClassVar[bool] = False

    def __post_init__(self):
        if self.facts_per_document < 3:
            raise ValueError("facts-twohop needs facts_per_document >= 3")

    def draft(self, world: World, templates: Templates) -> Draft:
        hops = TwoHopCast.draw(world, templates)
        subject, bridge, decoy, other, others_bridge = hops.people
        relation, attribute = hops.relation, hops.attribute
        sharer_facts = fill_document(
            world,
            hops.relation_facts(world),
            [subject, bridge, other],
            self.facts_per_document,
            forbidden=[(bridge, attribute)],  # the answer must come from the receiver's side
        )
        asked = world.attribute(bridge, attribute)
        receiver_facts = fill_document(
            world,
            [asked, world.attribute(decoy, attribute), world.attribute(others_bridge, attribute)],
            [bridge, decoy, others_bridge],
            self.facts_per_document,
            forbidden=[(f.person, f.key) for f in sharer_facts],
        )
        return Draft(
            sharer_facts, receiver_facts, attribute, who=f"{subject}'s {relation}", answer=asked.value
        )


@dataclass(frozen=True)
class LongCrossContextFacts(CrossContextFacts):
    """facts-cross with a long sharer document: the asked fact among ~118 others (1,076-1,212
    Gemma3 tokens on the test split), so a fixed-size packet must pick it out, not carry everything.
    Filler facts may repeat a value (12-16 per attribute); the answer's value never repeats."""

    name: ClassVar[str] = "facts-cross-long"
    sharer_people: int = 15
    sharer_facts: int = 118
    reuse_values: bool = True


@dataclass(frozen=True)
class LongerCrossContextFacts(LongCrossContextFacts):
    """facts-cross-long at 2,000-4,000 tokens: the asked fact among ~260 others about 34 people
    (the most a split's 40 names allow with the receiver's people). Forwarding this document
    costs the receiver a long prefill; a fixed-size packet does not grow with it."""

    name: ClassVar[str] = "facts-cross-longer"
    sharer_people: int = 34
    sharer_facts: int = 260

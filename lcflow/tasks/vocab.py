"""The generators' words, read from JSON files under lcflow/data/vocab/.

train.json and test.json hold the answer-bearing words (names and attribute values); they are
disjoint, so a test score measures transfer to unseen entities rather than memorised ones.
templates.json holds the sentence and question phrasings, shared by both splits since they
carry no answers.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from importlib import resources

from lcflow.tasks.base import check_split


def _vocab_file(filename: str) -> dict:
    path = resources.files("lcflow") / "data" / "vocab" / filename
    return json.loads(path.read_text(encoding="utf-8"))


@dataclass(frozen=True)
class Vocab:
    """One split's names and attribute values (every list keeps its file order, for determinism)."""

    split: str
    first_names: tuple[str, ...]
    last_names: tuple[str, ...]
    values: dict[str, tuple[str, ...]]  # attribute ("city") -> its values ("Oslo", ...)

    @property
    def attributes(self) -> tuple[str, ...]:
        return tuple(self.values)


@dataclass(frozen=True)
class Templates:
    """How facts and questions are phrased; several phrasings each, picked at random per sample."""

    facts: dict[str, tuple[str, ...]]  # attribute -> "{name} lives in {value}." ...
    questions: dict[str, tuple[str, ...]]  # attribute -> "Where does {who} live?" ...
    relations: tuple[str, ...]  # "mentor", "neighbour", ...
    relation_facts: tuple[str, ...]  # "{name}'s {relation} is {other}." ...


@functools.cache
def load_templates() -> Templates:
    raw = _vocab_file("templates.json")
    attributes = raw["attributes"]
    return Templates(
        facts={name: tuple(spec["facts"]) for name, spec in attributes.items()},
        questions={name: tuple(spec["questions"]) for name, spec in attributes.items()},
        relations=tuple(raw["relations"]),
        relation_facts=tuple(raw["relation_facts"]),
    )


@functools.cache
def load_vocab(split: str) -> Vocab:
    check_split(split)
    raw = _vocab_file(f"{split}.json")
    vocab = Vocab(
        split=split,
        first_names=tuple(raw["first_names"]),
        last_names=tuple(raw["last_names"]),
        values={name: tuple(values) for name, values in raw["attributes"].items()},
    )
    missing = set(vocab.attributes) ^ set(load_templates().facts)
    if missing:
        raise ValueError(f"{split}.json and templates.json disagree on the attributes: {sorted(missing)}")
    return vocab


@functools.cache
def load_word_list() -> list[str]:
    """The broad training word list (see the file's "about")."""
    return list(_vocab_file("words.json")["words"])

"""The held-out task family: facts about ships, in sentences and questions no adapter trains on.

    python -m lcflow.tasks.unseen            # rewrites lcflow/data/tasks/ships-cross.jsonl

Everything here differs from lcflow.tasks.facts except the shape of the problem: the entity
kind (ships, not people), the attributes (home port, cargo, captain, hull colour, flag), every
sentence template and every question phrasing. Values come from the test vocabulary (cities,
colours, people's names) or lists used nowhere else. As in facts-cross, the sharer's document
holds the asked fact and a rival ship's value of the same attribute; the receiver's own
document holds other facts about the asked ship and the asked attribute of other ships.

The file is the family: evaluate on it with `--task-file`; no training command reads it, and
the alignment corpus (lcflow.training.corpus) draws nothing from it.
"""

from __future__ import annotations

import random
from pathlib import Path

from lcflow.tasks.base import QASample
from lcflow.tasks.jsonl import save_task_file
from lcflow.tasks.vocab import load_vocab

NAME = "ships-cross"
PATH = Path(__file__).resolve().parents[1] / "data" / "tasks" / f"{NAME}.jsonl"

SHIPS = (
    "Albatross Kestrel Meridian Halcyon Corsair Wayfarer Solstice Marlin Tempest Osprey Nautilus "
    "Zephyr Valkyrie Sandpiper Borealis Cormorant Seraph Argonaut Mistral Pelican Calypso Drifter "
    "Heron Larkspur Monsoon Northstar Petrel Quillon Riptide Saltmarsh Tidewater Umbra Vesper "
    "Whitecap Yarrow Bellwether Cobalt Dunmore Ember Fairwind"
).split()
CARGO = (
    "coffee timber copper wool salt rice tea cotton marble steel grain sugar tobacco silk "
    "coal spices olives cocoa rubber iron"
).split()
FLAGS = "Peru Norway Chile Ghana Malta Fiji Oman Latvia Kenya Uruguay Iceland Vietnam".split()

TEMPLATES = {
    "port": ["The {ship} sails out of {value}.", "{value} is the home port of the {ship}."],
    "cargo": ["The {ship} carries a hold full of {value}.", "Crates of {value} fill the {ship}."],
    "captain": ["The {ship} is commanded by {value}.", "{value} is the captain of the {ship}."],
    "hull": ["The hull of the {ship} is painted {value}.", "The {ship} has a {value} hull."],
    "flag": ["The {ship} flies the flag of {value}.", "The {ship} is registered in {value}."],
}
QUESTIONS = {
    "port": ["From which port does the {ship} sail?", "Name the home port of the {ship}."],
    "cargo": ["What goods does the {ship} carry?", "Name the cargo of the {ship}."],
    "captain": ["Who commands the {ship}?", "Name the captain of the {ship}."],
    "hull": ["What colour is the hull of the {ship}?", "Name the hull colour of the {ship}."],
    "flag": ["Under which country's flag does the {ship} sail?", "Where is the {ship} registered?"],
}


def _values(rng: random.Random) -> dict[str, list[str]]:
    vocab = load_vocab("test")
    people = [f"{f} {last}" for f in vocab.first_names for last in vocab.last_names]
    rng.shuffle(people)
    return {
        "port": list(vocab.values["city"]),
        "cargo": list(CARGO),
        "captain": people[:60],
        "hull": list(vocab.values["colour"]),
        "flag": list(FLAGS),
    }


def make_sample(index: int, facts_per_document: int = 7) -> QASample:
    rng = random.Random(f"{NAME}|{index}")
    values = _values(rng)
    ships = rng.sample(SHIPS, 5)
    target, rival = ships[0], ships[1]
    attributes = list(TEMPLATES)
    asked = rng.choice(attributes)
    taken: dict[tuple[str, str], str] = {}

    def fact(ship: str, attribute: str) -> tuple[str, str, str]:
        if (ship, attribute) not in taken:
            used = {v for (_, a), v in taken.items() if a == attribute}
            taken[(ship, attribute)] = rng.choice([v for v in values[attribute] if v not in used])
        return ship, attribute, taken[(ship, attribute)]

    sharer = [fact(target, asked), fact(rival, asked)]
    sharer_ships = [target, rival, ships[2]]
    while len(sharer) < facts_per_document:
        ship, attribute = rng.choice(sharer_ships), rng.choice(attributes)
        if (ship, attribute) not in [(s, a) for s, a, _ in sharer]:
            sharer.append(fact(ship, attribute))
    receiver_ships = [target, ships[3], ships[4]]
    receiver = [fact(ships[3], asked)]
    stated = {(s, a) for s, a, _ in sharer}
    while len(receiver) < facts_per_document:
        ship, attribute = rng.choice(receiver_ships), rng.choice(attributes)
        pair = (ship, attribute)
        if pair in stated or pair == (target, asked) or pair in [(s, a) for s, a, _ in receiver]:
            continue
        receiver.append(fact(ship, attribute))

    def render(facts: list[tuple[str, str, str]]) -> str:
        rng.shuffle(facts)
        return " ".join(rng.choice(TEMPLATES[a]).format(ship=s, value=v) for s, a, v in facts)

    return QASample(
        id=f"{NAME}/{index}",
        sharer_context=render(sharer),
        receiver_context=render(receiver),
        question=rng.choice(QUESTIONS[asked]).format(ship=target),
        answers=[taken[(target, asked)]],
        task=NAME,
        same_context=False,
    )


def write(count: int = 240, path: Path = PATH) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_task_file([make_sample(i) for i in range(count)], path)
    return path


if __name__ == "__main__":
    print(write())

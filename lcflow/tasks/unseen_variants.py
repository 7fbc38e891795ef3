"""The unseen variants of facts-referents and facts-inside-hops: the same problems, in the ships
world of the held-out family (lcflow.tasks.unseen), as task files no adapter trains on.

    python -m lcflow.tasks.unseen_variants   # rewrites lcflow/data/tasks/ships-{referents,inside-hops}.jsonl

ships-referents: ships introduced in pairs ("The Albatross and the Meridian sail in one
convoy."), then each pair's facts by "the former" / "the latter" only ("The latter carries a
hold full of tea."). The asked attribute is stated for both ships of the target's pair, so the
sentence holding the answer, forwarded alone, leaves it a guess between two values.

ships-inside-hops: a ship's captain and owner are named ("The Albatross is commanded by Ada
Brook."), and each person's home town is a separate sentence ("Ada Brook grew up in Lima.");
asked "Where did the captain of the Albatross grow up?", the answer needs both sentences. The
decoys: the same ship's owner and another ship's captain, each with another town.

As in ships-cross, the receiver's own document holds other facts about the asked ship and the
asked attribute of other ships (or people), never the answer.
"""

from __future__ import annotations

import random
from pathlib import Path

from lcflow.tasks.base import QASample
from lcflow.tasks.jsonl import save_task_file
from lcflow.tasks.unseen import QUESTIONS, SHIPS, TEMPLATES, _values

DATA = Path(__file__).resolve().parents[1] / "data" / "tasks"
REFERENTS_NAME, HOPS_NAME = "ships-referents", "ships-inside-hops"
REFERENTS_PATH, HOPS_PATH = DATA / f"{REFERENTS_NAME}.jsonl", DATA / f"{HOPS_NAME}.jsonl"

# How a pair of ships is introduced: the only sentence that names them.
PAIR_INTROS = (
    "The {former} and the {latter} sail in one convoy.",
    "The {former} and the {latter} were built in the same yard.",
    "The {former} and the {latter} share a berth in winter.",
)
# Ship facts the referent variant states (the captain is left to the hops variant).
SHIP_FACTS = ("port", "cargo", "hull", "flag")
ROLES = {"captain": "The {ship} is commanded by {person}.", "owner": "The {ship} belongs to {person}."}
HOMETOWN = ("{person} grew up in {value}.", "{person} was raised in {value}.")
HOP_QUESTIONS = {
    "captain": (
        "Where did the captain of the {ship} grow up?",
        "In which town was the {ship}'s captain raised?",
    ),
    "owner": ("Where did the owner of the {ship} grow up?", "In which town was the {ship}'s owner raised?"),
}


class _Draw:
    """Distinct values per attribute, for one sample."""

    def __init__(self, rng: random.Random):
        self.rng, self.values, self.taken = rng, _values(rng), {}

    @staticmethod
    def pool(attribute: str) -> str:
        return "port" if attribute == "hometown" else attribute  # home towns are cities, as ports are

    def value(self, subject: str, attribute: str) -> str:
        """The value of `attribute` for `subject`, the same each time; no two subjects share one
        (nor a port and a home town)."""
        if (subject, attribute) not in self.taken:
            pool = self.pool(attribute)
            used = {v for (_, a), v in self.taken.items() if self.pool(a) == pool}
            self.taken[(subject, attribute)] = self.rng.choice(
                [v for v in self.values[pool] if v not in used]
            )
        return self.taken[(subject, attribute)]


def _ship_sentence(rng: random.Random, ship: str, attribute: str, value: str) -> str:
    sentence = rng.choice(TEMPLATES[attribute]).format(ship=ship, value=value)
    return sentence[0].upper() + sentence[1:]


def _receiver_document(draw: _Draw, rng: random.Random, target: str, others: list[str], asked: str) -> str:
    """Other facts about the target, and the asked attribute of another ship: never the answer."""
    facts = [(others[0], asked)]
    facts += [(target, a) for a in rng.sample([a for a in SHIP_FACTS if a != asked], 2)]
    facts += [(ship, a) for ship in others for a in rng.sample(SHIP_FACTS, 2) if (ship, a) not in facts]
    rng.shuffle(facts)
    return " ".join(_ship_sentence(rng, s, a, draw.value(s, a)) for s, a in facts)


def make_referent_sample(index: int, pairs: int = 2, facts_per_ship: int = 2) -> QASample:
    rng = random.Random(f"{REFERENTS_NAME}|{index}")
    draw = _Draw(rng)
    ships = rng.sample(SHIPS, 2 * pairs + 2)
    couples = [tuple(ships[i : i + 2]) for i in range(0, 2 * pairs, 2)]
    target_pair = rng.choice(couples)
    target, rival = target_pair if rng.random() < 0.5 else target_pair[::-1]
    asked = rng.choice(SHIP_FACTS)
    blocks = []
    for former, latter in couples:
        stated = {ship: set() for ship in (former, latter)}
        if (former, latter) == target_pair:
            stated = {ship: {asked} for ship in (former, latter)}
        for ship in (former, latter):
            while len(stated[ship]) < facts_per_ship:
                stated[ship].add(rng.choice(SHIP_FACTS))
        facts = [(ship, a) for ship in (former, latter) for a in sorted(stated[ship])]
        rng.shuffle(facts)
        referent = {former: "former", latter: "latter"}
        sentences = [_ship_sentence(rng, referent[s], a, draw.value(s, a)) for s, a in facts]
        blocks.append(" ".join([rng.choice(PAIR_INTROS).format(former=former, latter=latter), *sentences]))
    rng.shuffle(blocks)
    return QASample(
        id=f"{REFERENTS_NAME}/{index}",
        sharer_context=" ".join(blocks),
        receiver_context=_receiver_document(draw, rng, target, ships[2 * pairs :], asked),
        question=rng.choice(QUESTIONS[asked]).format(ship=target),
        answers=[draw.value(target, asked)],
        task=REFERENTS_NAME,
        same_context=False,
    )


def make_inside_hop_sample(index: int) -> QASample:
    rng = random.Random(f"{HOPS_NAME}|{index}")
    draw = _Draw(rng)
    target, other, *receiver_ships = rng.sample(SHIPS, 4)
    people = draw.values["captain"][:3]  # the target's captain and owner, the other ship's captain
    role = rng.choice(tuple(ROLES))
    decoy_role = "owner" if role == "captain" else "captain"
    crew = {(target, role): people[0], (target, decoy_role): people[1], (other, role): people[2]}
    sentences = [ROLES[r].format(ship=s, person=p) for (s, r), p in crew.items()]
    sentences += [rng.choice(HOMETOWN).format(person=p, value=draw.value(p, "hometown")) for p in people]
    sentences += [
        _ship_sentence(rng, s, a, draw.value(s, a))
        for s in (target, other)
        for a in rng.sample(SHIP_FACTS, 1)
    ]
    rng.shuffle(sentences)
    # The receiver knows other ship facts and another person's home town (a rival value).
    stranger = draw.values["captain"][3]
    receiver = _receiver_document(draw, rng, target, receiver_ships, rng.choice(SHIP_FACTS))
    receiver += " " + rng.choice(HOMETOWN).format(person=stranger, value=draw.value(stranger, "hometown"))
    return QASample(
        id=f"{HOPS_NAME}/{index}",
        sharer_context=" ".join(sentences),
        receiver_context=receiver,
        question=rng.choice(HOP_QUESTIONS[role]).format(ship=target),
        answers=[draw.value(people[0], "hometown")],
        task=HOPS_NAME,
        same_context=False,
    )


def write(count: int = 240) -> tuple[Path, Path]:
    save_task_file([make_referent_sample(i) for i in range(count)], REFERENTS_PATH)
    save_task_file([make_inside_hop_sample(i) for i in range(count)], HOPS_PATH)
    return REFERENTS_PATH, HOPS_PATH


if __name__ == "__main__":
    print(*write(), sep="\n")

"""facts-inside-hops: the answer needs two sentences of the sharer's document.

    sharer:   "Ada Brook's mentor is Lior Senn. ... Lior Senn lives in Oslo. ..."
    asked:    "Where does Ada Brook's mentor live?"  ->  Oslo

Both hops are on the sharer's side (unlike facts-twohop, where the second is the receiver's), with
decoys for each: Ada Brook's other relation (a neighbour, who lives elsewhere) and another
person's mentor (who lives elsewhere too). The sentence the question points at ("Ada Brook's
mentor is Lior Senn.") does not hold the answer, and the one that does ("Lior Senn lives in
Oslo.") shares no word with the question: a selection that forwards only what the question
attends to misses a hop, and a sharer that read the document may have joined them. The
receiver's own document holds other people's facts, the asked attribute among them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from lcflow.tasks.facts import Draft, FactsTask, TwoHopCast, World, fill_document
from lcflow.tasks.vocab import Templates


@dataclass(frozen=True)
class InsideHopFacts(FactsTask):
    name: ClassVar[str] = "facts-inside-hops"
    same_context: ClassVar[bool] = False
    facts_per_document: int = 9

    def __post_init__(self):
        if self.facts_per_document < 6:
            raise ValueError("facts-inside-hops needs facts_per_document >= 6 (two hops and their decoys)")

    def draft(self, world: World, templates: Templates) -> Draft:
        hops = TwoHopCast.draw(world, templates)
        subject, bridge, decoy, other, others_bridge = hops.people
        relation, attribute = hops.relation, hops.attribute
        asked = world.attribute(bridge, attribute)
        world.protected.add(asked.value)
        sharer_facts = fill_document(
            world,
            [
                *hops.relation_facts(world),
                asked,
                world.attribute(decoy, attribute),
                world.attribute(others_bridge, attribute),
            ],
            [subject, bridge, decoy, other, others_bridge],
            self.facts_per_document,
        )
        receiver_people = world.new_people(3)
        receiver_facts = fill_document(
            world,
            [world.attribute(receiver_people[0], attribute)],
            receiver_people,
            7,
            forbidden=[(f.person, f.key) for f in sharer_facts],
        )
        return Draft(
            sharer_facts, receiver_facts, attribute, who=f"{subject}'s {relation}", answer=asked.value
        )

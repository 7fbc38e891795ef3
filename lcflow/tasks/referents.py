"""facts-referents: facts stated by reference, so a sentence means something only in its context.

Each entity is named once, in a sentence that introduces two of them; its facts follow, each
naming it only as "the former" or "the latter":

    Ada Brook and Lior Senn share a flat. The latter lives in Lima. The former lives in Oslo.
    Mira Volk and Tal Dunn met at university. The colour the former loves most is teal. ...

Asked "Where does Lior Senn live?", the sentence that holds the answer ("The latter lives in
Lima.") does not say whose fact it is; the same attribute is stated for the other entity of the
pair (the rival), so forwarding that sentence alone leaves the answer a guess between the two
values, while a sharer that read the whole document resolved "the latter" when it read it. The
receiver's own document (as in facts-cross) knows the asked person's other attributes and the
asked attribute for someone else. Issue: what latents carry that forwarded text cannot.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import ClassVar

from lcflow.tasks.facts import Draft, Fact, FactsTask, World, article, fill_document
from lcflow.tasks.vocab import Templates

# How a pair of entities is introduced: the only sentence that names them.
PAIR_INTROS = (
    "{former} and {latter} share a flat.",
    "{former} and {latter} met at university.",
    "{former} and {latter} work at the same firm.",
    "{former} and {latter} are old friends.",
    "{former} and {latter} sing in the same choir.",
)
REFERENTS = ("the former", "the latter")


def render_by_referent(fact: Fact, referent: str, templates: Templates, rng: random.Random) -> str:
    """One attribute fact with the entity named by `referent`, capitalised where it opens."""
    template = rng.choice(templates.facts[fact.key])
    sentence = template.format(name=referent, value=fact.value, a=article(fact.value))
    return sentence[0].upper() + sentence[1:]


@dataclass(frozen=True)
class ReferentFacts(FactsTask):
    name: ClassVar[str] = "facts-referents"
    same_context: ClassVar[bool] = False
    pairs: int = 2  # pairs of entities in the sharer's document
    facts_per_document: int = 8

    def __post_init__(self):
        if not 1 <= self.pairs <= 4 or self.facts_per_document < 2 * self.pairs:
            raise ValueError("need 1 <= pairs <= 4 and at least one fact per entity")

    def draft(self, world: World, templates: Templates) -> Draft:
        people = world.new_people(2 * self.pairs)
        pairs = [tuple(people[i : i + 2]) for i in range(0, len(people), 2)]
        target, rival = world.rng.choice(pairs)
        if world.rng.random() < 0.5:  # the target is the former or the latter, as often
            target, rival = rival, target
        attribute = world.rng.choice(world.attributes)
        asked = world.attribute(target, attribute)
        world.protected.add(asked.value)
        sharer_facts = fill_document(
            world, [asked, world.attribute(rival, attribute)], people, self.facts_per_document
        )
        stated = [(f.person, f.key) for f in sharer_facts]
        other_attribute = world.rng.choice(
            [a for a in world.attributes if (target, a) not in stated and a != attribute]
        )
        receiver_people = [target, *world.new_people(2)]
        receiver_facts = fill_document(
            world,
            [world.attribute(target, other_attribute), world.attribute(receiver_people[1], attribute)],
            receiver_people,
            7,
            forbidden=[*stated, (target, attribute)],
        )
        return Draft(sharer_facts, receiver_facts, attribute, target, asked.value, groups=tuple(pairs))

    def render_sharer(self, draft: Draft, templates: Templates, rng: random.Random) -> str:
        """Per pair, its introduction and then its facts by referent (in a random order); the pairs
        in a random order."""
        blocks = []
        for former, latter in draft.groups:
            facts = [f for f in draft.sharer_facts if f.person in (former, latter)]
            rng.shuffle(facts)
            intro = rng.choice(PAIR_INTROS).format(former=former, latter=latter)
            sentences = [render_by_referent(f, REFERENTS[f.person == latter], templates, rng) for f in facts]
            blocks.append(" ".join([intro, *sentences]))
        rng.shuffle(blocks)
        return " ".join(blocks)

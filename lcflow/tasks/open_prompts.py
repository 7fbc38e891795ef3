"""facts-open: open prompts ("Summarize what you know about Ada Brook.") over facts-cross documents.

The sharer's and the receiver's documents are facts-cross's; instead of one attribute, the
receiver is asked for everything about the person the question names, in a few sentences:

    Question: Write two sentences about Ada Brook.
    Answer in two or three sentences.
    Answer:

No one answer is right. The sample's `answers` are the values of every fact the *sharer's*
document states about that person (what a handoff should bring), and an answer is scored by the
share of them it states (lcflow.eval.metrics.facts_stated) and by whether it is empty. A packet
trained to answer one-word factoid questions may take the receiver over (an empty answer, a lone
word): this family measures that against the text channels. Issue: one general adapter per pair.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import ClassVar

from lcflow.tasks.facts import CrossContextFacts, Draft
from lcflow.tasks.vocab import Templates

OPEN_PROMPTS = (
    "Summarize what you know about {who}.",
    "Write two sentences about {who}.",
    "Describe {who}.",
    "Tell me about {who}.",
    "What do we know about {who}?",
)


@dataclass(frozen=True)
class OpenPromptFacts(CrossContextFacts):
    name: ClassVar[str] = "facts-open"
    open_ended: ClassVar[bool] = True

    def ask(self, draft: Draft, templates: Templates, rng: random.Random) -> tuple[str, list[str]]:
        """An open prompt about the asked person; the answers are every value the sharer's
        document states about them (the asked fact first, then in the document's order)."""
        stated = [f.value for f in draft.sharer_facts if f.person == draft.who and not f.is_relation]
        answers = [draft.answer, *(v for v in stated if v != draft.answer)]
        return rng.choice(OPEN_PROMPTS).format(who=draft.who), answers

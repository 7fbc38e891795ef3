"""The task suite: QA samples for training and evaluating a handoff, and the prompt wording.

    from lcflow.tasks import get_task, format_question_prompt
    samples = get_task("facts-cross").samples("test", 200, seed=0)
    prompt = format_question_prompt(samples[0], include_context=False)

Tasks: facts-same, facts-cross, facts-twohop, facts-cross-long, facts-cross-longer (lcflow.tasks.facts),
facts-referents (lcflow.tasks.referents), facts-inside-hops (lcflow.tasks.inside_hops), facts-open
(lcflow.tasks.open_prompts, open prompts such as "Summarize what you know about X."); training variants
and mixes of them (VARIANTS, MIXES); your own samples come from a JSONL file through load_task_file (see
lcflow.tasks.jsonl).

- base.py: QASample and the Task protocol.
- facts.py: the facts families (same, cross, two-hop, long, longer).
- referents.py: facts-referents, facts stated by "the former" / "the latter".
- inside_hops.py: facts-inside-hops, both hops in the sharer's document.
- open_prompts.py: facts-open, open prompts scored by the facts an answer states.
- unseen.py: the held-out ships family (a task file).
- unseen_variants.py: the referent and inside-hop families' unseen variants, in the ships world (task files).
- mix.py: training mixes of several tasks.
- jsonl.py: task files, your own samples.
- prompts.py: the one wording of a question put to a receiver.
- vocab.py: the generators' words.
"""

from __future__ import annotations

from lcflow.tasks.base import SPLITS, QASample, Task
from lcflow.tasks.facts import (
    CrossContextFacts,
    LongCrossContextFacts,
    LongerCrossContextFacts,
    SameContextFacts,
    TwoHopFacts,
)
from lcflow.tasks.inside_hops import InsideHopFacts
from lcflow.tasks.jsonl import load_task_file, save_task_file
from lcflow.tasks.mix import MixedTask
from lcflow.tasks.open_prompts import OpenPromptFacts
from lcflow.tasks.prompts import (
    ANSWER_INSTRUCTION,
    OPEN_ANSWER_TOKENS,
    OPEN_INSTRUCTION,
    SHORT_ANSWER_TOKENS,
    format_question_prompt,
    question_prompt,
)
from lcflow.tasks.referents import ReferentFacts

TASKS = {
    task.name: task
    for task in (
        SameContextFacts,
        CrossContextFacts,
        TwoHopFacts,
        LongCrossContextFacts,
        # where the sharer's context matters beyond its tokens (the beyond-text issue)
        ReferentFacts,
        InsideHopFacts,
        LongerCrossContextFacts,
        OpenPromptFacts,
    )
}
# Training variants: named options of a task (`lcflow train --task facts-cross-pseudo`).
VARIANTS = {
    "facts-same-pseudo": ("facts-same", {"pseudo_values": 0.5}),
    "facts-cross-pseudo": ("facts-cross", {"pseudo_values": 0.5}),
    "facts-same-words": ("facts-same", {"word_values": 0.8}),
    "facts-cross-words": ("facts-cross", {"word_values": 0.8}),
    "facts-cross-long-words": ("facts-cross-long", {"word_values": 0.8}),
    "facts-twohop-words": ("facts-twohop", {"word_values": 0.8}),
    "facts-referents-words": ("facts-referents", {"word_values": 0.8}),
    "facts-open-words": ("facts-open", {"word_values": 0.8}),
}
# Training mixes (lcflow.tasks.mix): samples drawn from several tasks by weight.
MIXES = {
    "facts-mix-words": (("facts-cross-words", 0.5), ("facts-twohop-words", 0.5)),
    # One adapter for questions and open prompts alike (the beyond-text issue's general adapter).
    "facts-general-words": (
        ("facts-cross-words", 0.4),
        ("facts-referents-words", 0.2),
        ("facts-open-words", 0.4),
    ),
    # The general mix beside documents of ~1,100 tokens (for an adapter with 128 positions).
    "facts-general-long-words": (("facts-cross-long-words", 0.5), ("facts-general-words", 0.5)),
}
TASK_NAMES = tuple(TASKS)


def get_task(name: str, **options) -> Task:
    """A task by name; options go to its constructor (e.g. facts_per_document=8)."""
    if name in MIXES:
        parts = tuple(get_task(part, **options) for part, _ in MIXES[name])
        return MixedTask(name, parts, tuple(weight for _, weight in MIXES[name]))
    if name in VARIANTS:
        name, preset = VARIANTS[name]
        options = {**preset, **options}
    if name not in TASKS:
        raise ValueError(
            f"unknown task {name!r}; known tasks: {', '.join(TASK_NAMES + tuple(VARIANTS) + tuple(MIXES))}"
        )
    return TASKS[name](**options)


__all__ = [
    "ANSWER_INSTRUCTION",
    "OPEN_ANSWER_TOKENS",
    "OPEN_INSTRUCTION",
    "SHORT_ANSWER_TOKENS",
    "SPLITS",
    "TASKS",
    "TASK_NAMES",
    "QASample",
    "Task",
    "format_question_prompt",
    "get_task",
    "load_task_file",
    "question_prompt",
    "save_task_file",
]

"""The families where the sharer's context matters beyond its tokens: facts-referents,
facts-inside-hops and facts-cross-longer (lcflow.tasks)."""

from __future__ import annotations

import re

import pytest

from lcflow.tasks import get_task
from lcflow.tasks.referents import PAIR_INTROS

N = 40


INTROS = [re.escape(i).replace(r"\{former\}", "(.+)").replace(r"\{latter\}", "(.+)") for i in PAIR_INTROS]


def sentences(text: str) -> list[str]:
    return [s for s in re.split(r"(?<=\.) ", text) if s]


def introduced(sentence: str) -> tuple[str, ...] | None:
    """The two names a pair's introduction names, or None for any other sentence."""
    match = next((m for m in (re.fullmatch(i, sentence) for i in INTROS) if m), None)
    return match.groups() if match else None


@pytest.mark.parametrize("split", ["train", "test"])
def test_referents_name_each_entity_once_and_state_its_facts_by_referent(split):
    for sample in get_task("facts-referents").samples(split, N):
        doc = sentences(sample.sharer_context)
        pairs = [introduced(s) for s in doc if introduced(s)]
        facts = [s for s in doc if not introduced(s)]
        assert len(pairs) == 2 and len(facts) == 8, sample.sharer_context
        assert all(s.lower().count("the former") + s.lower().count("the latter") == 1 for s in facts)
        people = [name for pair in pairs for name in pair]
        assert all(sample.sharer_context.count(name) == 1 for name in people)  # named once
        [target] = [name for name in people if name in sample.question]
        # the answer's sentence names nobody: who it is about is only in the context
        [holding] = [s for s in facts if sample.answers[0] in s]
        assert not any(name in holding for name in people)
        assert sample.sharer_context.count(sample.answers[0]) == 1
        assert sample.answers[0] not in sample.receiver_context and target in sample.receiver_context


def test_referents_ask_the_former_and_the_latter_alike():
    referents = []
    for sample in get_task("facts-referents").samples("test", N):
        [holding] = [s for s in sentences(sample.sharer_context) if sample.answers[0] in s]
        referents.append("former" in holding)
    assert 0.25 < sum(referents) / N < 0.75


def test_inside_hops_need_two_sentences_of_the_sharers_document():
    for sample in get_task("facts-inside-hops").samples("test", N):
        subject, relation = re.search(r"(\w+ \w+)'s (\w+)", sample.question).groups()
        doc = sentences(sample.sharer_context)
        [first_hop] = [s for s in doc if subject in s and relation in s]
        bridge = first_hop.replace(subject, "").replace(f"'s {relation}", "")
        bridge = next(name for name in re.findall(r"[A-Z]\w+ [A-Z]\w+", bridge))
        [second_hop] = [s for s in doc if sample.answers[0] in s]
        assert bridge in second_hop and subject not in second_hop and relation not in second_hop
        assert sample.answers[0] not in sample.receiver_context


def test_the_longer_documents_hold_the_answer_once_among_hundreds_of_facts():
    for sample in get_task("facts-cross-longer").samples("test", 5):
        assert len(sentences(sample.sharer_context)) == 260
        assert sample.sharer_context.count(sample.answers[0]) == 1


@pytest.mark.parametrize("name", ["facts-referents", "facts-inside-hops", "facts-cross-longer"])
def test_the_new_families_are_seeded_and_split(name):
    task = get_task(name)
    assert task.samples("test", 3) == task.samples("test", 3)
    assert task.samples("test", 3) != task.samples("train", 3)
    assert all(not s.same_context and s.task == name for s in task.samples("test", 3))

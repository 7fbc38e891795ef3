"""The unseen variants of the referent and inside-hop families (ships-referents,
ships-inside-hops): reproducible, and each sample needs its sharer's context as the family says."""

import re

import pytest

from lcflow.tasks import load_task_file
from lcflow.tasks.unseen import SHIPS
from lcflow.tasks.unseen_variants import (
    HOPS_PATH,
    REFERENTS_PATH,
    make_inside_hop_sample,
    make_referent_sample,
    write,
)


def sentences(text: str) -> list[str]:
    return [s for s in re.split(r"(?<=\.) ", text) if s]


def test_the_shipped_files_are_what_the_generator_writes(tmp_path, monkeypatch):
    from lcflow.tasks import unseen_variants

    monkeypatch.setattr(unseen_variants, "REFERENTS_PATH", tmp_path / "r.jsonl")
    monkeypatch.setattr(unseen_variants, "HOPS_PATH", tmp_path / "h.jsonl")
    for fresh, shipped in zip(write(), (REFERENTS_PATH, HOPS_PATH), strict=True):
        assert [s.to_dict() for s in load_task_file(fresh)] == [s.to_dict() for s in load_task_file(shipped)]


@pytest.mark.parametrize("make", [make_referent_sample, make_inside_hop_sample])
def test_the_answer_is_the_sharers_alone(make):
    for i in range(240):
        sample = make(i)
        answer = sample.answers[0]
        assert sample.sharer_context.count(answer) == 1 and answer not in sample.receiver_context
        assert sample.id.endswith(f"/{i}") and not sample.same_context


def test_a_referent_sample_names_each_ship_once_and_its_answer_sentence_names_none():
    for i in range(240):
        sample = make_referent_sample(i)
        named = [ship for ship in SHIPS if ship in sample.sharer_context]
        assert len(named) == 4 and all(sample.sharer_context.count(s) == 1 for s in named)
        [target] = [ship for ship in named if ship in sample.question]
        [holding] = [s for s in sentences(sample.sharer_context) if sample.answers[0] in s]
        assert not any(ship in holding for ship in SHIPS)
        assert ("former" in holding) != ("latter" in holding)
        assert target in sample.receiver_context  # the receiver knows the ship, not the fact


def test_an_inside_hop_sample_needs_two_sentences():
    for i in range(240):
        sample = make_inside_hop_sample(i)
        ship = next(s for s in SHIPS if s in sample.question)
        role = "captain" if "captain" in sample.question else "owner"
        verb = "is commanded by" if role == "captain" else "belongs to"
        [first] = [s for s in sentences(sample.sharer_context) if s.startswith(f"The {ship} {verb} ")]
        person = first.removeprefix(f"The {ship} {verb} ").rstrip(".")
        [second] = [s for s in sentences(sample.sharer_context) if sample.answers[0] in s]
        assert second.startswith(person) and ship not in second

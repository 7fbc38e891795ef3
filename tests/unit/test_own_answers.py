"""Open prompts in training take the receiver's own answer (lcflow.training.own_answers)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from lcflow.handoff.pair import Receiver
from lcflow.tasks import get_task
from lcflow.training import own_answers


@pytest.fixture
def receiver(tiny_pair):
    torch.set_num_threads(1)
    model, tokenizer = tiny_pair[1]
    return Receiver(model, tokenizer)


def test_open_samples_take_the_receivers_own_answer_and_closed_keep_theirs(receiver, tmp_path, monkeypatch):
    samples = get_task("facts-general-words").samples("train", 8)
    opened = [s for s in samples if s.open_ended]
    assert opened and len(opened) < len(samples)
    cache = tmp_path / "run" / own_answers.OWN_ANSWERS
    monkeypatch.setattr(own_answers, "own_answer", lambda r, s: f"says {s.id}")  # the generation, below
    trained = own_answers.with_own_answers(samples, receiver, cache)
    for before, after in zip(samples, trained, strict=True):
        expected = [f"says {before.id}"] if before.open_ended else before.answers
        assert after == dataclasses.replace(before, answers=expected)
    assert [json.loads(line)["id"] for line in cache.read_text().splitlines()] == [s.id for s in opened]

    # a resumed run reads them back and generates nothing
    monkeypatch.setattr(own_answers, "own_answer", lambda r, s: pytest.fail("generated again"))
    assert own_answers.with_own_answers(samples, receiver, cache) == trained


def test_an_empty_own_answer_keeps_the_facts(receiver, tmp_path, monkeypatch):
    samples = [s for s in get_task("facts-open").samples("train", 2)]
    monkeypatch.setattr(own_answers, "own_answer", lambda r, s: "")
    assert own_answers.with_own_answers(samples, receiver, tmp_path / "a.jsonl") == samples


def test_own_answer_is_the_receiver_reading_the_document_as_forward_does(receiver):
    """The first line of the generation the eval's `forward` method makes for the same sample (greedy)."""
    from lcflow.eval.harness import EvalModels, run_sample
    from lcflow.handoff.generation import GenerationSettings
    from lcflow.tasks import OPEN_ANSWER_TOKENS

    sample = get_task("facts-open").samples("test", 1)[0]
    pair = (receiver.model, receiver.tokenizer)
    models = EvalModels(sharer=pair, receiver=pair)
    forward = run_sample("forward", models, sample, GenerationSettings(max_new_tokens=OPEN_ANSWER_TOKENS))
    first_line = forward.generated.lstrip().split("\n", 1)[0]
    assert own_answers.own_answer(receiver, sample) == own_answers.LEAD_IN.sub("", first_line).strip()
    assert own_answers.LEAD_IN.sub("", "Answer: answer:Ada lives in Oslo.") == "Ada lives in Oslo."


def test_a_trainer_on_the_general_mix_learns_open_prompts_as_the_receiver_answers(tiny_pair, tmp_path):
    from lcflow.training.train import TrainConfig, Trainer

    cfg = TrainConfig(sharer="s", receiver="r", out=str(tmp_path / "run"), mode="lcfx", steps=2)
    cfg.task, cfg.batch_size, cfg.bottleneck, cfg.slots = "facts-general-words", 4, 16, 4
    trainer = Trainer(cfg, *tiny_pair)
    receiver = Receiver(*tiny_pair[1])
    drawn = get_task("facts-general-words").samples("train", 8)
    assert [s.id for s in trainer.samples] == [s.id for s in drawn]
    for sample, original in zip(trainer.samples, drawn, strict=True):
        expected = own_answers.own_answer(receiver, original) if original.open_ended else None
        assert sample.answers == ([expected] if expected else original.answers)
    assert (tmp_path / "run" / own_answers.OWN_ANSWERS).is_file()
    trainer.run()
    assert len(trainer.losses) == 2

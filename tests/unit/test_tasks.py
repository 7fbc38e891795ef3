"""The task suite: determinism, disjoint vocabularies, per-task sample consistency, the JSONL loader."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from lcflow.tasks import (
    ANSWER_INSTRUCTION,
    OPEN_INSTRUCTION,
    TASK_NAMES,
    QASample,
    Task,
    format_question_prompt,
    get_task,
    load_task_file,
    question_prompt,
    save_task_file,
)
from lcflow.tasks.facts import render_fact
from lcflow.tasks.open_prompts import OPEN_PROMPTS
from lcflow.tasks.vocab import load_templates, load_vocab

N = 150  # samples per task and split in the consistency checks: enough to hit every attribute


def mentions(text: str, phrase: str) -> bool:
    """Whether `phrase` occurs in `text` as whole words (so "Rome" is not found in "Romeo")."""
    return re.search(rf"\b{re.escape(phrase)}\b", text, re.IGNORECASE) is not None


def sentences(document: str) -> list[str]:
    return re.split(r"(?<=\.) ", document)


def all_words(split: str) -> dict[str, list[str]]:
    vocab = load_vocab(split)
    return {"first_names": list(vocab.first_names), "last_names": list(vocab.last_names)} | {
        attribute: list(values) for attribute, values in vocab.values.items()
    }


# --- vocabulary --------------------------------------------------------------------------------


def test_train_and_test_vocabularies_are_disjoint():
    train = {w.lower() for words in all_words("train").values() for w in words}
    test = {w.lower() for words in all_words("test").values() for w in words}
    assert not train & test, f"shared between splits: {sorted(train & test)}"


@pytest.mark.parametrize("split", ["train", "test"])
def test_no_word_belongs_to_two_categories_or_the_templates(split):
    """A value that is also a name, another attribute's value, a relation or a template word
    would make "the answer is (not) in the document" ambiguous."""
    owner: dict[str, str] = {}
    for category, words in all_words(split).items():
        assert len(set(words)) == len(words), f"duplicates in {split} {category}"
        for word in words:
            assert word.lower() not in owner, f"{word!r} is in both {owner[word.lower()]} and {category}"
            owner[word.lower()] = category
    templates = load_templates()
    template_text = " ".join(
        [s for group in (*templates.facts.values(), *templates.questions.values()) for s in group]
        + list(templates.relation_facts)
        + list(templates.relations)
    )
    for word, category in owner.items():
        assert not mentions(template_text, word), f"{category} word {word!r} appears in a template"


@pytest.mark.parametrize("split", ["train", "test"])
def test_every_attribute_has_templates_and_enough_values(split):
    vocab, templates = load_vocab(split), load_templates()
    assert set(vocab.values) == set(templates.facts) == set(templates.questions)
    for attribute, values in vocab.values.items():
        assert len(values) >= 10, f"{split} {attribute}: too few values for a sample's distinct people"
        assert len(templates.facts[attribute]) >= 2 and len(templates.questions[attribute]) >= 2
        for template in templates.questions[attribute]:
            assert "{who}" in template
    assert len(vocab.first_names) >= 20 and len(vocab.last_names) >= 20


def test_every_fact_template_states_its_value():
    from lcflow.tasks.facts import Fact

    templates = load_templates()
    for attribute, phrasings in templates.facts.items():
        for index in range(len(phrasings)):
            rng = _FixedChoice(index)
            text = render_fact(Fact("Ada Brook", attribute, "owl"), templates, rng)
            assert "Ada Brook" in text and mentions(text, "owl"), text
            assert " a owl" not in text  # the article follows the value


class _FixedChoice:
    """A stand-in rng whose choice() always takes the same index (to render every template)."""

    def __init__(self, index: int):
        self.index = index

    def choice(self, options):
        return options[self.index]


# --- determinism -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", TASK_NAMES)
def test_same_seed_same_samples_and_prefix_stable(name):
    task = get_task(name)
    first = task.samples("train", 20, seed=3)
    assert first == get_task(name).samples("train", 20, seed=3)
    assert first[:5] == task.samples("train", 5, seed=3)  # asking for more changes none of the first
    assert first != task.samples("train", 20, seed=4)
    assert len({s.id for s in first}) == 20


def test_generation_does_not_touch_global_random():
    import random

    random.seed(123)
    expected = random.random()
    random.seed(123)
    get_task("facts-twohop").samples("train", 5)
    assert random.random() == expected


def test_samples_do_not_depend_on_the_hash_seed():
    """str hashes change between processes; generation must never depend on them."""
    code = (
        "import json; from lcflow.tasks import get_task, TASK_NAMES; "
        "print(json.dumps([s.to_dict() for n in TASK_NAMES for s in get_task(n).samples('test', 5)]))"
    )
    outputs = [
        subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "PYTHONHASHSEED": hash_seed},
        ).stdout
        for hash_seed in ("1", "2")
    ]
    assert outputs[0] == outputs[1]


def test_golden_sample():
    """A fixed sample, so any change to the generator, the vocabulary or the RNG use is noticed
    (regenerate this expectation deliberately when the change is intended)."""
    sample = get_task("facts-twohop").samples("train", 1, seed=0)[0]
    assert sample.question == "What is Ravi Orlov's manager's job?"
    assert sample.answers == ["carpenter"]
    assert sample.sharer_context.startswith("Anton Stone practises the violin every evening.")


# --- per-task consistency ------------------------------------------------------------------------


@pytest.mark.parametrize("name", TASK_NAMES)
@pytest.mark.parametrize("split", ["train", "test"])
def test_samples_use_only_their_splits_vocabulary(name, split):
    other = "test" if split == "train" else "train"
    own_values = {w for ws in load_vocab(split).values.values() for w in ws}
    foreign = [w for ws in all_words(other).values() for w in ws]
    for sample in get_task(name).samples(split, 40):
        assert sample.answers[0] in own_values
        text = " ".join([sample.sharer_context, sample.receiver_context, sample.question])
        assert not [w for w in foreign if mentions(text, w)], sample


@pytest.mark.parametrize("name", TASK_NAMES)
def test_sample_fields(name):
    task = get_task(name)
    assert isinstance(task, Task) and task.name == name
    for sample in task.samples("test", N):
        assert sample.task == name and sample.same_context == task.same_context
        assert sample.open_ended == task.open_ended
        assert sample.question.endswith("?") or sample.open_ended  # "Describe Ada Brook."
        assert len(sample.answers) >= 1 and 1 <= len(sample.answers[0].split()) <= 2
        # the long variants state sharer_facts; facts-referents adds one introduction per pair
        sharer = getattr(task, "sharer_facts", 0) or task.facts_per_document + getattr(task, "pairs", 0)
        for document, count in ((sample.sharer_context, sharer), (sample.receiver_context, 7)):
            assert len(sentences(document)) == count
            assert 4 * count <= len(document.split()) <= 16 * count  # sentences of a few words


def test_facts_same_answer_in_the_shared_document():
    for sample in get_task("facts-same").samples("train", N):
        assert sample.receiver_context == sample.sharer_context
        assert mentions(sample.sharer_context, sample.answers[0])
        asked = _asked_person(sample.question)
        assert any(asked in s and mentions(s, sample.answers[0]) for s in sentences(sample.sharer_context))


def test_facts_cross_only_the_sharer_has_the_answer():
    attributes_seen = set()
    for sample in get_task("facts-cross").samples("train", N):
        answer, asked = sample.answers[0], _asked_person(sample.question)
        assert sample.receiver_context != sample.sharer_context
        assert any(asked in s and mentions(s, answer) for s in sentences(sample.sharer_context))
        assert not mentions(sample.receiver_context, answer)
        # A distractor: the receiver knows the asked person, just not the asked fact.
        assert asked in sample.receiver_context
        attributes_seen.add(_attribute_of(answer, "train"))
    assert attributes_seen == set(load_vocab("train").attributes)


def test_facts_twohop_needs_both_documents():
    relations = load_templates().relations
    for sample in get_task("facts-twohop").samples("train", N):
        answer = sample.answers[0]
        subject, relation = re.search(
            rf"([A-Z]\w+ [A-Z]\w+)'s ({'|'.join(relations)})\b", sample.question
        ).groups()
        link = next(s for s in sentences(sample.sharer_context) if subject in s and mentions(s, relation))
        bridge = next(n for n in re.findall(r"[A-Z]\w+ [A-Z]\w+", link) if n != subject)
        # The link is only on the sharer's side, the answer only on the receiver's, next to the bridge.
        assert not mentions(sample.sharer_context, answer)
        assert any(bridge in s and mentions(s, answer) for s in sentences(sample.receiver_context))
        assert not any(subject in s and bridge in s for s in sentences(sample.receiver_context))
        # Distractors on both sides: another relation of the subject, other people's values.
        assert sum(subject in s for s in sentences(sample.sharer_context)) >= 2
        same_kind = load_vocab("train").values[_attribute_of(answer, "train")]
        assert sum(mentions(sample.receiver_context, v) for v in same_kind) >= 2


def _asked_person(question: str) -> str:
    return re.search(r"[A-Z]\w+ [A-Z]\w+", question).group(0)


def _attribute_of(value: str, split: str) -> str:
    return next(a for a, vs in load_vocab(split).values.items() if value in vs)


def test_facts_per_document_is_a_parameter():
    sample = get_task("facts-cross", facts_per_document=4, people_per_document=2).samples("train", 1)[0]
    assert len(sentences(sample.sharer_context)) == 4 and len(sentences(sample.receiver_context)) == 4
    sample = get_task("facts-twohop", facts_per_document=3).samples("train", 1)[0]
    assert len(sentences(sample.sharer_context)) == 3
    with pytest.raises(ValueError):
        get_task("facts-same", facts_per_document=2, people_per_document=3)


def test_unknown_task_and_split():
    with pytest.raises(ValueError, match="facts-same.*facts-cross.*facts-twohop"):
        get_task("facts-nope")
    with pytest.raises(ValueError, match="split"):
        get_task("facts-same").samples("validation", 1)


# --- prompts -----------------------------------------------------------------------------------


def test_prompt_wording():
    sample = get_task("facts-cross").samples("test", 1)[0]
    bare = format_question_prompt(sample, include_context=False)
    assert bare == question_prompt(sample.question)
    assert bare.startswith(f"Question: {sample.question}\n") and bare.endswith("Answer:")
    assert sample.receiver_context not in bare
    assert format_question_prompt(sample, include_context=True) == sample.receiver_context + "\n\n" + bare
    no_context = QASample("x", "doc", "", "Q?", ["a"], "t", False)
    assert format_question_prompt(no_context, include_context=True) == question_prompt("Q?")


def test_facts_open_asks_for_everything_the_sharer_states_about_one_person():
    PROMPTS = [re.escape(p).replace(r"\{who\}", "(.+)") for p in OPEN_PROMPTS]
    for sample in get_task("facts-open").samples("test", N):
        assert sample.open_ended
        [person] = [m[1] for m in (re.fullmatch(p, sample.question) for p in PROMPTS) if m]
        stated = [s for s in sentences(sample.sharer_context) if person in s]
        # every answer is one of the person's facts in the sharer's document, and each such fact is an answer
        assert len(sample.answers) == len(stated) >= 1
        assert all(any(mentions(s, answer) for s in stated) for answer in sample.answers)
        prompt = format_question_prompt(sample)
        assert OPEN_INSTRUCTION in prompt and ANSWER_INSTRUCTION not in prompt
    # the documents are facts-cross's, sample for sample
    cross = get_task("facts-cross").samples("test", 5)
    opened = get_task("facts-open").samples("test", 5)
    assert [s.sharer_context for s in cross] != [s.sharer_context for s in opened]  # own seeds
    assert {s.task for s in opened} == {"facts-open"}


# --- JSONL task files ----------------------------------------------------------------------------


def test_task_file_round_trip(tmp_path):
    samples = get_task("facts-twohop").samples("test", 3)
    path = save_task_file(samples, tmp_path / "frozen.jsonl")
    assert load_task_file(path) == samples


def test_task_file_defaults(tmp_path):
    path = tmp_path / "mine.jsonl"
    line = {
        "sharer_context": "Ada lives in Oslo.",
        "receiver_context": "",
        "question": "Where?",
        "answers": ["Oslo"],
    }
    path.write_text(
        json.dumps(line)
        + "\n\n"
        + json.dumps({**line, "id": "q2", "receiver_context": line["sharer_context"]})
        + "\n"
    )
    first, second = load_task_file(path)
    assert (first.id, first.task, first.same_context, first.open_ended) == ("mine-1", "mine", False, False)
    assert (second.id, second.same_context) == ("q2", True)


def test_task_file_open_prompts(tmp_path):
    samples = get_task("facts-open").samples("test", 3)
    path = save_task_file(samples, tmp_path / "open.jsonl")
    assert load_task_file(path) == samples and all(s.open_ended for s in load_task_file(path))
    record = {**samples[0].to_dict(), "open_ended": "yes"}
    path.write_text(json.dumps(record) + "\n")
    with pytest.raises(ValueError, match="open.jsonl:1: 'open_ended' must be true or false"):
        load_task_file(path)


def test_task_file_errors_name_every_bad_line(tmp_path):
    good = {
        "sharer_context": "Ada lives in Oslo.",
        "receiver_context": "",
        "question": "Where?",
        "answers": ["Oslo"],
    }
    lines = [
        json.dumps(good),  # 1
        "{not json",  # 2
        json.dumps({k: v for k, v in good.items() if k != "answers"}),  # 3
        json.dumps({**good, "answers": []}),  # 4
        json.dumps({**good, "anwsers": ["x"]}),  # 5
        json.dumps(["a", "list"]),  # 6
        json.dumps({**good, "id": "dup"}),  # 7
        json.dumps({**good, "id": "dup"}),  # 8
        json.dumps({**good, "question": "  "}),  # 9
    ]
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError) as info:
        load_task_file(path)
    message = str(info.value)
    assert "7 bad line(s)" in message
    for line_number, reason in [
        (2, "not valid JSON"),
        (3, "missing field 'answers'"),
        (4, "'answers' must be a non-empty list"),
        (5, "unknown field 'anwsers'"),
        (6, "expected a JSON object"),
        (8, "duplicate id 'dup' (first on line 7)"),
        (9, "'question' is empty"),
    ]:
        assert f"bad.jsonl:{line_number}: " in message and reason in message
    assert "bad.jsonl:1:" not in message and "bad.jsonl:7:" not in message


def test_empty_task_file(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n")
    with pytest.raises(ValueError, match="no samples"):
        load_task_file(path)


def test_pseudo_value_variant_invents_values_that_cannot_be_memorised():
    from lcflow.tasks.vocab import load_vocab

    real = {v for values in load_vocab("train").values.values() for v in values}
    samples = get_task("facts-cross-pseudo").samples("train", 40, seed=0)
    invented = [s for s in samples if s.answers[0] not in real]
    assert 8 <= len(invented) <= 32  # about half
    assert len({s.answers[0] for s in invented}) == len(invented)  # fresh words, not a small set
    for s in invented:
        assert s.answers[0] in s.sharer_context and s.answers[0] not in s.receiver_context
    assert get_task("facts-cross-pseudo").samples("train", 5) == get_task("facts-cross-pseudo").samples(
        "train", 5
    )


def test_word_value_variant_draws_from_a_broad_list_without_test_words():
    from lcflow.tasks.vocab import load_vocab, load_word_list

    words = load_word_list()
    test_values = {v.lower() for values in load_vocab("test").values.values() for v in values}
    assert len(words) > 5000 and not test_values & set(words)
    samples = get_task("facts-cross-words").samples("train", 50, seed=0)
    from_list = [s for s in samples if s.answers[0].lower() in set(words)]
    assert len(from_list) >= 30 and len({s.answers[0] for s in from_list}) >= 28
    assert all(s.answers[0] in s.sharer_context and s.answers[0] not in s.receiver_context for s in from_list)


def test_long_documents_hide_one_answer_among_many_facts():
    """facts-cross-long: >= 1,000 tokens of facts on the sharer's side; filler values may repeat,
    the answer's never does, and the receiver's document never contains it."""
    task = get_task("facts-cross-long")
    for sample in task.samples("test", 30):
        assert len(sentences(sample.sharer_context)) == 118
        assert len(re.findall(rf"\b{re.escape(sample.answers[0])}\b", sample.sharer_context)) == 1
        assert not mentions(sample.receiver_context, sample.answers[0])
    assert get_task("facts-cross").samples("test", 5) != [s for s in task.samples("test", 5)]


def test_the_training_mix_draws_both_hops_by_weight_and_is_stable():
    """facts-mix-words: about half single-hop, half two-hop samples, each exactly its part's
    sample at that index (so ids never collide), the same whatever n is."""
    mix = get_task("facts-mix-words")
    samples = mix.samples("train", 200, seed=1)
    kinds = [s.task for s in samples]
    assert set(kinds) == {"facts-cross", "facts-twohop"} and 70 <= kinds.count("facts-twohop") <= 130
    assert len({s.id for s in samples}) == 200 and samples[:10] == mix.samples("train", 10, seed=1)
    parts = {"facts-cross": get_task("facts-cross-words"), "facts-twohop": get_task("facts-twohop-words")}
    assert all(s == parts[s.task].sample("train", i, seed=1) for i, s in enumerate(samples))
    with pytest.raises(ValueError, match="weight"):
        type(mix)("bad", mix.parts, (1.0,))

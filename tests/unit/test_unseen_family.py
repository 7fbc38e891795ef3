"""The held-out task family (ships-cross): reproducible, answerable only from the sharer's side,
and disjoint in wording from the training tasks."""

from lcflow.tasks import get_task, load_task_file
from lcflow.tasks.unseen import PATH, SHIPS, make_sample, write


def test_the_shipped_file_is_what_the_generator_writes(tmp_path):
    fresh = load_task_file(write(path=tmp_path / "ships.jsonl"))
    assert [s.to_dict() for s in fresh] == [s.to_dict() for s in load_task_file(PATH)]


def test_answer_is_in_the_sharer_document_only():
    for i in range(240):
        sample = make_sample(i)
        answer = sample.answers[0]
        assert answer in sample.sharer_context and answer not in sample.receiver_context
        ship = next(w for w in sample.question.rstrip("?.").split() if w in SHIPS)
        assert f"the {ship}" in sample.sharer_context or f"The {ship}" in sample.sharer_context


def test_no_sentence_or_question_of_the_training_tasks_appears():
    train = get_task("facts-cross").samples("train", 50)
    words = {w.strip(".?'s") for s in train for w in (s.sharer_context + " " + s.question).split()}
    ships = load_task_file(PATH)[:50]
    assert not any(s.question in {t.question for t in train} for s in ships)
    assert "ship" not in " ".join(t.sharer_context for t in train).lower()
    assert {"hull", "cargo", "captain"}.isdisjoint(words)

"""The text channels LCF-X is compared with: the fair note, forward, forward-selected, and the text
reader (a LoRA trained as the LCF-X adapter is), on tiny models: what each sends, that the reader
trains, saves, resumes and loads like any adapter, and that `lcflow eval` runs them all side by
side on the same samples."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import run_cli, span_adapter, write_task_file
from safetensors.torch import load_file

from lcflow.adapter import AdapterMismatchError
from lcflow.adapter.reader import TextReader
from lcflow.core.layer_map import build_layer_map
from lcflow.core.prompting import C2C_NOTE_INSTRUCTION, finish_note, note_prompt
from lcflow.handoff.pair import Sharer
from lcflow.packets.alignment import collect_stats, fit_alignment
from lcflow.packets.selection import selected_sentences
from lcflow.tasks import get_task
from lcflow.training.config import TrainConfig
from lcflow.training.corpus import alignment_corpus

DOC = "Ann is here. Bob lives in Rome. Cy has a dog."


def word_spans(text: str) -> torch.Tensor:
    """One token per word plus a BOS with an empty span, as a tokenizer would give."""
    offsets, start = [(0, 0)], 0
    for word in text.split(" "):
        start = text.index(word, start)
        offsets.append((start, start + len(word)))
        start += len(word)
    return torch.tensor(offsets)


def test_selected_sentences_are_the_whole_sentences_holding_the_positions():
    spans = word_spans(DOC)
    assert selected_sentences(DOC, spans, torch.tensor([5])) == "Bob lives in Rome."  # "in"
    # positions of the last and the first sentence: both whole, in document order
    assert selected_sentences(DOC, spans, torch.tensor([9, 1])) == "Ann is here. Cy has a dog."
    assert selected_sentences(DOC, spans, torch.tensor([0])) == ""  # BOS holds no text


def test_a_fair_note_is_one_sentence_of_its_first_line():
    assert finish_note(" Bob lives in Rome. He also has a cat.\nQuestion: x") == "Bob lives in Rome."
    assert finish_note("Bob lives in Rome\nNote: more") == "Bob lives in Rome"
    assert finish_note("Is it Rome? Yes.") == "Is it Rome?"
    # a base model that skips its note and starts the next few-shot example wrote no note
    assert finish_note("\nQuestion: Where does Bob live?") == ""
    assert finish_note(" whole note.\nkept ", style="c2c") == "whole note.\nkept"  # the paper's, untouched


def test_the_note_prompt_is_an_instruction_or_few_shot_for_a_base_model(tiny_pair):
    (_, tokenizer), _ = tiny_pair
    chat = note_prompt(tokenizer, DOC, "Where does Bob live?")
    assert "Where does Bob live?" in chat and DOC in chat and "Note:" not in chat
    c2c = note_prompt(tokenizer, DOC, "Where does Bob live?", style="c2c")
    assert C2C_NOTE_INSTRUCTION.splitlines()[1] in c2c

    class Base:  # a tokenizer without a chat template: a base model
        chat_template = None

    few_shot = note_prompt(Base(), DOC, "Where does Bob live?")
    assert few_shot.endswith(f"Text: {DOC}\nQuestion: Where does Bob live?\nNote:")
    assert few_shot.count("Note:") == 3  # two worked examples, then this one
    with pytest.raises(ValueError, match="note style"):
        note_prompt(tokenizer, DOC, "q", style="long")


def test_a_note_stops_at_its_first_sentence_and_at_most_64_tokens(tiny_pair):
    (model, tokenizer), _ = tiny_pair
    sharer = Sharer(model, tokenizer)
    settings = sharer.note_settings("fair")
    assert settings.max_new_tokens == 64 and "\n" in settings.stop and ". " in settings.stop
    assert sharer.note_settings("c2c").max_new_tokens == 256 and sharer.note_settings("c2c").stop == []
    note = sharer.write_message(DOC, "Where does Bob live?", max_new_tokens=8)
    assert "\n" not in note and note == finish_note(note)


@pytest.fixture(scope="module")
def span_dir(tiny_pair, tmp_path_factory) -> Path:
    """A span-packet LCF-X adapter for the tiny pair (closed-form alignment, budget 8)."""
    sharer, receiver = tiny_pair
    stats = collect_stats(sharer, receiver, alignment_corpus(20), build_layer_map(3, 2), 0, False)
    adapter = span_adapter(sharer, receiver, fit_alignment(stats, 0, 16), slots=8)
    return adapter.save_pretrained(tmp_path_factory.mktemp("spans") / "lcfx")


def reader_config(out: Path, **settings) -> TrainConfig:
    base = dict(sharer="s", receiver="r", mode="text-reader", task="facts-cross", batch_size=2, lr=1e-2)
    return TrainConfig(out=str(out), **(base | settings))


def test_a_forward_selected_reader_trains_resumes_and_loads_as_an_adapter(tiny_pair, span_dir, tmp_path):
    from lcflow.training.reader import ReaderTrainer

    sharer, (model, tokenizer) = tiny_pair
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = reader_config(tmp_path / "reader", steps=2, checkpoint_every=1, init_adapter=str(span_dir))
    trainer = ReaderTrainer(cfg, sharer, (model, tokenizer))
    out = trainer.run()
    assert len(trainer.losses) == 2 and all(loss > 0 for loss in trainer.losses)
    names = {p.name for p in out.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "reader_config.json"} <= names
    # the channel text is the selection's sentences: never more than the document
    sample = trainer.samples[0]
    assert 0 < len(trainer.channel_text(sample)) <= len(sample.sharer_context)
    # the receiver itself is untouched: the reader trained a copy
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())

    reader = TextReader.from_pretrained(out, model, tokenizer)
    assert reader.config.channel == "forward-selected" and reader.config.selection_adapter == str(span_dir)
    assert reader.config.training["steps_done"] == 2
    # merged in, the LoRA still reports its size (eval tables and cards show it)
    assert reader.parameter_counts()["total"] == trainer.adapter.parameter_counts()["total"] > 0
    ids = torch.tensor([[1, 5, 9, 13]])
    with torch.no_grad():  # trained: it reads differently from the receiver it started as
        assert not torch.allclose(reader.model(ids).logits, model(ids).logits)
    with pytest.raises(AdapterMismatchError, match="text reader's receiver"):
        TextReader.from_pretrained(out, *sharer)  # another model

    cfg.steps = 3  # resume from the checkpoint and take one more step
    again = ReaderTrainer(cfg, sharer, (model, tokenizer))
    again.run()
    assert len(again.losses) == 3 and again.losses[:2] == trainer.losses


def test_init_reader_starts_from_a_trained_readers_weights_and_refuses_another_channel(
    tiny_pair, span_dir, tmp_path
):
    """--init-reader: the fair control for an LCF-X adapter refined with --init-adapter starts
    where the trained reader left off (its LoRA weights), not from an untrained LoRA."""
    from lcflow.training.reader import ReaderTrainer

    sharer, receiver = tiny_pair
    first = reader_config(tmp_path / "first", steps=1, init_adapter=str(span_dir))
    trained = ReaderTrainer(first, sharer, receiver).run()
    again = reader_config(
        tmp_path / "again", steps=1, init_adapter=str(span_dir), init_reader=str(trained), seed=1
    )
    start = ReaderTrainer(again, sharer, receiver).adapter.state_dict()
    fresh = ReaderTrainer(
        reader_config(tmp_path / "fresh", steps=1, init_adapter=str(span_dir)), sharer, receiver
    )
    saved = load_file(trained / "adapter_model.safetensors")
    assert start.keys() == saved.keys()
    assert all(torch.equal(start[k], saved[k]) for k in saved)
    assert not all(torch.equal(fresh.adapter.state_dict()[k], saved[k]) for k in saved)
    other = reader_config(tmp_path / "other", steps=1, channel="forward", init_reader=str(trained))
    with pytest.raises(ValueError, match="give the same --channel and --rank"):
        ReaderTrainer(other, sharer, receiver)


def test_a_reader_copied_for_a_second_pair_says_so_and_reads_that_pairs_selection(tiny_pair, tmp_path):
    """scripts/ship_reader.py --copy: the same weights, the second pair's selection adapter, and a
    card that names where the weights came from instead of claiming a training run of their own."""
    import subprocess
    import sys

    from lcflow.adapter.card import render_markdown

    _, (model, tokenizer) = tiny_pair
    source, target = tmp_path / "a-reader-selected", tmp_path / "b-reader-selected"
    TextReader.for_model(model, tokenizer, "forward-selected", rank=4).save_pretrained(source)
    script = Path(__file__).resolve().parents[2] / "scripts" / "ship_reader.py"
    argv = [sys.executable, str(script), "--copy", str(source), str(target), "--selection", "b-lcfx"]
    subprocess.run([*argv, "--why", "same budget"], check=True, capture_output=True)
    copy = TextReader.from_pretrained(target, model, tokenizer)
    assert copy.config.selection_adapter == "b-lcfx"
    assert copy.config.training == {"copied_from": str(source), "copy_reason": "same budget"}
    assert (target / "adapter_model.safetensors").read_bytes() == (
        source / "adapter_model.safetensors"
    ).read_bytes()
    card = {
        "adapter": target.name,
        "mode": "text-reader",
        "channel": "forward-selected",
        "receiver": "r",
        "selection_adapter": "b-lcfx",
        "lora": {"rank": 4, "alpha": 8, "target_modules": ["q_proj"]},
        "training": copy.config.training,
        "build_command": "x",
        "eval": {"task": "t", "split": "test", "seed": 0, "n": 0, "max_new_tokens": 1},
        "results": {},
    }
    text = render_markdown(card)
    assert f"the weights of `{source}`" in text and "copied with no further training" in text
    assert "trained to read" not in text


def test_forward_selected_needs_the_lcfx_adapter_whose_selection_it_forwards(tiny_pair, tmp_path):
    from lcflow.training.reader import ReaderTrainer

    with pytest.raises(ValueError, match="--init-adapter"):
        ReaderTrainer(reader_config(tmp_path / "r", steps=1), *tiny_pair)


def test_training_on_a_task_file_holds_out_and_records_a_validation_split(tiny_pair, tmp_path):
    from lcflow.training.reader import ReaderTrainer

    task_file = write_task_file(tmp_path / "mine.jsonl", 10)
    cfg = reader_config(
        tmp_path / "reader", steps=3, channel="forward", task_file=str(task_file), validation=0.2
    )
    trainer = ReaderTrainer(cfg, *tiny_pair)
    split = json.loads((tmp_path / "reader" / "split.json").read_text())
    assert len(split["train"]) == 8 and len(split["validation"]) == 2
    assert not set(split["train"]) & set(split["validation"])
    assert {s.id for s in trainer.samples} <= set(split["train"])  # never a held-out sample
    assert len(trainer.samples) == 6 and trainer.data["epochs"] == 0.75
    held = [
        json.loads(line)["id"] for line in (tmp_path / "reader" / "validation.jsonl").read_text().splitlines()
    ]
    assert held == split["validation"]
    trainer.run()
    assert (
        json.loads((tmp_path / "reader" / "reader_config.json").read_text())["training"]["train_samples"] == 8
    )


def test_eval_runs_every_text_channel_beside_lcfx_on_the_same_samples(
    tiny_pair, tiny_dir, span_dir, tmp_path
):
    from lcflow.training.reader import ReaderTrainer

    readers = {}
    for channel, name in (("forward-selected", "reader-selected"), ("forward", "reader-forward")):
        cfg = reader_config(tmp_path / name, steps=1, channel=channel, init_adapter=str(span_dir))
        readers[name] = ReaderTrainer(cfg, *tiny_pair).run()
    methods = "receiver,skyline,text,text-c2c,forward-selected,forward-selected+reader,forward+reader,lcfx"
    argv = ["eval", "--sharer", str(tiny_dir("llama", 300, 3)), "--receiver", str(tiny_dir("gemma3", 400, 2))]
    argv += ["--task", "facts-cross", "--n", "3", "--max-new-tokens", "3", "--methods", methods]
    argv += ["--adapter-lcfx", str(span_dir), "--out", str(tmp_path / "out")]
    argv += ["--adapter-reader-selected", str(readers["reader-selected"])]
    argv += ["--adapter-reader-forward", str(readers["reader-forward"])]
    with pytest.MonkeyPatch.context() as mp:  # random models never end a note: keep notes short
        mp.setattr(Sharer.write_message.__wrapped__, "__defaults__", (6, "fair"))
        code, stdout, stderr = run_cli(argv)
    assert code == 0, stderr + stdout
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    rows = {row["method"]: row for row in results["summary"]}
    expected = methods.replace("skyline", "forward").split(",")
    assert list(rows) == expected and all(row["n"] == 3 for row in rows.values())
    records = {(r["method"], r["sample_id"]): r for r in results["samples"]}
    samples = get_task("facts-cross").samples("test", 3, seed=0)
    for sample in samples:
        forward = records["forward", sample.id]["bytes_sent"]
        selected = records["forward-selected", sample.id]["bytes_sent"]
        assert forward == len(sample.sharer_context.encode()) and 0 < selected <= forward
        assert records["forward-selected+reader", sample.id]["bytes_sent"] == selected  # the same text
    assert rows["forward-selected"]["latency_ms"]["select"]["median"] > 0
    assert [(p["method"], p["baseline"]) for p in results["paired"]] == [
        ("lcfx", m) for m in expected if m != "lcfx"
    ]
    assert results["meta"]["adapters"]["forward-selected+reader"]["mode"] == "text-reader"
    assert "| forward-selected+reader | 3 |" in (tmp_path / "out" / "results.md").read_text()


def test_stop_strings_stop_each_row_on_its_own_text(tiny_pair):
    from lcflow.handoff.generation import _StopOnStrings

    _, (_, tokenizer) = tiny_pair
    prompt = tokenizer("Where?", add_special_tokens=False).input_ids
    texts = ("Rome. He", "Rome and", "\n\nRome")  # the last: leading newlines do not end it
    rows = [prompt + tokenizer(text, add_special_tokens=False).input_ids for text in texts]
    width = max(len(r) for r in rows)
    ids = torch.tensor([r + [r[-1]] * (width - len(r)) for r in rows])
    stop = _StopOnStrings(tokenizer, [". ", "\n"], prompt_length=len(prompt))
    assert stop(ids, None).tolist() == [True, False, False]
    # the prompt's own text never counts: a stop string there does not end the answer
    where = _StopOnStrings(tokenizer, ["Where"], prompt_length=len(prompt))
    assert where(ids, None).tolist() == [False, False, False]

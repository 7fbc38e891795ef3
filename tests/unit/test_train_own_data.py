"""`lcflow train` on the user's own samples, in one command: the LCF-X span recipe (alignment,
retrieval heads, distillation; each step resumable) and the text reader, from a JSONL task file,
on tiny models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import run_cli, write_task_file

from lcflow.adapter import AdapterConfig, LatentAdapter
from lcflow.adapter.reader import TextReader
from lcflow.testing.tiny import load_tiny


def train(tiny_dir, out: Path, task_file: Path, *extra: str) -> tuple[int, str, str]:
    model = str(tiny_dir("gemma3", 400, 2))  # one model on both sides: one tokenizer
    argv = ["train", "--sharer", model, "--receiver", model, "--task-file", str(task_file), "--out", str(out)]
    argv += [
        "--steps",
        "2",
        "--batch-size",
        "2",
        "--checkpoint-every",
        "1",
        "--slots",
        "8",
        "--device",
        "cpu",
    ]
    return run_cli(argv + list(extra))


def test_lcfx_on_a_task_file_in_one_command(tiny_dir, tmp_path):
    task_file = write_task_file(tmp_path / "mine.jsonl", 12)
    out = tmp_path / "lcfx"
    code, stdout, stderr = train(tiny_dir, out, task_file, "--mode", "lcfx")
    assert code == 0, stderr + stdout
    init = AdapterConfig.load(out / "init")
    assert init.packet == "spans" and init.training["method"].startswith("the exact map")
    assert init.selection_heads and (out / "init" / "heads.json").is_file()  # chosen on training samples
    trained = LatentAdapter.from_pretrained(out)
    assert trained.config.selection_heads == init.selection_heads
    assert trained.config.training["steps_done"] == 2 and trained.config.training["train_samples"] == 11
    split = json.loads((out / "split.json").read_text())
    assert len(split["validation"]) == 1 and (out / "validation.jsonl").is_file()
    # run again with more steps: the alignment and heads are kept, the distillation resumes
    code, stdout, stderr = train(tiny_dir, out, task_file, "--mode", "lcfx", "--steps", "3")
    assert code == 0, stderr + stdout
    assert json.loads((out / "train_log.json").read_text())["steps_done"] == 3
    assert AdapterConfig.load(out / "init").selection_heads == init.selection_heads


def test_a_text_reader_from_the_same_command(tiny_dir, tmp_path):
    task_file = write_task_file(tmp_path / "mine.jsonl", 6)
    out = tmp_path / "reader"
    code, stdout, stderr = train(tiny_dir, out, task_file, "--mode", "text-reader", "--channel", "forward")
    assert code == 0, stderr + stdout
    reader = TextReader.from_pretrained(out, *load_tiny(tiny_dir("gemma3", 400, 2)))
    assert reader.config.channel == "forward" and reader.config.training["task_file"] == str(task_file)


def test_two_tokenizers_are_told_to_use_the_bridge(tiny_dir, tmp_path):
    task_file = write_task_file(tmp_path / "mine.jsonl", 4)
    argv = [
        "train",
        "--sharer",
        str(tiny_dir("llama", 300, 3)),
        "--receiver",
        str(tiny_dir("gemma3", 400, 2)),
    ]
    argv += ["--mode", "lcfx", "--task-file", str(task_file), "--out", str(tmp_path / "x"), "--device", "cpu"]
    code, _, stderr = run_cli(argv)
    assert code == 2 and "lcflow bridge" in stderr and "Traceback" not in stderr


def test_a_bad_task_file_is_named_by_line(tiny_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"sharer_context": "x"}\nnot json\n')
    code, _, stderr = train(tiny_dir, tmp_path / "out", bad, "--mode", "text-reader", "--channel", "forward")
    assert code == 2 and "bad.jsonl:1" in stderr and "bad.jsonl:2" in stderr and "Traceback" not in stderr


@pytest.mark.parametrize("validation", ["1.5", "-0.1"])
def test_a_validation_share_outside_0_1_is_refused(tiny_dir, tmp_path, validation):
    task_file = write_task_file(tmp_path / "mine.jsonl", 4)
    code, _, stderr = train(
        tiny_dir,
        tmp_path / "out",
        task_file,
        "--mode",
        "text-reader",
        "--channel",
        "forward",
        "--validation",
        validation,
    )
    assert code == 2 and "--validation" in stderr


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--mode", "lcfx", "--teacher-adapter", "."], "give --mode lcfx --init-adapter DIR too"),
        (["--mode", "lcfx", "--init-adapter", ".", "--teacher-adapter", "nowhere"], "is not a directory"),
    ],
)
def test_a_teacher_adapter_needs_a_student_to_distil(tiny_dir, tmp_path, extra, message):
    task_file = write_task_file(tmp_path / "mine.jsonl", 4)
    code, _, stderr = train(tiny_dir, tmp_path / "out", task_file, *extra)
    assert code == 2 and message in stderr and "Traceback" not in stderr

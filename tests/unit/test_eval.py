"""`lcflow eval` end to end on tiny random models, and the report helpers on hand-made rows."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from helpers import run_cli

from lcflow.adapter import LatentAdapter
from lcflow.cli import main
from lcflow.commands import eval as eval_cmd
from lcflow.handoff.pair import Sharer

SLOTS, BOTTLENECK = 4, 16
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny matmuls gain nothing from threads, and on a busy 2-core machine two OpenMP threads
    spin against other processes (100x slower here); restored afterwards for other modules."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def cross_run(tiny_dir, lcfx_dir, tmp_path_factory):
    """One eval on facts-cross: four methods that run, one whose adapter is missing."""
    out = tmp_path_factory.mktemp("eval") / "out"
    argv = [
        "eval",
        "--sharer",
        str(tiny_dir("llama", 300, 3)),
        "--receiver",
        str(tiny_dir("gemma3", 400, 2)),
        "--task",
        "facts-cross",
        "--methods",
        "receiver,skyline,text,lcfx,lcfx-pruned",
        "--adapter-lcfx",
        str(lcfx_dir),
        "--n",
        "3",
        "--max-new-tokens",
        "4",
        "--device",
        "cpu",
        "--out",
        str(out),
    ]
    with pytest.MonkeyPatch.context() as mp:
        # The text message is capped at 256 tokens, seconds per sample for a random model that
        # never stops; 8 tokens run the same code in a fraction of that.
        mp.setattr(Sharer.write_message.__wrapped__, "__defaults__", (8, "fair"))  # under no_grad
        code, stdout, stderr = run_cli(argv)
    return SimpleNamespace(code=code, stdout=stdout, stderr=stderr, out=out, argv=argv)


def test_eval_writes_json_markdown_and_plots(cross_run, lcfx_dir):
    assert cross_run.code == 0, cross_run.stderr
    results = json.loads((cross_run.out / "results.json").read_text())
    rows = {row["method"]: row for row in results["summary"]}
    assert list(rows) == ["receiver", "forward", "text", "lcfx"]  # skyline: forward's old name, accepted
    for row in rows.values():
        assert row["n"] == 3
        for score in ("em", "f1"):
            low, high = row[f"{score}_ci"]
            assert 0.0 <= low <= row[score] <= high <= 1.0
        for stage in ("receiver_prefill", "generate", "total"):
            assert row["latency_ms"][stage]["median"] > 0
            assert row["latency_ms"][stage]["p90"] >= row["latency_ms"][stage]["median"]
    assert rows["text"]["latency_ms"]["message_generate"]["median"] > 0
    assert rows["lcfx"]["latency_ms"]["encode"]["median"] > 0
    # Two retained receiver layers, SLOTS x BOTTLENECK latents each, two bytes per latent (bf16).
    assert rows["lcfx"]["bytes_sent_median"] == 2 * SLOTS * BOTTLENECK * 2
    params = LatentAdapter.from_pretrained(lcfx_dir).parameter_counts()["total"]
    assert rows["lcfx"]["adapter_parameters"] == params
    assert "adapter_parameters" not in rows["receiver"]

    assert len(results["samples"]) == 4 * 3
    assert {r["method"] for r in results["samples"]} == set(rows)
    meta = results["meta"]
    assert meta["command"].split() == ["lcflow", *cross_run.argv]
    assert meta["machine"]["cpu_count"] >= 1 and meta["machine"]["torch_threads"] >= 1
    assert meta["machine"]["device"] == "cpu"
    assert meta["latency"] == "in-process"
    assert (meta["task"], meta["split"], meta["n"], meta["seed"]) == ("facts-cross", "test", 3, 0)
    assert meta["adapters"]["lcfx"]["path"] == str(lcfx_dir)
    assert meta["adapters"]["lcfx"]["parameters"] == params
    config = LatentAdapter.from_pretrained(lcfx_dir).config
    assert meta["adapters"]["lcfx"]["packet"]["slots"] == config.slots == SLOTS
    assert meta["adapters"]["lcfx"]["packet"]["selection_chunk"] == config.selection_chunk
    # the weights' precision, read from the files' headers (the config records what was saved)
    assert meta["adapters"]["lcfx"]["stored_dtypes"] == [{"float32": "F32", "bfloat16": "BF16"}[config.dtype]]

    # lcfx against every other method, on the same 3 samples, in EM and in contains
    assert [(p["method"], p["baseline"], p["n"]) for p in results["paired"]] == [
        ("lcfx", method, 3) for method in ("receiver", "forward", "text")
    ]
    assert all(-1 <= p["contains_difference"] <= 1 for p in results["paired"])
    markdown = (cross_run.out / "results.md").read_text()
    assert "| method | n | EM [95% CI] | contains [95% CI] | F1 [95% CI] | TTFT ms |" in markdown
    assert "| lcfx | text | 3 |" in markdown
    for method in rows:
        assert f"\n| {method} | 3 |" in markdown
    assert "| method | n |" in cross_run.stdout  # the table is printed too
    for name in ("accuracy_vs_ttft.png", "latency_breakdown.png"):
        assert (cross_run.out / name).read_bytes()[:8] == PNG_MAGIC


def test_missing_adapter_is_skipped_with_a_printed_reason(cross_run):
    assert "skipping lcfx-pruned: no --adapter-lcfx-pruned DIR given" in cross_run.stdout
    meta = json.loads((cross_run.out / "results.json").read_text())["meta"]
    assert "lcfx-pruned" in meta["skipped"] and "lcfx-pruned" not in meta["methods"]
    assert "- lcfx-pruned: no --adapter-lcfx-pruned" in (cross_run.out / "results.md").read_text()


@pytest.fixture
def loaded_tiny_pair(monkeypatch, tiny_pair):
    """--pair names real models; serve the tiny ones in their place (the loading seam)."""
    monkeypatch.setattr(eval_cmd, "load_models", lambda sharer, receiver, device: tiny_pair)


def write_jsonl(path, records) -> str:
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return str(path)


SAME = "Mira Volkov lives in Oslo. Lior Senn plays the violin."
TASK_RECORDS = [
    {"id": "a", "sharer_context": SAME, "receiver_context": SAME, "question": "Where?", "answers": ["Oslo"]},
    {"sharer_context": SAME, "receiver_context": "", "question": "What instrument?", "answers": ["violin"]},
]


def test_task_file_with_pair_and_default_adapter_directories(loaded_tiny_pair, lcfx_dir, tmp_path):
    adapters = tmp_path / "adapters"
    adapters.mkdir()
    (adapters / "smollm2-to-gemma3-lcfx").symlink_to(lcfx_dir, target_is_directory=True)
    task_file = write_jsonl(tmp_path / "mine.jsonl", TASK_RECORDS)
    code, stdout, stderr = run_cli(
        ["eval", "--pair", "smollm2-to-gemma3", "--task-file", task_file, "--methods", "receiver,lcf,lcfx"]
        + ["--adapters", str(adapters), "--max-new-tokens", "3", "--out", str(tmp_path / "out")]
    )
    assert code == 0, stderr
    # The file has a same-context sample, so lcf applies, but adapters/ holds no lcf adapter.
    assert f"skipping lcf: no adapter at {adapters / 'smollm2-to-gemma3-lcf'}" in stdout
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [row["method"] for row in results["summary"]] == ["receiver", "lcfx"]
    assert [row["n"] for row in results["summary"]] == [2, 2]
    assert {r["sample_id"] for r in results["samples"]} == {"a", "mine-2"}
    meta = results["meta"]
    assert (meta["task"], meta["split"], meta["n"]) == ("mine.jsonl", "file", 2)
    assert meta["models"]["pair"] == "smollm2-to-gemma3"
    assert meta["models"]["receiver"] == "gemma3-270m"
    assert meta["adapters"]["lcfx"]["path"] == str(adapters / "smollm2-to-gemma3-lcfx")


def test_bad_task_file_gives_a_clear_error(loaded_tiny_pair, tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", [TASK_RECORDS[0], {"question": "Where?", "answers": []}])
    code, _, stderr = run_cli(
        ["eval", "--pair", "smollm2-to-gemma3", "--task-file", bad, "--out", str(tmp_path)]
    )
    assert code == 2
    assert "bad.jsonl:2: missing field 'sharer_context'" in stderr
    assert "'answers' must be a non-empty list" in stderr
    missing = str(tmp_path / "nope.jsonl")
    code, _, stderr = run_cli(
        ["eval", "--pair", "smollm2-to-gemma3", "--task-file", missing, "--out", str(tmp_path)]
    )
    assert code == 2 and "nope.jsonl does not exist" in stderr
    assert not (tmp_path / "results.json").exists()


def test_wrong_mode_adapter_skipped_and_nothing_left_is_an_error(loaded_tiny_pair, lcfx_dir, tmp_path):
    task_file = write_jsonl(tmp_path / "same.jsonl", TASK_RECORDS[:1])
    code, stdout, stderr = run_cli(
        ["eval", "--pair", "smollm2-to-gemma3", "--task-file", task_file, "--methods", "lcf,lcfx-pruned"]
        + ["--adapter-lcf", str(lcfx_dir), "--adapters", str(tmp_path), "--out", str(tmp_path / "out")]
    )
    assert code == 2
    assert "skipping lcf: cannot use" in stdout and "holds a lcfx adapter; lcf needs lcf" in stdout
    assert "skipping lcfx-pruned: no adapter at" in stdout and "lcflow prune" in stdout
    assert "no method left to run" in stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--pair", "smollm2-to-gemma3", "--methods", "receiver,telepathy"], "unknown method(s) telepathy"),
        (["--sharer", "x"], "give --pair"),
        (["--pair", "smollm2-to-gemma3", "--sharer", "x"], "not both"),
        (["--pair", "smollm2-to-gemma3", "--n", "0"], "--n must be at least 1"),
        (["--pair", "gemma3-to-gemma3", "--methods", "kvcomm", "--kvcomm-fraction", "0"], "in (0, 1]"),
        (["--pair", "gemma3-to-gemma3", "--methods", "kvcomm", "--kvcomm-calibration", "0"], "at least 1"),
    ],
)
def test_bad_flags_are_refused_before_loading(monkeypatch, tmp_path, argv, message):
    monkeypatch.setattr(eval_cmd, "load_models", lambda *a: pytest.fail("models loaded despite bad flags"))
    code, _, stderr = run_cli(["eval", *argv, "--out", str(tmp_path)])
    assert code == 2 and message in stderr


def test_services_time_the_methods_they_serve(tiny_pair, tiny_dir, lcfx_dir, tmp_path):
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from service_helpers import Pair

    pair = Pair(tiny_pair, lcfx_dir, "lcfx", InMemorySpanExporter())
    argv = ["eval", "--sharer", str(tiny_dir("llama", 300, 3)), "--receiver", str(tiny_dir("gemma3", 400, 2))]
    argv += ["--task", "facts-cross", "--methods", "receiver,skyline,lcfx", "--adapter-lcfx", str(lcfx_dir)]
    argv += ["--n", "2", "--max-new-tokens", "3", "--services", f"127.0.0.1:{pair.sharer_port}"]
    try:
        code, stdout, stderr = run_cli([*argv, "--out", str(tmp_path / "out")])
        assert code == 0, stderr
        # The same through sessions: the sharer's context prefilled before the handoff, untimed.
        code, stdout, stderr = run_cli([*argv, "--sharer-sessions", "--out", str(tmp_path / "held")])
        assert code == 0, stderr
    finally:
        pair.stop()
    result = json.loads((tmp_path / "out" / "results.json").read_text())
    assert "services" in json.dumps(result["meta"])
    records = {(r["method"], r["sample_id"]): r for r in result["samples"]}
    served = [r for (method, _), r in records.items() if method == "lcfx"]
    assert len(served) == 2 and all("transfer" in r["timings_ms"] and r["bytes_sent"] > 0 for r in served)
    assert all(r["timings_ms"]["sharer_prefill"] > 0 for r in served)
    in_process = [r for (method, _), r in records.items() if method == "forward"]
    assert len(in_process) == 2 and all("transfer" not in r["timings_ms"] for r in in_process)
    held = json.loads((tmp_path / "held" / "results.json").read_text())
    assert "sessions" in held["meta"]["latency"]
    served = [r for r in held["samples"] if r["method"] == "lcfx"]
    assert len(served) == 2 and all(r["timings_ms"].get("sharer_prefill", 0.0) == 0.0 for r in served)
    assert [r["generated"] for r in served] == [
        r["generated"] for r in result["samples"] if r["method"] == "lcfx"
    ]


def test_services_run_the_text_readers_as_in_process(tiny_pair, tiny_dir, tmp_path_factory, tmp_path):
    """The +reader methods through the services: TEXT on the reader's channel with the reader named
    by its directory (served from the receiver's --adapters), answering as the reader does
    in-process, on the same samples."""
    from helpers import make_adapter_dir
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from service_helpers import Pair

    from lcflow.adapter.reader import TextReader

    root = tmp_path_factory.mktemp("served")
    spans_dir = make_adapter_dir(tiny_pair, tmp_path_factory, "lcfx", packet="spans")
    LatentAdapter.from_pretrained(spans_dir).save_pretrained(root / "spans")
    torch.manual_seed(7)
    for channel, name in (("forward", "reads-forward"), ("forward-selected", "reads-selected")):
        reader = TextReader.for_model(*tiny_pair[1], channel, rank=4)
        for weight_name, weight in reader.model.named_parameters():
            if "lora_B" in weight_name:  # trained: it reads otherwise than the receiver
                torch.nn.init.normal_(weight, std=0.5)
        reader.save_pretrained(root / name)
    argv = ["eval", "--sharer", str(tiny_dir("llama", 300, 3)), "--receiver", str(tiny_dir("gemma3", 400, 2))]
    argv += ["--task", "facts-cross", "--methods", "forward+reader,forward-selected+reader"]
    argv += ["--adapter-lcfx", str(root / "spans"), "--adapter-reader-forward", str(root / "reads-forward")]
    argv += ["--adapter-reader-selected", str(root / "reads-selected"), "--n", "2", "--max-new-tokens", "4"]
    code, _, stderr = run_cli([*argv, "--out", str(tmp_path / "local")])
    assert code == 0, stderr
    pair = Pair(tiny_pair, root / "spans", "lcfx", InMemorySpanExporter(), adapters=str(root))
    try:
        argv += ["--services", f"127.0.0.1:{pair.sharer_port}"]
        code, _, stderr = run_cli([*argv, "--out", str(tmp_path / "served")])
        assert code == 0, stderr
        assert sorted(pair.receiver_service.readers.loaded()) == ["reads-forward", "reads-selected"]
    finally:
        pair.stop()
    local, served = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("local", "served"))
    assert "services" in served["meta"]["latency"]
    assert all(r["bytes_sent"] > 0 and "time_to_first_token" in r["timings_ms"] for r in served["samples"])
    assert all(
        "select" in r["timings_ms"] for r in served["samples"] if r["method"] == "forward-selected+reader"
    )
    answers = {(r["method"], r["sample_id"]): r["generated"] for r in local["samples"]}
    assert len(answers) == 4
    assert {(r["method"], r["sample_id"]): r["generated"] for r in served["samples"]} == answers


def test_sharer_sessions_need_services(tmp_path, capsys):
    assert main(["eval", "--pair", "gemma3-to-gemma3", "--sharer-sessions", "--out", str(tmp_path)]) == 2
    assert "--sharer-sessions needs --services" in capsys.readouterr().err


def test_kvcomm_runs_on_one_model_and_records_its_layers(monkeypatch, tiny_dir, tiny_pair, tmp_path):
    """KVComm on a same-model pair (the tiny Llama on both sides): calibrated on the train split,
    its layers recorded, its bytes those of the layers sent whole plus one sink row per other."""
    monkeypatch.setattr(
        eval_cmd, "load_models", lambda sharer, receiver, device: (tiny_pair[0], tiny_pair[0])
    )
    out = tmp_path / "out"
    code, stdout, stderr = run_cli(
        ["eval", "--sharer", "a", "--receiver", "a", "--task", "facts-cross", "--methods", "forward,kvcomm"]
        + ["--kvcomm-fraction", "0.3", "--kvcomm-calibration", "2", "--n", "2", "--max-new-tokens", "2"]
        + ["--out", str(out)]
    )
    assert code == 0, stderr
    results = json.loads((out / "results.json").read_text())
    meta, rows = results["meta"]["kvcomm"], {r["method"]: r for r in results["summary"]}
    assert meta["calibration"] == "2 of facts-cross train split" and meta["fraction"] == 0.3
    assert 0 in meta["layers"] and len(meta["layers"]) in (1, 2)  # layer 0 and the best of 3 layers
    assert f"kvcomm: layers {meta['layers']}" in stdout
    config = tiny_pair[0][0].config
    row_bytes = config.num_key_value_heads * config.head_dim * 2 * 2  # K and V, bf16
    sent = [s["bytes_sent"] for s in results["samples"] if s["method"] == "kvcomm"]
    assert all(b % row_bytes == 0 and b // row_bytes > 3 for b in sent)  # a whole prefix, not 3 sinks
    assert rows["kvcomm"]["latency_ms"]["sharer_prefill"]["median"] > 0


def test_kvcomm_is_skipped_across_models(loaded_tiny_pair, tmp_path):
    code, stdout, _ = run_cli(
        ["eval", "--pair", "smollm2-to-gemma3", "--methods", "receiver,kvcomm", "--n", "1"]
        + ["--max-new-tokens", "2", "--out", str(tmp_path / "out")]
    )
    assert code == 0 and "skipping kvcomm: same-model pairs only" in stdout


def test_an_lcfx_adapter_with_a_receiver_lora_is_read_through_it(
    loaded_tiny_pair, tiny_pair, lcfx_dir, tmp_path
):
    """An adapter trained with --receiver-lora carries receiver-reader/: eval loads it for every
    LCF-X method and records it; a reader of another channel there is refused with its reason."""
    import shutil

    from lcflow.adapter.reader import RECEIVER_READER, TextReader

    adapter = tmp_path / "lcfx-lora"
    shutil.copytree(lcfx_dir, adapter)
    reader = TextReader.for_model(*tiny_pair[1], "lcfx", rank=4)
    reader.save_pretrained(adapter / RECEIVER_READER)
    argv = ["eval", "--pair", "smollm2-to-gemma3", "--task", "facts-cross", "--n", "2"]
    argv += ["--methods", "lcfx,lcfx-wrong", "--adapter-lcfx", str(adapter), "--max-new-tokens", "2"]
    code, _, stderr = run_cli([*argv, "--out", str(tmp_path / "out")])
    assert code == 0, stderr
    meta = json.loads((tmp_path / "out" / "results.json").read_text())["meta"]
    for method in ("lcfx", "lcfx-wrong"):
        assert meta["adapters"][method]["receiver_lora"] == str(adapter / RECEIVER_READER)
    TextReader.for_model(*tiny_pair[1], "forward", rank=4).save_pretrained(adapter / RECEIVER_READER)
    code, stdout, _ = run_cli([*argv, "--methods", "receiver,lcfx", "--out", str(tmp_path / "again")])
    assert code == 0 and "reads forward, not an LCF-X packet" in stdout


def test_open_prompts_are_scored_by_the_facts_stated_and_empty_answers(loaded_tiny_pair, tmp_path):
    """facts-open: longer answers by default, each scored by the share of the document's facts it
    states, and the share of empty answers in the summary and its table."""
    from lcflow.eval.metrics import facts_stated
    from lcflow.tasks import OPEN_ANSWER_TOKENS, get_task

    out = tmp_path / "out"
    code, _, stderr = run_cli(
        ["eval", "--pair", "smollm2-to-gemma3", "--task", "facts-open", "--methods", "receiver,forward"]
        + ["--n", "2", "--out", str(out)]
    )
    assert code == 0, stderr
    results = json.loads((out / "results.json").read_text())
    assert results["meta"]["max_new_tokens"] == OPEN_ANSWER_TOKENS
    answers = {s.id: s.answers for s in get_task("facts-open").samples("test", 2)}
    for record in results["samples"]:
        assert record["facts_stated"] == facts_stated(record["generated"], answers[record["sample_id"]])
        assert record["empty"] == (not record["generated"].strip())
    for row in results["summary"]:
        low, high = row["facts_stated_ci"]
        assert 0.0 <= low <= row["facts_stated"] <= high <= 1.0
        mine = [r for r in results["samples"] if r["method"] == row["method"]]
        assert row["empty_rate"] == sum(r["empty"] for r in mine) / len(mine)
    assert "| facts stated [95% CI] | empty answers |" in (out / "results.md").read_text()


def test_a_wire_that_cannot_group_the_packets_rows_is_a_usage_error_naming_both():
    """int4 quantizes rows in groups of 64: rows of 96 numbers (a narrowed packet's b) are refused
    as the user's mistake, in one line, before anything is sent; int8 (one scale a row) carries them."""
    from lcflow.core.errors import UsageError
    from lcflow.eval.harness import through_the_wire

    latents = SimpleNamespace(layers={0: torch.randn(1, 4, 96)})
    with pytest.raises(
        UsageError, match=r"--wire int4 cannot carry .* rows of 96 numbers.*use --wire int4-g32 or bf16"
    ):
        through_the_wire(latents, "int4")
    assert through_the_wire(latents, "int8") > 0 and latents.layers[0].shape == (1, 4, 96)


def test_an_int4_wire_that_names_its_group_carries_rows_the_default_group_cannot():
    """ "int4-hadamard-g32": 96-number rows in three rotated groups of 32, each with a float16
    scale: 48 code bytes and 6 scale bytes a row, and the rows come back near what was sent."""
    from lcflow.eval.harness import through_the_wire

    sent = torch.randn(1, 4, 96)
    latents = SimpleNamespace(layers={0: sent.clone()})
    assert through_the_wire(latents, "int4-hadamard-g32") == 4 * (96 // 2 + 3 * 2)
    received = latents.layers[0]
    assert received.shape == sent.shape and not torch.equal(received, sent)
    assert (received - sent).norm() < 0.2 * sent.norm()

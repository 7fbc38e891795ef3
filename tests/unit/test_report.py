"""What `lcflow eval` writes and decides around its runs: the report (tables, paired differences,
plots), model cards from its results, default adapter directories, batched notes."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
from helpers import run_cli

from lcflow.commands import eval as eval_cmd
from lcflow.eval import report
from lcflow.handoff.pair import Sharer

# --- report helpers ---------------------------------------------------------------------------------

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def row(method: str, em: float, ci: list[float], stages: dict[str, float], **extra) -> dict:
    latency = {name: {"median": ms, "p90": ms * 2} for name, ms in stages.items()}
    return {
        "method": method,
        "n": 1,
        "em": em,
        "em_ci": ci,
        "f1": em,
        "f1_ci": ci,
        "latency_ms": latency,
        "bytes_sent_median": 2048,
        **extra,
    }


def test_report_table_orders_stages_and_marks_missing_values():
    rows = [
        row(
            "lcfx",
            1.0,
            [math.nan, math.nan],
            {
                "zeta": 1,
                "generate": 2,
                "transfer": 3,
                "sharer_prefill": 4,
                "time_to_first_token": 5,
                "total": 9,
            },
            adapter_parameters=1234,
            adapter_mb_bf16=0.0025,
        ),
        row("receiver", 0.5, [0.25, 0.75], {"receiver_prefill": 7, "total": 8}),
    ]
    assert report.stage_names(rows) == ["sharer_prefill", "transfer", "receiver_prefill", "generate", "zeta"]
    table = report.markdown_table(rows).splitlines()
    assert table[0].startswith("| method | n | EM [95% CI] |")
    assert "| lcfx | 1 | 1.000 [n/a] |" in table[2] and "| 1,234 | 0.00 |" in table[2]
    assert "| 5.0 | 10.0 | 9.0 | 4.0 | 3.0 |  | 2.0 | 1.0 | 2.0 kB |" in table[2]
    # No token ever streamed: the total stands in for TTFT, and the table says so.
    assert "| receiver | 1 | 0.500 [0.250, 0.750] |" in table[3] and "8.0 (no token: total)" in table[3]


def test_report_json_has_no_nan(tmp_path):
    rows = [row("receiver", 0.0, [math.nan, math.nan], {"receiver_prefill": 1, "total": 2})]
    meta = {
        "task": "t",
        "split": "test",
        "n": 1,
        "seed": 0,
        "models": {"sharer": "s", "receiver": "r"},
        "machine": {"cpu_count": 2, "torch_threads": 2, "device": "cpu", "accelerator": "cpu"},
        "latency": "in-process",
        "date": "now",
        "command": "lcflow eval",
    }
    paths = report.write_report(tmp_path, rows, [], meta)
    text = paths["json"].read_text()
    assert "NaN" not in text and json.loads(text)["summary"][0]["em_ci"] == [None, None]
    assert paths["accuracy_plot"].read_bytes()[:8] == PNG_MAGIC


def test_adapter_dir_defaults(tmp_path):
    (tmp_path / "smollm2-to-gemma3-lcf").mkdir()
    args = SimpleNamespace(adapters=tmp_path, adapter_lcf=None, adapter_c2c=str(tmp_path / "gone"))
    assert eval_cmd.adapter_dir("lcf", args, "smollm2-to-gemma3") == (tmp_path / "smollm2-to-gemma3-lcf", "")
    path, reason = eval_cmd.adapter_dir("c2c", args, "smollm2-to-gemma3")
    assert path is None and "--adapter-c2c" in reason and "is not a directory" in reason
    path, reason = eval_cmd.adapter_dir("lcf", args, None)
    assert path is None and "no --adapter-lcf DIR given" in reason


def test_lcfx_defaults_to_the_pairs_bridge_when_it_has_no_span_adapter(tmp_path):
    args = SimpleNamespace(adapters=tmp_path, adapter_lcfx=None)
    path, reason = eval_cmd.adapter_dir("lcfx", args, "smollm2-to-gemma3")
    assert path is None and "smollm2-to-gemma3-lcfx" in reason
    (tmp_path / "smollm2-to-gemma3-lcfx-bridge").mkdir()
    assert eval_cmd.adapter_dir("lcfx-wrong", args, "smollm2-to-gemma3") == (
        tmp_path / "smollm2-to-gemma3-lcfx-bridge",
        "",
    )
    (tmp_path / "smollm2-to-gemma3-lcfx").mkdir()  # a pair's own <pair>-lcfx comes first
    assert eval_cmd.adapter_dir("lcfx", args, "smollm2-to-gemma3") == (
        tmp_path / "smollm2-to-gemma3-lcfx",
        "",
    )


def test_batched_notes_equal_the_notes_written_one_at_a_time(tiny_dir):
    """`--text-batch`: left-padded batches of different lengths give each note its own greedy text."""
    from lcflow.tasks import get_task
    from lcflow.testing.tiny import load_tiny

    model, tokenizer = load_tiny(tiny_dir("llama", 300, 3))  # a private copy: its weights change
    with torch.no_grad():  # a random model at init answers every input alike; louder weights do not
        for weight in model.parameters():
            if weight.dim() == 2:
                weight.mul_(8)
    sharer = Sharer(model, tokenizer)
    samples = get_task("facts-cross").samples("test", 3, seed=0)
    pairs = [(s.sharer_context, s.question) for s in samples]
    pairs[1] = (pairs[1][0][:40], pairs[1][1])  # a shorter input in the same batch: padded on the left
    alone = [sharer.write_message(c, q, max_new_tokens=6) for c, q in pairs]
    batched = sharer.write_messages(pairs[:2], max_new_tokens=6) + sharer.write_messages(
        pairs[2:], max_new_tokens=6
    )
    assert batched == alone
    assert len(set(alone)) > 1  # the check compares notes that differ, not one repeated string


def test_text_batch_records_amortised_note_time(tiny_dir, tmp_path):
    out = tmp_path / "out"
    argv = ["eval", "--sharer", str(tiny_dir("llama", 300, 3)), "--receiver", str(tiny_dir("gemma3", 400, 2))]
    argv += ["--methods", "text", "--n", "3", "--max-new-tokens", "3", "--text-batch", "2", "--out", str(out)]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Sharer.write_messages.__wrapped__, "__defaults__", (6, "fair"))  # short notes
        code, _, stderr = run_cli(argv)
    assert code == 0, stderr
    results = json.loads((out / "results.json").read_text())
    stages = results["summary"][0]["latency_ms"]
    assert "message_generate_batched" in stages and "message_generate" not in stages
    assert results["meta"]["text_batch"] == 2 and "amortised" in results["meta"]["latency"]
    code, _, stderr = run_cli([*argv[:-2], "--services", "127.0.0.1:1", "--out", str(out)])
    assert code == 2 and "--text-batch" in stderr and "Traceback" not in stderr


def test_model_card_renders_packet_diagnostics(lcfx_dir, tmp_path):
    from lcflow.adapter.card import write_card

    row = {"method": "lcfx", "n": 4, "em": 0.5, "em_ci": [0.0, 1.0], "f1": 0.5, "f1_ci": [0.0, 1.0]}
    meta = {"task": "facts-cross", "split": "test", "seed": 0, "max_new_tokens": 8}
    (tmp_path / "results.json").write_text(json.dumps({"meta": meta, "summary": [row]}))
    summary = {
        "n": 4,
        "rows_median": 8,
        "between_sample_share": {"mean": 0.25, "min": 0.125},
        "prefix_attention": {"right": 0.5, "wrong": 0.375},
        "answer_nll": {"right": 1.5, "wrong": 4.25},
    }
    (tmp_path / "diag.json").write_text(
        json.dumps({"summary": summary, "meta": {"task": "facts-cross/test"}})
    )
    card = write_card(lcfx_dir, tmp_path / "results.json", "lcfx", "cmd", tmp_path / "diag.json")
    assert card["packet_diagnostics"]["answer_nll"] == {"right": 1.5, "wrong": 4.25}
    text = (lcfx_dir / "README.md").read_text()
    assert (
        "## Packet diagnostics" in text and "| 4 | 8 | 0.250, 0.125 | 0.500 / 0.375 | 1.500 / 4.250 |" in text
    )
    card = write_card(lcfx_dir, tmp_path / "results.json", "lcfx", "cmd")
    assert (
        card["packet_diagnostics"] is None
        and "Packet diagnostics" not in (lcfx_dir / "README.md").read_text()
    )


def test_a_card_holds_provenance_and_results_and_reads_the_config_it_shows(lcfx_dir, tmp_path):
    """No copy of adapter_config.json in model_card.json: the README shows what the config says
    now, so a card cannot go stale when the config changes (e.g. `lcflow heads --write`)."""
    import shutil

    from lcflow.adapter.card import render_markdown, write_card

    adapter = tmp_path / "adapter"
    shutil.copytree(lcfx_dir, adapter)
    row = {"method": "lcfx", "n": 4, "em": 0.5, "em_ci": [0.0, 1.0], "f1": 0.5, "f1_ci": [0.0, 1.0]}
    meta = {"task": "facts-cross", "split": "test", "seed": 0, "max_new_tokens": 8}
    (tmp_path / "results.json").write_text(json.dumps({"meta": meta, "summary": [row]}))
    card = write_card(adapter, tmp_path / "results.json", "lcfx", "cmd")
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert set(card) & {"bottleneck", "slots", "retained_layers", "training", "selection"} == set()
    assert card["eval"]["wire"] == "exact"  # an eval without --wire: replayed as encoded
    meta["wire"] = "int4-hadamard-g32"
    (tmp_path / "results.json").write_text(json.dumps({"meta": meta, "summary": [row]}))
    assert (
        write_card(adapter, tmp_path / "results.json", "lcfx", "cmd")["eval"]["wire"] == "int4-hadamard-g32"
    )
    assert f"bottleneck b={config['bottleneck']}" in (adapter / "README.md").read_text()
    config["bottleneck"] = 7
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    assert "bottleneck b=7" in render_markdown(card, adapter)


def test_card_records_each_answer_and_takes_them_only_from_a_run_that_reproduces_it(lcfx_dir, tmp_path):
    from lcflow.adapter.card import add_answers, write_card

    config = json.loads((lcfx_dir / "adapter_config.json").read_text())

    def results(em: float, n: int = 4, seed: int = 0, adapter=lcfx_dir, answers: int = 4) -> dict:
        row = {"method": "lcfx", "n": n, "em": em, "em_ci": [em - 0.25, em + 0.25], "f1": em, "f1_ci": [0, 1]}
        meta = {"task": "facts-cross", "split": "test", "seed": seed, "max_new_tokens": 8, "machine": "m"}
        meta["models"] = {"sharer": config["sharer"]["name"], "receiver": config["receiver"]["name"]}
        meta["adapters"] = {"lcfx": {"path": str(adapter)}}
        samples = [
            {"method": "lcfx", "sample_id": f"s{i}", "prediction": f"p{i}", "em": float(i < em * n)}
            for i in range(answers)
        ] + [{"method": "text", "sample_id": "s0", "prediction": "t", "em": 0.0}]
        return {"meta": meta, "summary": [row], "samples": samples}

    (tmp_path / "results.json").write_text(json.dumps(results(0.5)))
    card = write_card(lcfx_dir, tmp_path / "results.json", "lcfx", "cmd")
    assert card["eval"]["answers"] == [
        {"id": "s0", "prediction": "p0", "em": 1.0},
        {"id": "s1", "prediction": "p1", "em": 1.0},
        {"id": "s2", "prediction": "p2", "em": 0.0},
        {"id": "s3", "prediction": "p3", "em": 0.0},
    ]
    refused = (
        (results(1.0), "does not reproduce"),
        (results(0.5, seed=1), "not the card's eval"),
        (results(0.5, adapter=tmp_path / "another-adapter"), "not the card's eval"),
        (results(0.5, answers=3), "holds 3 lcfx answers"),
    )
    for bad, message in refused:
        (tmp_path / "bad.json").write_text(json.dumps(bad))
        with pytest.raises(ValueError, match=message):
            add_answers(lcfx_dir, tmp_path / "bad.json", "lcfx")
    assert json.loads((lcfx_dir / "model_card.json").read_text()) == card  # refused: nothing written
    (tmp_path / "again.json").write_text(json.dumps(results(0.75)))  # inside the card's CI
    assert add_answers(lcfx_dir, tmp_path / "again.json", "lcfx")["em"] == 0.75
    assert [a["em"] for a in json.loads((lcfx_dir / "model_card.json").read_text())["eval"]["answers"]] == [
        1.0,
        1.0,
        1.0,
        0.0,
    ]


def test_paired_differences_count_what_each_side_alone_answered():
    from lcflow.eval.report import paired_differences

    def records(method: str, ems: list[float], contains: list[float] | None = None) -> list[dict]:
        contains = contains or ems
        return [
            {"method": method, "sample_id": f"s{i}", "em": em, "contains": c}
            for i, (em, c) in enumerate(zip(ems, contains, strict=True))
        ]

    rows = paired_differences(
        records("text", [1, 0, 0, 0], [1, 1, 0, 0])
        + records("lcfx", [1, 1, 1, 0])
        + records("lcfx-wrong", [0, 0, 1, 0])
        + records("receiver", [0, 0, 0])  # a method that ran on fewer samples: only those compared
    )
    by_pair = {(r["method"], r["baseline"]): r for r in rows}
    # LCF-X against every other method
    assert set(by_pair) == {("lcfx", "text"), ("lcfx", "receiver"), ("lcfx", "lcfx-wrong")}
    assert (by_pair["lcfx", "text"]["em_difference"], by_pair["lcfx", "text"]["gained"]) == (0.5, 2)
    assert by_pair["lcfx", "text"]["contains_difference"] == 0.25  # the note contained one more
    assert (by_pair["lcfx", "receiver"]["n"], by_pair["lcfx", "receiver"]["gained"]) == (3, 3)
    lcfx_wrong = by_pair["lcfx", "lcfx-wrong"]
    assert (lcfx_wrong["em_difference"], lcfx_wrong["gained"], lcfx_wrong["lost"]) == (0.5, 2, 0)
    # without LCF-X: each method against the note
    rows = paired_differences(records("text", [1, 0, 0]) + records("forward", [1, 1, 0]))
    assert [(r["method"], r["baseline"], r["em_difference"]) for r in rows] == [("forward", "text", 1 / 3)]
    low, high = lcfx_wrong["em_difference_ci"]
    assert -1 <= low < 0.5 < high <= 1


def test_open_prompts_pair_the_facts_stated_too():
    from lcflow.eval.report import paired_differences, paired_table

    records = [
        {"method": m, "sample_id": i, "em": 0.0, "contains": 0.0, "facts_stated": f}
        for i, (lcfx, forward) in enumerate([(1.0, 0.5), (0.5, 0.5), (0.0, 0.5)])
        for m, f in (("lcfx", lcfx), ("forward", forward))
    ]
    [row] = paired_differences(records)
    assert row["facts_stated_difference"] == pytest.approx(0.0)
    low, high = row["facts_stated_difference_ci"]
    assert low < 0 < high
    assert "facts stated difference [95% CI]" in paired_table([row])
    closed = [{k: v for k, v in r.items() if k != "facts_stated"} for r in records]
    assert "facts_stated_difference" not in paired_differences(closed)[0]
    assert "facts stated" not in paired_table(paired_differences(closed))

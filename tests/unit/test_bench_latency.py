"""`lcflow bench latency` end to end on tiny Qwen2 -> Qwen3 configs: every method, stage and
context length timed, bytes that behave as each method's design says."""

from __future__ import annotations

import json

from lcflow.bench.latency import slope
from lcflow.bench.latency_runs import LABEL, METHODS, STAGES
from lcflow.cli import main
from lcflow.testing.tiny import tiny_config

CONTEXTS, MESSAGES, BOTTLENECK, SLOTS = [8, 16, 32], [2, 4], 16, 4


def test_bench_latency_times_every_method_stage_and_context(tmp_path, capsys):
    sharer, receiver = tmp_path / "sharer.json", tmp_path / "receiver.json"
    tiny_config("qwen2", 300, 3).to_json_file(sharer)
    tiny_config("qwen3", 400, 2).to_json_file(receiver)
    out = tmp_path / "latency.json"
    args = ["bench", "latency", "--sharer", str(sharer), "--receiver", str(receiver), "--threads", "1"]
    args += ["--context-lengths", *map(str, CONTEXTS), "--message-tokens", *map(str, MESSAGES)]
    args += ["--bottleneck", str(BOTTLENECK), "--slots", str(SLOTS), "--repeats", "1", "--out", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert LABEL.upper() in printed and "LCF-X" in printed

    report = json.loads(out.read_text())
    assert report["label"] == LABEL
    assert report["models"]["sharer"]["weights"] == report["models"]["receiver"]["weights"] == LABEL
    machine = report["machine"]
    assert machine["cpu_count"] >= 1 and machine["torch_threads"] == 1 and machine["device"] == "cpu"

    results = report["results"]
    cases = {(r["method"], r["context_tokens"], r["message_tokens"]) for r in results}
    expected = {("text", t, n) for t in CONTEXTS for n in MESSAGES}
    expected |= {(m, t, None) for m in ("lcf", "lcfx", "lcfx-spans") for t in CONTEXTS}
    assert cases == expected and len(results) == len(expected)
    for r in results:
        assert list(r["stages_ms"]) == list(STAGES[r["method"]])
        assert all(ms > 0 for ms in r["stages_ms"].values()), r
        assert r["ttft_ms"] > 0 and r["bytes"] > 0 and r["wire_bytes"] > 0

    def by_context(method: str, key: str) -> list[int]:
        return [
            next(r[key] for r in results if r["method"] == method and r["context_tokens"] == t)
            for t in CONTEXTS
        ]

    # Receiver Qwen3 has 2 layers: LCF sends bf16 [T, b] per layer plus int32 [T, 2] spans, LCF-X [m, b].
    assert by_context("lcf", "bytes") == [2 * t * BOTTLENECK * 2 + t * 2 * 4 for t in CONTEXTS]
    assert by_context("lcfx", "bytes") == [2 * SLOTS * BOTTLENECK * 2] * len(CONTEXTS)
    # a span packet: one row per selected position, at most m, never more than the context has
    assert by_context("lcfx-spans", "bytes") == [2 * min(SLOTS, t - 1) * BOTTLENECK * 2 for t in CONTEXTS]
    lcf_wire = by_context("lcf", "wire_bytes")
    assert lcf_wire == sorted(lcf_wire) and lcf_wire[0] < lcf_wire[-1]
    assert {r["bytes"] for r in results if r["method"] == "text" and r["message_tokens"] == 4} == {16}

    growth = {(g["method"], g["message_tokens"]): g for g in report["growth"]["with_context"]}
    assert set(growth) == {("lcf", None), ("lcfx", None), ("lcfx-spans", None)} | {
        ("text", n) for n in MESSAGES
    }
    assert growth[("lcfx", None)]["bytes_per_1k_context_tokens"] == 0
    assert growth[("lcfx-spans", None)]["bytes_per_1k_context_tokens"] == 0
    assert growth[("lcf", None)]["bytes_per_1k_context_tokens"] == 1000 * (2 * BOTTLENECK * 2 + 8)
    assert all(g["ttft_ms_per_1k_context_tokens"] is not None for g in growth.values())
    per_message = report["growth"]["with_message"]
    assert [g["context_tokens"] for g in per_message] == CONTEXTS
    assert all(
        g["bytes_per_message_token"] == 4 and g["ttft_ms_per_message_token"] is not None for g in per_message
    )
    assert set(report["stages"]) == set(METHODS)


def test_slope_is_least_squares_and_needs_two_points():
    assert slope([1, 2, 3], [1, 3, 5]) == 2.0
    assert slope([0, 1, 2, 3], [0, 2, 1, 3]) == 0.8
    assert slope([5, 5], [1, 2]) is None

"""`lcflow bench load` against services on loopback (tiny models): the issue's burst of 12
handoffs at the default --max-concurrent 4 is served without one RESOURCE_EXHAUSTED, the
queue time is reported, and the JSON and PNG are written."""

from __future__ import annotations

import json
import os

import pytest
from helpers import free_port, tiny_adapter_dir
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from service_helpers import running_services

from lcflow.bench.load import run_load

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def sharer_target(tiny_pair, tmp_path_factory):
    """Both services with the default limits (4 at once, 8 queued), LCF-X."""
    directory = tiny_adapter_dir(tiny_pair, tmp_path_factory.mktemp("load-adapter"))
    with running_services(tiny_pair, directory, InMemorySpanExporter()) as services:
        yield services.sharer


def test_a_burst_of_12_at_max_concurrent_4_is_all_served(sharer_target):
    result = run_load(sharer_target, concurrency=12, requests=240, max_new_tokens=3, retries=0)
    summary = result.summary()
    assert summary["errors"] == {} and summary["ok"] == 240  # no RESOURCE_EXHAUSTED, even without retries
    assert summary["queue_ms"]["max"] > 0  # 12 at once on 4 slots: some waited, and it was reported
    assert summary["throughput_per_s"] > 0
    assert summary["latency_ms"]["p50"] <= summary["latency_ms"]["p95"] <= summary["latency_ms"]["p99"]
    assert all(o.ttft_ms is not None and o.ttft_ms <= o.latency_ms for o in result.outcomes)


def test_the_command_writes_json_and_a_plot(sharer_target, tmp_path, capsys):
    from lcflow.cli import main

    argv = ["bench", "load", "--sharer", sharer_target, "--concurrency", "3", "--requests", "6"]
    argv += ["--max-new-tokens", "2", "--sharer-pid", str(os.getpid()), "--out", str(tmp_path)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "6/6 ok" in out and "errors         none" in out
    record = json.loads((tmp_path / "load.json").read_text())
    assert len(record["outcomes"]) == 6 and record["config"]["concurrency"] == 3
    usage = record["summary"]["processes"]["sharer"]
    assert usage["start"]["rss_kb"] > 0 and usage["peak_rss_kb"] >= usage["start"]["rss_kb"]
    assert usage["rss_mib_series"] and usage["rss_mib_series"][-1][0] == round(record["summary"]["wall_s"], 1)
    assert (tmp_path / "load_latency.png").read_bytes()[:8] == PNG_MAGIC
    # nothing listening: every handoff an error, counted by status, exit 1
    dead = f"127.0.0.1:{free_port()}"
    assert (
        main(["bench", "load", "--sharer", dead, "--requests", "2", "--concurrency", "1", "--retries", "0"])
        == 1
    )
    assert "UNAVAILABLE 2" in capsys.readouterr().out


def test_rss_series_tells_the_second_half_from_the_whole_run():
    from lcflow.bench.load import ProcessSample, ProcessUsage

    usage = ProcessUsage(pid=os.getpid())
    # warm-up then flat: 100 -> 200 kB in the first half, 200 -> 202 in the second
    for second, kb in enumerate([100, 150, 200, 200, 201, 201, 202]):
        usage.series.append((float(second), kb))
    usage.start, usage.end = ProcessSample(100, 4), ProcessSample(202, 4)
    summary = usage.summary(points=3)
    assert summary["rss_drift"] == pytest.approx(1.02)
    assert summary["rss_growth_second_half"] == pytest.approx(0.01)  # from 200 at the midpoint
    assert len(summary["rss_mib_series"]) <= 4 and "series" not in summary
    assert usage.sample(9.0).rss_kb > 0 and usage.series[-1][0] == 9.0  # a real sample of this process

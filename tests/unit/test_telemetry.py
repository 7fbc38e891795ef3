"""The console exporter writes each span as one line of JSON, so a log line written between two
writes (stdout and stderr merged by `docker logs`) can never land inside a span."""

from __future__ import annotations

import json

from lcflow.serving.telemetry import TRACER_NAME, make_tracer_provider


def test_console_exporter_prints_one_json_object_per_line(monkeypatch, capsys):
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "console")
    provider = make_tracer_provider("lcflow-test")
    tracer = provider.get_tracer(TRACER_NAME)
    with tracer.start_as_current_span("outer"):
        with tracer.start_as_current_span("inner") as inner:
            inner.set_attribute("note", "a value\nwith a newline")
    provider.shutdown()
    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    spans = [json.loads(line) for line in lines]
    assert [s["name"] for s in spans] == ["inner", "outer"]
    assert spans[0]["attributes"]["note"] == "a value\nwith a newline"
    assert spans[0]["parent_id"] == spans[1]["context"]["span_id"]

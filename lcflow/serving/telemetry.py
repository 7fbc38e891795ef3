"""OpenTelemetry set-up: one trace from the client through the sharer to the receiver.

Trace context travels in gRPC metadata as W3C `traceparent`, injected and extracted by the
opentelemetry-instrumentation-grpc interceptors. The exporter is chosen by the standard
environment variables:

    OTEL_TRACES_EXPORTER = none (default) | console | otlp
    OTEL_EXPORTER_OTLP_ENDPOINT = http://jaeger:4317   (otlp, gRPC)
    OTEL_SERVICE_NAME = lcflow-sharer | lcflow-receiver | ...

Tests pass their own in-memory exporter instead.
"""

from __future__ import annotations

import logging
import os
import sys

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
    SpanExporter,
)

log = logging.getLogger(__name__)

TRACER_NAME = "lcflow"


def make_tracer_provider(service_name: str, exporter: SpanExporter | None = None) -> TracerProvider:
    """A tracer provider for one service; `exporter` overrides the OTEL_TRACES_EXPORTER choice."""
    name = os.environ.get("OTEL_SERVICE_NAME") if exporter is None else None
    provider = TracerProvider(resource=Resource.create({"service.name": name or service_name}))
    if exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        return provider
    choice = os.environ.get("OTEL_TRACES_EXPORTER", "none").strip().lower()
    if choice == "console":
        provider.add_span_processor(
            SimpleSpanProcessor(ConsoleSpanExporter(out=sys.stdout, formatter=span_as_one_line))
        )
    elif choice == "otlp":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(
            BatchSpanProcessor(OTLPSpanExporter())
        )  # endpoint from OTEL_EXPORTER_OTLP_*
    elif choice not in ("none", ""):
        log.warning(
            "OTEL_TRACES_EXPORTER=%s is not supported here (use otlp, console or none); tracing off", choice
        )
    return provider


def span_as_one_line(span: ReadableSpan) -> str:
    """A span as one line of JSON. The console exporter's default spreads a span over many lines,
    and where stdout and stderr share one log (docker logs) a log line can land inside it; one
    line per span keeps each span whole."""
    return span.to_json(indent=None) + "\n"


def current_trace_id() -> str:
    """The active trace id as 32 hex digits ('' outside a trace)."""
    ctx = trace.get_current_span().get_span_context()
    return format(ctx.trace_id, "032x") if ctx.is_valid else ""


class TraceIdLogFilter(logging.Filter):
    """Adds `trace_id` to every log record, so service logs can be joined with traces."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.trace_id = current_trace_id() or "-"
        return True


def configure_service_logging(level: str = "INFO") -> None:
    """Structured key=value logs with the trace id, for the services."""
    handler = logging.StreamHandler()
    handler.addFilter(TraceIdLogFilter())
    handler.setFormatter(
        logging.Formatter(
            "ts=%(asctime)s level=%(levelname)s logger=%(name)s trace_id=%(trace_id)s msg=%(message)s"
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level.upper(), logging.INFO))

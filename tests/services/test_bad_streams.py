"""Bad input to the services, each answered with its exact gRPC status while the service goes on
serving: damaged latent streams, mismatched identities, bad requests, and strict streams (nothing
the receiver did not ask for; every declared shape checked before a byte of data)."""

from __future__ import annotations

import zlib

import grpc
import pytest
import zstandard
from helpers import CONTEXT, PROMPT, set_shape
from service_helpers import (
    header_of,
    latent_messages,
    plain_request,
    receive_events,
    receive_status,
    still_serves,
)

from lcflow.proto_gen.lcflow.v1 import lcflow_pb2 as pb
from lcflow.transport import CodecConfig, PacketWriter, TensorSpec


def chunk_positions(messages) -> list[int]:
    return [i for i, m in enumerate(messages) if m.WhichOneof("message") == "chunk"]


def damage_version(messages):
    header_of(messages).format_version = 99


def damage_adapter(messages):
    header_of(messages).adapter_id = "lcf:0000000000000000"


def damage_receiver_model(messages):
    header_of(messages).receiver_id = "someone-else@aaaa.bbbb"


def damage_flip_byte(messages):
    chunk = messages[chunk_positions(messages)[1]].chunk
    chunk.payload = bytes([chunk.payload[0] ^ 0xFF]) + chunk.payload[1:]


def damage_missing_chunk(messages):
    del messages[chunk_positions(messages)[1]]


def damage_duplicated_chunk(messages):
    position = chunk_positions(messages)[1]
    messages.insert(position, messages[position])


def damage_reordered_chunks(messages):
    a, b = chunk_positions(messages)[:2]
    messages[a], messages[b] = messages[b], messages[a]


def damage_truncated(messages):
    del messages[-2:]  # the last chunk and the trailer never come


def damage_bomb(messages):
    """The first segment's chunks replaced by one that inflates to 256 MiB."""
    header = header_of(messages)
    first = chunk_positions(messages)
    payload = zstandard.ZstdCompressor(level=3, write_checksum=True).compress(bytes(256 << 20))
    segment0 = [i for i in first if messages[i].chunk.segment == 0]
    for i in reversed(segment0[1:]):
        del messages[i]
    messages[segment0[0]] = pb.LatentMessage(
        chunk=pb.LatentChunk(segment=0, payload=payload, crc32=zlib.crc32(payload), last_in_segment=True)
    )
    for sequence, i in enumerate(chunk_positions(messages)):  # a well-numbered stream: only the bomb is wrong
        messages[i].chunk.sequence = sequence
    header.codec.chunk_size = 1 << 20
    assert header.total_raw_bytes < 1 << 20 and len(payload) < 1 << 20


def damage_malformed_safetensors(messages):
    """An uncompressed stream whose first segment is not a safetensors blob at all."""
    header = header_of(messages)
    spec = header.segments[0].tensors[0]
    blob = (16).to_bytes(8, "little") + b"not json at all!" + bytes(64)
    writer = PacketWriter(
        mode="lcfx",
        adapter_id=header.adapter_id,
        sharer_id=header.sharer_id,
        receiver_id=header.receiver_id,
        layer_specs={header.segments[0].layer: {"latent": TensorSpec(spec.dtype, tuple(spec.shape))}},
        codec=CodecConfig(name="none"),
    )
    chunk = pb.LatentChunk(sequence=0, segment=0, payload=blob, crc32=zlib.crc32(blob), last_in_segment=True)
    trailer = pb.LatentTrailer(total_chunks=1, crc32=zlib.crc32(blob), total_wire_bytes=len(blob))
    request = messages[0].request
    request.mode = pb.LCF_X
    messages[:] = [
        messages[0],
        writer.header(),
        pb.LatentMessage(chunk=chunk),
        pb.LatentMessage(trailer=trailer),
    ]


@pytest.mark.parametrize(
    "damage, code",
    [
        (damage_version, grpc.StatusCode.FAILED_PRECONDITION),
        (damage_adapter, grpc.StatusCode.FAILED_PRECONDITION),
        (damage_receiver_model, grpc.StatusCode.FAILED_PRECONDITION),
        (damage_flip_byte, grpc.StatusCode.DATA_LOSS),
        (damage_missing_chunk, grpc.StatusCode.DATA_LOSS),
        (damage_duplicated_chunk, grpc.StatusCode.DATA_LOSS),
        (damage_reordered_chunks, grpc.StatusCode.DATA_LOSS),
        (damage_truncated, grpc.StatusCode.DATA_LOSS),
        (damage_bomb, grpc.StatusCode.INVALID_ARGUMENT),
    ],
    ids=lambda v: getattr(v, "__name__", str(v)).removeprefix("damage_"),
)
def test_bad_latent_streams_get_their_status(pair, damage, code):
    messages = latent_messages(pair)
    assert len(chunk_positions(messages)) >= 3
    damage(messages)
    assert receive_status(pair, messages) == code
    still_serves(pair)


def test_malformed_safetensors_is_invalid_argument(pair):
    if pair.mode != "lcfx":
        pytest.skip("built as an LCF-X stream")
    messages = latent_messages(pair)
    damage_malformed_safetensors(messages)
    assert receive_status(pair, messages) == grpc.StatusCode.INVALID_ARGUMENT
    still_serves(pair)


def test_identity_mismatch_names_both(pair):
    messages = latent_messages(pair)
    damage_adapter(messages)
    with pytest.raises(grpc.RpcError) as err:
        list(pair.receiver_stub.Receive(iter(messages), timeout=30))
    assert (
        "lcf:0000000000000000" in err.value.details()
        and pair.receiver_service.engine.adapter_id in err.value.details()
    )


@pytest.mark.parametrize(
    "options",
    [
        {"prompt": "   ", "context": CONTEXT},
        {"prompt": PROMPT, "context": ""},
        {"prompt": "x" * 40_000, "context": CONTEXT},
        {"prompt": PROMPT, "context": "word " * 5000},
        {"prompt": PROMPT, "context": CONTEXT, "max_new_tokens": 100_000},
    ],
    ids=["empty-prompt", "empty-context", "oversized-prompt", "oversized-context", "too-many-tokens"],
)
def test_bad_requests_are_invalid_argument(pair, options):
    options = dict(options)  # the parameter dict is shared between the lcf and lcfx runs
    prompt = options.pop("prompt")
    with pytest.raises(grpc.RpcError) as err:
        pair.client.handoff(prompt, mode=pair.mode, **options)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert len(err.value.details()) > 20  # says what was wrong
    still_serves(pair)


def test_an_unknown_mode_number_is_named_with_the_valid_modes(pair):
    """Mode 99 is not unset: the status says which number was sent and which modes exist, on the
    sharer and on the receiver (which a sharer of another version may call directly)."""
    for mode, said in ((99, "mode 99 is not a mode"), (0, "mode is unset")):
        request = pair.client.request(PROMPT, mode="none")
        request.mode = mode
        with pytest.raises(grpc.RpcError) as err:
            list(pair.sharer_stub.Handoff(request, timeout=30))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert said in err.value.details() and "LCF_X (2)" in err.value.details()
    opening = plain_request(pb.NONE)
    opening.request.mode = 99
    events, code, details = receive_events(pair, [opening])
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "mode 99" in details and events == []
    still_serves(pair)


def test_a_chat_role_outside_the_templates_roles_is_refused(pair):
    good = pb.ChatMessages(messages=[pb.ChatMessage(role="user", content=PROMPT)])
    request = pair.client.request(PROMPT, mode="none")
    request.prompt_messages.CopyFrom(good)
    assert list(pair.sharer_stub.Handoff(request, timeout=30))[-1].HasField("summary")
    for role in ("wizard", ""):
        bad = pb.ChatMessages(messages=[pb.ChatMessage(role="system", content="Be brief.")])
        bad.messages.append(pb.ChatMessage(role=role, content=PROMPT))
        request.prompt_messages.CopyFrom(bad)
        with pytest.raises(grpc.RpcError) as err:
            list(pair.sharer_stub.Handoff(request, timeout=30))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        details = err.value.details()
        assert f"prompt_messages[1] has role {role!r}" in details and "system, user, assistant" in details
    still_serves(pair)


@pytest.mark.parametrize("mode", [pb.NONE, pb.TEXT])
@pytest.mark.parametrize("follows", ["header", "request", "trailer"])
def test_nothing_may_follow_a_plain_request(pair, mode, follows):
    latent = latent_messages(pair)
    extra = {"header": latent[1], "request": plain_request(mode), "trailer": latent[-1]}[follows]
    assert receive_events(pair, [plain_request(mode)])[1] == grpc.StatusCode.OK  # alone, it is served
    events, code, details = receive_events(pair, [plain_request(mode), extra])
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert f"{follows} message arrived after a {pb.Mode.Name(mode)} ReceiverRequest" in details
    assert events == []  # refused before anything was generated
    still_serves(pair)


def test_a_second_request_inside_the_payload_is_invalid(pair):
    messages = latent_messages(pair)
    messages.insert(3, messages[0])  # after the header and a chunk
    events, code, details = receive_events(pair, messages)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "second ReceiverRequest" in details
    assert events == []
    still_serves(pair)


@pytest.mark.parametrize("follows", ["chunk", "request", "header", "trailer"])
def test_nothing_may_follow_the_trailer(pair, follows):
    messages = latent_messages(pair)
    extra = {"chunk": messages[2], "request": messages[0], "header": messages[1], "trailer": messages[-1]}
    events, code, details = receive_events(pair, [*messages, extra[follows]])
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert f"{follows} message arrived after the LatentTrailer" in details
    assert events == []
    still_serves(pair)


def test_a_latent_request_without_a_header_is_invalid(pair):
    messages = latent_messages(pair)
    events, code, details = receive_events(pair, [messages[0], messages[2]])
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "must send its LatentHeader" in details
    events, code, details = receive_events(pair, messages[:1])
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "not the end of the stream" in details


def bad_rows(pair, header):
    rows = 5000 if pair.mode == "lcf" else 5  # lcf: above --max-context-tokens; lcfx: not the 4 slots
    for i, segment in enumerate(header.segments):
        if segment.HasField("layer"):
            set_shape(header, i, (1, rows, segment.tensors[0].shape[2]))
        else:
            set_shape(header, i, (rows, 2))
    return "--max-context-tokens" if pair.mode == "lcf" else "pools into 4 slots"


def bad_bottleneck(pair, header):
    set_shape(header, 0, (1, header.segments[0].tensors[0].shape[1], 17))
    return "does not fit this adapter"


def bad_layers(pair, header):
    header.segments[0].layer = header.layers[0] = 7
    return "but this receiver's adapter decodes layers"


def bad_mode(pair, header):
    header.mode = pb.LCF_X if pair.mode == "lcf" else pb.LCF
    return "the request asked for"


def bad_tensor_name(pair, header):
    header.segments[0].tensors[0].name = "keys"
    return "expected one float tensor 'latent'"


def bad_spans(pair, header):
    if pair.mode == "lcfx":  # LCF-X carries no shared segment at all
        header.segments.add(tensors=[pb.TensorSpec(name="token_spans", dtype="int32", shape=[4, 2])])
        set_shape(header, len(header.segments) - 1, (4, 2))
        return "carries no shared tensors"
    shared = next(i for i, s in enumerate(header.segments) if not s.HasField("layer"))
    set_shape(header, shared, (3, 2))
    return "LCF needs one int32 token_spans"


@pytest.mark.parametrize(
    "damage",
    [bad_rows, bad_bottleneck, bad_layers, bad_mode, bad_tensor_name, bad_spans],
    ids=lambda f: f.__name__,
)
def test_header_shapes_must_fit_the_adapter(pair, damage):
    """Each header is self-consistent (the wire format accepts it) but declares tensors this
    receiver's decoder cannot take: refused from the header alone, before any chunk is read."""
    messages = latent_messages(pair)
    expected = damage(pair, header_of(messages))
    # Only the request and header: were the header accepted, the receiver would go on to wait for
    # chunks and end with DATA_LOSS, not INVALID_ARGUMENT.
    events, code, details = receive_events(pair, messages[:2])
    assert code == grpc.StatusCode.INVALID_ARGUMENT, details
    assert expected in details
    assert events == []
    still_serves(pair)

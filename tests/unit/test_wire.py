"""The latent wire format: exact round trips, and every kind of bad stream refused with the right status."""

from __future__ import annotations

import tracemalloc
import zlib

import grpc
import pytest
import torch
import zstandard
from helpers import chunk_indices, expect_error, make_packet, with_segment_payload

from lcflow.proto_gen.lcflow.v1 import lcflow_pb2 as pb
from lcflow.transport import (
    MAX_CHUNK_BYTES,
    CodecConfig,
    LatentPacket,
    PacketAssembler,
    PacketWriter,
    TensorSpec,
    WireError,
    WireLimits,
    assemble,
    coalesce_chunks,
    packet_messages,
)

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.int32]


def assert_same(a: LatentPacket, b: LatentPacket) -> None:
    assert (b.mode, b.adapter_id, b.sharer_id, b.receiver_id) == (
        a.mode,
        a.adapter_id,
        a.sharer_id,
        a.receiver_id,
    )
    assert b.layers == a.layers and b.meta == a.meta
    for layer in a.layers:
        for name, tensor in a.tensors_per_layer[layer].items():
            got = b.tensors_per_layer[layer][name]
            assert got.dtype == tensor.dtype and torch.equal(got, tensor)
    assert torch.equal(b.shared_tensors["token_spans"], a.shared_tensors["token_spans"])


# ---------------------------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "codec", [CodecConfig(), CodecConfig(byte_shuffle=False), CodecConfig(name="none")], ids=repr
)
def test_round_trip_is_exact(dtype, codec):
    packet = make_packet(dtype)
    assert_same(packet, assemble(packet_messages(packet, codec)))


def test_lcfx_packet_without_shared_tensors_round_trips():
    packet = make_packet(torch.float16, tokens=32)
    packet.mode, packet.shared_tensors = "lcfx", {}
    got = assemble(packet_messages(packet))
    assert got.mode == "lcfx" and got.shared_tensors == {}
    assert torch.equal(got.tensors_per_layer[5]["latent"], packet.tensors_per_layer[5]["latent"])


def test_shuffle_helps_bf16_and_stats_count_bytes():
    packet = make_packet(torch.bfloat16, tokens=512, width=128)
    sizes = {}
    for shuffle in (False, True):
        writer = PacketWriter.for_packet(packet, CodecConfig(byte_shuffle=shuffle))
        for layer in packet.layers:
            list(writer.layer(layer, packet.tensors_per_layer[layer]))
        list(writer.shared(packet.shared_tensors))
        assert writer.stats.bytes_raw == packet.raw_bytes()
        sizes[shuffle] = writer.stats.bytes_wire
    assert sizes[True] < sizes[False] < packet.raw_bytes()


def test_chunks_stay_within_the_limit_and_counts_match():
    packet = make_packet(torch.float32, tokens=4096, width=128, layers=(0, 1))  # 2 MiB per layer
    messages = list(packet_messages(packet, CodecConfig(name="none")))
    chunks = [m.chunk for m in messages if m.WhichOneof("message") == "chunk"]
    assert all(m.ByteSize() <= MAX_CHUNK_BYTES + 64 for m in messages)
    assert max(len(c.payload) for c in chunks) == MAX_CHUNK_BYTES
    assert [c.sequence for c in chunks] == list(range(len(chunks)))
    assert len(chunks) == 1 + 2 * 3  # spans: 1 chunk; each 2 MiB layer + safetensors header: 3 chunks
    assert messages[-1].trailer.total_chunks == len(chunks)

    small = list(packet_messages(packet, CodecConfig(chunk_size=4096)))
    assert all(len(m.chunk.payload) <= 4096 for m in small if m.WhichOneof("message") == "chunk")
    assert_same(packet, assemble(small))


def test_codec_config_refuses_chunks_over_1_mib():
    with pytest.raises(ValueError, match="chunk_size"):
        CodecConfig(chunk_size=MAX_CHUNK_BYTES + 1)


def test_layers_are_available_before_the_trailer():
    packet = make_packet(torch.bfloat16, tokens=128)
    assembler = PacketAssembler()
    seen: list = []
    for message in packet_messages(packet, CodecConfig(chunk_size=1000)):
        kind = message.WhichOneof("message")
        if kind == "trailer":
            assert seen == [None, *packet.layers]  # every segment decoded before the trailer arrived
        for segment in assembler.on_message(message):
            seen.append(segment.layer)
            if segment.layer is not None:
                assert torch.equal(
                    segment.tensors["latent"], packet.tensors_per_layer[segment.layer]["latent"]
                )
    assert_same(packet, assembler.on_stream_end())


def test_writer_streams_layers_as_they_are_encoded():
    tokens, width = 16, 8
    writer = PacketWriter(
        mode="lcfx",
        adapter_id="a",
        sharer_id="s",
        receiver_id="r",
        layer_specs={layer: {"latent": TensorSpec("float16", (1, tokens, width))} for layer in (2, 7)},
    )
    assembler = PacketAssembler()
    assembler.on_header(writer.header().header)
    for layer in (2, 7):
        *_, last = [
            assembler.on_chunk(m.chunk)
            for m in writer.layer(layer, {"latent": torch.ones(1, tokens, width).half()})
        ]
        assert last.layer == layer
    with pytest.raises(ValueError, match="do not match"):
        list(PacketWriter.for_packet(make_packet()).layer(0, {"latent": torch.zeros(2, 2)}))
    packet = assembler.on_trailer(writer.trailer().trailer)
    assert packet.layers == [2, 7] and packet.tensors_per_layer[7]["latent"].sum() == tokens * width


# ---------------------------------------------------------------------------------------------- errors


def test_unknown_format_version_is_failed_precondition():
    messages = list(packet_messages(make_packet()))
    messages[0].header.format_version = 99
    err = expect_error(messages, grpc.StatusCode.FAILED_PRECONDITION)
    assert "99" in err.details


def test_chunk_before_header_is_failed_precondition():
    messages = list(packet_messages(make_packet()))
    expect_error(messages[1:], grpc.StatusCode.FAILED_PRECONDITION)


def test_flipped_byte_is_data_loss():
    messages = list(packet_messages(make_packet()))
    chunk = messages[chunk_indices(messages)[1]].chunk
    payload = bytearray(chunk.payload)
    payload[len(payload) // 2] ^= 0x01
    chunk.payload = bytes(payload)
    assert "CRC" in expect_error(messages, grpc.StatusCode.DATA_LOSS).details
    # Same flip with the chunk CRC recomputed (a lying sender): zstd's frame checksum still catches it.
    chunk.crc32 = zlib.crc32(chunk.payload)
    expect_error(messages, grpc.StatusCode.DATA_LOSS)


def test_flipped_byte_without_compression_is_caught_by_the_trailer():
    messages = list(packet_messages(make_packet(torch.float32), CodecConfig(name="none")))
    chunk = messages[chunk_indices(messages)[-1]].chunk
    payload = bytearray(chunk.payload)
    payload[-1] ^= 0x80  # inside tensor data: the blob still parses
    chunk.payload, chunk.crc32 = bytes(payload), zlib.crc32(bytes(payload))
    assert "trailer" in expect_error(messages, grpc.StatusCode.DATA_LOSS).details


@pytest.mark.parametrize("damage", ["missing", "duplicated", "swapped"])
def test_missing_duplicated_or_reordered_chunk_is_data_loss(damage):
    messages = list(packet_messages(make_packet(), CodecConfig(chunk_size=500)))
    i = chunk_indices(messages)[2]
    if damage == "missing":
        del messages[i]
    elif damage == "duplicated":
        messages.insert(i, messages[i])
    else:
        messages[i], messages[i + 1] = messages[i + 1], messages[i]
    expect_error(messages, grpc.StatusCode.DATA_LOSS)


def test_whole_segment_sent_twice_is_data_loss():
    packet = make_packet()
    writer = PacketWriter.for_packet(packet)
    first = list(writer.layer(0, packet.tensors_per_layer[0]))
    again = pb.LatentMessage()
    again.CopyFrom(first[0])
    again.chunk.sequence = len(first)
    assembler = PacketAssembler()
    assembler.on_header(writer.header().header)
    for message in first:
        assembler.on_chunk(message.chunk)
    with pytest.raises(WireError) as caught:
        assembler.on_chunk(again.chunk)
    assert caught.value.code == grpc.StatusCode.DATA_LOSS and "twice" in caught.value.details


def test_truncated_stream_is_data_loss():
    messages = list(packet_messages(make_packet(), CodecConfig(chunk_size=500)))
    expect_error(messages[:-1], grpc.StatusCode.DATA_LOSS)  # no trailer
    cut = chunk_indices(messages)[3]
    expect_error([*messages[:cut], messages[-1]], grpc.StatusCode.DATA_LOSS)  # trailer inside a segment


def test_payload_over_the_limit_is_invalid_argument():
    messages = list(packet_messages(make_packet(tokens=64, width=16)))
    err = expect_error(messages, grpc.StatusCode.INVALID_ARGUMENT, WireLimits(max_payload_bytes=1000))
    assert "limit" in err.details


def test_data_larger_than_declared_is_invalid_argument():
    packet = make_packet(torch.float32, tokens=64, width=16)
    messages = list(packet_messages(packet))
    header = messages[0].header
    header.segments[1].tensors[0].shape[:] = [1, 4, 16]  # declare 4 tokens, send 64
    header.total_raw_bytes = sum(
        4 * int(torch.tensor(list(t.shape)).prod()) for s in header.segments for t in s.tensors
    )
    err = expect_error(messages, grpc.StatusCode.INVALID_ARGUMENT)
    assert "declares" in err.details


def _bomb_stream(write_content_size: bool) -> list[pb.LatentMessage]:
    """A header declaring a 64-byte tensor, then one chunk that inflates to 256 MiB of zeros."""
    writer = PacketWriter(
        mode="lcfx",
        adapter_id="a",
        sharer_id="s",
        receiver_id="r",
        layer_specs={0: {"latent": TensorSpec("float32", (16,))}},
    )
    bomb = zstandard.ZstdCompressor(level=3, write_checksum=True, write_content_size=write_content_size)
    payload = bomb.compress(bytes(256 << 20))
    assert len(payload) < MAX_CHUNK_BYTES
    chunk = pb.LatentChunk(
        sequence=0, segment=0, payload=payload, crc32=zlib.crc32(payload), last_in_segment=True
    )
    trailer = pb.LatentTrailer(total_chunks=1, crc32=zlib.crc32(payload), total_wire_bytes=len(payload))
    return [writer.header(), pb.LatentMessage(chunk=chunk), pb.LatentMessage(trailer=trailer)]


@pytest.mark.parametrize("write_content_size", [True, False], ids=["size-declared", "size-unknown"])
def test_zstd_bomb_is_refused_without_allocating_it(write_content_size):
    messages = _bomb_stream(write_content_size)
    tracemalloc.start()
    try:
        expect_error(messages, grpc.StatusCode.INVALID_ARGUMENT)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20, f"peak Python allocation {peak} bytes while refusing a 256 MiB bomb"


def _first_segment_blob(messages) -> bytes:
    return zstandard.ZstdDecompressor().decompress(messages[chunk_indices(messages)[0]].chunk.payload)


def test_segment_of_two_zstd_frames_is_invalid_argument():
    # The second frame has no checksum: accepting it would let unchecked bytes in.
    messages = list(packet_messages(make_packet(tokens=8)))
    frame = messages[chunk_indices(messages)[0]].chunk.payload
    unchecked = zstandard.ZstdCompressor(write_checksum=False).compress(b"x" * 64)
    err = expect_error(with_segment_payload(messages, frame + unchecked), grpc.StatusCode.INVALID_ARGUMENT)
    assert "one frame" in err.details


@pytest.mark.parametrize("cut", [2, 40], ids=["checksum-cut", "content-cut"])
def test_segment_frame_cut_short_is_data_loss(cut):
    # Cutting the 4-byte checksum leaves every content byte in place; it must still be refused.
    messages = list(packet_messages(make_packet(tokens=8)))
    frame = messages[chunk_indices(messages)[0]].chunk.payload
    err = expect_error(with_segment_payload(messages, frame[:-cut]), grpc.StatusCode.DATA_LOSS)
    assert "truncated" in err.details


def test_zstd_frame_without_content_size_is_invalid_argument():
    messages = list(packet_messages(make_packet(tokens=8)))
    blob = _first_segment_blob(messages)
    frame = zstandard.ZstdCompressor(write_checksum=True, write_content_size=False).compress(blob)
    err = expect_error(with_segment_payload(messages, frame), grpc.StatusCode.INVALID_ARGUMENT)
    assert "content size" in err.details


def test_oversized_chunk_is_invalid_argument():
    messages = list(
        packet_messages(make_packet(tokens=256, width=64), CodecConfig(name="none", chunk_size=4096))
    )
    messages[0].header.codec.chunk_size = 1024
    expect_error(messages, grpc.StatusCode.INVALID_ARGUMENT)


def _raw_segment_stream(blob: bytes, spec: TensorSpec) -> list[pb.LatentMessage]:
    writer = PacketWriter(
        mode="lcfx",
        adapter_id="a",
        sharer_id="s",
        receiver_id="r",
        layer_specs={0: {"latent": spec}},
        codec=CodecConfig(name="none"),
    )
    chunk = pb.LatentChunk(sequence=0, segment=0, payload=blob, crc32=zlib.crc32(blob), last_in_segment=True)
    trailer = pb.LatentTrailer(total_chunks=1, crc32=zlib.crc32(blob), total_wire_bytes=len(blob))
    return [writer.header(), pb.LatentMessage(chunk=chunk), pb.LatentMessage(trailer=trailer)]


@pytest.mark.parametrize(
    "blob",
    [
        (10**9).to_bytes(8, "little") + b"{}" + bytes(64),  # header length far past the blob
        (16).to_bytes(8, "little") + b"not json at all!" + bytes(64),
        (2).to_bytes(8, "little") + b"[]" + bytes(64),
        b"\x01\x02",
    ],
    ids=["huge-header-length", "not-json", "not-an-object", "too-short"],
)
def test_malformed_safetensors_header_is_invalid_argument(blob):
    expect_error(_raw_segment_stream(blob, TensorSpec("float32", (16,))), grpc.StatusCode.INVALID_ARGUMENT)


def test_safetensors_blob_that_disagrees_with_the_header_is_invalid_argument():
    from safetensors.torch import save

    blob = save({"latent": torch.zeros(16, dtype=torch.float16)})  # header says float32
    err = expect_error(
        _raw_segment_stream(blob, TensorSpec("float32", (8,))), grpc.StatusCode.INVALID_ARGUMENT
    )
    assert "F16" in err.details


def test_coalesced_chunks_round_trip_within_the_size_bound():
    packet = make_packet(torch.bfloat16, tokens=128, width=32, layers=tuple(range(10)))
    single = list(packet_messages(packet))
    batched = list(coalesce_chunks(single, max_bytes=20_000))
    kinds = [m.WhichOneof("message") for m in batched]
    assert "chunks" in kinds and len(batched) < len(single)
    assert all(
        sum(len(c.payload) for c in m.chunks.chunks) <= 20_000
        for m in batched
        if m.WhichOneof("message") == "chunks"
    )
    assert_same(packet, assemble(batched))
    # Layers still come out one by one, as each batch completes them.
    assembler = PacketAssembler()
    completed = [len(assembler.on_message(m)) for m in batched]
    assert sum(completed) == len(packet.layers) + 1 and max(completed) > 1


def test_batch_over_the_chunk_size_is_invalid_argument():
    messages = list(packet_messages(make_packet(), CodecConfig(chunk_size=4096)))
    batched = list(coalesce_chunks(messages, max_bytes=MAX_CHUNK_BYTES))
    expect_error(batched, grpc.StatusCode.INVALID_ARGUMENT)


def test_an_unknown_mode_value_is_invalid_argument_not_a_crash():
    """proto3 enums are open: a peer can send a Mode value this receiver has no name for."""
    messages = list(packet_messages(make_packet()))
    messages[0].header.mode = 12345
    with pytest.raises(WireError) as err:
        assemble(messages)
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and "unknown mode 12345" in err.value.details


def test_the_connector_primitives_carry_a_packet_layer_by_layer():
    """lcflow.transport.connector: a sender called in its documented order (header, shared, one
    layer at a time, trailer) and a receiver fed each message hand back every layer as it
    completes, then the same packet; an engine needs nothing else of the wire format."""
    from lcflow.transport import LatentReceiver, LatentSender

    packet = make_packet()
    sender: LatentSender = PacketWriter.for_packet(packet)
    receiver: LatentReceiver = PacketAssembler()
    receiver.on_header(sender.header().header)
    completed = [s.layer for m in sender.shared(packet.shared_tensors) for s in receiver.on_message(m)]
    for layer in packet.layers:
        for message in sender.layer(layer, packet.tensors_per_layer[layer]):
            completed += [segment.layer for segment in receiver.on_message(message)]
        assert completed[-1] == layer  # the layer is there before the next one is sent
    assert receiver.on_message(sender.trailer()) == [] and receiver.packet is not None
    assert completed == [None, *packet.layers]
    assert_same(packet, receiver.on_stream_end())
    assert receiver.stats.bytes_wire == sender.stats.bytes_wire


def test_a_connector_must_implement_every_primitive():
    from lcflow.transport import LatentReceiver

    class HeaderOnly(LatentReceiver):
        def on_header(self, header):
            pass

    with pytest.raises(TypeError, match="on_message"):
        HeaderOnly()

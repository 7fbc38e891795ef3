"""Segment layout and codec pieces: the blobs are real safetensors, byte-shuffle is exact, zstd keeps its checks."""

from __future__ import annotations

import platform

import grpc
import numpy as np
import pytest
import safetensors.torch
import torch
import zstandard

from lcflow.proto_gen.lcflow.v1 import lcflow_pb2 as pb
from lcflow.transport import (
    CodecConfig,
    LatentPacket,
    TensorSpec,
    WireError,
    assemble,
    coalesce_chunks,
    packet_messages,
)
from lcflow.transport.codec import SegmentDecoder, crc32
from lcflow.transport.memory import keep_freed_memory
from lcflow.transport.segments import (
    SHUFFLE_BLOCK,
    check_segment,
    load_segment,
    max_blob_bytes,
    serialise_segment,
    shuffle_into,
    unshuffle_into,
)

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.int32]


def random_tensor(dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    if dtype == torch.int32:
        return torch.randint(-(2**31), 2**31 - 1, shape, generator=generator, dtype=torch.int32)
    return torch.randn(shape, generator=generator).to(dtype)


def mixed_tensors() -> dict[str, torch.Tensor]:
    # Sizes on both sides of a shuffle block, a scalar and an empty tensor.
    return {
        "latent": random_tensor(torch.bfloat16, (1, 3 * SHUFFLE_BLOCK + 5)),
        "scale": random_tensor(torch.float32, ()),
        "spans": random_tensor(torch.int32, (7, 2)),
        "half": random_tensor(torch.float16, (5, 3)),
        "empty": torch.zeros(0, 4, dtype=torch.float16),
    }


def specs_of(tensors: dict[str, torch.Tensor]) -> dict[str, TensorSpec]:
    return {name: TensorSpec.of(t) for name, t in tensors.items()}


def test_unshuffled_blob_is_what_safetensors_reads():
    tensors = mixed_tensors()
    blob = serialise_segment(tensors)
    loaded = safetensors.torch.load(bytes(blob))
    assert loaded.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor)
    header_len = int.from_bytes(blob[:8], "little")
    assert header_len % 8 == 0  # padded as safetensors pads it: tensor data 8-byte aligned


@pytest.mark.parametrize("byte_shuffle", [False, True])
def test_segment_round_trip_is_exact(byte_shuffle):
    tensors = mixed_tensors()
    blob = serialise_segment(tensors, byte_shuffle)
    specs = specs_of(tensors)
    assert len(blob) <= max_blob_bytes(specs)
    header = check_segment(blob, specs, "test segment")
    got = load_segment(blob, header, specs, byte_shuffle)
    for name, tensor in tensors.items():
        assert got[name].dtype == tensor.dtype and got[name].shape == tensor.shape
        assert torch.equal(got[name], tensor)


def test_an_unshuffled_received_blob_is_read_in_place_where_aligned():
    """The receiver's blob (a bytearray) is not copied again: a tensor whose bytes are aligned for
    its dtype is a view of it; a misaligned one, and any tensor of immutable bytes, is copied."""
    tensors = mixed_tensors()
    specs = specs_of(tensors)
    blob = bytearray(serialise_segment(tensors))
    header = check_segment(blob, specs, "test segment")
    base = np.frombuffer(blob, dtype=np.uint8).ctypes.data

    def in_blob(got: dict[str, torch.Tensor]) -> dict[str, bool]:
        return {name: base <= t.data_ptr() < base + len(blob) for name, t in got.items() if t.numel()}

    viewed = load_segment(blob, header, specs, byte_shuffle=False)
    # latent (bf16) starts the data; scale (float32) and spans (int32) follow its 196,618 bytes, 2
    # past a multiple of 4; half (float16) follows them at an even offset
    assert in_blob(viewed) == {"latent": True, "scale": False, "spans": False, "half": True}
    copied = load_segment(bytes(blob), header, specs, byte_shuffle=False)
    assert not any(in_blob(copied).values())
    for name, tensor in tensors.items():
        assert torch.equal(viewed[name], tensor) and torch.equal(copied[name], tensor)


def test_without_compression_nothing_is_shuffled():
    """Byte-shuffle only helps zstd; a `none` stream says it is unshuffled and is."""
    packet = LatentPacket(
        mode="lcf",
        adapter_id="a",
        sharer_id="s",
        receiver_id="r",
        layers=[0],
        tensors_per_layer={0: {"latent": random_tensor(torch.bfloat16, (1, 4, 8))}},
    )
    for name, shuffled in (("none", False), ("zstd", True)):
        messages = list(packet_messages(packet, CodecConfig(name=name)))
        assert messages[0].header.codec.byte_shuffle is shuffled
        if name == "none":  # the segment's payload is the safetensors blob as it is
            assert messages[1].chunk.payload == serialise_segment(packet.tensors_per_layer[0])
        assert torch.equal(
            assemble(messages).tensors_per_layer[0]["latent"], packet.tensors_per_layer[0]["latent"]
        )


def test_shuffled_blob_is_the_safetensors_blob_regrouped_by_byte_plane():
    tensors = {"latent": random_tensor(torch.bfloat16, (2, 100)), "spans": random_tensor(torch.int32, (9,))}
    plain, shuffled = serialise_segment(tensors), serialise_segment(tensors, byte_shuffle=True)
    header = check_segment(plain, specs_of(tensors), "test segment")
    start = header["__data_start__"]
    assert plain[:start] == shuffled[:start]  # the JSON header is left readable
    for name, tensor in tensors.items():
        lo, hi = (start + offset for offset in header[name]["data_offsets"])
        elements = np.frombuffer(plain[lo:hi], dtype=np.uint8).reshape(-1, tensor.element_size())
        assert shuffled[lo:hi] == elements.T.tobytes()


@pytest.mark.parametrize("itemsize", [1, 2, 4])
@pytest.mark.parametrize("count", [1, SHUFFLE_BLOCK - 1, SHUFFLE_BLOCK, 2 * SHUFFLE_BLOCK + 3])
def test_shuffle_into_matches_a_transpose_and_inverts(itemsize, count):
    source = np.random.default_rng(count).integers(0, 256, count * itemsize, dtype=np.uint8)
    shuffled = np.empty_like(source)
    shuffle_into(shuffled, source, itemsize)
    assert np.array_equal(shuffled, source.reshape(count, itemsize).T.reshape(-1))
    restored = np.empty_like(source)
    unshuffle_into(restored, shuffled, itemsize)
    assert np.array_equal(restored, source)


def test_default_zstd_frames_carry_checksum_and_content_size():
    config = CodecConfig()
    assert (config.level, config.float_params, config.byte_shuffle) == (1, True, True)
    frame = config.compressor().compress(serialise_segment(mixed_tensors(), byte_shuffle=True))
    params = zstandard.get_frame_parameters(frame)
    assert params.has_checksum and params.content_size > 0
    plain = CodecConfig(float_params=False).compressor().compress(b"x" * 1000)
    assert zstandard.get_frame_parameters(plain).has_checksum


def test_decoder_reassembles_a_frame_fed_in_small_pieces():
    tensors = mixed_tensors()
    blob = serialise_segment(tensors, byte_shuffle=True)
    frame = CodecConfig().compressor().compress(blob)
    decoder = SegmentDecoder("zstd", max_blob_bytes(specs_of(tensors)), "test segment")
    for start in range(0, len(frame), 1000):
        decoder.feed(frame[start : start + 1000])
    assert decoder.finish() == blob


def test_crc32_is_zlibs_crc32():
    import zlib

    data = bytes(range(256)) * 1000
    assert crc32(data) == zlib.crc32(data) and crc32(data, 12345) == zlib.crc32(data, 12345)


def test_coalesce_batches_small_chunks_and_passes_big_ones_through_uncopied():
    def chunk(sequence: int, size: int) -> pb.LatentMessage:
        message = pb.LatentMessage()
        message.chunk.sequence, message.chunk.payload = sequence, bytes(size)
        return message

    messages = [chunk(0, 100), chunk(1, 100), chunk(2, 5000), chunk(3, 100)]
    out = list(coalesce_chunks(messages, max_bytes=10_000, alone_bytes=2500))
    assert [m.WhichOneof("message") for m in out] == ["chunks", "chunk", "chunk"]
    assert out[1] is messages[2] and out[2] is messages[3]
    assert [c.sequence for c in out[0].chunks.chunks] == [0, 1]


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt tuning is glibc's")
def test_keep_freed_memory_is_accepted_by_glibc():
    assert keep_freed_memory() is True


def test_receiver_refuses_an_unknown_codec():
    tensors = {"latent": random_tensor(torch.bfloat16, (1, 8, 4))}
    packet = LatentPacket("lcfx", "a", "s", "r", [0], {0: tensors})
    messages = list(packet_messages(packet))
    messages[0].header.codec.name = "lz4"
    with pytest.raises(WireError) as caught:
        assemble(messages)
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT and "unknown codec" in caught.value.details


def test_a_frame_in_a_later_chunk_after_the_first_frame_ended_is_refused():
    # The first chunk holds a whole frame; the next chunk starts a second one.
    compressor = zstandard.ZstdCompressor(write_checksum=True, write_content_size=True)
    decoder = SegmentDecoder("zstd", limit=1 << 16, what="test segment")
    decoder.feed(compressor.compress(b"a" * 1000))
    with pytest.raises(WireError) as caught:
        decoder.feed(compressor.compress(b"b" * 10))
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT and "one frame" in caught.value.details

"""Quantized latents (wire format versions 2 and 3): each scheme within its error bound, every
bad header refused before anything is allocated, versions 1 to 3 side by side, and handoffs
through both services with tiny models."""

from __future__ import annotations

import tracemalloc

import grpc
import pytest
import torch
from helpers import (
    expect_error,
    make_packet,
    with_segment_payload,
)

import lcflow.transport.assembler as assembler_module  # its version check reads this module's set
from lcflow.proto_gen.lcflow.v1 import lcflow_pb2 as pb
from lcflow.transport import (
    CodecConfig,
    PacketAssembler,
    PacketWriter,
    TensorSpec,
    WireError,
    WireLimits,
    assemble,
    packet_messages,
)
from lcflow.transport.quantize import DEFAULT_INT4_GROUP, Quantization, hadamard
from lcflow.transport.segments import serialise_segment

SCHEMES = [("int8", None), ("int8", 16), ("int4", None), ("int4", 16), ("int4", 128)]


def hard_latents(dtype: torch.dtype, rows: int = 96, width: int = 128) -> torch.Tensor:
    """Rows of very different magnitudes, an outlier channel, a zero row and a tiny row."""
    generator = torch.Generator().manual_seed(7)
    x = torch.randn(1, rows, width, generator=generator)
    x *= torch.logspace(-3, 2, rows).view(1, rows, 1)  # within float16's range, outlier included
    x[0, :, 5] *= 40.0
    x[0, 0] = 0.0
    x[0, 1] = 1e-30
    return x.to(dtype)


def scales_per_element(q: Quantization, scales: torch.Tensor, spec: TensorSpec) -> torch.Tensor:
    return scales.float().repeat_interleave(q.group_of(spec), dim=-1)


@pytest.mark.parametrize("scheme, group", SCHEMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_round_trip_is_within_half_a_scale_step(scheme, group, dtype):
    """|x - x^| <= s / 2 per element (quantize.py), plus half an ulp of the declared dtype."""
    q = Quantization.named(scheme, group)
    x = hard_latents(dtype)
    spec = TensorSpec.of(x)
    codes, scales = q.quantize(x)
    assert codes.dtype == (torch.int8 if scheme == "int8" else torch.uint8)
    assert tuple(codes.shape) == q.codes_spec(spec).shape and tuple(scales.shape) == q.scales_spec(spec).shape
    decoded = q.dequantize(codes, scales, spec, "cpu")
    assert decoded.dtype == dtype and decoded.shape == x.shape

    step = scales_per_element(q, scales, spec)
    exact, got = x.float(), decoded.float()
    rounding = torch.finfo(dtype).eps / 2 * got.abs()  # the cast of x^ to the declared dtype
    bound = step / 2 * (1 + 1e-5) + rounding + 1e-30
    assert ((exact - got).abs() <= bound).all(), ((exact - got).abs() - bound).max()
    # and the bound is not vacuous: the error does reach a good part of it somewhere
    assert ((exact - got).abs() > step / 4).any()
    assert torch.equal(got[0, 0], torch.zeros_like(got[0, 0]))  # a zero row stays zero


@pytest.mark.parametrize("group", [None, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_rotated_round_trip_is_within_half_a_step_per_group_in_norm(group, dtype):
    """With rotated groups the half-step bound holds for y = H x, coordinate by coordinate, so it
    holds in norm for x: ||x - x^|| = ||y - y^|| <= s / 2 sqrt(g) per group (H is orthonormal)."""
    q = Quantization.named("int4-hadamard", group)
    assert (q.scheme, q.rotation, q.base_name) == ("int4", "hadamard", "int4-hadamard")
    assert q.name == ("int4-hadamard" if group is None else "int4-hadamard-g16")  # the name says its group
    x = hard_latents(dtype)
    spec = TensorSpec.of(x)
    codes, scales = q.quantize(x)
    decoded = q.dequantize(codes, scales, spec, "cpu")
    g = q.group_of(spec)
    error = (x.float() - decoded.float()).reshape(*x.shape[:-1], -1, g).norm(dim=-1)
    rounding = torch.finfo(dtype).eps / 2 * decoded.float().reshape(error.shape + (g,)).norm(dim=-1)
    bound = scales.float() / 2 * g**0.5 * (1 + 1e-4) + rounding + 1e-30
    assert (error <= bound).all(), (error - bound).max()
    assert (error > bound / 8).any()  # not vacuous


def test_rotation_spreads_an_outlier_channel_and_cuts_the_error():
    """Why it exists: one channel 40x the rest sets every scale of its group; rotated, the
    outlier's energy is spread over the group and the other channels keep their resolution."""
    x = hard_latents(torch.float32)[:, 2:]  # rows of one magnitude each, channel 5 an outlier
    spec = TensorSpec.of(x)

    def relative_error(name: str) -> float:
        q = Quantization.named(name)
        decoded = q.dequantize(*q.quantize(x), spec, "cpu")
        return ((x - decoded).norm() / x.norm()).item()

    assert relative_error("int4-hadamard") < 0.7 * relative_error("int4")


def test_hadamard_is_orthonormal_and_symmetric():
    for n in (1, 2, 16, 64):
        h = hadamard(n)
        assert torch.equal(h, h.T) and torch.allclose(h @ h, torch.eye(n), atol=1e-6)
        assert torch.allclose(h.abs(), torch.full((n, n), n**-0.5))
    with pytest.raises(ValueError, match="power of two"):
        Quantization.named("int4-hadamard", 48).group_of(TensorSpec("float32", (2, 96)))


def test_codes_use_their_range_and_int4_packs_two_a_byte():
    x = hard_latents(torch.float32)
    int8_codes, _ = Quantization.named("int8").quantize(x)
    assert int8_codes.min() >= -127 and int8_codes.max() == 127  # the absmax element maps to +-127
    int4_codes, _ = Quantization.named("int4").quantize(x)
    nibbles = torch.stack((int4_codes & 0x0F, int4_codes >> 4), dim=-1)
    assert nibbles.min() >= 1 and nibbles.max() == 15 and int4_codes.shape[-1] == x.shape[-1] // 2


def test_int4_default_group_is_the_measured_one():
    assert Quantization.named("int4").group_size == DEFAULT_INT4_GROUP == 64
    assert Quantization.named("int8").group_size == 0  # one scale per row


def test_an_int4_name_may_carry_its_group_size():
    assert Quantization.named("int4-hadamard-g32") == Quantization("int4", 32, "float16", "hadamard")
    assert Quantization.named("int4-g128").group_size == 128
    assert Quantization.named("int4-g32", group_size=32).group_size == 32
    with pytest.raises(ValueError, match="names group 32, not 64"):
        Quantization.named("int4-g32", group_size=64)
    assert Quantization.named("int4-hadamard-g32").name == "int4-hadamard-g32"  # named and name agree
    assert Quantization.named("int4", 64).name == "int4"  # the default group is not named
    # int8 keeps one scale a row; groups below 8 or above 4096, or not in plain digits, are no group
    for bad in [
        "int8-g32",
        "int4-g0",
        "int4-gx",
        "int5-g32",
        "int4-g4",
        "int4-g8192",
        "int4-g²",
        "int4-g032",
    ]:
        with pytest.raises(ValueError, match="unknown quantization"):
            Quantization.named(bad)


def test_wire_forms_on_the_command_line_take_a_group_and_refuse_the_rest():
    import argparse

    from lcflow.core.names import check_wire_form

    assert check_wire_form("int4-hadamard-g32") == "int4-hadamard-g32"
    assert check_wire_form("bf16") == "bf16"
    assert check_wire_form("int4-g64") == "int4"  # one name for one codec
    for bad in ["bf16-g32", "int4-g", "none", "int4-g4294967296"]:  # "none" is a --quantize setting
        with pytest.raises(argparse.ArgumentTypeError, match="int4-hadamard-g32"):
            check_wire_form(bad)


@pytest.mark.parametrize("bad", [float("inf"), float("nan"), 1e6])
def test_values_the_scales_cannot_carry_are_refused_by_the_sender(bad):
    x = torch.ones(1, 4, 16)
    x[0, 2, 3] = bad  # 1e6 / 7 is past float16's 65504
    with pytest.raises(ValueError, match="cannot be quantized"):
        Quantization.named("int4").encode({"latent": x})


# ---------------------------------------------------------------------------------------------- versions


def quantized_packet(dtype=torch.bfloat16):
    return make_packet(dtype, tokens=48, width=128, layers=(0, 3))


def test_unquantized_packets_stay_version_1_and_quantized_ones_are_version_2():
    plain = list(packet_messages(quantized_packet()))
    assert plain[0].header.format_version == 1
    assert not plain[0].header.codec.quantization and not plain[0].header.segments[0].tensors[0].HasField(
        "scales"
    )
    quantized = list(packet_messages(quantized_packet(), CodecConfig(quantization="int4")))
    header = quantized[0].header
    assert header.format_version == 2
    assert (header.codec.quantization, header.codec.group_size, header.codec.scale_dtype) == (
        "int4",
        64,
        "float16",
    )
    latent = header.segments[0].tensors[0]
    assert (latent.dtype, list(latent.shape)) == ("bfloat16", [1, 48, 128])  # what the receiver gets back
    assert (latent.scales.name, latent.scales.dtype, list(latent.scales.shape)) == (
        "latent.scales",
        "float16",
        [1, 48, 2],
    )
    spans = header.segments[-1].tensors[0]
    assert spans.name == "token_spans" and not spans.HasField("scales")  # int32 travels as it is


def test_a_version_1_reader_refuses_version_2_cleanly(monkeypatch):
    """What a receiver from before quantization does: its version check (unchanged) answers
    FAILED_PRECONDITION, before it looks at anything else in the header."""
    monkeypatch.setattr(assembler_module, "SUPPORTED_FORMAT_VERSIONS", frozenset({1}))
    quantized = list(packet_messages(quantized_packet(), CodecConfig(quantization="int8")))
    err = expect_error(quantized, grpc.StatusCode.FAILED_PRECONDITION)
    assert "version 2" in err.details
    plain = assemble(packet_messages(quantized_packet()))  # version 1 still reads
    assert plain.layers == [0, 3]


def test_rotated_packets_are_version_3_and_older_readers_refuse_them(monkeypatch):
    rotated = list(packet_messages(quantized_packet(), CodecConfig(quantization="int4-hadamard")))
    header = rotated[0].header
    assert (header.format_version, header.codec.quantization, header.codec.rotation) == (
        3,
        "int4",
        "hadamard",
    )
    unrotated = list(packet_messages(quantized_packet(), CodecConfig(quantization="int4")))
    assert unrotated[0].header.format_version == 2 and not unrotated[0].header.codec.rotation
    monkeypatch.setattr(
        assembler_module, "SUPPORTED_FORMAT_VERSIONS", frozenset({1, 2})
    )  # a version 2 receiver
    err = expect_error(rotated, grpc.StatusCode.FAILED_PRECONDITION)
    assert "version 3" in err.details
    assert assemble(unrotated).layers == [0, 3]


@pytest.mark.parametrize("scheme", ["int8", "int4", "int4-hadamard"])
@pytest.mark.parametrize("codec", ["zstd", "none"])
def test_quantized_packets_round_trip_through_the_wire(scheme, codec):
    packet = quantized_packet()
    messages = list(packet_messages(packet, CodecConfig(name=codec, quantization=scheme)))
    assembler = PacketAssembler()
    for message in messages:
        assembler.on_message(message)
    decoded = assembler.on_stream_end()
    q = Quantization.named(scheme)
    for layer in packet.layers:
        sent = packet.tensors_per_layer[layer]["latent"]
        expected = q.dequantize(*q.quantize(sent), TensorSpec.of(sent), "cpu")  # what the codec alone gives
        got = decoded.tensors_per_layer[layer]["latent"]
        assert got.dtype == sent.dtype and got.device.type == "cpu"
        assert torch.equal(got, expected)  # the wire adds nothing to the codec's own error
    assert torch.equal(decoded.shared_tensors["token_spans"], packet.shared_tensors["token_spans"])
    raw, wire_bytes = assembler.stats.bytes_raw, assembler.stats.bytes_wire
    assert raw == packet.raw_bytes()  # bytes_raw counts the declared bf16 tensors
    smallest = {"int8": 1.8, "int4": 3.0, "int4-hadamard": 3.0}[
        scheme
    ]  # 2x / 3.8x minus safetensors headers on 48 rows
    assert raw / wire_bytes > smallest, (raw, wire_bytes)


# ---------------------------------------------------------------------------------------------- refusals

BIG = TensorSpec("bfloat16", (1, 65536, 1024))  # 128 MiB declared: allocating it would show


def big_header() -> pb.LatentMessage:
    writer = PacketWriter(
        mode="lcf",
        adapter_id="a",
        sharer_id="s",
        receiver_id="r",
        layer_specs={0: {"latent": BIG}},
        shared_specs={"token_spans": TensorSpec("int32", (65536, 2))},
        codec=CodecConfig(quantization="int4"),
    )
    return writer.header()


def set_scales(shape=None, dtype=None, name=None):
    def damage(header: pb.LatentHeader) -> None:
        scales = header.segments[0].tensors[0].scales
        if shape is not None:
            del scales.shape[:]
            scales.shape.extend(shape)
        scales.dtype = dtype if dtype is not None else scales.dtype
        scales.name = name if name is not None else scales.name

    return damage


def set_codec(**fields):
    def damage(header: pb.LatentHeader) -> None:
        for name, value in fields.items():
            setattr(header.codec, name, value)

    return damage


def scales_on_the_spans(header: pb.LatentHeader) -> None:
    header.segments[1].tensors[0].scales.CopyFrom(header.segments[0].tensors[0].scales)


def no_scales(header: pb.LatentHeader) -> None:
    header.segments[0].tensors[0].ClearField("scales")


def scales_of_scales(header: pb.LatentHeader) -> None:
    scales = header.segments[0].tensors[0].scales
    scales.scales.CopyFrom(pb.TensorSpec(name="x", dtype="float16", shape=[1]))


def odd_width(header: pb.LatentHeader) -> None:
    latent = header.segments[0].tensors[0]
    latent.shape[-1] = 1023
    latent.scales.shape[-1] = 1
    header.codec.group_size = 0  # one group a row: only the odd width is wrong
    header.total_raw_bytes -= 65536 * 2


DAMAGES = {
    "unknown-codec": set_codec(name="lz4"),
    "unknown-quantization": set_codec(quantization="int3"),
    "quantized-in-version-1": lambda h: setattr(h, "format_version", 1),
    "rotated-in-version-2": set_codec(rotation="hadamard"),
    "rotation-in-the-scheme-name": lambda h: (
        set_codec(quantization="int4-hadamard")(h),
        setattr(h, "format_version", 3),
    ),
    "unknown-rotation": lambda h: (set_codec(rotation="fourier")(h), setattr(h, "format_version", 3)),
    "rotation-without-quantization": lambda h: (
        set_codec(quantization="", group_size=0, scale_dtype="", rotation="hadamard")(h),
        setattr(h, "format_version", 3),
    ),
    "group-not-dividing-the-row": set_codec(group_size=48),
    "scale-dtype-not-a-float": set_codec(scale_dtype="int32"),
    "group-size-without-quantization": set_codec(quantization="none"),
    "scales-of-the-wrong-shape": set_scales(shape=[1, 65536, 32]),
    "scales-with-a-dimension-dropped": set_scales(shape=[65536, 16]),
    "scales-of-the-wrong-dtype": set_scales(dtype="float32"),
    "scales-of-an-int-dtype": set_scales(dtype="int32"),
    "scales-under-another-name": set_scales(name="latent"),
    "scales-missing": no_scales,
    "scales-on-an-int32-tensor": scales_on_the_spans,
    "scales-with-scales": scales_of_scales,
    "int4-of-an-odd-width": odd_width,
}


@pytest.mark.parametrize("damage", DAMAGES.values(), ids=DAMAGES.keys())
def test_bad_quantized_headers_are_invalid_argument_before_allocation(damage):
    message = big_header()
    assert PacketAssembler(WireLimits(max_payload_bytes=1 << 30)).on_header(message.header) is None  # valid
    damage(message.header)
    assembler = PacketAssembler(WireLimits(max_payload_bytes=1 << 30))
    tracemalloc.start()
    try:
        with pytest.raises(WireError) as caught:
            assembler.on_header(message.header)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details
    assert peak < 1 << 20, f"peak {peak} bytes while refusing a header that declares 128 MiB"


def test_codes_and_scales_count_against_the_payload_limit():
    """float32 scales, one per element: 5 wire bytes for 2 declared; the limit bounds both."""
    message = big_header()
    message.header.codec.group_size, message.header.codec.scale_dtype = 1, "float32"
    message.header.codec.quantization = "int8"
    scales = message.header.segments[0].tensors[0].scales
    scales.dtype = "float32"
    del scales.shape[:]
    scales.shape.extend([1, 65536, 1024])
    limits = WireLimits(max_payload_bytes=200 << 20)  # the 128.5 MiB declared fit; 320 MiB of codes do not
    with pytest.raises(WireError) as caught:
        PacketAssembler(limits).on_header(message.header)
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT and "exceeds" in caught.value.details


def test_a_blob_whose_scales_disagree_with_the_header_is_invalid_argument():
    """A lying sender: the header is right, the blob's scales tensor has another shape."""
    packet = quantized_packet()
    packet.mode, packet.shared_tensors = "lcfx", {}  # the first chunk is then layer 0's segment
    codec = CodecConfig(name="none", quantization="int8")
    messages = list(packet_messages(packet, codec))
    latent = packet.tensors_per_layer[0]["latent"]
    codes, scales = Quantization.named("int8").quantize(latent)
    lying = serialise_segment(
        {"latent": codes, "latent.scales": scales.reshape(1, 1, 48)}, codec.byte_shuffle
    )
    err = expect_error(with_segment_payload(messages, bytes(lying)), grpc.StatusCode.INVALID_ARGUMENT)
    assert "latent.scales" in err.details

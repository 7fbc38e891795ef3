"""Property-based fuzzing of the receiver's input: random, truncated, reordered, duplicated and
bit-flipped latent streams, arbitrary headers and safetensors blobs, fed to the decoding path
(PacketAssembler, and the receiver's own header check against its adapter).

Each case must end cleanly: a LatentPacket, or WireError / ServiceError with a gRPC status,
never another exception; within a time bound (hypothesis' deadline); and without allocating
past the limits (traced peak memory stays far below what a hostile size asks for).

A bounded number of cases runs by default; `LCFLOW_FUZZ_EXAMPLES=20000 pytest tests/services/test_fuzz_receiver.py`
runs a longer campaign.
"""

from __future__ import annotations

import os
import tracemalloc
import zlib

import grpc
import pytest
import torch

hypothesis = pytest.importorskip("hypothesis", reason="fuzzing needs hypothesis: pip install hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from lcflow.proto_gen.lcflow.v1 import lcflow_pb2 as pb  # noqa: E402
from lcflow.serving.server import ServiceError  # noqa: E402
from lcflow.transport import (  # noqa: E402
    CodecConfig,
    LatentPacket,
    PacketAssembler,
    WireError,
    WireLimits,
    packet_messages,
)

EXAMPLES = int(os.environ.get("LCFLOW_FUZZ_EXAMPLES", "150"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=2000,  # ms per case: a hang or a slow path is a failure, not a long wait
    database=None,  # no .hypothesis/ directory in the checkout
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
LIMITS = WireLimits(max_payload_bytes=1 << 20, max_chunk_bytes=1 << 16, max_segments=64)
MEMORY_BOUND = 32 << 20  # traced peak per case; the hostile sizes below ask for up to 2**64 bytes
STATUSES = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.DATA_LOSS, grpc.StatusCode.FAILED_PRECONDITION}


def packet(mode: str, dtype: torch.dtype, tokens: int) -> LatentPacket:
    generator = torch.Generator().manual_seed(tokens)
    layers = [0, 2, 3]
    return LatentPacket(
        mode=mode,
        adapter_id="lcfx:fuzz",
        sharer_id="s@a.b",
        receiver_id="r@c.d",
        layers=layers,
        tensors_per_layer={
            t: {"latent": torch.randn(1, tokens, 8, generator=generator).to(dtype)} for t in layers
        },
        shared_tensors={"token_spans": torch.arange(tokens * 2, dtype=torch.int32).view(tokens, 2)}
        if mode in ("lcf", "c2c")  # the same-context modes carry the sharer's token spans
        else {},
    )


def valid_streams():
    """A valid stream: mode, dtype, size, codec, byte-shuffle, chunk size and quantization all drawn."""
    return st.builds(
        lambda mode, dtype, tokens, codec, shuffle, chunk, quantize: list(
            packet_messages(
                packet(mode, dtype, tokens),
                CodecConfig(
                    name=codec,
                    byte_shuffle=shuffle,
                    chunk_size=chunk,
                    quantization=quantize[0],
                    group_size=quantize[1],
                ),
            )
        ),
        st.sampled_from(["lcf", "lcfx", "c2c"]),
        st.sampled_from([torch.bfloat16, torch.float16, torch.float32]),
        st.integers(1, 24),
        st.sampled_from(["zstd", "none"]),
        st.booleans(),
        st.sampled_from([16, 64, 333, 4096]),
        st.sampled_from(
            [
                ("none", None),
                ("int8", None),
                ("int8", 4),
                ("int4", None),
                ("int4", 2),
                ("int4-hadamard", None),
                ("int4-hadamard", 2),
            ]
        ),
    )


def feed(messages) -> LatentPacket | None:
    """The receiver's decoding path; returns the packet, or None when refused with a wire status."""
    assembler = PacketAssembler(LIMITS)
    try:
        for message in messages:
            assembler.on_message(message)
        return assembler.on_stream_end()
    except WireError as err:
        assert err.code in STATUSES and err.details
        return None


def bounded(run):
    """Run `run()` with tracemalloc on; fail if its traced peak passes MEMORY_BOUND."""
    tracemalloc.start()
    try:
        result = run()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < MEMORY_BOUND, f"peak {peak} bytes"
    return result


# --- mutations of valid streams ---------------------------------------------------------------------


def flip_bit(message: pb.LatentMessage, position: int) -> pb.LatentMessage | None:
    """The message with one bit of its wire encoding flipped, if that still parses as a LatentMessage."""
    data = bytearray(message.SerializeToString())
    if not data:
        return None
    data[position % len(data)] ^= 1 << (position % 8)
    flipped = pb.LatentMessage()
    try:
        flipped.ParseFromString(bytes(data))
    except Exception:  # protobuf's DecodeError: gRPC would refuse it before the receiver sees it
        return None
    return flipped


MUTATIONS = st.lists(
    st.tuples(
        st.sampled_from(["truncate", "delete", "duplicate", "swap", "flip", "flip_payload", "insert"]),
        st.integers(0, 1 << 20),
        st.integers(0, 1 << 20),
    ),
    min_size=1,
    max_size=4,
)


def mutate(messages: list, ops) -> list:
    messages = list(messages)
    for op, a, b in ops:
        if not messages:
            break
        i, j = a % len(messages), b % len(messages)
        if op == "truncate":
            messages = messages[:i]
        elif op == "delete":
            del messages[i]
        elif op == "duplicate":
            messages.insert(i, messages[i])
        elif op == "swap":
            messages[i], messages[j] = messages[j], messages[i]
        elif op == "flip":
            flipped = flip_bit(messages[i], b)
            if flipped is not None:
                messages[i] = flipped
        elif op == "flip_payload" and messages[i].WhichOneof("message") == "chunk":
            chunk = pb.LatentMessage()
            chunk.CopyFrom(messages[i])
            payload = bytearray(chunk.chunk.payload)
            payload[b % len(payload)] ^= 1 << (a % 8)
            chunk.chunk.payload = bytes(payload)
            chunk.chunk.crc32 = zlib.crc32(payload)  # a sender that checksums what it corrupted
            messages[i] = chunk
        elif op == "insert":
            messages.insert(i, messages[j])
    return messages


@FUZZ
@given(valid_streams())
def test_valid_streams_decode_exactly(messages):
    decoded = bounded(lambda: feed(messages))
    assert decoded is not None and decoded.layers == [0, 2, 3]


@FUZZ
@given(valid_streams(), MUTATIONS)
def test_damaged_streams_end_with_a_clean_status(messages, ops):
    bounded(lambda: feed(mutate(messages, ops)))


# --- arbitrary headers ------------------------------------------------------------------------------

DTYPE_NAMES = st.sampled_from(
    ["bfloat16", "float16", "float32", "int32", "int8", "uint8", "float64", "", "x" * 300]
)
HUGE = st.one_of(st.integers(0, 64), st.integers(0, 2**64 - 1))
SMALL_OR_HUGE = st.one_of(st.integers(0, 130), st.integers(0, 2**32 - 1))


def scale_specs():
    """No scales, or scales of any name, dtype and shape (format version 2's TensorSpec.scales)."""
    return st.one_of(
        st.none(),
        st.builds(
            lambda name, dtype, shape: pb.TensorSpec(name=name, dtype=dtype, shape=shape),
            st.sampled_from(["latent.scales", "token_spans.scales", "latent", ""]),
            DTYPE_NAMES,
            st.lists(HUGE, max_size=10),
        ),
    )


def codecs():
    """Codec messages with every field drawn, quantization fields (version 2) and the rotation
    (version 3) included."""
    return st.builds(
        lambda name, chunk, shuffle, quantization, group, scale_dtype, rotation: pb.Codec(
            name=name,
            chunk_size=chunk,
            byte_shuffle=shuffle,
            quantization=quantization,
            group_size=group,
            scale_dtype=scale_dtype,
            rotation=rotation,
        ),
        st.sampled_from(["zstd", "none", "gzip"]),
        st.one_of(st.integers(0, 1 << 17), st.just(2**32 - 1)),
        st.booleans(),
        st.sampled_from(["", "none", "int8", "int4", "int3"]),
        SMALL_OR_HUGE,
        st.sampled_from(["", "float16", "bfloat16", "float32", "int32"]),
        st.sampled_from(["", "none", "hadamard", "fourier"]),
    )


def headers():
    tensor = st.builds(
        lambda name, dtype, shape, scales: pb.TensorSpec(
            name=name, dtype=dtype, shape=shape, **({"scales": scales} if scales is not None else {})
        ),
        st.sampled_from(["latent", "token_spans", "", "a" * 300]),
        DTYPE_NAMES,
        st.lists(HUGE, max_size=10),
        scale_specs(),
    )
    segment = st.builds(
        lambda layer, tensors: (
            pb.SegmentSpec(layer=layer, tensors=tensors)
            if layer is not None
            else pb.SegmentSpec(tensors=tensors)
        ),
        st.one_of(st.none(), st.integers(0, 2**32 - 1)),
        st.lists(tensor, max_size=4),
    )
    return st.builds(
        lambda version, mode, segments, codec, total: pb.LatentHeader(
            format_version=version,
            adapter_id="lcfx:fuzz",
            mode=mode,
            layers=[s.layer for s in segments if s.HasField("layer")],
            segments=segments,
            codec=codec,
            total_raw_bytes=total
            if total is not None
            else sum(_spec_bytes(t) for s in segments for t in s.tensors) % 2**64,
        ),
        st.sampled_from([1, 1, 1, 0, 2, 2, 3, 3, 4]),
        st.one_of(st.sampled_from([pb.LCF, pb.LCF_X, pb.C2C, pb.TEXT, pb.NONE]), st.integers(0, 2**31 - 1)),
        st.lists(segment, max_size=6),
        codecs(),
        st.one_of(st.none(), HUGE),
    )


def _spec_bytes(spec: pb.TensorSpec) -> int:
    size = {"bfloat16": 2, "float16": 2, "float32": 4, "int32": 4}.get(spec.dtype, 1)
    for dim in spec.shape:
        size *= dim
    return size


CHUNKS = st.lists(
    st.builds(
        lambda sequence, segment, payload, last, good_crc: pb.LatentMessage(
            chunk=pb.LatentChunk(
                sequence=sequence,
                segment=segment,
                payload=payload,
                crc32=zlib.crc32(payload) if good_crc else 0,
                last_in_segment=last,
            )
        ),
        st.integers(0, 4),
        st.integers(0, 8),
        st.binary(max_size=512),
        st.booleans(),
        st.booleans(),
    ),
    max_size=6,
)


@FUZZ
@given(headers(), CHUNKS)
def test_arbitrary_headers_and_chunks_end_with_a_clean_status(header, chunks):
    bounded(lambda: feed([pb.LatentMessage(header=header), *chunks]))


@FUZZ
@given(headers())
def test_the_receivers_shape_check_takes_any_header(receiver_engine, header):
    """The receiver's own check of a header against its adapter (LCF-X, or C2C): a status, never a crash."""
    service, engine = receiver_engine
    latent_modes = (pb.LCF, pb.LCF_X, pb.C2C)
    own = pb.C2C if engine.adapter.config.mode == "c2c" else pb.LCF_X
    request = pb.ReceiverRequest(prompt_text="q", mode=header.mode if header.mode in latent_modes else own)
    try:
        service._check_header_fits(engine, request, header)
    except (ServiceError, WireError) as err:
        assert err.code == grpc.StatusCode.INVALID_ARGUMENT and err.details


# --- arbitrary safetensors blobs --------------------------------------------------------------------

BLOBS = st.one_of(
    st.binary(max_size=256),
    st.builds(  # a plausible length prefix and JSON-ish header, then junk
        lambda header, junk: len(header).to_bytes(8, "little") + header + junk,
        st.one_of(
            st.binary(max_size=128),
            st.builds(
                lambda dtype, shape, start, end: (
                    f'{{"latent":{{"dtype":"{dtype}","shape":{shape},"data_offsets":[{start},{end}]}}}}'
                ).encode(),
                st.sampled_from(["BF16", "F16", "F32", "I32", "F64"]),
                st.lists(HUGE, max_size=4),
                HUGE,
                HUGE,
            ),
        ),
        st.binary(max_size=256),
    ),
)


@FUZZ
@given(BLOBS, st.booleans())
def test_arbitrary_safetensors_blobs_end_with_a_clean_status(blob, shuffle):
    """An uncompressed stream whose one segment carries `blob` as its safetensors data."""
    header = pb.LatentHeader(
        format_version=1,
        adapter_id="lcfx:fuzz",
        mode=pb.LCF_X,
        layers=[0],
        segments=[
            pb.SegmentSpec(layer=0, tensors=[pb.TensorSpec(name="latent", dtype="bfloat16", shape=[1, 4, 8])])
        ],
        codec=pb.Codec(name="none", chunk_size=1 << 12, byte_shuffle=shuffle),
        total_raw_bytes=64,
    )
    messages = [pb.LatentMessage(header=header)]
    if blob:
        chunk = pb.LatentChunk(
            sequence=0, segment=0, payload=blob, crc32=zlib.crc32(blob), last_in_segment=True
        )
        messages.append(pb.LatentMessage(chunk=chunk))
    trailer = pb.LatentTrailer(
        total_chunks=len(messages) - 1, crc32=zlib.crc32(blob), total_wire_bytes=len(blob)
    )
    messages.append(pb.LatentMessage(trailer=trailer))
    decoded = bounded(lambda: feed(messages))
    if decoded is not None:  # only a blob that really holds the declared tensor is accepted
        assert decoded.tensors_per_layer[0]["latent"].shape == (1, 4, 8)


@pytest.fixture(scope="module", params=["lcfx", "c2c"])
def receiver_engine(request, tiny_pair, tmp_path_factory):
    from helpers import tiny_c2c_adapter_dir
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from lcflow.adapter import LatentAdapter
    from lcflow.core.kv import model_identity
    from lcflow.serving.config import ServiceConfig
    from lcflow.serving.loading import ReceiverEngine
    from lcflow.serving.receiver import ReceiverService
    from lcflow.serving.telemetry import make_tracer_provider

    (ms, ts), (mr, tr) = tiny_pair
    if request.param == "c2c":
        directory = tiny_c2c_adapter_dir(tiny_pair, tmp_path_factory.mktemp("fuzz-c2c") / "c2c")
    else:
        adapter = LatentAdapter.for_models(
            "lcfx", model_identity(ms, ts), model_identity(mr, tr), bottleneck=16, slots=4
        )
        directory = adapter.save_pretrained(tmp_path_factory.mktemp("fuzz-adapter"))
    engine = ReceiverEngine.from_loaded(mr, tr, str(directory))
    service = ReceiverService(
        ServiceConfig("receiver", model="tiny"), make_tracer_provider("fuzz", InMemorySpanExporter()), engine
    )
    return service, engine

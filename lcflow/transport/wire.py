"""The latent wire format: a LatentPacket <-> a stream of LatentMessage protobufs.

Sender (layers can go out as the encoder produces them):

    writer = PacketWriter(mode="lcf", adapter_id=..., sharer_id=..., receiver_id=...,
                          layer_specs={t: {"latent": TensorSpec("bfloat16", (1, T, 128))} for t in layers},
                          shared_specs={"token_spans": TensorSpec("int32", (T, 2))})
    yield writer.header()
    yield from writer.shared({"token_spans": spans})
    for layer, latent in sharer.encode_layers(context):
        yield from writer.layer(layer, {"latent": latent})
    yield writer.trailer()

    # or, with everything at hand: yield from packet_messages(packet)

Receiver:

    assembler = PacketAssembler()
    assembler.on_header(message.header)
    segment = assembler.on_chunk(message.chunk)   # a Segment once a layer is complete, else None
    packet = assembler.on_trailer(message.trailer)
    assembler.on_stream_end()                      # DATA_LOSS if the trailer never came

    # or message by message: for segment in assembler.on_message(message): ...
    # or all at once: packet = assemble(messages)

Quantized latents (format version 2): `PacketWriter(..., codec=CodecConfig(quantization="int4"))`
sends each float tensor as integer codes and scales (quantize.py), computed on the tensor's own
device; `PacketAssembler.device` says where the receiver dequantizes. Without quantization the
writer still writes version 1, which older receivers read.

Many small segments travel faster batched: `coalesce_chunks(messages)` merges consecutive
chunks into ChunkBatch messages (gRPC costs ~0.25 ms per message on 2 cores).

Every check failure raises WireError with the gRPC status to answer (see errors.py).
`writer.stats` / `assembler.stats` count chunks, raw and wire bytes and time spent.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch
import zstandard

from lcflow.core.names import LATENT_MODES, SAME_CONTEXT_MODES  # noqa: F401 (re-exported)
from lcflow.proto_gen.lcflow.v1 import lcflow_pb2 as pb
from lcflow.transport.codec import CODECS, MAX_CHUNK_BYTES, CodecConfig, SegmentDecoder, crc32
from lcflow.transport.connector import LatentReceiver, LatentSender
from lcflow.transport.errors import data_loss, invalid, precondition
from lcflow.transport.quantize import SCALES_SUFFIX, Quantization
from lcflow.transport.segments import (
    DTYPES,
    MAX_DIMS,
    TensorSpec,
    check_segment,
    load_segment,
    max_blob_bytes,
    segment_bytes,
    serialise_segment,
)

FORMAT_VERSION = 3  # the newest: 2 adds quantized payloads (Codec.quantization), 3 rotated groups
SUPPORTED_FORMAT_VERSIONS = frozenset({1, 2, 3})

MODE_TO_PROTO = {"lcf": pb.LCF, "lcfx": pb.LCF_X, "c2c": pb.C2C, "text": pb.TEXT, "none": pb.NONE}
MODE_FROM_PROTO = {value: name for name, value in MODE_TO_PROTO.items()}


def format_version(quantization: Quantization) -> int:
    """The oldest version that carries such a payload: 1 unless it is quantized, 2 unless its
    groups are rotated, so a sender keeps working with every receiver that can read what it sends."""
    if quantization.rotation != "none":
        return 3
    return 2 if quantization.enabled else 1


def mode_name(value: int) -> str:
    """A Mode's name for a message; proto3 enums are open, so a peer may send a value we do not know
    (pb.Mode.Name would raise on it, turning a bad request into an INTERNAL error)."""
    try:
        return pb.Mode.Name(value)
    except ValueError:
        return f"unknown mode {value}"


@dataclass
class LatentPacket:
    """Everything a receiver needs from the sharer's latents, independent of the wire."""

    mode: str  # "lcf", "lcfx" or "c2c" (LATENT_MODES)
    adapter_id: str
    sharer_id: str
    receiver_id: str
    layers: list[int]  # receiver layer indices, in send order
    tensors_per_layer: dict[int, dict[str, torch.Tensor]]  # e.g. {layer: {"latent": [1, T, b]}}
    shared_tensors: dict[str, torch.Tensor] = field(
        default_factory=dict
    )  # e.g. {"token_spans": int32 [T, 2]}
    meta: dict[str, str] = field(default_factory=dict)

    def raw_bytes(self) -> int:
        tensors = [t for per_layer in self.tensors_per_layer.values() for t in per_layer.values()]
        return sum(t.numel() * t.element_size() for t in [*tensors, *self.shared_tensors.values()])


@dataclass(frozen=True)
class WireLimits:
    """What a receiver accepts; anything bigger is refused with INVALID_ARGUMENT before it is allocated."""

    max_payload_bytes: int = 512 << 20  # declared raw tensor bytes of one packet
    max_chunk_bytes: int = MAX_CHUNK_BYTES
    max_segments: int = 1024
    max_tensors_per_segment: int = 64
    max_meta_entries: int = 64


@dataclass
class Segment:
    """One decoded segment: a receiver layer's tensors (layer is None for the shared tensors)."""

    layer: int | None
    tensors: dict[str, torch.Tensor]


@dataclass
class WireStats:
    chunks: int = 0
    bytes_raw: int = 0  # tensor data bytes, before compression
    bytes_serialised: int = 0  # what goes into the segment codec: bytes_raw, or codes + scales
    bytes_wire: int = 0  # chunk payload bytes
    # quantize (if on) + safetensors layout + byte-shuffle, or header checks + unshuffle + dequantize
    serialise_ms: float = 0.0
    codec_ms: float = 0.0  # zstd compress, or decompress


def _ms_since(start: float) -> float:
    return (time.perf_counter() - start) * 1000.0


# ----------------------------------------------------------------------------------------------
# Sender
# ----------------------------------------------------------------------------------------------


class PacketWriter(LatentSender):
    """Turns a header and per-layer tensors into LatentMessages; segments can be fed as they are ready."""

    def __init__(
        self,
        *,
        mode: str,
        adapter_id: str,
        sharer_id: str,
        receiver_id: str,
        layer_specs: dict[int, dict[str, TensorSpec]],
        shared_specs: dict[str, TensorSpec] | None = None,
        meta: dict[str, str] | None = None,
        codec: CodecConfig | None = None,
    ):
        if mode not in LATENT_MODES:
            raise ValueError(f"mode {mode!r} carries no latents: use one of {LATENT_MODES}")
        self.mode, self.adapter_id, self.sharer_id, self.receiver_id = (
            mode,
            adapter_id,
            sharer_id,
            receiver_id,
        )
        self.codec = codec or CodecConfig()
        self.compressor = self.codec.compressor()
        self.quantizer = self.codec.quantizer()
        self.meta = dict(meta or {})
        # Segment order: one per layer as given, then the shared tensors (if any).
        self.segment_keys: list[int | None] = list(layer_specs)
        self.specs: dict[int | None, dict[str, TensorSpec]] = dict(layer_specs)
        if shared_specs:
            self.segment_keys.append(None)
            self.specs[None] = dict(shared_specs)
        # what each segment's blob holds: the declared tensors, or their codes and scales
        self.wire_specs = {key: self.quantizer.wire_specs(specs) for key, specs in self.specs.items()}
        self.sent: set[int | None] = set()
        self.sequence = 0
        self.payload_crc = 0
        self.stats = WireStats(
            bytes_raw=sum(segment_bytes(s) for s in self.specs.values()),
            bytes_serialised=sum(segment_bytes(s) for s in self.wire_specs.values()),
        )

    @classmethod
    def for_packet(cls, packet: LatentPacket, codec: CodecConfig | None = None) -> PacketWriter:
        layer_specs = {
            layer: {name: TensorSpec.of(t) for name, t in packet.tensors_per_layer[layer].items()}
            for layer in packet.layers
        }
        shared_specs = {name: TensorSpec.of(t) for name, t in packet.shared_tensors.items()}
        return cls(
            mode=packet.mode,
            adapter_id=packet.adapter_id,
            sharer_id=packet.sharer_id,
            receiver_id=packet.receiver_id,
            layer_specs=layer_specs,
            shared_specs=shared_specs,
            meta=packet.meta,
            codec=codec,
        )

    def header(self) -> pb.LatentMessage:
        layers = [key for key in self.segment_keys if key is not None]
        dtypes = {spec.dtype for key in layers for spec in self.specs[key].values()}
        segments = [
            pb.SegmentSpec(
                layer=key,
                tensors=[self._tensor_spec(name, spec) for name, spec in self.specs[key].items()],
            )
            for key in self.segment_keys
        ]
        header = pb.LatentHeader(
            format_version=format_version(self.quantizer),
            adapter_id=self.adapter_id,
            sharer_id=self.sharer_id,
            receiver_id=self.receiver_id,
            mode=MODE_TO_PROTO[self.mode],
            dtype=dtypes.pop() if len(dtypes) == 1 else "",
            layers=layers,
            segments=segments,
            codec=self._codec_message(),
            total_raw_bytes=self.stats.bytes_raw,
            meta=self.meta,
        )
        return pb.LatentMessage(header=header)

    def _codec_message(self) -> pb.Codec:
        codec = pb.Codec(
            name=self.codec.name,
            level=self.codec.level,
            byte_shuffle=self.codec.shuffles,
            chunk_size=self.codec.chunk_size,
        )
        if self.quantizer.enabled:  # version 1 headers stay exactly as they were
            codec.quantization = self.quantizer.scheme
            codec.group_size = self.quantizer.group_size
            codec.scale_dtype = self.quantizer.scale_dtype
            if self.quantizer.rotation != "none":  # version 2 headers stay as they were too
                codec.rotation = self.quantizer.rotation
        return codec

    def _tensor_spec(self, name: str, spec: TensorSpec) -> pb.TensorSpec:
        message = pb.TensorSpec(name=name, dtype=spec.dtype, shape=list(spec.shape))
        if self.quantizer.applies_to(spec):
            scales = self.quantizer.scales_spec(spec)
            message.scales.CopyFrom(
                pb.TensorSpec(name=name + SCALES_SUFFIX, dtype=scales.dtype, shape=list(scales.shape))
            )
        return message

    def layer(self, layer: int, tensors: dict[str, torch.Tensor]) -> Iterator[pb.LatentMessage]:
        """The chunks of one receiver layer's segment."""
        if layer not in self.specs:
            raise ValueError(f"layer {layer} was not declared in the header (declared: {list(self.specs)})")
        return self._segment(layer, tensors)

    def shared(self, tensors: dict[str, torch.Tensor]) -> Iterator[pb.LatentMessage]:
        """The chunks of the shared-tensors segment."""
        if None not in self.specs:
            raise ValueError("no shared tensors were declared in the header")
        return self._segment(None, tensors)

    def _segment(self, key: int | None, tensors: dict[str, torch.Tensor]) -> Iterator[pb.LatentMessage]:
        if key in self.sent:
            raise ValueError(
                f"segment for {'shared tensors' if key is None else f'layer {key}'} already sent"
            )
        actual = {name: TensorSpec.of(t) for name, t in tensors.items()}
        if actual != self.specs[key]:
            raise ValueError(f"tensors {actual} do not match the declared {self.specs[key]}")
        self.sent.add(key)
        index = self.segment_keys.index(key)

        start = time.perf_counter()
        blob = serialise_segment(self.quantizer.encode(tensors), self.codec.shuffles)
        self.stats.serialise_ms += _ms_since(start)
        start = time.perf_counter()
        payload = self.compressor.compress(blob)
        self.stats.codec_ms += _ms_since(start)

        size = self.codec.chunk_size
        view = memoryview(payload)
        for offset in range(0, max(len(payload), 1), size):
            # A segment that fits one chunk goes as it is; otherwise one copy per piece.
            piece = payload if len(payload) <= size else bytes(view[offset : offset + size])
            self.payload_crc = crc32(piece, self.payload_crc)
            self.stats.chunks += 1
            self.stats.bytes_wire += len(piece)
            yield self._chunk_message(index, piece, last=offset + size >= len(payload))

    def _chunk_message(self, index: int, piece: bytes, last: bool) -> pb.LatentMessage:
        # Filled in place: LatentMessage(chunk=LatentChunk(...)) would copy the payload once more.
        message = pb.LatentMessage()
        chunk = message.chunk
        chunk.sequence, chunk.segment, chunk.crc32 = self.sequence, index, crc32(piece)
        chunk.payload, chunk.last_in_segment = piece, last
        self.sequence += 1
        return message

    def trailer(self) -> pb.LatentMessage:
        missing = [key for key in self.segment_keys if key not in self.sent]
        if missing:
            raise ValueError(f"segments not sent yet: {missing} (None = shared tensors)")
        return pb.LatentMessage(
            trailer=pb.LatentTrailer(
                total_chunks=self.sequence, crc32=self.payload_crc, total_wire_bytes=self.stats.bytes_wire
            )
        )


def packet_messages(
    packet: LatentPacket, codec: CodecConfig | None = None, writer: PacketWriter | None = None
) -> Iterator[pb.LatentMessage]:
    """Header, the shared tensors, each layer in order, trailer: a whole packet as messages.

    `writer`: one the caller made with `PacketWriter.for_packet(packet, codec)`, to read its
    stats once the messages are sent."""
    writer = writer or PacketWriter.for_packet(packet, codec)
    yield writer.header()
    if packet.shared_tensors:
        yield from writer.shared(packet.shared_tensors)
    for layer in packet.layers:
        yield from writer.layer(layer, packet.tensors_per_layer[layer])
    yield writer.trailer()


def coalesce_chunks(
    messages: Iterable[pb.LatentMessage],
    max_bytes: int = MAX_CHUNK_BYTES,
    alone_bytes: int = MAX_CHUNK_BYTES // 4,
) -> Iterator[pb.LatentMessage]:
    """Merge runs of small consecutive chunk messages into ChunkBatch messages of at most `max_bytes` payload.

    gRPC costs ~0.25 ms per message on 2 cores, so 28 small layer segments go ~5x faster in
    batches. A batch is held back until it is full or a non-chunk message (or the end) comes:
    use this when the segments are ready faster than the network takes them (throughput), not
    when each layer should leave the moment it is encoded (latency). Chunks of `alone_bytes` or
    more go on their own, as they came: batching them saves little per byte, costs a copy, and
    holds back data the receiver could already be decoding.
    """
    pending: list[pb.LatentMessage] = []
    pending_bytes = 0

    def flush() -> Iterator[pb.LatentMessage]:
        nonlocal pending, pending_bytes
        if len(pending) == 1:
            yield pending[0]
        elif pending:
            batch = pb.LatentMessage()
            batch.chunks.chunks.extend(message.chunk for message in pending)
            yield batch
        pending, pending_bytes = [], 0

    for message in messages:
        if message.WhichOneof("message") != "chunk":
            yield from flush()
            yield message
            continue
        size = len(message.chunk.payload)
        if pending_bytes + size > max_bytes or size >= alone_bytes:
            yield from flush()
        if size >= alone_bytes:
            yield message
            continue
        pending.append(message)
        pending_bytes += size
    yield from flush()


# ----------------------------------------------------------------------------------------------
# Receiver
# ----------------------------------------------------------------------------------------------


def _segment_name(key: int | None) -> str:
    return "shared-tensors segment" if key is None else f"segment of layer {key}"


class PacketAssembler(LatentReceiver):
    """Checks and decodes a latent stream message by message; layers are available as they complete."""

    def __init__(self, limits: WireLimits | None = None, device: torch.device | str = "cpu"):
        self.limits = limits or WireLimits()
        # Where quantized tensors are dequantized (their codes cross to it, not the decoded
        # floats); may be set until the first chunk. Other tensors stay on the CPU.
        self.device = device
        self.header: pb.LatentHeader | None = None
        self.quantizer = Quantization()
        self.specs: list[dict[str, TensorSpec]] = []  # segment index -> the declared tensors
        self.wire_specs: list[dict[str, TensorSpec]] = []  # segment index -> what its blob holds
        self.keys: list[int | None] = []  # segment index -> layer (None = shared)
        self.done: dict[int, dict[str, torch.Tensor]] = {}  # segment index -> tensors
        self.open_index: int | None = None  # segment whose chunks are arriving
        self.decoder: SegmentDecoder | None = None
        self.decompressor = zstandard.ZstdDecompressor()  # one context, reused by every segment
        self.next_sequence = 0
        self.payload_crc = 0
        self.packet: LatentPacket | None = None
        self.stats = WireStats()

    # -- header ------------------------------------------------------------------------------

    def on_header(self, header: pb.LatentHeader) -> None:
        if self.header is not None:
            raise precondition("a second LatentHeader arrived; one stream carries one packet")
        if header.format_version not in SUPPORTED_FORMAT_VERSIONS:
            raise precondition(
                f"latent format version {header.format_version} is not supported by this receiver "
                f"(supported: {sorted(SUPPORTED_FORMAT_VERSIONS)}); upgrade the older side"
            )
        if MODE_FROM_PROTO.get(header.mode) not in LATENT_MODES:
            raise invalid(f"header mode {mode_name(header.mode)} carries no latents; use LCF, LCF_X or C2C")
        codec = header.codec
        if codec.name not in CODECS:
            raise invalid(f"unknown codec {codec.name!r}; this receiver reads {CODECS}")
        if not 0 < codec.chunk_size <= self.limits.max_chunk_bytes:
            raise invalid(f"chunk_size {codec.chunk_size} is outside 1..{self.limits.max_chunk_bytes}")
        self.quantizer = _quantization_of(header)
        if not 0 < len(header.segments) <= self.limits.max_segments:
            raise invalid(f"{len(header.segments)} segments declared; allowed 1..{self.limits.max_segments}")
        if len(header.meta) > self.limits.max_meta_entries:
            raise invalid(f"{len(header.meta)} meta entries; at most {self.limits.max_meta_entries}")
        self.keys = [segment.layer if segment.HasField("layer") else None for segment in header.segments]
        layer_keys = [key for key in self.keys if key is not None]
        if len(set(self.keys)) != len(self.keys):
            raise invalid("the header declares a layer (or the shared segment) twice")
        if layer_keys != list(header.layers):
            raise invalid(
                f"header.layers {list(header.layers)} disagree with the segments' layers {layer_keys}"
            )
        self.specs = [
            self._segment_specs(segment, key) for segment, key in zip(header.segments, self.keys, strict=True)
        ]
        self.wire_specs = [
            self._wire_specs(specs, key) for specs, key in zip(self.specs, self.keys, strict=True)
        ]
        declared = sum(segment_bytes(specs) for specs in self.specs)
        if declared != header.total_raw_bytes:
            raise invalid(
                f"total_raw_bytes {header.total_raw_bytes} != {declared}, the sum of the tensor shapes"
            )
        # Both what the tensors become and what their blobs hold (codes and scales) are bounded.
        largest = max(declared, sum(segment_bytes(specs) for specs in self.wire_specs))
        if largest > self.limits.max_payload_bytes:
            raise invalid(
                f"payload of {largest} bytes exceeds this receiver's limit of {self.limits.max_payload_bytes}"
            )
        self.header = header
        self.stats.bytes_raw = declared

    def _segment_specs(self, segment: pb.SegmentSpec, key: int | None) -> dict[str, TensorSpec]:
        what = _segment_name(key)
        if not 0 < len(segment.tensors) <= self.limits.max_tensors_per_segment:
            raise invalid(
                f"{what}: {len(segment.tensors)} tensors; allowed 1..{self.limits.max_tensors_per_segment}"
            )
        specs: dict[str, TensorSpec] = {}
        for tensor in segment.tensors:
            if not tensor.name or len(tensor.name) > 256 or tensor.name in specs:
                raise invalid(f"{what}: tensor name {tensor.name!r} is empty, too long or repeated")
            if tensor.dtype not in DTYPES:
                raise invalid(
                    f"{what}: dtype {tensor.dtype!r} of {tensor.name!r} is not one of {sorted(DTYPES)}"
                )
            if len(tensor.shape) > MAX_DIMS:
                raise invalid(f"{what}: {tensor.name!r} has {len(tensor.shape)} dims; at most {MAX_DIMS}")
            specs[tensor.name] = TensorSpec(tensor.dtype, tuple(tensor.shape))
            self._check_scales(tensor, specs[tensor.name], what)
        return specs

    def _check_scales(self, tensor: pb.TensorSpec, spec: TensorSpec, what: str) -> None:
        """A quantized tensor declares exactly the scales its shape implies; no other tensor declares any."""
        if not self.quantizer.applies_to(spec):
            if tensor.HasField("scales"):
                raise invalid(f"{what}: {tensor.name!r} declares scales but is not a quantized tensor")
            return
        try:
            expected = self.quantizer.scales_spec(spec)
        except ValueError as err:
            raise invalid(f"{what}: {tensor.name!r} cannot be {self.quantizer.name}: {err}") from err
        scales = tensor.scales
        declared = (scales.name, scales.dtype, tuple(scales.shape), scales.HasField("scales"))
        if declared != (tensor.name + SCALES_SUFFIX, expected.dtype, expected.shape, False):
            raise invalid(
                f"{what}: scales of {tensor.name!r} declared as {scales.name!r} {scales.dtype} "
                f"{list(scales.shape)}; {self.quantizer.name} with group size {self.quantizer.group_size} "
                f"needs {tensor.name + SCALES_SUFFIX!r} {expected.dtype} {list(expected.shape)}"
            )

    def _wire_specs(self, specs: dict[str, TensorSpec], key: int | None) -> dict[str, TensorSpec]:
        try:
            return self.quantizer.wire_specs(specs)
        except ValueError as err:
            raise invalid(f"{_segment_name(key)}: {err}") from err

    # -- chunks ------------------------------------------------------------------------------

    def on_chunk(self, chunk: pb.LatentChunk) -> Segment | None:
        """Check one chunk and feed it to its segment; returns the Segment when this chunk completed it."""
        if self.header is None:
            raise precondition("a LatentChunk arrived before the LatentHeader; send the header first")
        if self.packet is not None:
            raise precondition("a LatentChunk arrived after the LatentTrailer")
        self._check_sequence(chunk)
        # Read once: protobuf (upb) hands out a fresh copy of a bytes field on every access, and
        # reading a 512 KiB payload six times cost ~2 ms of a 2048-token bf16 packet's ~6 ms here.
        payload = chunk.payload
        if len(payload) == 0 or len(payload) > self.header.codec.chunk_size:
            raise invalid(
                f"chunk {chunk.sequence} has {len(payload)} bytes; allowed 1..{self.header.codec.chunk_size}"
            )
        if crc32(payload) != chunk.crc32:
            raise data_loss(f"chunk {chunk.sequence} failed its CRC-32 check: corrupted in transit; resend")
        self.next_sequence += 1
        self.payload_crc = crc32(payload, self.payload_crc)
        self.stats.chunks += 1
        self.stats.bytes_wire += len(payload)

        self._open_segment(chunk)
        start = time.perf_counter()
        self.decoder.feed(payload)
        self.stats.codec_ms += _ms_since(start)
        if chunk.last_in_segment:
            return self._close_segment()
        return None

    def _check_sequence(self, chunk: pb.LatentChunk) -> None:
        if chunk.sequence == self.next_sequence:
            return
        if chunk.sequence < self.next_sequence:
            raise data_loss(
                f"chunk {chunk.sequence} arrived again or out of order (expected {self.next_sequence})"
            )
        raise data_loss(
            f"chunks {self.next_sequence}..{chunk.sequence - 1} are missing (got {chunk.sequence})"
        )

    def _open_segment(self, chunk: pb.LatentChunk) -> None:
        index = chunk.segment
        if index >= len(self.specs):
            raise invalid(
                f"chunk {chunk.sequence} names segment {index}; the header declares {len(self.specs)}"
            )
        if self.open_index is not None and index != self.open_index:
            raise data_loss(
                f"chunk {chunk.sequence} starts segment {index} while {_segment_name(self.keys[self.open_index])} "
                "has not had its last chunk"
            )
        if self.open_index is None:
            if index in self.done:
                raise data_loss(f"{_segment_name(self.keys[index])} arrived twice (chunk {chunk.sequence})")
            self.open_index = index
            limit = max_blob_bytes(self.wire_specs[index])
            what = _segment_name(self.keys[index])
            self.decoder = SegmentDecoder(self.header.codec.name, limit, what, self.decompressor)

    def _close_segment(self) -> Segment:
        index, key = self.open_index, self.keys[self.open_index]
        what = _segment_name(key)
        blob = self.decoder.finish()
        self.open_index, self.decoder = None, None
        start = time.perf_counter()
        # Every name, dtype, shape and offset is checked against the LatentHeader before
        # load_segment reads tensor data, so the tensors it builds are the declared ones.
        wire_specs = self.wire_specs[index]
        header = check_segment(blob, wire_specs, what)
        wire = load_segment(blob, header, wire_specs, self.header.codec.byte_shuffle)
        tensors = self.quantizer.decode(wire, self.specs[index], self.device)
        self.stats.serialise_ms += _ms_since(start)
        self.done[index] = tensors
        return Segment(key, tensors)

    # -- end ---------------------------------------------------------------------------------

    def on_trailer(self, trailer: pb.LatentTrailer) -> LatentPacket:
        if self.header is None:
            raise precondition("a LatentTrailer arrived before the LatentHeader")
        if self.packet is not None:
            raise precondition("a second LatentTrailer arrived")
        if self.open_index is not None:
            raise data_loss(
                f"the stream ended inside the {_segment_name(self.keys[self.open_index])} (truncated)"
            )
        if trailer.total_chunks != self.next_sequence:
            raise data_loss(f"trailer counts {trailer.total_chunks} chunks, {self.next_sequence} arrived")
        missing = [_segment_name(self.keys[i]) for i in range(len(self.keys)) if i not in self.done]
        if missing:
            raise data_loss(f"the stream ended without: {', '.join(missing)}")
        if trailer.crc32 != self.payload_crc or trailer.total_wire_bytes != self.stats.bytes_wire:
            raise data_loss("the whole-payload CRC-32 or byte count does not match the trailer; resend")
        by_key = {self.keys[i]: tensors for i, tensors in self.done.items()}
        self.packet = LatentPacket(
            mode=MODE_FROM_PROTO[self.header.mode],
            adapter_id=self.header.adapter_id,
            sharer_id=self.header.sharer_id,
            receiver_id=self.header.receiver_id,
            layers=list(self.header.layers),
            tensors_per_layer={layer: by_key[layer] for layer in self.header.layers},
            shared_tensors=by_key.get(None, {}),
            meta=dict(self.header.meta),
        )
        return self.packet

    def on_stream_end(self) -> LatentPacket:
        """Call when the stream closes; raises DATA_LOSS unless a valid trailer came."""
        if self.packet is None:
            raise data_loss(
                f"the latent stream ended after {self.stats.chunks} chunks without a trailer (truncated); resend"
            )
        return self.packet

    def on_batch(self, batch: pb.ChunkBatch) -> list[Segment]:
        """Several chunks in one message; returns the segments they completed, in order."""
        size = sum(len(chunk.payload) for chunk in batch.chunks)
        if self.header is not None and size > self.header.codec.chunk_size:
            raise invalid(f"a chunk batch carries {size} bytes; at most {self.header.codec.chunk_size}")
        completed = [self.on_chunk(chunk) for chunk in batch.chunks]
        return [segment for segment in completed if segment is not None]

    def on_message(self, message: pb.LatentMessage) -> list[Segment]:
        """Dispatch header / chunk / batch / trailer; returns the segments this message completed.

        After the trailer, the packet is `self.packet` (or `on_stream_end()`'s result).
        A ReceiverRequest is the caller's to handle before the payload starts.
        """
        kind = message.WhichOneof("message")
        if kind == "header":
            self.on_header(message.header)
            return []
        if kind == "chunk":
            segment = self.on_chunk(message.chunk)
            return [segment] if segment is not None else []
        if kind == "chunks":
            return self.on_batch(message.chunks)
        if kind == "trailer":
            self.on_trailer(message.trailer)
            return []
        raise precondition(f"unexpected {kind or 'empty'} message inside the latent payload")


def _quantization_of(header: pb.LatentHeader) -> Quantization:
    """The header's quantization; its fields must be unset in version 1 and without quantization,
    and the rotation unset before version 3."""
    codec = header.codec
    scheme = codec.quantization or "none"
    rotation = codec.rotation or "none"
    if scheme == "none":
        if codec.group_size or codec.scale_dtype or rotation != "none":
            raise invalid(
                "codec.group_size, codec.scale_dtype and codec.rotation are only for a quantized payload"
            )
        return Quantization()
    if header.format_version < 2:
        raise invalid(f"codec.quantization {scheme!r} needs latent format version 2, the header says 1")
    if rotation != "none" and header.format_version < 3:
        raise invalid(
            f"codec.rotation {rotation!r} needs latent format version 3, the header says {header.format_version}"
        )
    try:
        return Quantization(scheme, codec.group_size, codec.scale_dtype, rotation)
    except ValueError as err:
        raise invalid(f"codec: {err}") from err


def assemble(messages: Iterable[pb.LatentMessage], limits: WireLimits | None = None) -> LatentPacket:
    """A whole stream of header, chunks and trailer -> LatentPacket (raises WireError)."""
    assembler = PacketAssembler(limits)
    for message in messages:
        assembler.on_message(message)
    return assembler.on_stream_end()

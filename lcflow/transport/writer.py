"""The sender's half of the wire format (the LatentSender): a packet's header, its layers' chunk
messages as they are ready, the trailer; and coalesce_chunks, which batches small chunks.
The format itself, and how to use both halves: lcflow.transport.wire.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator

import torch

from lcflow.core.names import LATENT_MODES, SAME_CONTEXT_MODES  # noqa: F401 (re-exported)
from lcflow.proto_gen.lcflow.v1 import lcflow_pb2 as pb
from lcflow.transport.codec import MAX_CHUNK_BYTES, CodecConfig, crc32
from lcflow.transport.connector import LatentSender
from lcflow.transport.quantize import SCALES_SUFFIX
from lcflow.transport.segments import (
    TensorSpec,
    segment_bytes,
    serialise_segment,
)
from lcflow.transport.wire import MODE_TO_PROTO, LatentPacket, WireStats, _ms_since, format_version

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

    gRPC costs a fixed time per message, so many small layer segments go much faster in batches
    (docs/results/transport-design.md). A batch is held back until it is full or a non-chunk
    message (or the end) comes: use this when the segments are ready faster than the network
    takes them (throughput), not when each layer should leave the moment it is encoded
    (latency). Chunks of `alone_bytes` or more go on their own, as they came: batching them
    saves little per byte, costs a copy, and holds back data the receiver could already be
    decoding.
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

"""The receiver's half of the wire format (the LatentReceiver): checks a latent stream message
by message, before it reads a byte it did not expect, and hands back each layer as it
completes. The format itself, and how to use both halves: lcflow.transport.wire.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

import torch
import zstandard

from lcflow.core.names import LATENT_MODES, SAME_CONTEXT_MODES  # noqa: F401 (re-exported)
from lcflow.proto_gen.lcflow.v1 import lcflow_pb2 as pb
from lcflow.transport.codec import CODECS, SegmentDecoder, crc32
from lcflow.transport.connector import LatentReceiver
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
)
from lcflow.transport.wire import (
    MODE_FROM_PROTO,
    SUPPORTED_FORMAT_VERSIONS,
    LatentPacket,
    Segment,
    WireLimits,
    WireStats,
    _ms_since,
    mode_name,
)

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

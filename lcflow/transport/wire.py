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
from dataclasses import dataclass, field

import torch

from lcflow.core.names import LATENT_MODES, SAME_CONTEXT_MODES  # noqa: F401 (re-exported)
from lcflow.proto_gen.lcflow.v1 import lcflow_pb2 as pb
from lcflow.transport.codec import MAX_CHUNK_BYTES
from lcflow.transport.quantize import Quantization

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

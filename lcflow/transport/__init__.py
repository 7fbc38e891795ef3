"""Moving latents between a sharer and a receiver: the wire format of `Receiver.Receive`.

    from lcflow.transport import LatentPacket, PacketWriter, PacketAssembler, packet_messages, assemble

- connector.py: LatentSender / LatentReceiver, the engine's side of the transport, primitive by primitive.
- wire.py: the format: LatentPacket, limits, versions, mode names, statistics.
- writer.py: PacketWriter (the LatentSender), packet_messages, coalesce_chunks.
- assembler.py: PacketAssembler (the LatentReceiver), assemble.
- segments.py: one layer's tensors <-> a checked safetensors blob, byte-shuffled by plane.
- codec.py: CodecConfig, zstd with a hard decompression bound.
- quantize.py: int8 / int4 latents with absmax scales (format version 2; rotated groups, version
  3), their error bound.
- link.py: LinkMeter, which quantization and whether zstd pay on the link (the sharer's
  `--codec auto`).
- errors.py: WireError, carrying the gRPC status code to answer with.
- memory.py: lets a process reuse the memory it frees (large packets) instead of returning it to the kernel at once.
"""

from lcflow.transport.assembler import PacketAssembler, assemble
from lcflow.transport.codec import MAX_CHUNK_BYTES, CodecConfig
from lcflow.transport.connector import LatentReceiver, LatentSender
from lcflow.transport.errors import WireError
from lcflow.transport.segments import TensorSpec
from lcflow.transport.wire import (
    FORMAT_VERSION,
    MODE_FROM_PROTO,
    MODE_TO_PROTO,
    SUPPORTED_FORMAT_VERSIONS,
    LatentPacket,
    Segment,
    WireLimits,
    WireStats,
    mode_name,
)
from lcflow.transport.writer import PacketWriter, coalesce_chunks, packet_messages

__all__ = [
    "FORMAT_VERSION",
    "MAX_CHUNK_BYTES",
    "MODE_FROM_PROTO",
    "MODE_TO_PROTO",
    "SUPPORTED_FORMAT_VERSIONS",
    "CodecConfig",
    "LatentPacket",
    "LatentReceiver",
    "LatentSender",
    "PacketAssembler",
    "PacketWriter",
    "Segment",
    "TensorSpec",
    "WireError",
    "WireLimits",
    "WireStats",
    "assemble",
    "coalesce_chunks",
    "mode_name",
    "packet_messages",
]

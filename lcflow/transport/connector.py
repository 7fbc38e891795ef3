"""The boundary between an engine (a model with its adapter half) and the latent transport.

In the style of vLLM's KV connector: two small interfaces, each primitive named with who calls
it, so an engine never touches the wire format and the wire format never touches a model. The
wire format itself (LatentMessage, chunks, codecs, checks) is lcflow.transport.wire; its two
halves implement these: PacketWriter (writer.py) is the LatentSender, PacketAssembler
(assembler.py) the LatentReceiver.

Sender side, called by the sharer service's latent stream (lcflow.serving.sharer) and by the
transport bench (lcflow.bench.transport), in this order:

    header()             once, first: the message that declares the packet (mode, adapter and
                         model ids, codec, every segment's tensor specs), so the receiver can
                         check sizes and shapes before a byte of tensor data arrives
    shared(tensors)      at most once: tensors not tied to a layer (token spans)
    layer(i, tensors)    once per declared layer, as the encoder produces it: the layer's
                         messages (quantized, serialised, compressed, chunked); the receiver
                         can decode it while the next layer is being encoded
    trailer()            once, last: totals and a checksum of every chunk sent
    stats, quantizer     what the packing cost and produced (WireStats), read after trailer();
                         the quantization the header declared

Receiver side, called by the receiver service's Receive handler (lcflow.serving.receiver) and
by the transport bench:

    on_header(header)    once, first: checks the declared packet against the limits; raises a
                         WireError (with its gRPC status) for anything it will not take
    on_message(message)  for each message of the payload (chunks, chunk batches, the trailer):
                         verifies it and returns the segments (layers) it completed, in order
    on_stream_end()      once the stream closes: the checked LatentPacket, or DATA_LOSS if the
                         trailer never came (`packet` holds it as soon as the trailer is checked)
    device               where decoded (dequantized) tensors land; may be set until the first chunk
    stats, quantizer     what the unpacking cost (WireStats); the quantization the header declared
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from lcflow.proto_gen.lcflow.v1 import lcflow_pb2 as pb
    from lcflow.transport.quantize import Quantization
    from lcflow.transport.wire import LatentPacket, Segment, WireStats


class LatentSender(ABC):
    """Turns an engine's packet, layer by layer, into the messages of a latent stream."""

    stats: WireStats
    quantizer: Quantization

    @abstractmethod
    def header(self) -> pb.LatentMessage:
        """The first message: the packet declared."""

    @abstractmethod
    def shared(self, tensors: dict[str, torch.Tensor]) -> Iterator[pb.LatentMessage]:
        """The messages of the tensors not tied to a layer."""

    @abstractmethod
    def layer(self, layer: int, tensors: dict[str, torch.Tensor]) -> Iterator[pb.LatentMessage]:
        """The messages of one declared layer's tensors."""

    @abstractmethod
    def trailer(self) -> pb.LatentMessage:
        """The last message: totals and checksum."""


class LatentReceiver(ABC):
    """Checks a latent stream message by message and hands back each layer as it completes."""

    stats: WireStats
    quantizer: Quantization
    device: torch.device | str
    packet: LatentPacket | None  # set once the trailer is checked

    @abstractmethod
    def on_header(self, header: pb.LatentHeader) -> None:
        """Check the declared packet; raise a WireError for one this receiver will not take."""

    @abstractmethod
    def on_message(self, message: pb.LatentMessage) -> list[Segment]:
        """Verify one payload message; return the segments it completed."""

    @abstractmethod
    def on_stream_end(self) -> LatentPacket:
        """The checked packet, once the stream has closed (DATA_LOSS without a trailer)."""

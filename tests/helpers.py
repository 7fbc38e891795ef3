"""Test helpers shared by several test modules."""

from __future__ import annotations

import torch

from lcflow.handoff import receiver_view
from lcflow.proto_gen.lcflow.v1 import lcflow_pb2 as pb
from lcflow.transport import CodecConfig, LatentPacket, packet_messages


def lcfx_stream(engine, context: str, prompt: str, meta: dict | None = None) -> list[pb.LatentMessage]:
    """A valid LCF-X Receive stream made by a sharer engine: the request, then the packet in
    64-byte chunks (many chunks, so tests can damage one). `meta` goes into the header."""
    from services.receiver.server import identity_id

    with torch.inference_mode():
        shared = engine.sharer.prefill(context)
        layers = dict(engine.sharer.encode_layers(shared, receiver_view("", prompt)))
    packet = LatentPacket(
        mode="lcfx",
        adapter_id=engine.adapter_id,
        sharer_id=identity_id(engine.identity),
        receiver_id=identity_id(engine.adapter.config.receiver),
        layers=list(layers),
        tensors_per_layer={t: {"latent": z.to(torch.bfloat16).contiguous()} for t, z in layers.items()},
        meta=meta or {},
    )
    request = pb.ReceiverRequest(
        prompt_text=prompt, mode=pb.LCF_X, generation=pb.GenerationSettings(max_new_tokens=2)
    )
    return [pb.LatentMessage(request=request), *packet_messages(packet, CodecConfig(chunk_size=64))]

"""C2C's in-process handoff: the sharer's KV of the layers the fuser reads, fused into the
receiver's cache of the same context (the receiver service does the same with the sharer's packet).
The fuser itself is an adapter (lcflow.adapter.c2c); this is the handoff that runs it.
"""

from __future__ import annotations

from lcflow.adapter.c2c import WIRE_BYTES_PER_VALUE, C2CFuser, C2CSender
from lcflow.core.kv import RopeCodec
from lcflow.handoff.pair import Latents, Receiver, Sharer


def c2c_prepare(fuser: C2CFuser, sharer: tuple, receiver: Receiver, context: str, prompt: str):
    """Same-context C2C handoff in-process: both models read `context`; the receiver's cache of it
    is fused (`Receiver.prepare_c2c`, as the receiver service does with the sharer's packet).

    sharer: (model, tokenizer); receiver: a lcflow.handoff.pair.Receiver (of the receiver model). Returns the
    prepared receiver input and the bytes the sharer's KV (the layers the fuser reads) takes in bf16.
    """
    sharer_model, sharer_tokenizer = sharer
    shared = Sharer(sharer_model, sharer_tokenizer).prefill(context)
    latents = Latents("c2c", dict(C2CSender(fuser.config).encode_layers(shared.captured)), shared.spans)
    prepared = receiver.prepare_c2c(latents, context, prompt, fuser=fuser, rope=RopeCodec(sharer_model))
    prepared.timings_ms["sharer_prefill"] = shared.prefill_ms
    sent = sum(z.numel() for z in latents.layers.values()) * WIRE_BYTES_PER_VALUE
    return prepared, sent

"""LCF-X: cross-context handoff through a fixed number of pooled slots per layer.

The sharer's context is one the receiver never saw, so there are no receiver tokens to fuse
into. Instead the sharer's per-token latents are pooled by attention into m slots
(m learned queries per layer), so the packet's size does not depend on the context length:

    z = W_enc · rmsnorm([K_s ; V_s])                        per token, [T, b]
    q = Q_t (+ W_d · digest)                                m queries, [m, b]
    slots = rmsnorm(softmax(q · (W_k z)^T / sqrt(b)) · W_v z)   [m, b]

With `receiver_aware`, the queries are shifted by a digest of the receiver's own context
(its mean latent through the same encoder), so pooling can favour what the receiver lacks.
The receiver decodes the slots into m prefix KV entries on top of a neutral base: its own
KV for m filler tokens (BOS), with the same gated residual as LCF. A closed gate leaves the
plain filler prefix, which a model treats like attention-sink tokens.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn
from transformers import DynamicCache

from lcflow.adapter.blocks import KVProjection, LayerGate, RMSNorm
from lcflow.adapter.config import AdapterConfig
from lcflow.adapter.lcf import joint_encoder
from lcflow.core.kv import CapturedKV, RopeCodec, run_backbone, split_joint


class SlotPooling(nn.Module):
    """Attention pooling of [batch, tokens, b] latents into [batch, m, b] slots."""

    def __init__(self, bottleneck: int, slots: int, receiver_aware: bool):
        super().__init__()
        self.queries = nn.Parameter(torch.randn(slots, bottleneck) * bottleneck**-0.5)
        self.key = nn.Linear(bottleneck, bottleneck)
        self.value = nn.Linear(bottleneck, bottleneck)
        self.out_norm = RMSNorm(bottleneck)
        self.digest_in = nn.Linear(bottleneck, bottleneck) if receiver_aware else None
        if self.digest_in is not None:
            nn.init.zeros_(self.digest_in.weight)  # start as plain pooling
            nn.init.zeros_(self.digest_in.bias)

    def forward(self, tokens: torch.Tensor, digest: torch.Tensor | None = None) -> torch.Tensor:
        q = self.queries.unsqueeze(0).expand(tokens.shape[0], -1, -1)
        if self.digest_in is not None and digest is not None:
            q = q + self.digest_in(digest).unsqueeze(1)
        scores = q @ self.key(tokens).transpose(1, 2) / math.sqrt(tokens.shape[-1])
        return self.out_norm(scores.softmax(dim=-1) @ self.value(tokens))


class LCFXEncoder(nn.Module):
    """Sharer side of LCF-X: captured KV -> m slots per retained receiver layer."""

    def __init__(self, config: AdapterConfig):
        super().__init__()
        self.layer_map = dict(config.layer_map)
        self.layers = list(config.retained_layers)
        self.receiver_aware = config.receiver_aware
        in_dim, b = config.sharer.spec.kv_dim, config.bottleneck
        self.proj = nn.ModuleDict({str(t): joint_encoder(in_dim, b) for t in self.layers})
        self.pool = nn.ModuleDict(
            {str(t): SlotPooling(b, config.slots, config.receiver_aware) for t in self.layers}
        )

    def token_latents(self, captured: CapturedKV, layer: int) -> torch.Tensor:
        return self.proj[str(layer)](captured.joint(self.layer_map[layer]))

    def digest(self, receiver_context: CapturedKV) -> dict[int, torch.Tensor]:
        """What the receiver already holds, seen through the sharer: mean latent per layer, [batch, b]."""
        return {t: self.token_latents(receiver_context, t).mean(dim=1) for t in self.layers}

    def encode_layer(
        self, captured: CapturedKV, layer: int, digest: dict[int, torch.Tensor] | None = None
    ) -> torch.Tensor:
        """Slots [batch, m, b] for receiver layer `layer`."""
        d = digest[layer] if digest is not None else None
        return self.pool[str(layer)](self.token_latents(captured, layer), d)

    def forward(
        self, captured: CapturedKV, digest: dict[int, torch.Tensor] | None = None
    ) -> dict[int, torch.Tensor]:
        return {t: self.encode_layer(captured, t, digest) for t in self.layers}


@torch.no_grad()
def filler_prefix(model, filler_token_id: int, slots: int) -> DynamicCache:
    """The receiver's own cache for `slots` filler tokens at positions 0..m-1: the neutral base."""
    ids = torch.full((1, slots), filler_token_id, dtype=torch.long, device=model.device)
    cache = DynamicCache(config=model.config)
    run_backbone(model, ids, cache)
    return cache


class LCFXDecoder(nn.Module):
    """Receiver side of LCF-X: slots -> m prefix KV entries in every receiver layer."""

    def __init__(self, config: AdapterConfig):
        super().__init__()
        spec = config.receiver.spec
        self.num_heads, self.head_dim = spec.num_kv_heads, spec.head_dim
        self.num_layers = spec.num_layers
        self.layers = list(config.retained_layers)
        b, hidden = config.bottleneck, config.bottleneck * config.hidden_mult
        self.proj = nn.ModuleDict(
            {str(t): KVProjection(b, hidden, spec.num_kv_heads, spec.head_dim) for t in self.layers}
        )
        self.gates = nn.ModuleDict({str(t): LayerGate() for t in self.layers})

    def gate(self, layer: int) -> torch.Tensor:
        return self.gates[str(layer)]()

    def prefix_cache(
        self, model, rope: RopeCodec, base: DynamicCache, slots: dict[int, torch.Tensor]
    ) -> DynamicCache:
        """A new cache holding the m prefix entries: base filler KV, plus gated slot KV where retained.

        The base is copied, not rebuilt, so that each layer keeps its own bookkeeping: a
        sliding-window layer whose window is shorter than m holds only the last entries.
        """
        cache = copy.deepcopy(base)
        batch = next(iter(slots.values())).shape[0] if slots else 1
        for layer, entry in enumerate(cache.layers):
            keys = entry.keys.expand(batch, -1, -1, -1)
            values = entry.values.expand(batch, -1, -1, -1)
            gate = self.gate(layer) if layer in self.layers else None
            if gate is not None and gate.item() > 0.0:
                first = entry.get_seq_length() - keys.shape[2]  # > 0 only if the window dropped some
                update = self.proj[str(layer)](slots[layer][:, first:].to(keys.dtype))
                dk, dv = split_joint(update, self.num_heads, self.head_dim)
                pos = torch.arange(first, first + keys.shape[2], device=keys.device).expand(batch, -1)
                keys = keys + gate * rope.rotate(dk, pos, layer)
                values = values + gate * dv
            entry.keys, entry.values = keys, values
        return cache

"""LCF: same-context translation of a sharer's KV cache, one latent per token.

Encoder (sharer side), per retained receiver layer t reading sharer layer s = map[t]:
    z_t = W_enc · rmsnorm([K_s ; V_s])                      (2*H_s*D_s -> b, keys without RoPE)
Decoder (receiver side), knowing the receiver's own cache for the same tokens:
    h_t = z_t + W_in · rmsnorm([K_r ; V_r])                  (what the receiver already has)
    [dK ; dV] = sigmoid(head weights) * W_up · mlp(h_t)     (b -> 2*H_r*D_r)
    K_r <- K_r + g_t * RoPE(dK),  V_r <- V_r + g_t * dV      (gated residual, g_t in [0, 1])
A layer whose gate is exactly 0 is not touched at all; those layers can be pruned.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import DynamicCache

from lcflow.adapter.blocks import KVProjection, LayerGate, RMSNorm
from lcflow.adapter.config import AdapterConfig
from lcflow.core.kv import CapturedKV, RopeCodec, split_joint


def joint_encoder(in_dim: int, bottleneck: int) -> nn.Module:
    """The joint K/V down-projection (MLA-style): one matrix sees keys and values together."""
    return nn.Sequential(RMSNorm(in_dim), nn.Linear(in_dim, bottleneck))


class LCFEncoder(nn.Module):
    """Sharer side of LCF: captured KV -> one b-wide latent per token per retained receiver layer."""

    def __init__(self, config: AdapterConfig):
        super().__init__()
        self.layer_map = dict(config.layer_map)
        self.layers = list(config.retained_layers)
        in_dim = config.sharer.spec.kv_dim
        self.proj = nn.ModuleDict({str(t): joint_encoder(in_dim, config.bottleneck) for t in self.layers})

    def encode_layer(self, captured: CapturedKV, layer: int) -> torch.Tensor:
        """Latent [batch, tokens, b] for receiver layer `layer`."""
        return self.proj[str(layer)](captured.joint(self.layer_map[layer]))

    def forward(self, captured: CapturedKV) -> dict[int, torch.Tensor]:
        return {t: self.encode_layer(captured, t) for t in self.layers}


class LCFDecoder(nn.Module):
    """Receiver side of LCF: latents aligned to receiver tokens -> gated update of its own cache."""

    def __init__(self, config: AdapterConfig):
        super().__init__()
        spec = config.receiver.spec
        self.num_heads, self.head_dim = spec.num_kv_heads, spec.head_dim
        self.layers = list(config.retained_layers)
        b, hidden = config.bottleneck, config.bottleneck * config.hidden_mult
        self.receiver_in = nn.ModuleDict({str(t): joint_encoder(spec.kv_dim, b) for t in self.layers})
        self.proj = nn.ModuleDict(
            {str(t): KVProjection(b, hidden, spec.num_kv_heads, spec.head_dim) for t in self.layers}
        )
        self.gates = nn.ModuleDict({str(t): LayerGate() for t in self.layers})

    def gate(self, layer: int) -> torch.Tensor:
        return self.gates[str(layer)]()

    def delta(self, layer: int, latent: torch.Tensor, receiver_joint: torch.Tensor) -> torch.Tensor:
        """Ungated joint K/V update [batch, tokens, 2*H*D] (keys without RoPE)."""
        h = latent + self.receiver_in[str(layer)](receiver_joint)
        return self.proj[str(layer)](h)

    def fuse_layer(
        self,
        cache: DynamicCache,
        rope: RopeCodec,
        layer: int,
        latent: torch.Tensor,
        positions: torch.Tensor,
        covered: torch.Tensor,
    ) -> None:
        """Update one receiver layer's cache at `positions` [tokens] (absolute, ascending, contiguous).

        latent: [batch, tokens, b] aligned to those receiver tokens; covered: [tokens] bool, tokens
        that received sharer information (others, e.g. chat-template markers, stay as they are).
        """
        gate = self.gate(layer)
        if gate.item() == 0.0:
            return  # a closed gate leaves the receiver's cache bit-identical
        entry = cache.layers[layer]
        keys, values = entry.keys, entry.values
        # A sliding-window layer may have dropped its oldest tokens: index relative to what is kept.
        offset = entry.get_seq_length() - keys.shape[-2]
        keep = positions >= offset
        positions, latent, covered = positions[keep], latent[:, keep], covered[keep]
        if positions.numel() == 0:
            return
        start, end = int(positions[0]) - offset, int(positions[-1]) - offset + 1
        pos = positions.unsqueeze(0).expand(keys.shape[0], -1)
        k_rot, v = keys[:, :, start:end], values[:, :, start:end]
        k_plain = rope.derotate(k_rot, pos, layer)
        receiver_joint = torch.cat([k_plain.transpose(1, 2).flatten(2), v.transpose(1, 2).flatten(2)], -1)
        update = self.delta(layer, latent.to(keys.dtype), receiver_joint) * covered[None, :, None].to(
            keys.dtype
        )
        dk, dv = split_joint(update, self.num_heads, self.head_dim)
        fused_k = k_rot + gate * rope.rotate(dk, pos, layer)
        fused_v = v + gate * dv
        entry.keys = torch.cat([keys[:, :, :start], fused_k, keys[:, :, end:]], dim=2)
        entry.values = torch.cat([values[:, :, :start], fused_v, values[:, :, end:]], dim=2)

    def fuse(
        self,
        cache: DynamicCache,
        rope: RopeCodec,
        latents: dict[int, torch.Tensor],
        positions: torch.Tensor,
        covered: torch.Tensor,
    ) -> DynamicCache:
        """Fuse every retained layer's latent into `cache` (in place; returned for convenience)."""
        for layer in self.layers:
            self.fuse_layer(cache, rope, layer, latents[layer], positions, covered)
        return cache

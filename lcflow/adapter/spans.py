"""LCF-X with a span packet: the sharer's most relevant context positions, translated per token.

Chosen by the oracle ladder (docs/results/oracles-*.md): a receiver reads whole sentences of
a document's KV, kept in order, about as well as the document itself, but not pooled slots.
So the packet is m latent vectors per receiver layer, one per selected sharer position:

    positions = the sentences the question attends to most, at most m tokens   (sharer side,
                (lcflow.packets.selection; no question: m chunk means)      its own attention)
    z[t]      = (x[t] - mu_x) E_t            x: sharer K/V (no RoPE) of layers near t, [rows, b]
    K, V      = split(mu_y + z[t] D_t)       the receiver's own K/V, predicted; RoPE re-applied
                                             at the document's place in the receiver's input

E_t and D_t start as the closed-form dense alignment (lcflow.packets.alignment) and are
ordinary parameters, so task training can refine them. The packet holds latent tensors only:
no token ids, no text of the sharer's context, and never more than m rows per layer.
"""

from __future__ import annotations

import torch
from torch import nn

from lcflow.adapter.config import AdapterConfig
from lcflow.core.kv import CapturedKV
from lcflow.packets.selection import (
    cache_from_captured,
    chunk_means,
    question_attention,
    question_ids,
    top_sentences,
    top_tokens,
)


def sharer_inputs(config: AdapterConfig, layer: int) -> list[int]:
    """The sharer layers whose K/V feed receiver layer `layer` (a window around the mapped one)."""
    centre, last = config.layer_map[layer], config.sharer.spec.num_layers - 1
    return list(range(max(0, centre - config.sharer_window), min(last, centre + config.sharer_window) + 1))


class SpanEncoder(nn.Module):
    """Sharer side: choose positions with the question, encode each to b numbers per layer."""

    def __init__(self, config: AdapterConfig):
        super().__init__()
        self.config = config
        self.layers = list(config.retained_layers)
        b, kv = config.bottleneck, config.sharer.spec.kv_dim
        dims = {t: kv * len(sharer_inputs(config, t)) for t in self.layers}
        self.mu = nn.ParameterDict({str(t): nn.Parameter(torch.zeros(d)) for t, d in dims.items()})
        self.proj = nn.ParameterDict({str(t): nn.Parameter(torch.zeros(d, b)) for t, d in dims.items()})

    def rows(self, context_tokens: int) -> int:
        """Rows per layer of the packet for a context of this many tokens (BOS included)."""
        return min(self.config.slots, context_tokens - 1)

    @torch.no_grad()
    def select(self, model, tokenizer, captured: CapturedKV, text: str, spans, question: str):
        """Positions to send (document order), or None for the question-free chunk means."""
        if not question:
            return None
        return self.select_by_ids(model, captured, question_ids(tokenizer, question), text, spans)

    @torch.no_grad()
    def select_by_ids(self, model, captured: CapturedKV, question: torch.Tensor, text: str = "", spans=None):
        """`select` for a question already tokenised, [1, Q] (the latency bench has no tokenizer;
        `text` and `spans` are only read by the sentence selections)."""
        cache = cache_from_captured(model, captured)
        heads = [(layer, head) for layer, head in self.config.selection_heads]
        scores = question_attention(
            model, cache, question, captured.num_tokens, heads=heads, chunk=self.config.selection_chunk
        )
        if self.config.selection == "tokens":
            return top_tokens(scores, self.config.slots)
        per_token = self.config.selection == "sentences-mean"
        return top_sentences(scores, spans, text, self.config.slots, per_token=per_token)

    def features(self, captured: CapturedKV, layer: int) -> torch.Tensor:
        """[tokens, d]: K/V of the sharer layers feeding `layer`, BOS dropped."""
        parts = [captured.joint(s)[0, 1:] for s in sharer_inputs(self.config, layer)]
        return torch.cat(parts, dim=-1)

    def encode_layer(self, captured: CapturedKV, layer: int, positions: torch.Tensor | None) -> torch.Tensor:
        """Latents [1, rows, b] for receiver layer `layer`."""
        x = self.features(captured, layer)
        if positions is None:
            x = chunk_means(x, self.config.slots)
        else:
            x = x[positions - 1]  # features start after BOS
        return ((x - self.mu[str(layer)]) @ self.proj[str(layer)])[None]


class SpanDecoder(nn.Module):
    """Receiver side: latents -> the receiver's keys (no RoPE) and values in every layer."""

    def __init__(self, config: AdapterConfig):
        super().__init__()
        spec = config.receiver.spec
        self.num_heads, self.head_dim = spec.num_kv_heads, spec.head_dim
        self.layers = list(config.retained_layers)
        if self.layers != list(range(spec.num_layers)):
            raise ValueError("a span packet writes every receiver layer; it cannot be pruned")
        b, d = config.bottleneck, spec.kv_dim
        self.mu = nn.ParameterDict({str(t): nn.Parameter(torch.zeros(d)) for t in self.layers})
        self.proj = nn.ParameterDict({str(t): nn.Parameter(torch.zeros(b, d)) for t in self.layers})

    def gate(self, layer: int) -> torch.Tensor:
        """Span packets have no gates (every layer is written); 1 for `lcflow info`."""
        return torch.ones(())

    def entries(self, latents: dict[int, torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Keys and values [batch, heads, rows, head_dim] per receiver layer, in layer order."""
        keys, values = [], []
        for t in self.layers:
            z = latents[t]
            y = self.mu[str(t)].to(z.dtype) + z @ self.proj[str(t)].to(z.dtype)
            k, v = y.split(self.num_heads * self.head_dim, dim=-1)
            shape = (y.shape[0], y.shape[1], self.num_heads, self.head_dim)
            keys.append(k.reshape(shape).transpose(1, 2))
            values.append(v.reshape(shape).transpose(1, 2))
        return keys, values


def load_alignment(adapter, alignment) -> None:
    """Copy a fitted lcflow.packets.alignment.KVAlignment into a span adapter's halves."""
    config = adapter.config
    if alignment.config.window != config.sharer_window or alignment.config.layer_map != config.layer_map:
        raise ValueError("the alignment was fitted with another layer map or sharer window than the adapter")
    with torch.no_grad():
        for t in config.retained_layers:
            fitted = alignment.maps[t]
            if adapter.encoder is not None:
                adapter.encoder.mu[str(t)].copy_(fitted.mu_x)
                adapter.encoder.proj[str(t)].copy_(fitted.encoder)
            if adapter.decoder is not None:
                adapter.decoder.mu[str(t)].copy_(fitted.mu_y)
                adapter.decoder.proj[str(t)].copy_(fitted.decoder)

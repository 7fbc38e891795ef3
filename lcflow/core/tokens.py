"""Aligning two tokenisations of the same text by character spans.

Sharer and receiver may cut the same text into different tokens. Each receiver token gets
the mean of the sharer latents whose character spans overlap its own span; receiver tokens
that cover no sharer token (chat-template markers, say) get nothing and are left alone.
Same tokenisation: the alignment is the identity and costs nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SpanAlignment:
    """weights[i, j] = share of sharer token j in receiver token i (rows sum to 1 or are empty)."""

    weights: torch.Tensor  # [receiver_tokens, sharer_tokens]
    covered: torch.Tensor  # [receiver_tokens] bool: receiver token i has at least one sharer token
    identity: bool

    def apply(self, latents: torch.Tensor) -> torch.Tensor:
        """Pool sharer-token latents [..., sharer_tokens, b] onto receiver tokens [..., receiver_tokens, b]."""
        if self.identity:
            return latents
        return self.weights.to(latents.dtype) @ latents


def align_spans(sharer_spans: torch.Tensor, receiver_spans: torch.Tensor) -> SpanAlignment:
    """Build the alignment from [tokens, 2] (start, end) character spans over the same text.

    Empty spans (special tokens such as BOS) overlap nothing.
    """
    s_start, s_end = sharer_spans[:, 0].long(), sharer_spans[:, 1].long()
    r_start, r_end = receiver_spans[:, 0].long(), receiver_spans[:, 1].long()
    if torch.equal(sharer_spans.long(), receiver_spans.long()):
        covered = r_end > r_start
        return SpanAlignment(torch.diag(covered.float()), covered, identity=bool(covered.all()))
    overlap = torch.minimum(r_end[:, None], s_end[None, :]) - torch.maximum(
        r_start[:, None], s_start[None, :]
    )
    hits = (overlap > 0).float()
    counts = hits.sum(dim=1, keepdim=True)
    weights = hits / counts.clamp(min=1)
    return SpanAlignment(weights, counts.squeeze(1) > 0, identity=False)

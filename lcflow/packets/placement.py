"""Writing KV entries into a receiver's cache where a document's text would have been.

The receiver's input for a cross-context question is rendered exactly as if it read the
sharer's document as its first context block (the skyline's layout), but the document's
tokens are replaced by m KV entries:

    [ head: BOS + template start ] [ m packet entries ] [ tail: receiver context, question ]
      the receiver's own KV          decoded, re-rotated    run by the receiver on top
      (the attention sink stays)     at positions H..H+m-1

So the receiver meets the packet in the place and order it meets any document, its own
attention sink untouched at position 0, and the tail's positions follow the packet's.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from lcflow.core.kv import CapturedKV, RopeCodec, capture_kv, full_cache, prefill, run_backbone
from lcflow.core.prompting import filler_token_id, render_text

# Stands in for the document while rendering; split out again before tokenising.
_MARK = "\u2063LCFLOW-PACKET\u2063"


@dataclass
class SlotLayout:
    """The receiver's input around the document slot, tokenised."""

    head_ids: torch.Tensor  # [1, H]: BOS and the template up to the document
    tail_ids: torch.Tensor  # [1, N]: everything after it (own context, question, template end)

    @property
    def head_tokens(self) -> int:
        return self.head_ids.shape[1]


def slot_layout(tokenizer, prompt: str, receiver_context: str = "") -> SlotLayout:
    """Render the receiver's input with the document slot first, as the skyline reads it."""
    text = render_text(tokenizer, prompt, [_MARK, receiver_context])
    head, tail = text.split(_MARK)
    templated = bool(getattr(tokenizer, "chat_template", None))
    head_ids = tokenizer(head, add_special_tokens=not templated, return_tensors="pt").input_ids
    tail_ids = tokenizer(tail, add_special_tokens=False, return_tensors="pt").input_ids
    return SlotLayout(head_ids, tail_ids)


def document_ids(tokenizer, document: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The document as the receiver would read it inside its input: ids [1, T], spans [T, 2]."""
    enc = tokenizer(document, add_special_tokens=False, return_offsets_mapping=True, return_tensors="pt")
    return enc["input_ids"], enc["offset_mapping"][0].to(torch.int32)


@torch.no_grad()
def own_document_kv(model, tokenizer, document: str, layout: SlotLayout) -> tuple[CapturedKV, torch.Tensor]:
    """The receiver's own KV (RoPE removed) of `document` read in the slot, and its token spans.

    This is what a perfect translation would produce: the target of dense alignment and the
    top rungs of the oracle ladder."""
    cache, spans = document_cache(model, tokenizer, document, layout)
    return capture_kv(model, cache, start=layout.head_tokens), spans


@torch.no_grad()
def document_cache(model, tokenizer, document: str, layout: SlotLayout):
    """The receiver's full cache of [head + document] (a sliding-window layer keeps every
    document token here) and the document's token spans."""
    ids, spans = document_ids(tokenizer, document)
    return prefill(model, torch.cat([layout.head_ids, ids], dim=1), full_cache()), spans


def slot_cache(
    model,
    rope: RopeCodec,
    layout: SlotLayout,
    keys: list[torch.Tensor],
    values: list[torch.Tensor],
    head_cache: DynamicCache | None = None,
) -> DynamicCache:
    """A receiver cache: its own head, then the entries (keys without RoPE, [1, H, m, D] per
    layer, every layer) rotated to positions H..H+m-1. `head_cache` (the receiver's cache of
    the head, reused across requests) is copied, never modified."""
    cache = copy.deepcopy(head_cache) if head_cache is not None else prefill(model, layout.head_ids)
    start = layout.head_tokens
    for layer, (k, v) in enumerate(zip(keys, values, strict=True)):
        positions = torch.arange(start, start + k.shape[2], device=k.device)[None]
        cache.update(rope.rotate(k, positions, layer), v, layer)
    return cache


def finish_input(model, tokenizer, layout: SlotLayout, cache: DynamicCache, entries: int):
    """Run the tail (all but its last token) on top of the cache; return the ids `generate` sees.

    The packet's positions hold a filler id in `input_ids`: generate only reads the uncached
    last token, the filler just keeps lengths and positions right."""
    filler = torch.full((1, entries), filler_token_id(tokenizer), dtype=torch.long)
    input_ids = torch.cat([layout.head_ids, filler, layout.tail_ids], dim=1)
    run_backbone(model, layout.tail_ids[:, :-1], cache)
    return input_ids

"""Choosing which context positions a fixed-size packet carries.

The sharer knows the receiver's question (it travels in the Handoff request), so it can ask
its own model which context tokens the question attends to, as SnapKV does with an
observation window. For each layer l, head h, question token i and context position j:

    a[l, h, i, j] = softmax_j( scale_l * q[l, h, i] . k[l, h, j] )    over context + question
    score[j]      = mean over l, h, i of a[l, h, i, j]

In a long document one softmax over every position lets a few loud tokens anywhere (names that
recur in many sentences) drown the sentence that answers. With a chunk size c, each question
token's softmax runs over one chunk of c consecutive positions (and the sink) at a time, so
sentences compete with their neighbours, and a chunk that holds nothing relevant gives its
mass to the sink:

    a_c[l, h, i, j] = softmax over {0} + chunk(j) of the same logits      (`chunk` > 0)

Position 0 (BOS) soaks up most attention in every model (an attention sink) and is never
selected: the receiver keeps its own sink. Three ways to spend a budget of m positions:

    top_tokens        the m highest-scoring positions, in document order
    top_sentences     whole sentences, best total (or per-token mean) score first, while they
                      fit in m (then the best-scoring tokens of the next sentence fill what is left)
    chunk_means       no question: m consecutive chunks of the context, each averaged
"""

from __future__ import annotations

import re
import threading
from contextlib import contextmanager
from itertools import pairwise

import torch
from transformers import DynamicCache

from lcflow.core.kv import CapturedKV, RopeCodec, decoder_backbone, run_backbone
from lcflow.tasks import QASample

_SENTENCE = re.compile(r"[^.!?]+(?:[.!?]+|$)")


class _EnoughLayers(Exception):
    """Raised after the last layer whose queries are needed: the rest of the pass is skipped."""


# model types whose q_norm runs after the heads are moved forward ([batch, heads, tokens, D]);
# the others (Qwen3) normalise [batch, tokens, heads, D]
_NORM_AFTER_TRANSPOSE = {"gemma3", "gemma3_text"}


@contextmanager
def capture_queries(model, layers: int):
    """Record the queries of the first `layers` layers as [batch, heads, tokens, head_dim] (after
    q_norm where the family has one, before RoPE), and stop the forward pass once they have run
    (_EnoughLayers).

    Only this thread's forward passes are recorded (or stopped): a service runs handoffs on one
    model from several threads at once, and their passes fire every registered hook."""
    backbone = decoder_backbone(model)
    queries: dict[int, torch.Tensor] = {}
    handles = []
    owner = threading.get_ident()
    for index, layer in enumerate(backbone.layers[:layers]):
        attn = layer.self_attn
        norm = getattr(attn, "q_norm", None)
        heads_first = norm is not None and attn.config.model_type in _NORM_AFTER_TRANSPOSE
        shape = (attn.config.num_attention_heads, attn.head_dim)

        def hook(_module, _inputs, output, index=index, heads_first=heads_first, shape=shape):
            if threading.get_ident() == owner:
                queries[index] = as_heads(output, *shape, heads_first)

        handles.append((norm or attn.q_proj).register_forward_hook(hook))

    def stop(_module, _inputs, _output):
        if threading.get_ident() == owner:
            raise _EnoughLayers

    if layers < len(backbone.layers):
        handles.append(backbone.layers[layers - 1].register_forward_hook(stop))
    try:
        yield queries
    finally:
        for handle in handles:
            handle.remove()


def as_heads(q: torch.Tensor, num_heads: int, head_dim: int, heads_first: bool) -> torch.Tensor:
    """Queries as [batch, heads, tokens, head_dim] from what a hook saw: q_proj's output
    [batch, tokens, heads * head_dim], or q_norm's, [batch, heads, tokens, D] where `heads_first`
    (Gemma3) and [batch, tokens, heads, D] otherwise (Qwen3)."""
    if q.dim() == 3:
        return q.view(q.shape[0], q.shape[1], num_heads, head_dim).transpose(1, 2)
    return q if heads_first else q.transpose(1, 2)


def cache_from_captured(model, captured: CapturedKV) -> DynamicCache:
    """A full cache (no sliding-window trimming) rebuilt from captured KV: keys re-rotated at
    positions 0..T-1. What a sharer session keeps is the captured form; this is its cache."""
    rope = RopeCodec(model)
    cache = DynamicCache()
    for layer, (k, v) in enumerate(zip(captured.keys, captured.values, strict=True)):
        positions = torch.arange(k.shape[2], device=k.device).expand(k.shape[0], -1)
        cache.update(rope.rotate(k, positions, layer), v, layer)
    return cache


@torch.no_grad()
def head_attention(
    model,
    cache,
    question_ids: torch.Tensor,
    context_tokens: int,
    restore: bool = True,
    layers: int | None = None,
    chunk: int = 0,
) -> torch.Tensor:
    """Attention mass each of the first `context_tokens` cached positions gets from the question,
    per layer and head: [layers, heads, context_tokens] (mean over question tokens of the softmax
    weights; each row is normalised over context + question, or with `chunk` over the sink and
    one chunk of the context at a time, `chunk_softmax`). A sliding-window layer whose cache
    dropped old entries has no full view: its rows are NaN, as are those of layers past `layers`
    (only the first `layers` layers are run: retrieval heads sit early, the rest is not needed).

    Runs the question on top of `cache` (a prefilled context), then crops the cache back, so
    the caller's cache is unchanged (restore=False leaves the question in it: for a throwaway
    copy of a sliding-window cache, which cannot be cropped once its window is full).
    """
    rope = RopeCodec(model)
    backbone = decoder_backbone(model)
    layers = min(layers or len(backbone.layers), len(backbone.layers))
    start = cache.get_seq_length()
    with capture_queries(model, layers) as queries:
        try:
            run_backbone(model, question_ids, cache)
        except _EnoughLayers:
            pass  # the layers after `layers` hold no question entries (the crop below is per layer)
    tokens = question_ids.shape[1]
    positions = torch.arange(start, start + tokens, device=question_ids.device)[None]
    heads = backbone.layers[0].self_attn.config.num_attention_heads
    scores = torch.full((len(backbone.layers), heads, context_tokens), float("nan"))
    for index, layer in enumerate(backbone.layers[:layers]):
        attn = layer.self_attn
        keys = cache.layers[index].keys  # rotated, [batch, kv_heads, cached, head_dim]
        cached = keys.shape[2]
        if cached != start + tokens:  # a sliding-window cache dropped old entries: no full view
            continue
        q = rope.rotate(queries[index], positions, index)
        keys = keys.repeat_interleave(q.shape[1] // keys.shape[1], dim=1)
        logits = (q @ keys.transpose(-1, -2)).float() * attn.scaling
        softcap = getattr(attn, "attn_logit_softcapping", None)
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        # Question token i (at position start + i) sees positions <= start + i, and in a
        # sliding-window layer only the last `window` of them.
        key_pos = torch.arange(cached)[None, :]
        query_pos = (start + torch.arange(tokens))[:, None]
        hidden = key_pos > query_pos
        if rope.spec.layer_types[index] == "sliding_attention" and rope.spec.sliding_window:
            hidden |= key_pos <= query_pos - rope.spec.sliding_window
        logits = logits.masked_fill(hidden, float("-inf"))
        if chunk:
            weights = chunk_softmax(logits[..., :context_tokens], chunk)
        else:
            weights = logits.softmax(dim=-1)[..., :context_tokens]
        scores[index] = weights[0].mean(dim=1).cpu()
    if restore:  # only the layers that ran hold the question's entries
        for entry in cache.layers[:layers]:
            entry.crop(-tokens)
    return scores


def chunk_softmax(logits: torch.Tensor, chunk: int) -> torch.Tensor:
    """[..., T] logits over context positions (0 the sink) -> weights, each chunk of `chunk`
    positions after the sink normalised together with the sink alone; the sink's own weight is 0.
    A chunk the query cannot see at all (every logit -inf, sink too) gets weight 0."""
    tokens = logits.shape[-1]
    rest = logits[..., 1:]
    pad = -rest.shape[-1] % chunk
    rest = torch.nn.functional.pad(rest, (0, pad), value=float("-inf"))
    chunks = rest.unflatten(-1, (-1, chunk))  # [..., chunks, chunk]
    sink = logits[..., :1].unsqueeze(-1).expand(*chunks.shape[:-1], 1)
    weights = torch.cat([sink, chunks], dim=-1).softmax(dim=-1)[..., 1:].nan_to_num(0.0)
    weights = weights.flatten(-2)[..., : tokens - 1]
    return torch.cat([torch.zeros_like(logits[..., :1]), weights], dim=-1)


def question_attention(
    model,
    cache,
    question_ids: torch.Tensor,
    context_tokens: int,
    restore: bool = True,
    heads: list[tuple[int, int]] | None = None,
    chunk: int = 0,
) -> torch.Tensor:
    """[context_tokens] scores: `head_attention` combined over `heads` (see `combine_heads`); with
    heads, the question runs only through the layers up to the deepest of them."""
    layers = max(layer for layer, _ in heads) + 1 if heads else None
    per_head = head_attention(model, cache, question_ids, context_tokens, restore, layers, chunk)
    return combine_heads(per_head, heads)


def combine_heads(per_head: torch.Tensor, heads: list[tuple[int, int]] | None = None) -> torch.Tensor:
    """[L, H, T] per-head scores -> [T]: the mean over the given (layer, head) pairs (a sharer's
    retrieval heads, lcflow.training.heads), or over every head of every layer with a full
    view when none are given (or none of them has a full view)."""
    chosen = [per_head[layer, head] for layer, head in heads or []]
    chosen = [row for row in chosen if not row[0].isnan()]
    if chosen:
        return torch.stack(chosen).mean(dim=0)
    seen = ~per_head[:, 0, 0].isnan()
    if not seen.any():
        return torch.zeros(per_head.shape[-1])
    return per_head[seen].mean(dim=(0, 1))


def question_ids(tokenizer, question: str) -> torch.Tensor:
    """The question's ids [1, Q] as they follow a context (a blank line first, no special tokens)."""
    return tokenizer("\n\n" + question, add_special_tokens=False, return_tensors="pt").input_ids


def top_tokens(scores: torch.Tensor, m: int) -> torch.Tensor:
    """The m best-scoring positions except the sink (position 0), in document order."""
    candidates = scores.clone()
    candidates[0] = float("-inf")
    count = min(m, scores.numel() - 1)
    return candidates.topk(count).indices.sort().values


def sentence_spans(text: str) -> list[tuple[int, int]]:
    """Character spans of the sentences of `text` (ends at . ! ?, trailing spaces dropped)."""
    spans = []
    for match in _SENTENCE.finditer(text):
        start, end = match.start(), match.end()
        while start < end and text[start].isspace():
            start += 1
        if start < end:
            spans.append((start, end))
    return spans


def tokens_by_sentence(token_spans: torch.Tensor, text: str) -> list[list[int]]:
    """Token positions grouped by the sentence their span starts in (tokens with empty spans,
    such as BOS, belong to none)."""
    groups: list[list[int]] = [[] for _ in sentence_spans(text)]
    bounds = sentence_spans(text)
    for position, (start, end) in enumerate(token_spans.tolist()):
        if end <= start:
            continue
        for index, (s, e) in enumerate(bounds):
            if start < e and end > s:
                groups[index].append(position)
                break
    return [g for g in groups if g]


def selected_sentences(text: str, token_spans: torch.Tensor, positions: torch.Tensor) -> str:
    """The whole sentences of `text` that hold any of the token `positions` (spans [T, 2] over
    `text`), in document order, joined by a space: a span selection forwarded as text."""
    bounds = sentence_spans(text)
    chosen: set[int] = set()
    for position in positions.tolist():
        start, end = token_spans[position].tolist()
        if end <= start:
            continue  # BOS and other tokens with no text
        chosen.update(i for i, (s, e) in enumerate(bounds) if start < e and end > s)
    return " ".join(text[bounds[i][0] : bounds[i][1]].strip() for i in sorted(chosen))


def top_sentences(
    scores: torch.Tensor, token_spans: torch.Tensor, text: str, m: int, per_token: bool = False
) -> torch.Tensor:
    """Whole sentences, highest attention first, while they fit in m positions; what is left of
    the budget goes to the best tokens of the remaining sentences. Document order.

    A sentence's attention is the sum over its tokens, or with `per_token` the mean: the sum
    favours long sentences (the two compared: docs/lcfx.md, section 4)."""
    groups = tokens_by_sentence(token_spans, text)

    def score(group: list[int]) -> float:
        return float(scores[group].mean() if per_token else scores[group].sum())

    ranked = sorted(groups, key=score, reverse=True)
    chosen: list[int] = []
    for group in ranked:
        if len(chosen) + len(group) <= m:
            chosen.extend(group)
    if len(chosen) < m:
        rest = torch.tensor([p for g in groups for p in g if p not in chosen], dtype=torch.long)
        if rest.numel():
            extra = rest[scores[rest].topk(min(m - len(chosen), rest.numel())).indices]
            chosen.extend(extra.tolist())
    return torch.tensor(sorted(chosen), dtype=torch.long)


def chunk_means(entries: torch.Tensor, m: int) -> torch.Tensor:
    """[..., T, d] -> [..., min(m, T), d]: the mean of each of m near-equal consecutive chunks."""
    tokens = entries.shape[-2]
    bounds = torch.linspace(0, tokens, min(m, tokens) + 1).round().long().tolist()
    return torch.stack([entries[..., a:b, :].mean(dim=-2) for a, b in pairwise(bounds)], dim=-2)


def answer_selected(sample: QASample, spans: torch.Tensor, positions: torch.Tensor | None) -> bool | None:
    """Do the selected positions (of a context tokenised into `spans` [T, 2]) cover the answer's
    first mention in the sharer's document? None when the answer is not in the document, or
    nothing was selected by question (chunk means)."""
    found = re.search(rf"(?<!\w){re.escape(sample.answers[0])}(?!\w)", sample.sharer_context)
    if found is None or positions is None:
        return None
    covered = torch.zeros(len(sample.sharer_context), dtype=torch.bool)
    for start, end in spans[positions].tolist():
        covered[start:end] = True
    return bool(covered[found.start() : found.end()].all())

"""Retrieval heads: the few attention heads of a sharer that find the fact a question asks for.

A span packet carries the sentences the receiver's question attends to most in the sharer's
document (lcflow.packets.selection). Averaged over every head of every layer, that
attention is a weak pointer in some models (SmolLM2-135M's: docs/lcfx.md, section 5). A few
heads do much better alone ("retrieval heads", Wu et
al. 2024), so they are chosen once per sharer model, on training samples:

    recall[l, h] = share of samples whose selection by head (l, h) alone covers the answer
                   (whole sentences by mean attention per token, within the m-token budget)
    ranked       = heads by recall, best first
    chosen       = the best K heads averaged, K the smallest of 1, 2, 4, 8, 16 whose recall on
                   the same samples is within `tolerance` of the best K's (fewer heads, less fit)

Only samples whose answer appears in the sharer's document count. Nothing here sees a test
split: the held-out measurement is `lcflow bench packets` (answer recall) and `lcflow eval`.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from lcflow.core.kv import full_cache, prefill
from lcflow.core.prompting import tokenize_context
from lcflow.packets.selection import (
    answer_selected,
    combine_heads,
    head_attention,
    question_ids,
    top_sentences,
)
from lcflow.tasks import QASample, format_question_prompt

HEAD_COUNTS = (1, 2, 4, 8, 16)


@dataclass
class HeadChoice:
    """The chosen heads and what they were chosen on."""

    heads: list[list[int]]  # [layer, head] pairs, best first
    recall: float  # of the chosen set, on the training samples
    recall_all_heads: float  # every head averaged (the selection without retrieval heads)
    recall_by_count: dict[int, float]  # K -> recall of the best K heads averaged
    ranked: list[tuple[float, int, int]] = field(default_factory=list)  # (recall, layer, head), top 16
    samples: int = 0  # samples counted (answer in the sharer's document)


@torch.no_grad()
def read_heads_by_chunk(
    model, tokenizer, sample: QASample, chunks: tuple[int, ...], layers: int | None = None
) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    """The sharer reads its document: ({chunk: per-head question attention [L, H, T]}, token
    spans [T, 2]). The question is the receiver's prompt, as a handoff's selection sees it; one
    prefill, then the question once per chunk size (`head_attention`, which restores the cache),
    through the first `layers` layers (all by default)."""
    ids, spans = tokenize_context(tokenizer, sample.sharer_context)
    cache = prefill(model, ids, full_cache())
    question = question_ids(tokenizer, format_question_prompt(sample, include_context=False))
    scores = {c: head_attention(model, cache, question, ids.shape[1], layers=layers, chunk=c) for c in chunks}
    return scores, spans


def read_heads(model, tokenizer, sample: QASample) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-head question attention [L, H, T], token spans [T, 2]), one softmax over the whole
    document (`read_heads_by_chunk` with chunk 0)."""
    scores, spans = read_heads_by_chunk(model, tokenizer, sample, chunks=(0,))
    return scores[0], spans


def covers_answer(sample: QASample, spans: torch.Tensor, scores: torch.Tensor, m: int) -> bool | None:
    """Does the selection by `scores` (sentences by mean attention, m tokens) cover the answer?"""
    chosen = top_sentences(scores, spans, sample.sharer_context, m, per_token=True)
    return answer_selected(sample, spans, chosen)


def choose_heads(model, tokenizer, samples: list[QASample], m: int, tolerance: float = 0.01) -> HeadChoice:
    """Rank every head by its recall on `samples` (training samples), then choose how many to keep."""
    readings = []
    for sample in tqdm(samples, desc="reading", leave=False):
        per_head, spans = read_heads(model, tokenizer, sample)
        if answer_selected(sample, spans, torch.arange(spans.shape[0])) is not None:
            readings.append((sample, per_head, spans))
    if not readings:
        raise ValueError("no sample has its answer in the sharer's document: nothing to choose heads on")
    layers, heads = readings[0][1].shape[:2]
    hits = torch.zeros(layers, heads)
    for sample, per_head, spans in tqdm(readings, desc="ranking heads", leave=False):
        for layer in range(layers):
            if per_head[layer, 0, 0].isnan():
                continue
            for head in range(heads):
                hits[layer, head] += bool(covers_answer(sample, spans, per_head[layer, head], m))
    rate = hits / len(readings)
    ranked = sorted(((float(rate[t, h]), t, h) for t in range(layers) for h in range(heads)), reverse=True)

    def recall(chosen: list[tuple[int, int]] | None) -> float:
        return statistics.fmean(
            bool(covers_answer(sample, spans, combine_heads(per_head, chosen), m))
            for sample, per_head, spans in readings
        )

    by_count = {k: recall([(t, h) for _, t, h in ranked[:k]]) for k in HEAD_COUNTS}
    best = max(by_count.values())
    count = min(k for k, value in by_count.items() if value >= best - tolerance)
    return HeadChoice(
        heads=[[t, h] for _, t, h in ranked[:count]],
        recall=by_count[count],
        recall_all_heads=recall(None),
        recall_by_count=by_count,
        ranked=ranked[:16],
        samples=len(readings),
    )

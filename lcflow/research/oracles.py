"""The oracle ladder: which packets can a receiver read at all, before anything is trained?

Each rung hands the receiver the same question with something different in the document's
place (see lcflow.packets.placement), and scores EM, F1, "contains the answer" and the
answer's negative log-likelihood (teacher-forced, nats per token):

    none                 nothing: the receiver's own context and the question only
    text                 the sharer's document as text (the skyline of a perfect handoff)
    own-full             the receiver's own KV of the document (must equal `text`)
    own-tokens-M         that KV cut to the M positions the question attends to most
    own-sentences-M      whole sentences the question attends to, at most M positions
    own-chunks-M         M chunk means of that KV (no question needed)
    own-random-M         M random positions (a control)
    xlat-full            the sharer's KV, translated per token by the dense alignment
    xlat-tokens-M        translated, the sharer's M most-attended positions
    xlat-sentences-M     translated, the sharer's most-attended sentences
    xlat-wrong-M         xlat-sentences-M built from another sample's document (a control)

"own" rungs select with the receiver's own attention (an oracle: in deployment the receiver
never has the document); "xlat" rungs select with the sharer's attention from the question
over its context, which a sharer can compute since the question travels in the request.
"""

from __future__ import annotations

import copy
import random
import statistics
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from lcflow.core.kv import CapturedKV, capture_kv, full_cache, prefill
from lcflow.core.names import DEFAULT_RUNGS
from lcflow.core.prompting import tokenize_context
from lcflow.eval.metrics import contains_answer, exact_match, extract_answer, mean_with_ci, token_f1
from lcflow.handoff.generation import GenerationSettings, generate_text
from lcflow.handoff.pair import PreparedInput, Receiver
from lcflow.packets.alignment import KVAlignment
from lcflow.packets.placement import document_cache, finish_input, slot_cache, slot_layout
from lcflow.packets.selection import (
    chunk_means,
    question_attention,
    question_ids,
    top_sentences,
    top_tokens,
)
from lcflow.tasks import QASample, question_prompt
from lcflow.training.train import answer_ids, answer_loss


@dataclass
class RungOutcome:
    rung: str
    sample_id: str
    generated: str
    em: float
    f1: float
    contains: float
    nll: float
    entries: int  # KV entries in the document's place (the packet's length)


@dataclass
class _Document:
    """One document read by a model: captured KV (no RoPE), spans, question attention."""

    text: str
    captured: CapturedKV
    spans: torch.Tensor  # [T, 2] over `text`
    scores: torch.Tensor  # [T] the question's attention to each position


@torch.no_grad()
def read_as_receiver(model, tokenizer, document: str, layout, question: str) -> _Document:
    """The receiver's own reading of the document in the slot (oracle rungs)."""
    cache, spans = document_cache(model, tokenizer, document, layout)
    scores = question_attention(
        model, cache, question_ids(tokenizer, question_prompt(question)), cache.get_seq_length()
    )
    captured = capture_kv(model, cache, start=layout.head_tokens)
    return _Document(document, captured, spans, scores[layout.head_tokens :])


@torch.no_grad()
def read_as_sharer(model, tokenizer, document: str, question: str) -> _Document:
    """The sharer's reading: its context prefill (BOS first), then the question's attention."""
    ids, spans = tokenize_context(tokenizer, document)
    cache = prefill(model, ids, full_cache())
    scores = question_attention(
        model, cache, question_ids(tokenizer, question_prompt(question)), ids.shape[1]
    )
    return _Document(document, capture_kv(model, cache), spans, scores)


def choose_positions(kind: str, m: int, doc: _Document, rng: random.Random, sink: bool) -> torch.Tensor:
    """Positions of `doc` a rung keeps (`sink`: position 0 is BOS and never kept)."""
    first = 1 if sink else 0
    tokens = doc.captured.num_tokens
    if kind == "full":
        return torch.arange(first, tokens)
    if kind == "tokens":
        scores = doc.scores if sink else torch.cat([torch.tensor([float("-inf")]), doc.scores])
        picked = top_tokens(scores, m)
        return picked if sink else picked - 1
    if kind == "sentences":
        return top_sentences(doc.scores, doc.spans, doc.text, m)
    if kind == "random":
        return torch.tensor(sorted(rng.sample(range(first, tokens), min(m, tokens - first))))
    raise ValueError(f"unknown selection {kind!r}")


def own_entries(kind: str, m: int, doc: _Document, rng: random.Random):
    """Keys (no RoPE) and values per receiver layer from the receiver's own KV."""
    if kind == "chunks":
        return (
            [chunk_means(k, m) for k in doc.captured.keys],
            [chunk_means(v, m) for v in doc.captured.values],
        )
    positions = choose_positions(kind, m, doc, rng, sink=False)
    return (
        [k[:, :, positions] for k in doc.captured.keys],
        [v[:, :, positions] for v in doc.captured.values],
    )


def translated_entries(kind: str, m: int, doc: _Document, alignment: KVAlignment, spec, rng):
    """Keys and values per receiver layer decoded from the sharer's selected, encoded tokens."""
    positions = choose_positions(kind, m, doc, rng, sink=True)
    keys, values = [], []
    for layer in range(spec.num_layers):
        z = alignment.encode(doc.captured, layer, positions)
        k, v = alignment.decode(z, layer, spec.num_kv_heads, spec.head_dim)
        keys.append(k)
        values.append(v)
    return keys, values


@dataclass
class OracleModels:
    sharer: tuple  # (model, tokenizer)
    receiver: tuple
    alignment: KVAlignment | None = None
    _head_cache: dict = field(default_factory=dict)


def _parse(rung: str) -> tuple[str, str, int]:
    parts = rung.split("-")
    source, kind = parts[0], parts[1] if len(parts) > 1 else ""
    m = int(parts[2]) if len(parts) > 2 else 0
    return source, kind, m


def _score(
    rung: str, sample: QASample, receiver: Receiver, prepared: PreparedInput, entries: int, settings
) -> RungOutcome:
    target = answer_ids(receiver.tokenizer, sample.answers[0])
    nll = float(answer_loss(receiver, copy.deepcopy(prepared), target))
    generated = generate_text(
        receiver.model, receiver.tokenizer, prepared.input_ids, prepared.cache, settings
    )
    prediction = extract_answer(generated)
    return RungOutcome(
        rung,
        sample.id,
        generated,
        exact_match(prediction, sample.answers),
        token_f1(prediction, sample.answers),
        contains_answer(generated, sample.answers),
        nll,
        entries,
    )


@torch.no_grad()
def run_sample(
    rungs: list[str],
    models: OracleModels,
    sample: QASample,
    other: QASample,
    settings: GenerationSettings,
    seed: int = 0,
) -> list[RungOutcome]:
    """Every rung on one sample; `other` is the sample whose document the wrong-packet control uses."""
    r_model, r_tok = models.receiver
    receiver = Receiver(r_model, r_tok)
    prompt = question_prompt(sample.question)
    layout = slot_layout(r_tok, prompt, sample.receiver_context)
    rng = random.Random(f"{sample.id}|{seed}")
    own = sharer_doc = other_doc = None
    outcomes = []
    for rung in rungs:
        source, kind, m = _parse(rung)
        if source in ("none", "text"):
            contexts = [sample.receiver_context] if source == "none" else [sample.sharer_context]
            if source == "text":
                contexts.append(sample.receiver_context)
            prepared = receiver.prepare_plain(prompt, contexts)
            outcomes.append(_score(rung, sample, receiver, prepared, 0, settings))
            continue
        if source == "own":
            own = own or read_as_receiver(r_model, r_tok, sample.sharer_context, layout, sample.question)
            keys, values = own_entries(kind, m, own, rng)
        elif source == "xlat":
            if models.alignment is None:
                raise ValueError(f"rung {rung!r} needs a dense alignment (--alignment DIR)")
            s_model, s_tok = models.sharer
            if kind == "wrong":
                other_doc = other_doc or read_as_sharer(s_model, s_tok, other.sharer_context, other.question)
                doc, kind = other_doc, "sentences"
            else:
                sharer_doc = sharer_doc or read_as_sharer(
                    s_model, s_tok, sample.sharer_context, sample.question
                )
                doc = sharer_doc
            keys, values = translated_entries(kind, m, doc, models.alignment, receiver.rope.spec, rng)
        else:
            raise ValueError(f"unknown rung {rung!r}; known: {', '.join(DEFAULT_RUNGS)}")
        entries = keys[0].shape[2]
        head = models._head_cache.get(layout.head_ids.shape[1])
        if head is None:
            head = models._head_cache[layout.head_ids.shape[1]] = prefill(r_model, layout.head_ids)
        cache = slot_cache(r_model, receiver.rope, layout, keys, values, head)
        input_ids = finish_input(r_model, r_tok, layout, cache, entries)
        prepared = PreparedInput(input_ids, cache, input_ids.shape[1])
        outcomes.append(_score(rung, sample, receiver, prepared, entries, settings))
    return outcomes


def run_ladder(
    rungs: list[str],
    models: OracleModels,
    samples: list[QASample],
    settings: GenerationSettings,
    progress: bool = True,
) -> list[RungOutcome]:
    outcomes = []
    for index, sample in enumerate(tqdm(samples, desc="oracles", unit="sample", disable=not progress)):
        other = samples[(index + 1) % len(samples)]
        outcomes.extend(run_sample(rungs, models, sample, other, settings))
    return outcomes


def summarize(outcomes: list[RungOutcome]) -> list[dict]:
    rows = []
    for rung in dict.fromkeys(o.rung for o in outcomes):
        mine = [o for o in outcomes if o.rung == rung]
        em, lo, hi = mean_with_ci([o.em for o in mine])
        rows.append(
            {
                "rung": rung,
                "n": len(mine),
                "em": em,
                "em_ci": [lo, hi],
                "f1": statistics.fmean(o.f1 for o in mine),
                "contains": statistics.fmean(o.contains for o in mine),
                "answer_nll": statistics.fmean(o.nll for o in mine),
                "entries_median": statistics.median(o.entries for o in mine),
            }
        )
    return rows


def markdown_table(rows: list[dict]) -> str:
    lines = [
        "| rung | n | EM [95% CI] | F1 | contains answer | answer NLL (nats/token) | entries |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lo, hi = r["em_ci"]
        ci = f" [{lo:.3f}, {hi:.3f}]" if lo == lo and hi > lo else ""
        lines.append(
            f"| {r['rung']} | {r['n']} | {r['em']:.3f}{ci} | {r['f1']:.3f} | {r['contains']:.3f} | "
            f"{r['answer_nll']:.3f} | {r['entries_median']:g} |"
        )
    return "\n".join(lines)

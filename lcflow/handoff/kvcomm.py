"""KVComm (Shi et al., ICLR 2026), the training-free KV baseline for same-model pairs.

The sharer runs the receiver's own model over the receiver's input up to the end of the
document (the template's head, then the document: the tokens `forward` would have the receiver
prefill) and sends that KV. The receiver puts it in front of the rest of its input, but only
in a chosen subset S of its layers; every other layer keeps just the first position (the
attention sink) of the sent prefix:

    layer l in S:      the receiver's tokens attend to  [prefix 0..P-1] + [their own, causally]
    layer l not in S:  the receiver's tokens attend to  [prefix 0]      + [their own, causally]

so with S = every layer it is `forward` with the receiver's prefill of the document done by
the sharer, and bytes sent are |S| prefix-length KV rows plus one row for each other layer.

S is chosen by KVComm's attention rule: on calibration samples, run the receiver with the whole
prefix in every layer and score each layer by the share of its attention (averaged over heads
and the receiver's tokens) that lands on the document, positions 1..P-1; keep layer 0 and the
top `fraction` of layers by that score.

How the other layers lose the prefix: they hold it, zeroed, and a pre-hook on their attention
masks its columns 1..P-1 (`restricted_prefix`). One cache length for every layer keeps
transformers' single attention mask valid; the maths is that of KVComm's ragged cache, except
that its released code lets the short layers' tokens see each other non-causally, and here they
stay causal.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from lcflow.core.kv import decoder_backbone, full_cache, prefill, run_backbone
from lcflow.core.prompting import context_token_range, render_input
from lcflow.handoff.pair import PreparedInput, reader_contexts

WIRE_BYTES_PER_VALUE = 2  # the KV travels as bfloat16


@dataclass
class KVCommInput:
    """A KVComm handoff's two halves over one rendered input: the prefix the sharer computes
    (the template's head and the document) and the rest the receiver prefills."""

    input_ids: torch.Tensor  # [1, N] the receiver's whole input, as `forward` renders it
    prefix_length: int  # P: tokens up to the end of the document, the sharer's part


def kvcomm_input(tokenizer, prompt: str, document: str, receiver_context: str = "") -> KVCommInput:
    """Render the receiver's input as `forward` would (the document where a document sits, then
    the receiver's own context and the prompt) and find where the document ends."""
    if not document:
        raise ValueError("KVComm needs the sharer's document: it sends the KV of that document")
    rendered = render_input(tokenizer, prompt, reader_contexts(document, receiver_context))
    positions, _ = context_token_range(rendered, document)
    return KVCommInput(rendered.input_ids, int(positions[-1]) + 1)


def sharer_prefix(model, handoff: KVCommInput) -> DynamicCache:
    """The sharer's side: its KV of the prefix (the same model as the receiver's). Every layer
    keeps every position (`full_cache`: a sliding-window layer too, its mask enforcing the
    window), so position p is row p of every layer."""
    return prefill(model, handoff.input_ids[:, : handoff.prefix_length], full_cache())


def send_layers(cache: DynamicCache, kept: set[int], prefix_length: int) -> int:
    """Put the prefix through the wire in place, as KVComm sends it: bf16, the kept layers whole
    and only the sink of the others (their positions 1..P-1 zeroed); returns the bytes sent."""
    sent = 0
    for index, layer in enumerate(cache.layers):
        layer.keys = layer.keys.to(torch.bfloat16).to(layer.keys.dtype)
        layer.values = layer.values.to(torch.bfloat16).to(layer.values.dtype)
        if index not in kept:
            layer.keys[:, :, 1:prefix_length] = 0
            layer.values[:, :, 1:prefix_length] = 0
        rows = prefix_length if index in kept else 1
        per_row = layer.keys.shape[1] * (layer.keys.shape[-1] + layer.values.shape[-1])
        sent += rows * per_row * WIRE_BYTES_PER_VALUE
    return sent


def _attention_modules(model) -> list[torch.nn.Module]:
    return [layer.self_attn for layer in decoder_backbone(model).layers]


@contextlib.contextmanager
def restricted_prefix(model, kept: set[int], prefix_length: int):
    """Inside: layers not in `kept` mask the prefix's columns 1..P-1 of every attention call.

    The hook edits the call's attention mask (bool: True attends; float: 0 attends, a large
    negative does not); a call without a mask (transformers leaves it out when plain causal
    attention will do) gets one built first. The hooks act on every call through the model while
    inside, so one handoff at a time per model (as `lcflow eval` runs them; no service serves KVComm)."""

    def hook(module, args, kwargs):
        mask = kwargs.get("attention_mask")
        hidden = kwargs["hidden_states"]
        queries = hidden.shape[1]
        if mask is None:
            past = kwargs["past_key_values"].get_seq_length(module.layer_idx)
            keys = past + queries
            allowed = torch.ones(queries, keys, dtype=torch.bool, device=hidden.device)
            mask = torch.tril(allowed, diagonal=past)[None, None].expand(hidden.shape[0], 1, -1, -1)
        mask = mask.clone()
        if mask.dtype == torch.bool:
            mask[..., 1:prefix_length] = False
        else:
            mask[..., 1:prefix_length] = torch.finfo(mask.dtype).min
        kwargs["attention_mask"] = mask
        return args, kwargs

    handles = [
        module.register_forward_pre_hook(hook, with_kwargs=True)
        for index, module in enumerate(_attention_modules(model))
        if index not in kept
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def prepare_receiver(model, handoff: KVCommInput, cache: DynamicCache, kept: set[int]) -> PreparedInput:
    """The receiver's side: prefill the rest of its input (all but the last token) after the
    sent prefix, with the layers outside `kept` seeing only its sink. The same restriction must
    hold while generating: `Receiver.generate` enters the result's attention_restriction."""

    def restriction():
        return restricted_prefix(model, kept, handoff.prefix_length)

    with restriction():
        run_backbone(model, handoff.input_ids[:, handoff.prefix_length : -1], cache)
    rest = handoff.input_ids.shape[1] - handoff.prefix_length
    return PreparedInput(handoff.input_ids, cache, rest, attention_restriction=restriction)


def layer_scores(model, handoff: KVCommInput) -> torch.Tensor:
    """KVComm's calibration score per layer [L]: with the whole prefix in every layer, the share
    of the receiver tokens' attention that lands on the document (prefix positions 1..P-1),
    averaged over heads and the receiver's tokens."""
    cache = sharer_prefix(model, handoff)
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")  # attention weights: only the eager kernel returns them
    try:
        out = decoder_backbone(model)(
            input_ids=handoff.input_ids[:, handoff.prefix_length :].to(model.device),
            past_key_values=cache,
            use_cache=True,
            output_attentions=True,
        )
    finally:
        model.set_attn_implementation(previous)
    return torch.stack([a[..., 1 : handoff.prefix_length].sum(-1).mean() for a in out.attentions]).float()


def choose_layers(scores: torch.Tensor, fraction: float) -> set[int]:
    """Layer 0 and the top `fraction` of layers by score (at least one besides layer 0)."""
    if not 0 < fraction <= 1:
        raise ValueError(f"the fraction of layers KVComm shares must be in (0, 1], not {fraction}")
    count = max(1, math.ceil(fraction * scores.numel()))
    return {0, *(int(i) for i in torch.argsort(scores, descending=True)[:count])}


def calibrate(model, tokenizer, samples: list[tuple[str, str, str]], fraction: float) -> set[int]:
    """The kept layers from calibration samples (prompt, document, receiver context): each
    sample's scores min-max normalised (KVComm's rule), averaged, then `choose_layers`."""
    if not samples:
        raise ValueError("KVComm's layer choice needs at least one calibration sample")
    total = torch.zeros(len(_attention_modules(model)))
    with torch.inference_mode():
        for prompt, document, receiver_context in samples:
            scores = layer_scores(model, kvcomm_input(tokenizer, prompt, document, receiver_context))
            span = (scores.max() - scores.min()).clamp_min(1e-12)
            total += ((scores - scores.min()) / span).cpu()
    return choose_layers(total / len(samples), fraction)

"""How a model's input text is built: one place, used by the handoff, training, eval and services.

A receiver's turn is one user message: any context blocks first, then the prompt, wrapped in
the model's chat template when it has one. We also return where each context block sits in
the rendered text, because LCF fuses the sharer's latents onto exactly those characters.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# The text-to-text baseline's request to the sharer (C2C's wording: the most essential
# background knowledge, in one clear sentence).
TEXT_MESSAGE_INSTRUCTION = (
    "Another assistant must answer this question: {question}\n"
    "In one clear sentence, state the most essential background knowledge from the text above "
    "that it needs to answer."
)
MESSAGE_PREFIX = "Note from another assistant: "


@dataclass
class RenderedInput:
    """A tokenised model input and where the first context block lies in it."""

    text: str
    input_ids: torch.Tensor  # [1, tokens]
    offsets: torch.Tensor  # [tokens, 2] character spans in `text`
    context_start: int  # character offset of the first context block in `text` (-1 if none)


def _user_message(prompt: str, contexts: list[str]) -> str:
    return "\n\n".join([c for c in contexts if c] + [prompt])


def render_text(tokenizer, prompt: str, contexts: list[str] | None = None) -> str:
    """The receiver's full input text: chat template (with generation prompt) when the tokenizer has one."""
    message = _user_message(prompt, contexts or [])
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": message}], tokenize=False, add_generation_prompt=True
        )
    return message


def render_input(tokenizer, prompt: str, contexts: list[str] | None = None) -> RenderedInput:
    """Render and tokenise; special tokens come from the template when there is one."""
    contexts = contexts or []
    text = render_text(tokenizer, prompt, contexts)
    templated = bool(getattr(tokenizer, "chat_template", None))
    enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=not templated, return_tensors="pt")
    first = next((c for c in contexts if c), "")
    return RenderedInput(
        text=text,
        input_ids=enc["input_ids"],
        offsets=enc["offset_mapping"][0].to(torch.int32),
        context_start=text.find(first) if first else -1,
    )


def tokenize_context(tokenizer, text: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A sharer's context as raw text (BOS added, no template): ids [1, T] and spans [T, 2] in `text`."""
    if not text:
        raise ValueError("the sharer context is empty: give the text the sharer should hand off")
    enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=True, return_tensors="pt")
    return enc["input_ids"], enc["offset_mapping"][0].to(torch.int32)


def context_token_range(rendered: RenderedInput, context: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Receiver tokens overlapping the context block: their positions [n] and their spans
    relative to the context text [n, 2] (clipped to it)."""
    start, end = rendered.context_start, rendered.context_start + len(context)
    if rendered.context_start < 0:
        raise ValueError("the context does not appear in the rendered receiver input")
    s, e = rendered.offsets[:, 0], rendered.offsets[:, 1]
    inside = (e > start) & (s < end) & (e > s)
    positions = inside.nonzero().squeeze(1)
    spans = torch.stack([s[inside].clamp(start, end) - start, e[inside].clamp(start, end) - start], dim=1)
    return positions, spans


def filler_token_id(tokenizer) -> int:
    """The token whose KV forms LCF-X's neutral prefix: BOS, else PAD, else EOS."""
    for token_id in (tokenizer.bos_token_id, tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return int(token_id)
    raise ValueError("the receiver tokenizer has no BOS, PAD or EOS token to build the LCF-X prefix from")

"""How a model's input text is built: one place, used by the handoff, training, eval and services.

A receiver's turn is one user message: any context blocks first, then the prompt, wrapped in
the model's chat template when it has one. We also return where each context block sits in
the rendered text, because LCF fuses the sharer's latents onto exactly those characters.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

# The note (TEXT mode): what the sharer is asked to write for the receiver. Two styles:
#   "fair"  a note that reads as a note: one sentence of at most NOTE_MAX_TOKENS, ended at the
#           first newline or sentence end; an instruction in the chat template where the model
#           has one, else (a base model) a short few-shot prompt, since a base model asked in
#           words mostly continues the instruction instead of following it.
#   "c2c"   the paper protocol (C2C's wording: the most essential background knowledge, in one
#           clear sentence, up to 256 tokens), kept for comparisons with the papers.
NOTE_STYLES = ("fair", "c2c")
NOTE_MAX_TOKENS = {"fair": 64, "c2c": 256}
NOTE_STOPS = {"fair": ["\n", ". ", "? ", "! "], "c2c": []}
C2C_NOTE_INSTRUCTION = (
    "Another assistant must answer this question: {question}\n"
    "In one clear sentence, state the most essential background knowledge from the text above "
    "that it needs to answer."
)
FAIR_NOTE_INSTRUCTION = (
    "Another assistant must answer this question: {question}\n"
    "It cannot see the text above. Write one short sentence from the text that it needs to answer, "
    "and nothing else."
)
# Examples in no task family's vocabulary (a bakery, a library), so the prompt teaches the form
# of a note and nothing of any family's answers.
FEW_SHOT_NOTE_PROMPT = (
    "Text: The bakery on Elm Street opens at seven. Its rye bread sells out by noon.\n"
    "Question: What sells out by noon?\n"
    "Note: The rye bread of the bakery on Elm Street sells out by noon.\n\n"
    "Text: The town library lends bicycles in summer. Its reading room closes on Mondays.\n"
    "Question: When is the reading room closed?\n"
    "Note: The library's reading room is closed on Mondays.\n\n"
    "Text: {document}\n"
    "Question: {question}\n"
    "Note:"
)
# The few-shot prompt's field names: a note that opens with one of them is the base model skipping
# its note and starting the next example ("Question: ..."), so it wrote no note at all.
FEW_SHOT_FIELDS = ("Text:", "Question:", "Note:")
MESSAGE_PREFIX = "Note from another assistant: "
_SENTENCE_END = re.compile(r"[.!?](?=\s|$)")


def note_prompt(tokenizer, document: str, question: str, style: str = "fair") -> str:
    """The sharer's input for writing a note about `document` for someone asked `question`."""
    if style not in NOTE_STYLES:
        raise ValueError(f"unknown note style {style!r}; choose from {', '.join(NOTE_STYLES)}")
    if style == "fair" and not getattr(tokenizer, "chat_template", None):
        return FEW_SHOT_NOTE_PROMPT.format(document=" ".join(document.split()), question=question)
    instruction = (FAIR_NOTE_INSTRUCTION if style == "fair" else C2C_NOTE_INSTRUCTION).format(
        question=question
    )
    return render_text(tokenizer, instruction, [document])


def finish_note(generated: str, style: str = "fair") -> str:
    """A fair note is its first line's first sentence (generation stops near there; this cuts the
    token or two past the stop), and empty when that line opens a new few-shot example; a c2c
    note is kept whole, as the paper's protocol does."""
    if style != "fair":
        return generated.strip()
    line = generated.strip().split("\n", 1)[0]
    if line.startswith(FEW_SHOT_FIELDS):
        return ""
    end = _SENTENCE_END.search(line)
    return (line[: end.end()] if end else line).strip()


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

"""The handoff in-process: a sharer encodes its context, a receiver decodes and generates.

    sharer = Sharer(sharer_model, sharer_tokenizer, adapter.encoder, adapter.config)
    receiver = Receiver(receiver_model, receiver_tokenizer, adapter.decoder, adapter.config)
    context = sharer.prefill("Ada lives in Oslo. ...")          # a session can keep this
    latents = sharer.encode(context, receiver_context=...)    # what travels (LCF-X: fixed size)
    prepared = receiver.prepare(latents, prompt="Where does Ada live?", ...)
    answer = receiver.generate(prepared, GenerationSettings(max_new_tokens=16))

Generation is the library's own `generate` continuing from a normal `past_key_values`
cache: the cache already holds the (fused) prompt, so only the uncached tail is run.
The same `prepare` path runs with gradients for training (see lcflow.training.train).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from lcflow.adapter.bridge import INPUT_LAYER
from lcflow.adapter.c2c import aligned_sharer_kv
from lcflow.adapter.config import AdapterConfig
from lcflow.adapter.lcfx import filler_prefix
from lcflow.core.kv import CapturedKV, RopeCodec, capture_kv, full_cache, prefill, run_backbone
from lcflow.core.names import SAME_CONTEXT_MODES
from lcflow.core.prompting import (
    MESSAGE_PREFIX,
    NOTE_MAX_TOKENS,
    NOTE_STOPS,
    context_token_range,
    filler_token_id,
    finish_note,
    note_prompt,
    render_input,
    tokenize_context,
)
from lcflow.core.tokens import align_spans
from lcflow.handoff.generation import GenerationSettings, generate_text
from lcflow.packets.placement import finish_input, slot_cache, slot_layout
from lcflow.packets.selection import selected_sentences

MODES = ("lcf", "lcfx", "c2c", "text", "none")


@dataclass
class SharerContext:
    """A prefilled sharer context: what a sharer session holds between handoffs."""

    text: str
    input_ids: torch.Tensor  # [1, T]
    spans: torch.Tensor  # [T, 2] character spans in `text`
    captured: CapturedKV  # keys without RoPE, every layer
    prefill_ms: float


@dataclass
class Latents:
    """What the sharer hands off: one tensor per retained receiver layer."""

    mode: str  # "lcf", "lcfx" or "c2c"
    # lcf: [1, T, b] per sharer token; lcfx: [1, m, b]; c2c: per *sharer* layer the fuser reads,
    # its keys (RoPE removed) and values side by side, [1, T, 2 H_s D_s] (lcflow.adapter.c2c)
    layers: dict[int, torch.Tensor]
    token_spans: torch.Tensor | None = None  # lcf, c2c: sharer token spans [T, 2] over the context text

    def num_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.layers.values())


@dataclass
class ContextPrefill:
    """LCF / C2C: the receiver's own prefill of [context + prompt], made before the sharer's side
    arrives (it does not depend on it), so that the two prefills can overlap."""

    rendered: object  # lcflow.core.prompting's rendered input: input_ids and the context's place in it
    cache: DynamicCache
    prefill_ms: float


@dataclass
class PreparedInput:
    """A receiver input whose prompt is already in the cache (all but its last token or more)."""

    input_ids: torch.Tensor  # [1, N] the ids generate() sees, cached part included
    cache: DynamicCache
    prompt_tokens: int  # tokens of the receiver's own prompt
    timings_ms: dict[str, float] = field(default_factory=dict)
    # A context that must hold while the receiver continues from this cache (KVComm: the layers
    # that keep only the prefix's sink mask the rest of it; lcflow.handoff.kvcomm). None: none.
    attention_restriction: Callable[[], contextlib.AbstractContextManager] | None = None


def _ms(start: float) -> float:
    return (time.perf_counter() - start) * 1000.0


class Sharer:
    """The sharer model plus the adapter's encoder half (None for TEXT-only use)."""

    def __init__(self, model, tokenizer, encoder=None, config: AdapterConfig | None = None):
        self.model, self.tokenizer, self.encoder, self.config = model, tokenizer, encoder, config

    @torch.no_grad()
    def prefill(self, text: str) -> SharerContext:
        """Run the sharer over its context once and keep its KV without RoPE."""
        start = time.perf_counter()
        ids, spans = tokenize_context(self.tokenizer, text)
        cache = prefill(self.model, ids, full_cache())
        captured = capture_kv(self.model, cache)
        return SharerContext(text, ids, spans, captured, _ms(start))

    def digest(self, receiver_text: str) -> dict[int, torch.Tensor] | None:
        """LCF-X receiver-aware pooling: what the receiver already has, seen through the sharer."""
        if self.config is None or self.config.mode != "lcfx" or not self.config.receiver_aware:
            return None
        if not receiver_text:
            return None
        return self.encoder.digest(self.prefill(receiver_text).captured)

    def select(self, context: SharerContext, receiver_text: str = "", question: str = ""):
        """Span packets: the context positions the packet holds, chosen with `question` (the
        receiver's prompt), else with `receiver_text`; None with neither (chunk means)."""
        return self.encoder.select(
            self.model,
            self.tokenizer,
            context.captured,
            context.text,
            context.spans,
            question or receiver_text,
        )

    def encode_layers(
        self, context: SharerContext, receiver_text: str = "", question: str = "", positions=None
    ):
        """Yield (receiver layer, latent) one layer at a time, so a transport can send each at once.

        `question` (the receiver's prompt) steers a span packet's selection; without one it
        falls back to `receiver_text`, and with neither to the question-free chunk means.
        `positions`: a span packet's selection already made with `select` (not made again)."""
        if self.encoder is None:
            raise ValueError("this sharer has no adapter encoder: load an LCF, LCF-X or C2C adapter")
        if self.config.mode == "c2c":  # the sharer's own KV of the layers the fuser reads
            yield from self.encoder.encode_layers(context.captured)
            return
        if self.config.mode == "lcfx" and self.config.packet in ("spans", "bridge"):
            if positions is None:
                positions = self.select(context, receiver_text, question)
            if self.config.packet == "bridge":  # one segment: soft tokens for the receiver's input
                yield (
                    INPUT_LAYER,
                    self.encoder.encode_soft(context.captured, context.text, context.spans, positions),
                )
                return
            for layer in self.encoder.layers:
                yield layer, self.encoder.encode_layer(context.captured, layer, positions)
            return
        digest = self.digest(receiver_text)
        for layer in self.encoder.layers:
            if self.config.mode == "lcfx":
                yield layer, self.encoder.encode_layer(context.captured, layer, digest)
            else:
                yield layer, self.encoder.encode_layer(context.captured, layer)

    def latent_rows(self, context: SharerContext, positions=None) -> int:
        """Rows per layer of this context's packet: its tokens (LCF), m slots, the span rows, or
        (bridge) the receiver tokens of the positions `select` chose."""
        if self.config.mode in SAME_CONTEXT_MODES:
            return context.input_ids.shape[1]
        if self.config.packet == "spans":
            return self.encoder.rows(context.input_ids.shape[1])
        if self.config.packet == "bridge":
            return len(self.encoder.receiver_rows(context.text, context.spans, positions)[1])
        return self.config.slots

    def encode(
        self, context: SharerContext, receiver_text: str = "", question: str = "", positions=None
    ) -> Latents:
        layers = dict(self.encode_layers(context, receiver_text, question, positions))
        spans = context.spans if self.config.mode in SAME_CONTEXT_MODES else None
        return Latents(self.config.mode, layers, spans)

    def message_input(self, context_text: str, question: str, style: str = "fair") -> torch.Tensor:
        """The note's input: the sharer's context and the request to write one, [1, T]
        (lcflow.core.prompting.note_prompt: the fair note, or C2C's wording with style "c2c")."""
        text = note_prompt(self.tokenizer, context_text, question, style)
        templated = bool(getattr(self.tokenizer, "chat_template", None))
        return self.tokenizer(text, add_special_tokens=not templated, return_tensors="pt").input_ids

    @staticmethod
    def note_settings(style: str, max_new_tokens: int | None = None) -> GenerationSettings:
        """Greedy; the style's length and stops (a fair note ends at its first sentence)."""
        return GenerationSettings(max_new_tokens or NOTE_MAX_TOKENS[style], stop=list(NOTE_STOPS[style]))

    @torch.no_grad()
    def write_message(
        self, context_text: str, question: str, max_new_tokens: int | None = None, style: str = "fair"
    ) -> str:
        """The note (TEXT mode): the sharer states in words what the receiver needs."""
        generated = generate_text(
            self.model,
            self.tokenizer,
            self.message_input(context_text, question, style),
            None,
            self.note_settings(style, max_new_tokens),
        )
        return finish_note(generated, style)

    @torch.no_grad()
    def write_messages(
        self, pairs: list[tuple[str, str]], max_new_tokens: int | None = None, style: str = "fair"
    ) -> list[str]:
        """`write_message` for a batch of (context, question) pairs at once (greedy).

        For evaluations only: a CPU decodes a batch of notes for little more than one (each step
        reads the weights once), so the text baseline's accuracy can be measured on hundreds of
        samples. Inputs are left-padded; a note can differ from the unbatched one where padding
        changes float rounding enough to flip a greedy choice. Not a handoff's latency."""
        pad = (
            self.tokenizer.pad_token_id
            if self.tokenizer.pad_token_id is not None
            else self.tokenizer.eos_token_id
        )
        rows = [self.message_input(c, q, style)[0] for c, q in pairs]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):  # left padding: every row's next token is at the end
            ids[i, width - len(row) :] = row
            mask[i, width - len(row) :] = 1
        output = self.model.generate(
            input_ids=ids.to(self.model.device),
            attention_mask=mask.to(self.model.device),
            pad_token_id=pad,
            **self.note_settings(style, max_new_tokens).generate_kwargs(self.tokenizer, width),
        )
        texts = self.tokenizer.batch_decode(output[:, width:], skip_special_tokens=True)
        return [finish_note(text, style) for text in texts]

    def selected_text(self, context: SharerContext, question: str, positions=None) -> str:
        """forward-selected: the whole sentences of the context that hold the positions a span
        packet would carry (the adapter's selection head, this question, the same budget), in
        document order, as text. The channel LCF-X must beat once the selection is given to both."""
        if positions is None:
            positions = self.select(context, question=question)
        return selected_sentences(context.text, context.spans, positions)


class Receiver:
    """The receiver model plus the adapter's decoder half (None for TEXT / NONE modes)."""

    def __init__(self, model, tokenizer, decoder=None, config: AdapterConfig | None = None):
        self.model, self.tokenizer, self.decoder, self.config = model, tokenizer, decoder, config
        self.rope = RopeCodec(model)
        self._filler: DynamicCache | None = None
        self._heads: dict[tuple[int, ...], DynamicCache] = {}  # span packets: cached template heads

    def prepare_plain(self, prompt: str, contexts: list[str]) -> PreparedInput:
        """Receiver alone (NONE), skyline, or TEXT (the sharer's message is one of the contexts)."""
        rendered = render_input(self.tokenizer, prompt, contexts)
        start = time.perf_counter()
        cache = prefill(self.model, rendered.input_ids[:, :-1])
        return PreparedInput(
            rendered.input_ids, cache, rendered.input_ids.shape[1], {"receiver_prefill": _ms(start)}
        )

    def prefill_same_context(self, context: str, prompt: str) -> ContextPrefill:
        """LCF / C2C's first half: the receiver's cache of [context + prompt] (all but its last token)."""
        rendered = render_input(self.tokenizer, prompt, [context])
        start = time.perf_counter()
        cache = prefill(self.model, rendered.input_ids[:, :-1])
        return ContextPrefill(rendered, cache, _ms(start))

    def prepare_lcf(
        self, latents: Latents, context: str, prompt: str, prefilled: ContextPrefill | None = None
    ) -> PreparedInput:
        """Same context: prefill [context + prompt] (or take `prefilled`, made while the latents
        travelled), then fuse the latents onto the context tokens."""

        def fuse(cache, positions, alignment):
            aligned = {t: alignment.apply(z) for t, z in latents.layers.items()}
            self.decoder.fuse(cache, self.rope, aligned, positions, alignment.covered)

        return self._prepare_same_context(latents, context, prompt, fuse, prefilled)

    def prepare_c2c(
        self,
        latents: Latents,
        context: str,
        prompt: str,
        fuser=None,
        rope=None,
        prefilled: ContextPrefill | None = None,
    ) -> PreparedInput:
        """Same context, C2C: prefill [context + prompt] (or take `prefilled`), then fuse the
        sharer's KV (`latents`, as lcflow.adapter.c2c.C2CSender sends it) into the context tokens'
        cache.

        fuser: the C2CFuser (default: this receiver's decoder); rope: the sharer's RoPE, to
        re-rotate its keys at the receiver's positions (default: the one the adapter recorded)."""

        fuser = fuser if fuser is not None else self.decoder

        def fuse(cache, positions, alignment):
            kv = fuser.sharer_kv(latents.layers)
            aligned = aligned_sharer_kv(rope or fuser.sharer_rope(), kv, alignment, positions)
            fuser.fuse(cache, aligned, positions, alignment.covered)

        return self._prepare_same_context(latents, context, prompt, fuse, prefilled)

    def _prepare_same_context(
        self, latents: Latents, context: str, prompt: str, fuse, prefilled: ContextPrefill | None
    ) -> PreparedInput:
        """LCF and C2C: prefill [context + prompt] unless `prefilled`, align the sharer's tokens to
        the context's by character spans, then `fuse(cache, positions, alignment)` the sharer's
        side into the context tokens' cache (timed as decode_kv)."""
        prefilled = prefilled if prefilled is not None else self.prefill_same_context(context, prompt)
        rendered, cache = prefilled.rendered, prefilled.cache
        start = time.perf_counter()
        positions, spans = context_token_range(rendered, context)
        fuse(cache, positions, align_spans(latents.token_spans, spans))
        timings = {"receiver_prefill": prefilled.prefill_ms, "decode_kv": _ms(start)}
        return PreparedInput(rendered.input_ids, cache, rendered.input_ids.shape[1], timings)

    def prepare_lcfx(self, latents: Latents, prompt: str, receiver_context: str = "") -> PreparedInput:
        """Cross context: m decoded prefix entries, then the receiver's own context and prompt."""
        if self.config.packet in ("spans", "bridge"):
            return self.prepare_spans(latents, prompt, receiver_context)
        start = time.perf_counter()
        slots = self.config.slots
        if self._filler is None:  # the neutral base prefix is the same for every request
            self._filler = filler_prefix(self.model, filler_token_id(self.tokenizer), slots)
        cache = self.decoder.prefix_cache(self.model, self.rope, self._filler, latents.layers)
        decode_ms = _ms(start)
        rendered = render_input(self.tokenizer, prompt, [receiver_context])
        filler = torch.full((1, slots), filler_token_id(self.tokenizer), dtype=torch.long)
        input_ids = torch.cat([filler, rendered.input_ids], dim=1)
        start = time.perf_counter()
        # With gradients when training: the prompt's KV depends on the prefix it attends to.
        run_backbone(self.model, input_ids[:, slots:-1], cache)
        timings = {"decode_kv": decode_ms, "receiver_prefill": _ms(start)}
        return PreparedInput(input_ids, cache, rendered.input_ids.shape[1], timings)

    def prepare_spans(self, latents: Latents, prompt: str, receiver_context: str = "") -> PreparedInput:
        """Span (or bridge) packet: decoded entries where a document would sit
        (lcflow.packets.placement)."""
        start = time.perf_counter()
        layout = slot_layout(self.tokenizer, prompt, receiver_context)
        key = tuple(layout.head_ids[0].tolist())
        if key not in self._heads:  # the template's head is the same for every request
            self._heads[key] = prefill(self.model, layout.head_ids)
        if self.config.packet == "bridge":  # the receiver reads the soft tokens first
            keys, values = self.decoder.entries(self.model, self.tokenizer.bos_token_id, latents.layers)
        else:
            keys, values = self.decoder.entries(latents.layers)
        cache = slot_cache(self.model, self.rope, layout, keys, values, self._heads[key])
        decode_ms = _ms(start)
        start = time.perf_counter()
        input_ids = finish_input(self.model, self.tokenizer, layout, cache, keys[0].shape[2])
        timings = {"decode_kv": decode_ms, "receiver_prefill": _ms(start)}
        return PreparedInput(input_ids, cache, input_ids.shape[1] - keys[0].shape[2], timings)

    def prepare(
        self,
        mode: str,
        prompt: str,
        latents: Latents | None = None,
        context: str = "",
        receiver_context: str = "",
    ) -> PreparedInput:
        if mode == "lcf":
            return self.prepare_lcf(latents, context, prompt)
        if mode == "lcfx":
            return self.prepare_lcfx(latents, prompt, receiver_context)
        if mode == "c2c":
            return self.prepare_c2c(latents, context, prompt)
        if mode == "none":
            return self.prepare_plain(prompt, [receiver_context])
        raise ValueError(f"unknown mode {mode!r}; use one of {MODES} (text: prepare_plain with the message)")

    def generate(
        self,
        prepared: PreparedInput,
        settings: GenerationSettings | None = None,
        on_text: Callable[[str], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
        on_first_token: Callable[[], None] | None = None,
    ) -> str:
        restriction = prepared.attention_restriction or contextlib.nullcontext
        with restriction():
            return generate_text(
                self.model,
                self.tokenizer,
                prepared.input_ids,
                prepared.cache,
                settings,
                on_text,
                should_stop,
                on_first_token,
            )


def receiver_view(receiver_context: str, prompt: str) -> str:
    """What the receiver already has (its context and its question): the text LCF-X's digest reads."""
    return "\n\n".join(part for part in (receiver_context, prompt) if part)


def text_contexts(receiver_context: str, message: str) -> list[str]:
    """TEXT mode: the receiver reads its own context and the sharer's message."""
    return [receiver_context, MESSAGE_PREFIX + message]


def reader_contexts(forwarded: str, receiver_context: str) -> list[str]:
    """forward / forward-selected: the receiver reads the forwarded text where a document would
    sit, then its own context (the same for a text reader and for its training)."""
    return [text for text in (forwarded, receiver_context) if text]

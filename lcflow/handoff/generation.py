"""Generating the receiver's answer: the settings a request gives (greedy or sampled, stop
strings, a token budget), the stopping criteria they become, and generation with a callback
per new piece of text.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache, StoppingCriteria, StoppingCriteriaList, TextStreamer


@dataclass
class GenerationSettings:
    max_new_tokens: int = 32
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None

    def generate_kwargs(self, tokenizer, prompt_length: int, should_stop=None) -> dict:
        """`model.generate`'s arguments for these settings, for inputs of `prompt_length` tokens."""
        kwargs: dict = {"max_new_tokens": self.max_new_tokens, "do_sample": self.temperature > 0}
        if self.temperature > 0:
            kwargs.update(temperature=self.temperature, top_p=self.top_p)
        criteria = [_StopOnStrings(tokenizer, self.stop, prompt_length)] if self.stop else []
        criteria += [_StopWhen(should_stop)] if should_stop else []
        if criteria:
            kwargs["stopping_criteria"] = StoppingCriteriaList(criteria)
        return kwargs


class _StopWhen(StoppingCriteria):
    """Stops generation when `should_stop()` turns true (a cancelled or timed-out request)."""

    def __init__(self, should_stop: Callable[[], bool]):
        self.should_stop = should_stop

    def __call__(self, input_ids, scores, **kwargs) -> torch.BoolTensor:
        return torch.full(
            (input_ids.shape[0],), self.should_stop(), dtype=torch.bool, device=input_ids.device
        )


class _StopOnStrings(StoppingCriteria):
    """Stops each row once the text it generated, leading whitespace aside, contains one of `stops`
    (so a note that opens with a newline is not ended before it says anything).

    Why not transformers' own `stop_strings`: its criterion tabulates every vocabulary entry on
    each `generate` call, seconds for Gemma3's 262k tokens, more than a short note takes to write."""

    def __init__(self, tokenizer, stops: list[str], prompt_length: int):
        self.tokenizer, self.stops, self.prompt_length = tokenizer, list(stops), prompt_length

    def __call__(self, input_ids, scores, **kwargs) -> torch.BoolTensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_length :], skip_special_tokens=True)
        return torch.tensor(
            [any(stop in text.lstrip() for stop in self.stops) for text in texts],
            dtype=torch.bool,
            device=input_ids.device,
        )


class _CallbackStreamer(TextStreamer):
    """Hands each finalised piece of text to `on_text` (skipping the prompt), and calls
    `on_first_token` when the first answer token exists: text is only finalised at word
    boundaries, so that would time the first word, not the first token."""

    def __init__(self, tokenizer, on_text=None, on_first_token=None):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.on_text, self.on_first_token = on_text, on_first_token

    def put(self, value):
        if not self.next_tokens_are_prompt and self.on_first_token is not None:
            self.on_first_token()
            self.on_first_token = None
        super().put(value)

    def on_finalized_text(self, text: str, stream_end: bool = False):
        if text and self.on_text is not None:
            self.on_text(text)


@torch.no_grad()
def generate_text(
    model,
    tokenizer,
    input_ids: torch.Tensor,
    cache: DynamicCache | None,
    settings: GenerationSettings | None = None,
    on_text: Callable[[str], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    on_first_token: Callable[[], None] | None = None,
) -> str:
    """`model.generate` continuing from `cache` (which holds all but the uncached tail of input_ids).

    on_text receives the answer's text as it is produced; on_first_token is called once, when
    the first answer token is generated; should_stop is polled after every token."""
    settings = settings or GenerationSettings()
    if settings.seed is not None:
        torch.manual_seed(settings.seed)
    if cache is None:
        cache = DynamicCache(config=model.config)
    input_ids = input_ids.to(model.device)
    output = model.generate(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        past_key_values=cache,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        streamer=_CallbackStreamer(tokenizer, on_text, on_first_token) if on_text or on_first_token else None,
        **settings.generate_kwargs(tokenizer, input_ids.shape[1], should_stop),
    )
    return tokenizer.decode(output[0, input_ids.shape[1] :], skip_special_tokens=True)

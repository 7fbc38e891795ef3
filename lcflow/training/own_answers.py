"""Open prompts learn the receiver's own answer: what it says reading the document as text.

An open prompt ("Summarize what you know about Ada Brook.", lcflow.tasks.open_prompts) has no
gold answer. Trained on one-word answers alone, a packet takes the receiver over: asked to
describe someone, it answers one word or nothing. So before training, each open sample's answer
becomes the plain receiver's own greedy answer reading [sharer document, own document, prompt]
as text, the same input the distillation's teacher reads, up to the end of its first line:

    answer(open sample) = first line of generate(receiver, [sharer document, receiver document], prompt)

(A small base model goes on after its answer with more "Answer: ..." lines of its own making;
the first line is its answer, as lcflow.eval.metrics reads a short answer's first line.)

and CE and the KL then both ask the packet (or a text reader) to make the receiver say what it
would say reading the document: the receiver stays itself. Closed questions keep their gold
answer. The answers are written to OUT/own_answers.jsonl, and a resumed run reads them back
instead of generating them again.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from pathlib import Path

import torch
from tqdm import tqdm

from lcflow.handoff.generation import GenerationSettings
from lcflow.handoff.pair import Receiver, reader_contexts
from lcflow.tasks import OPEN_ANSWER_TOKENS, QASample, format_question_prompt

log = logging.getLogger(__name__)

OWN_ANSWERS = "own_answers.jsonl"
LEAD_IN = re.compile(r"^\s*(?:answer\s*:\s*)+", re.IGNORECASE)  # "Answer: Answer:" alone is no answer


@torch.no_grad()
def own_answer(receiver: Receiver, sample: QASample, max_new_tokens: int = OPEN_ANSWER_TOKENS) -> str:
    """The plain receiver's greedy answer to the sample's prompt, reading the sharer's document:
    its first non-empty line without an "Answer:" lead-in ("" if nothing is left)."""
    prompt = format_question_prompt(sample, include_context=False)
    contexts = reader_contexts(sample.sharer_context, sample.receiver_context)
    prepared = receiver.prepare_plain(prompt, contexts)
    settings = GenerationSettings(max_new_tokens=max_new_tokens, stop=["\n"])
    generated = receiver.generate(prepared, settings).lstrip()  # a leading newline opens no answer
    return LEAD_IN.sub("", generated.split("\n", 1)[0]).strip()


def with_own_answers(samples: list[QASample], receiver: Receiver, cache: Path) -> list[QASample]:
    """`samples` with every open sample's answers replaced by [the receiver's own answer]; an empty
    own answer keeps the sample's facts (rare: said in the log). Reads and extends `cache`."""
    known = {}
    if cache.is_file():
        records = [json.loads(line) for line in cache.read_text().splitlines() if line.strip()]
        known = {record["id"]: record["answer"] for record in records}
    todo = list({s.id: s for s in samples if s.open_ended and s.id not in known}.values())
    cache.parent.mkdir(parents=True, exist_ok=True)
    with cache.open("a", encoding="utf-8") as file:
        for sample in tqdm(todo, desc="own answers to open prompts", unit="sample", disable=not todo):
            known[sample.id] = own_answer(receiver, sample)
            file.write(json.dumps({"id": sample.id, "answer": known[sample.id]}) + "\n")
            file.flush()  # a stopped run keeps what it generated
    empty = sum(1 for s in samples if s.open_ended and not known[s.id])
    if empty:
        log.warning("%d open sample(s) got an empty own answer and keep their facts as the answer", empty)
    return [
        dataclasses.replace(s, answers=[known[s.id]]) if s.open_ended and known[s.id] else s for s in samples
    ]

"""The dataset interface every task shares: one question-answer sample and the Task protocol.

A sample holds two documents: the sharer's (whose KV cache is handed over) and the receiver's
own. In same-context tasks they are the same text; in cross-context tasks they differ and the
answer needs the sharer's document.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Protocol, runtime_checkable

SPLITS = ("train", "test")


@dataclass(frozen=True)
class QASample:
    id: str
    sharer_context: str  # what the sharer model sees: a short document of facts
    receiver_context: str  # the receiver's own document: the same text, a different one, or ""
    question: str
    answers: list[str]  # accepted answers, the first is canonical; short (1-3 words)
    task: str
    same_context: bool
    # An open prompt ("Summarize what you know about Ada Brook."): no one answer is right, and
    # `answers` lists the document's facts a good answer states (lcflow.eval.metrics.facts_stated).
    open_ended: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


@runtime_checkable
class Task(Protocol):
    name: str
    same_context: bool

    def samples(self, split: str, n: int, seed: int = 0) -> list[QASample]: ...


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")

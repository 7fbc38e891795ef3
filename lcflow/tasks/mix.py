"""A training mix of several tasks: each sample drawn from one of them, by weight.

    facts-mix-words = 1/2 facts-cross-words + 1/2 facts-twohop-words

An adapter trained on single-hop samples only learns "the answer is a word of the packet"; on
facts-twohop the answer sits in the receiver's own document and the packet carries only the
link, so it must learn to read both. Which part a sample comes from is decided by the sample's
own seeded RNG, so sample i is the same whatever n is, like every other task.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from lcflow.tasks.base import QASample, Task, check_split
from lcflow.tasks.facts import sample_rng


@dataclass(frozen=True)
class MixedTask:
    """Sample i comes from parts[j] with probability weights[j]; its id and task stay the part's."""

    name: str
    parts: tuple[Task, ...]
    weights: tuple[float, ...]
    same_context: ClassVar[bool] = False

    def __post_init__(self):
        if len(self.parts) != len(self.weights) or not self.parts:
            raise ValueError("a mix needs one weight per part, and at least one part")
        if any(w <= 0 for w in self.weights):
            raise ValueError("mix weights must be positive")
        if len({part.same_context for part in self.parts}) != 1:
            raise ValueError("a mix cannot combine same-context and cross-context tasks")

    def samples(self, split: str, n: int, seed: int = 0) -> list[QASample]:
        check_split(split)
        return [self.sample(split, index, seed) for index in range(n)]

    def sample(self, split: str, index: int, seed: int = 0) -> QASample:
        rng = sample_rng(self.name, split, seed, index)
        part = rng.choices(self.parts, weights=self.weights)[0]
        # The part draws its own sample at this index: its ids never collide across indices.
        return part.sample(split, index, seed)

"""Answer scoring: SQuAD-style exact match and token F1, answer extraction, confidence intervals.

normalize_answer, exact_match and token_f1 follow the official SQuAD v1.1/v2.0 evaluation
script (lower-case, drop punctuation and the articles a/an/the, collapse whitespace; F1 over
the bag of tokens; the best score over the accepted answers).
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Sequence
from statistics import NormalDist

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)

# Lead-ins small models put before the answer itself, stripped (case-insensitively, repeatedly)
# so exact match compares the answer and not the habit of the model.
_ANSWER_PREFIXES = re.compile(
    r"^\s*(?:(?:final\s+)?answer\s*[:\-]|a\s*:|the\s+answer\s+is\b:?|it\s+is\b:?|it's\b)\s*",
    re.IGNORECASE,
)
# The first sentence ends at . ! or ? followed by whitespace or the end of the text.
_SENTENCE_END = re.compile(r"[.!?](?=\s|$)")
_WRAPPING = " \t\"'`*_“”‘’"


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lower-case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    """1.0 if the normalised prediction equals any normalised accepted answer, else 0.0."""
    if isinstance(answers, str):
        answers = [answers]  # a bare string is one answer, not a list of characters
    target = normalize_answer(prediction)
    return float(any(target == normalize_answer(answer) for answer in answers))


def contains_answer(generated: str, answers: Sequence[str]) -> float:
    """1.0 if any normalised accepted answer appears, as whole words, in the first non-empty line
    of the generation ("Otto Thorne is a sculptor by profession" contains "sculptor", which EM
    calls wrong). Only the first line: a model that answers wrong, then starts another
    "Answer:" line with the right word, has not answered right."""
    if isinstance(answers, str):
        answers = [answers]
    line = next((ln for ln in generated.splitlines() if ln.strip()), "")
    text = f" {normalize_answer(line)} "
    return float(any(normalize_answer(a) and f" {normalize_answer(a)} " in text for a in answers))


def facts_stated(generated: str, facts: Sequence[str]) -> float:
    """The share of `facts` an open answer states: each normalised fact found, as whole words,
    anywhere in the normalised generation (every line: an open answer runs over sentences).
    "She lives in Oslo and plays the harp." states 2 of ["Oslo", "harp", "Finnish"]: 0.667."""
    if isinstance(facts, str):
        facts = [facts]
    if not facts:
        raise ValueError("facts_stated needs at least one fact")
    text = f" {normalize_answer(generated)} "
    return sum(bool(normalize_answer(f)) and f" {normalize_answer(f)} " in text for f in facts) / len(facts)


def _f1(prediction_tokens: list[str], answer_tokens: list[str]) -> float:
    if not prediction_tokens or not answer_tokens:
        # SQuAD v2: an empty answer scores 1 only against an empty prediction.
        return float(prediction_tokens == answer_tokens)
    common = sum((Counter(prediction_tokens) & Counter(answer_tokens)).values())
    if common == 0:
        return 0.0
    precision = common / len(prediction_tokens)
    recall = common / len(answer_tokens)
    return 2 * precision * recall / (precision + recall)


def token_f1(prediction: str, answers: Sequence[str]) -> float:
    """Token-overlap F1 between the normalised prediction and the best-matching accepted answer."""
    if isinstance(answers, str):
        answers = [answers]
    tokens = normalize_answer(prediction).split()
    return max((_f1(tokens, normalize_answer(answer).split()) for answer in answers), default=0.0)


def extract_answer(generated_text: str) -> str:
    """The answer part of a generation: its first non-empty line, up to the end of the first
    sentence, without lead-ins such as "Answer:" or "The answer is", and without wrapping
    quotes, markdown emphasis or trailing punctuation."""
    line = next((ln for ln in generated_text.splitlines() if ln.strip()), "")
    previous = None
    while previous != line:  # "Answer: The answer is Oslo" loses both lead-ins
        previous = line
        line = _ANSWER_PREFIXES.sub("", line, count=1).strip().strip(_WRAPPING)
    end = _SENTENCE_END.search(line)
    if end:
        line = line[: end.start()]
    return line.strip().strip(_WRAPPING).rstrip(".,;:!?").strip()


def mean_with_ci(
    values: Sequence[float], confidence: float = 0.95, bounds: tuple[float, float] | None = None
) -> tuple[float, float, float]:
    """The mean and a two-sided confidence interval (mean, low, high) by the normal approximation:
    mean +- z * s / sqrt(n), with s the sample standard deviation (n - 1). Bounds are NaN for a
    single value, where no spread can be estimated; bounds are clipped to `bounds` (the range the
    mean can take), by default the values' range.
    For 0/1 scores this is the Wald interval, which is too narrow when the mean is near 0 or 1
    on few samples (all-equal scores give a zero-width interval)."""
    if not values:
        raise ValueError("mean_with_ci needs at least one value")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    n = len(values)
    mean = math.fsum(values) / n
    if n == 1:
        return mean, math.nan, math.nan
    variance = math.fsum((v - mean) ** 2 for v in values) / (n - 1)
    half_width = NormalDist().inv_cdf(0.5 + confidence / 2) * math.sqrt(variance / n)
    # A mean cannot leave the range of its values (e.g. an accuracy cannot pass 1).
    low, high = bounds if bounds is not None else (min(values), max(values))
    return mean, float(max(mean - half_width, low)), float(min(mean + half_width, high))

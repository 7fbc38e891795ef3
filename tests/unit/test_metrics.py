"""Answer metrics against SQuAD-style examples, answer extraction, and the confidence interval."""

from __future__ import annotations

import math
import random

import pytest

from lcflow.eval.metrics import exact_match, extract_answer, mean_with_ci, normalize_answer, token_f1


def test_normalize_answer():
    assert normalize_answer("The  Eiffel-Tower!") == "eiffeltower"
    assert normalize_answer("  an Apple a day ") == "apple day"
    assert normalize_answer("theory") == "theory"  # articles only as whole words


def test_exact_match():
    assert exact_match("the Denver Broncos", ["Denver Broncos"]) == 1.0
    assert exact_match("Broncos", ["Denver Broncos"]) == 0.0
    assert exact_match("broncos.", ["Denver Broncos", "Broncos"]) == 1.0
    assert exact_match("Oslo", "Oslo") == 1.0  # a bare string is one answer
    assert exact_match("", ["Oslo"]) == 0.0


def test_token_f1():
    # SQuAD: prediction "Denver Broncos won" vs gold "Denver Broncos": P = 2/3, R = 1, F1 = 0.8.
    assert token_f1("Denver Broncos won", ["Denver Broncos"]) == pytest.approx(0.8)
    assert token_f1("the Broncos", ["Denver Broncos"]) == pytest.approx(2 * 1.0 * 0.5 / 1.5)
    assert token_f1("Carolina Panthers", ["Denver Broncos"]) == 0.0
    assert token_f1("Broncos", ["Carolina Panthers", "Denver Broncos"]) == pytest.approx(2 / 3)  # best answer
    assert token_f1("", ["Oslo"]) == 0.0
    assert token_f1("", [""]) == 1.0


@pytest.mark.parametrize(
    "generated, expected",
    [
        ("Oslo", "Oslo"),
        ("Answer: Oslo.", "Oslo"),
        ("  answer - oslo", "oslo"),
        ("A: the cello\nQuestion: next one?", "the cello"),
        ("\n\n**Oslo**\n", "Oslo"),
        ('"Lima"', "Lima"),
        ("The answer is Oslo. Ada moved there in 2019.", "Oslo"),
        ("Answer: The answer is: Lima!", "Lima"),
        ("Final answer: table tennis", "table tennis"),
        ("Oslo, Norway", "Oslo, Norway"),
        ("3.5 metres", "3.5 metres"),
        ("", ""),
    ],
)
def test_extract_answer(generated, expected):
    assert extract_answer(generated) == expected


def test_extract_then_score_is_fair_to_a_chatty_model():
    assert exact_match(extract_answer("Answer: Oslo.\nBecause the text says so."), ["Oslo"]) == 1.0


def test_mean_with_ci_normal_approximation():
    values = [1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 1.0, 0.0]
    mean, low, high = mean_with_ci(values)
    standard_error = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1) / len(values))
    assert mean == pytest.approx(0.625)
    assert high - mean == pytest.approx(1.959964 * standard_error, rel=1e-5)
    assert mean - low == pytest.approx(high - mean)
    narrower = mean_with_ci(values, confidence=0.5)
    assert low < narrower[1] < mean < narrower[2] < high


def test_mean_with_ci_covers_the_true_mean_about_95_percent_of_the_time():
    rng = random.Random(0)
    covered = 0
    for _ in range(400):
        draws = [rng.gauss(10.0, 2.0) for _ in range(50)]
        _, low, high = mean_with_ci(draws)
        covered += low <= 10.0 <= high
    assert 0.90 <= covered / 400 <= 0.99


def test_mean_with_ci_edges():
    assert mean_with_ci([1, 1, 1]) == (1.0, 1.0, 1.0)
    assert mean_with_ci([0, 1])[1:] == (0.0, 1.0)  # clipped to the range of the values
    mean, low, high = mean_with_ci([0.5])
    assert mean == 0.5 and math.isnan(low) and math.isnan(high)
    with pytest.raises(ValueError):
        mean_with_ci([])
    with pytest.raises(ValueError):
        mean_with_ci([1.0, 2.0], confidence=1.0)


def test_contains_answer_reads_whole_words_of_the_first_line_only():
    from lcflow.eval.metrics import contains_answer

    assert contains_answer("Otto Thorne is a sculptor by profession", ["sculptor"]) == 1.0
    assert contains_answer("The Sitar.", ["sitar"]) == 1.0
    assert contains_answer("sculptors", ["sculptor"]) == 0.0  # a whole word, not a substring
    assert contains_answer(" Goulash.\nAnswer: Falafel.", ["falafel"]) == 0.0  # the second guess
    assert contains_answer("\n\n New York", ["new york"]) == 1.0
    assert contains_answer("", ["x"]) == 0.0


def test_facts_stated_counts_each_fact_once_anywhere_in_an_open_answer():
    from lcflow.eval.metrics import facts_stated

    answer = "Ada Brook lives in Oslo.\nShe plays the harp, and the harp is old."
    assert facts_stated(answer, ["Oslo", "harp", "Finnish"]) == pytest.approx(2 / 3)
    assert facts_stated(answer, ["harps"]) == 0.0  # whole words
    assert facts_stated("", ["Oslo"]) == 0.0
    assert facts_stated("New York, and nothing else", ["new york"]) == 1.0
    with pytest.raises(ValueError, match="at least one fact"):
        facts_stated(answer, [])

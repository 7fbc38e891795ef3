"""`--codec auto`: zstd only where the link is slow enough for compressing to save time
(lcflow.transport.link), from a configured rate or the rate measured on recent handoffs."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import CONTEXT, PROMPT
from helpers import make_adapter_dir as services_adapter_dir
from service_helpers import Pair, trace_spans

from lcflow.serving.config import ServiceConfig
from lcflow.transport.link import EXPLORE_EVERY, PRIORS, PROBES, WINDOW, Compression, LinkMeter

MB = 1_000_000


def test_zstd_pays_below_the_rate_where_its_cpu_time_equals_the_time_it_saves():
    # S/C + S/(rR) + S/D < S/R  <=>  R < (1 - 1/r) / (1/C + 1/D)
    assert Compression(900 * MB, 1800 * MB, 1.5).pays_below() == pytest.approx(200 * MB)
    assert Compression(900 * MB, 1800 * MB, 1.0).pays_below() == 0.0  # nothing saved: never pays
    assert Compression(900 * MB, 1800 * MB, 0.9).pays_below() == 0.0


@pytest.mark.parametrize(
    "mbit, scheme, expected",
    [
        (100, "none", "zstd"),  # bf16 latents compress 1.5x: worth it on slow links...
        (1000, "none", "zstd"),
        (10_000, "none", "none"),  # ...not on 10 Gbit/s
        (100, "int8", "zstd"),
        (1000, "int8", "none"),  # int8 codes barely compress (1.07x)
        (1000, "int4", "none"),
        (100, "int4", "zstd"),
    ],
)
def test_a_configured_link_rate_decides_by_the_rule(mbit, scheme, expected):
    choice = LinkMeter(link_mbit=mbit).choose(scheme)
    assert choice.name == expected
    assert "configured" in choice.reason and scheme in choice.reason


def test_an_unmeasured_link_tries_both_codecs_then_keeps_the_cheaper():
    meter = LinkMeter()
    first = meter.choose("int4")
    assert first.name == "zstd" and "first" in first.reason
    meter.record("int4", "zstd", 10 * MB, 50.0)  # 5 ms per MB
    for probe in range(PROBES):  # alternating until each codec is measured PROBES times
        choice = meter.choose("int4")
        assert choice.name == "none" and f"{probe + 1} of {PROBES}" in choice.reason
        meter.record("int4", "none", 10 * MB, 30.0)  # 3 ms per MB: none is cheaper here
        if probe + 1 < PROBES:
            assert meter.choose("int4").name == "zstd"
            meter.record("int4", "zstd", 10 * MB, 50.0)
    picks = [meter.choose("int4").name for _ in range(EXPLORE_EVERY)]
    assert picks.count("none") == EXPLORE_EVERY - 1 and picks[-1] == "zstd"  # one turn re-tries zstd
    assert meter.choose("none").name == "zstd"  # each scheme is measured on its own...
    assert meter.choose("int4", payload="lcf").name == "zstd"  # ...and each payload (mode)
    assert "first lcf handoff: int4/zstd" in meter.choose("int4", payload="lcf").reason


def measured(zstd_ms: list[float], none_ms: list[float]) -> LinkMeter:
    """A meter that has seen these handoffs (10 MB each) of "none" payloads."""
    meter = LinkMeter()
    for codec, times in (("zstd", zstd_ms), ("none", none_ms)):
        for ms in times:
            meter.record("none", codec, 10 * MB, ms)
    return meter


def probe_all(meter: LinkMeter, schemes: tuple[str, ...], ms_per_mb: dict[tuple[str, str], float]) -> list:
    """Answer the meter's probes with these costs (ms per raw MB) until it has measured every arm;
    returns the arms it probed, in order."""
    probed = []
    while len(probed) < 2 * PROBES * len(schemes):
        choice = meter.choose(schemes)
        arm = (choice.quantization, choice.name)
        probed.append(arm)
        meter.record(*arm, 10 * MB, 10 * ms_per_mb[arm])
    return probed


def test_auto_also_picks_the_quantization_among_those_offered():
    """Offered bf16 and int8 (an LCF-X card's accurate codecs), the meter probes every arm, fewest
    bytes first, then sends with the cheapest: here bf16 without zstd (a fast link, where
    quantizing costs more than the bytes it saves)."""
    meter, schemes = LinkMeter(), ("none", "int8")
    ms_per_mb = {("int8", "zstd"): 3.0, ("int8", "none"): 2.0, ("none", "zstd"): 4.0, ("none", "none"): 1.0}
    probed = probe_all(meter, schemes, ms_per_mb)
    assert probed[:4] == [("int8", "zstd"), ("int8", "none"), ("none", "zstd"), ("none", "none")]
    assert sorted(probed) == sorted(list(ms_per_mb) * PROBES)
    choice = meter.choose(schemes)
    assert (choice.quantization, choice.name) == ("none", "none")
    assert "none/none is cheapest" in choice.reason and "int8/none 2.0" in choice.reason
    # a slow link: the bytes dominate, and the smallest scheme with zstd wins
    slow = {("int8", "zstd"): 20.0, ("int8", "none"): 22.0, ("none", "zstd"): 30.0, ("none", "none"): 44.0}
    meter = LinkMeter()
    probe_all(meter, schemes, slow)
    choice = meter.choose(schemes)
    assert (choice.quantization, choice.name) == ("int8", "zstd")


def test_re_measuring_favours_the_near_ties():
    """Once measured, one handoff in EXPLORE_EVERY re-tries another arm, the longest untried for its
    cost: over many handoffs an arm at 1.1x the best's cost is re-tried more often than one at 8x,
    every arm is re-tried, and the best is sent the rest of the time."""
    meter, schemes = LinkMeter(), ("none", "int8", "int4")
    ms_per_mb = {
        ("int4", "zstd"): 1.1,
        ("int4", "none"): 1.0,
        ("int8", "zstd"): 2.0,
        ("int8", "none"): 1.5,
        ("none", "zstd"): 8.0,
        ("none", "none"): 4.0,
    }
    probe_all(meter, schemes, ms_per_mb)
    sent = []
    for _ in range(EXPLORE_EVERY * 60):
        choice = meter.choose(schemes)
        sent.append((choice.quantization, choice.name))
    assert sent.count(("int4", "none")) == len(sent) - 60  # the best, but on the exploring turns
    assert set(sent) == set(ms_per_mb)
    assert sent.count(("int4", "zstd")) > sent.count(("int8", "none")) > sent.count(("none", "zstd"))


def test_a_configured_link_sends_the_smallest_quantization_offered():
    choice = LinkMeter(link_mbit=100).choose(("none", "int8", "int4"))
    assert choice.quantization == "int4" and choice.name == "zstd" and "configured" in choice.reason


def test_one_slow_handoff_does_not_flip_the_choice():
    """Interference only adds time, so a codec costs the least of its recent handoffs: one
    handoff slowed by something else running (300 ms) leaves none the cheaper."""
    meter = measured(zstd_ms=[50.0, 50.0], none_ms=[30.0, 300.0])
    assert meter.cost("none", "none") == 3.0
    choice = meter.choose("none")
    assert choice.name == "none" and "none/none is cheapest" in choice.reason


def test_the_choice_follows_a_link_that_got_slow():
    meter = measured(zstd_ms=[50.0] * PROBES, none_ms=[30.0] * PROBES)
    assert meter.choose("none").name == "none"
    for _ in range(WINDOW):  # the link got slow: every handoff sent without zstd now takes longer
        meter.record("none", "none", 10 * MB, 800.0)
    choice = meter.choose("none")
    assert choice.name == "zstd" and "none/zstd is cheapest" in choice.reason


def test_measured_compression_replaces_the_prior():
    meter = LinkMeter(link_mbit=100)
    assert meter.choose("int4").name == "zstd"
    for _ in range(8):  # this payload does not compress at all: zstd never pays
        meter.record_compression("int4", 4 * MB, 4 * MB, 5.0)
    assert meter.compression[("", "int4")].ratio == pytest.approx(1.0, abs=0.01)
    assert meter.choose("int4").name == "none"
    assert ("", "none") not in meter.compression  # other schemes keep their priors
    assert "ratio 1.50" in meter.choose("none").reason and PRIORS["none"].ratio == 1.50


def test_bad_codec_settings_are_refused():
    with pytest.raises(ValueError, match="--codec must be one of"):
        ServiceConfig("sharer", codec="gzip")
    with pytest.raises(ValueError, match="--link-mbit"):
        ServiceConfig("sharer", link_mbit=-1)
    assert ServiceConfig("sharer", quantize="int4-hadamard-g32").quantize == "int4-hadamard-g32"
    for bad in ("int5", "int8-g32", "card-g32"):  # int8 keeps one scale a row; card names its own
        with pytest.raises(ValueError, match="--quantize must be one of .*int4-hadamard-g32"):
            ServiceConfig("sharer", quantize=bad)


def test_a_grouped_int4_starts_from_int4s_prior():
    """int4-g32 sends the nibbles int4 does (and more scales): zstd is judged by int4's prior."""
    meter = LinkMeter(link_mbit=100)
    assert "ratio 1.16" in meter.choose("int4-g32").reason and PRIORS["int4"].ratio == 1.16


@pytest.mark.parametrize(
    "options, codecs, why",
    [
        ({"link_mbit": 100}, ["none/zstd"], "configured"),
        ({"link_mbit": 100_000}, ["none/none"], "configured"),
        ({"codec": "zstd", "link_mbit": 100_000}, ["none/zstd"], "--codec zstd"),
        ({}, ["none/zstd", "none/none"], "measur"),  # unmeasured: zstd first, then none
    ],
)
def test_the_summary_and_the_trace_say_which_codec_ran_and_why(
    tiny_pair, tmp_path_factory, spans_exporter, options, codecs, why
):
    running = Pair(
        tiny_pair,
        services_adapter_dir(tiny_pair, tmp_path_factory, "lcfx"),
        "lcfx",
        spans_exporter,
        **options,
    )
    try:
        results = [
            running.client.handoff(PROMPT, mode="lcfx", context=CONTEXT, max_new_tokens=2) for _ in codecs
        ]
    finally:
        running.stop()
    assert [result.summary.codec for result in results] == codecs
    summary = results[-1].summary
    assert why in summary.codec_reason and "model card" in summary.codec_reason
    span = trace_spans(spans_exporter, summary.trace_id)[("lcflow-sharer", "sharer.stream")]
    assert span.attributes["lcflow.codec"] == codecs[-1].split("/")[1]
    assert span.attributes["lcflow.codec_reason"] == summary.codec_reason
    if not options:  # both handoffs were measured
        assert set(running.sharer_service.link.costs) == {("lcfx", "none", "zstd"), ("lcfx", "none", "none")}


def test_every_quantization_has_a_zstd_prior():
    """--link-mbit decides from PRIORS before any handoff: a scheme without one would fall back
    to bf16's ratio (1.5), far above what quantized codes compress by."""
    from lcflow.core.names import QUANTIZATIONS

    assert set(QUANTIZATIONS) <= set(PRIORS)


def card_dir(tmp_path, card: object) -> Path:
    import json

    (tmp_path / "model_card.json").write_text(json.dumps(card))
    return tmp_path


@pytest.mark.parametrize(
    "card, allowed",
    [
        (
            {"codec": {"default": "int4", "em": {"none": 0.865, "int8": 0.865, "int4": 0.865}}},
            ("none", "int8", "int4"),
        ),
        ({"codec": {"default": "int8", "em": {"none": 0.82, "int8": 0.81, "int4": 0.62}}}, ("none", "int8")),
        # int8 measured 2 points down: not offered, though smaller codecs are
        ({"codec": {"default": "int4", "em": {"none": 0.82, "int8": 0.80, "int4": 0.815}}}, ("none", "int4")),
        # int4-hadamard has int4's bytes and a rotation more: never offered beside int4
        (
            {
                "codec": {
                    "default": "int4",
                    "em": {"none": 0.565, "int8": 0.565, "int4-hadamard": 0.57, "int4": 0.565},
                }
            },
            ("none", "int8", "int4"),
        ),
        # a group named (a narrowed packet's rows of 224): int4-g32 has more scales than int4's 64
        (
            {
                "codec": {
                    "default": "int4-hadamard-g32",
                    "em": {"none": 0.80, "int8": 0.80, "int4-hadamard-g32": 0.795, "int4-g32": 0.70},
                }
            },
            ("none", "int8", "int4-hadamard-g32"),
        ),
        ({"codec": {"default": "int8-g32"}}, ("none",)),  # int8 has no groups: unknown, bf16
        ({"codec": {"default": "int8"}}, ("int8",)),  # no EMs to judge others by: the choice alone
        ({"codec": {"default": "int2"}}, ("none",)),  # an unknown choice: bf16, never lossy
        ({"results": {}}, ("none",)),
        ("not an object", ("none",)),
    ],
)
def test_a_card_offers_bf16_and_the_codecs_it_measured_within_one_point(tmp_path, card, allowed):
    from lcflow.serving.inspection import card_codecs

    assert card_codecs(card_dir(tmp_path, card)) == allowed


def test_a_card_offers_only_codecs_that_can_carry_the_adapters_rows_and_one_name_for_each(tmp_path):
    """Rows of 224 numbers: int4 in groups of 64 cannot carry them, so a card that measured it does
    not offer it (bf16 stays); "int4-g64" is "int4", so the two never stand as two codecs."""
    from lcflow.serving.inspection import card_codecs

    card = {
        "codec": {"default": "int4", "em": {"none": 0.8, "int8": 0.8, "int4-hadamard-g32": 0.8, "int4": 0.8}}
    }
    assert card_codecs(card_dir(tmp_path, card)) == ("none", "int8", "int4-hadamard-g32", "int4")
    assert card_codecs(tmp_path, width=224) == ("none", "int8", "int4-hadamard-g32")
    card = {"codec": {"default": "int4-g64", "em": {"none": 0.8, "int4-g64": 0.8, "int4": 0.8}}}
    assert card_codecs(card_dir(tmp_path, card)) == ("none", "int4")


def test_quantize_names_one_codec_one_way():
    assert ServiceConfig("sharer", quantize="int4-g64").quantize == "int4"
    with pytest.raises(ValueError, match="--quantize must be one of"):
        ServiceConfig("sharer", quantize="int4-g4294967296")  # no group a header field can hold


def test_a_missing_card_offers_bf16_alone(tmp_path):
    from lcflow.serving.inspection import card_codecs

    assert card_codecs(tmp_path) == ("none",)


def test_auto_through_the_services_probes_each_codec_the_card_allows(
    tiny_pair, tmp_path, tmp_path_factory, spans_exporter
):
    """A card allowing bf16 and int8: the sharer's first handoffs go round int8/zstd, int8/none,
    bf16/zstd, bf16/none (fewest bytes first), and the receiver reads each; the meter then holds a
    cost for each of the four."""
    import shutil

    directory = tmp_path / "carded"
    shutil.copytree(services_adapter_dir(tiny_pair, tmp_path_factory, "lcfx"), directory)
    card_dir(directory, {"codec": {"default": "int8", "em": {"none": 0.82, "int8": 0.81, "int4": 0.5}}})
    running = Pair(tiny_pair, directory, "lcfx", spans_exporter)
    try:
        results = [
            running.client.handoff(PROMPT, mode="lcfx", context=CONTEXT, max_new_tokens=2) for _ in range(4)
        ]
    finally:
        running.stop()
    assert [result.summary.codec for result in results] == [
        "int8/zstd",
        "int8/none",
        "none/zstd",
        "none/none",
    ]
    assert "none, int8 allowed by the model card" in results[0].summary.codec_reason
    assert set(running.sharer_service.link.costs) == {
        ("lcfx", q, c) for q in ("none", "int8") for c in ("zstd", "none")
    }

"""`lcflow bench transport` end to end with tiny payloads: every stage measured, JSON complete."""

from __future__ import annotations

import json

import pytest

from lcflow.bench.transport import STAGES
from lcflow.cli import main


def test_bench_transport_writes_every_stage(tmp_path, capsys):
    out = tmp_path / "transport.json"
    args = ["bench", "transport", "--tokens", "8", "--dtype", "bfloat16", "float16", "--layers", "2"]
    args += ["--quantize", "none", "int4"]
    assert main([*args, "--width", "16", "--lcfx-slots", "4", "--repeats", "1", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["machine"]["cpu_count"] >= 1 and report["machine"]["platform"]
    cases = {(r["mode"], r["tokens"], r["dtype"], r["quantize"]) for r in report["results"]}
    assert cases == {
        (m, t, d, q)
        for m, t in (("lcf", 8), ("lcfx", 4))
        for d in ("bfloat16", "float16")
        for q in ("none", "int4")
    }
    for result in report["results"]:
        assert set(result["stages"]) == set(STAGES)
        for stage in result["stages"].values():
            assert stage["ms"] > 0 and stage["mb_s"] > 0
        # 2 layers x [1, T, 16] latents, plus int32 [T, 2] token spans for LCF
        expected = 2 * result["tokens"] * 16 * 2 + (
            result["tokens"] * 2 * 4 if result["mode"] == "lcf" else 0
        )
        assert result["raw_bytes"] == expected and result["wire_bytes"] > 0
        assert result["transport_overhead_ms"] > 0 and result["transport_vs_raw_grpc"] > 0
    assert "end-to-end" in capsys.readouterr().out


LINK_FIELDS = {
    "mode", "tokens", "codec", "default", "link", "raw_bf16_bytes", "wire_bytes",
    "end_to_end_ms", "link_limit_ms", "raw_loopback_ms",
}  # fmt: skip


def test_link_records_over_loopback_and_an_emulated_link(tmp_path, capsys):
    """--link: loopback and a 100 Mbit/s veth link to a namespace (tc tbf). The shaped link must
    really limit: ~1 MB of bf16 latents cannot arrive sooner than the rate allows."""
    from lcflow.bench.netns import why_rate_limit_unavailable

    records_path = tmp_path / "links.json"
    args = [
        "bench",
        "transport",
        "--tokens",
        "2048",
        "--dtype",
        "bfloat16",
        "--layers",
        "2",
        "--width",
        "128",
    ]
    args += [
        "--lcfx-slots",
        "0",
        "--repeats",
        "1",
        "--link",
        "loopback,100mbit",
        "--link-codecs",
        "none,zstd,auto",
    ]
    assert main([*args, "--json", str(records_path)]) == 0
    records = json.loads(records_path.read_text())
    why = why_rate_limit_unavailable()
    links = ["loopback"] if why else ["loopback", "100mbit"]
    assert [(r["link"], r["codec_setting"]) for r in records] == [
        (link, setting) for link in links for setting in ("none", "zstd", "auto")
    ]
    for record in records:
        assert LINK_FIELDS <= set(record) and record["mode"] == "lcf" and record["tokens"] == 2048
        assert record["raw_bf16_bytes"] == 2 * 2048 * 128 * 2 + 2048 * 2 * 4  # latents + int32 spans
        assert record["wire_bytes"] > 0 and record["end_to_end_ms"] > 0 and record["raw_loopback_ms"] > 0
        assert record["codec"] in ("zstd", "none") and record["codec_reason"]
    for auto in records[2::3]:  # compared with the better of the two fixed codecs, same link
        assert auto["codec_setting"] == "auto" and auto["auto_vs_best_fixed"] > 0
        assert auto["offered"] == ["none"] and auto["quantization"] == "none"  # --quantize none alone
        assert not auto["default"]  # the cards' default path is offered int8 and int4 as well
    if why:
        assert "skipping the emulated links 100mbit" in capsys.readouterr().out
        return
    shaped = records[3]  # none over 100 Mbit/s
    at_line_rate_ms = shaped["wire_bytes"] * 8 / 100e6 * 1000
    assert shaped["link_limit_ms"] >= at_line_rate_ms
    assert shaped["end_to_end_ms"] >= 0.8 * at_line_rate_ms  # the bucket's 50 kB burst is ~5% of it
    # bf16 latents compress 1.5x: on 100 Mbit/s the handoffs measured say zstd pays
    assert records[5]["codec"] == "zstd" and "none/zstd is cheapest" in records[5]["codec_reason"]


def test_an_unknown_link_codec_is_refused_in_one_line(capsys):
    assert main(["bench", "transport", "--link-codecs", "zstd,gzip"]) == 2
    assert "--link-codecs: use some of auto, zstd, none" in capsys.readouterr().err


def test_a_link_rate_that_is_not_one_is_refused_in_one_line(capsys):
    assert main(["bench", "transport", "--link", "loopback,fast"]) == 2
    assert "is not a tc rate" in capsys.readouterr().err


def test_the_bench_offers_auto_what_the_shipped_cards_allow():
    """CARD_CODECS mirrors the shipped adapters' cards (the bench has random payloads, no
    adapter): this fails when a card's codecs change and the bench does not."""
    from pathlib import Path

    from lcflow.bench.transport import CARD_CODECS
    from lcflow.serving.inspection import card_codecs

    adapters = Path(__file__).resolve().parents[2] / "adapters"
    shipped = {"lcf": "smollm2-to-gemma3-lcf", "lcfx": "gemma3-to-gemma3-lcfx"}
    assert {mode: card_codecs(adapters / name) for mode, name in shipped.items()} == CARD_CODECS


def test_auto_is_offered_the_cards_codecs_that_the_run_quantizes_with():
    from lcflow.bench.transport import offered_schemes

    assert offered_schemes("lcf", ["none", "int8", "int4"]) == ("none", "int8", "int4")
    assert offered_schemes("lcf", ["none", "int4", "int4-hadamard"]) == ("none", "int4")
    assert offered_schemes("lcfx", ["none", "int8", "int4"]) == ("none", "int8")
    assert offered_schemes("lcfx", ["int4-hadamard"]) == ("int4-hadamard",)  # none of the card's


def test_the_default_path_record_is_auto_offered_every_codec_the_card_allows(tmp_path):
    """With --quantize covering the LCF card's codecs, the auto record is the services' default
    path: offered bf16, int8 and int4, it sends one of them and is compared with the best fixed
    codec among the three."""
    records_path = tmp_path / "links.json"
    args = ["bench", "transport", "--tokens", "64", "--dtype", "bfloat16", "--layers", "2", "--width", "128"]
    args += ["--lcfx-slots", "0", "--repeats", "1", "--quantize", "none", "int8", "int4"]
    assert main([*args, "--link", "loopback", "--steady", "40", "--json", str(records_path)]) == 0
    records = json.loads(records_path.read_text())
    assert [(r["quantization"], r["codec_setting"]) for r in records[:-1]] == [
        (q, s) for q in ("none", "int8", "int4") for s in ("zstd", "none")
    ]
    auto = records[-1]
    assert auto["codec_setting"] == "auto" and auto["default"] and auto["offered"] == ["none", "int8", "int4"]
    assert auto["quantization"] in auto["offered"] and auto["auto_vs_best_fixed"] > 0
    assert f"{auto['quantization']}/{auto['codec']} is cheapest" in auto["codec_reason"]
    assert not any(r["default"] for r in records[:-1])
    # steady state: 40 more handoffs as a sharer sends them, the 32nd re-measuring another codec,
    # each paired with one of the best fixed codec's
    steady = auto["steady"]
    assert steady["handoffs"] == 40 and sum(steady["sent"].values()) == 40 and len(steady["sent"]) >= 2
    assert set(steady["sent"]) <= {f"{q}/{c}" for q in auto["offered"] for c in ("zstd", "none")}
    # the fastest fixed codec; the records are rounded to a microsecond, so two can tie there
    fixed_ms = {f"{r['quantization']}/{r['codec']}": r["end_to_end_ms"] for r in records[:-1]}
    assert fixed_ms[steady["best_fixed"]] <= min(fixed_ms.values()) + 0.001
    assert steady["auto_mean_ms"] > 0 and steady["best_fixed_mean_ms"] > 0
    ratio = steady["auto_mean_ms"] / steady["best_fixed_mean_ms"]
    assert steady["auto_vs_best_fixed"] == pytest.approx(ratio, abs=0.002)


@pytest.mark.parametrize("device, why", [("gpu", "is not a device"), ("cuda:7", "no such CUDA device")])
def test_a_device_the_machine_lacks_is_refused_in_one_line(capsys, device, why):
    import torch

    if device.startswith("cuda") and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    assert main(["bench", "transport", "--device", device]) == 2
    assert why in capsys.readouterr().err


def test_the_report_names_the_device(tmp_path):
    out = tmp_path / "transport.json"
    args = ["bench", "transport", "--tokens", "8", "--dtype", "bfloat16", "--layers", "2", "--width", "16"]
    assert main([*args, "--lcfx-slots", "0", "--repeats", "1", "--device", "cpu", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["machine"]["device"] == "cpu" and report["config"]["device"] == "cpu"

"""Quantized latents end to end: through both services, with the codec each adapter's card chose,
moving the receiver's first-token logits little; and the eval's wire forms."""

from __future__ import annotations

import pytest
import torch
from helpers import (
    CONTEXT,
    PROMPT,
    RECEIVER_CONTEXT,
    in_process_answer,
    in_process_prepared,
)
from helpers import bf16 as bf16_on_the_wire
from helpers import make_adapter_dir as services_adapter_dir
from service_helpers import Pair, trace_spans

from lcflow.transport import (
    TensorSpec,
)
from lcflow.transport.quantize import DEFAULT_INT4_GROUP, Quantization

# ---------------------------------------------------------------------------------------------- handoffs


def through_the_wire(scheme: str):
    """A latent as the receiver gets it back: bf16, quantized, dequantized, as float32."""
    q = Quantization.named(scheme)

    def on_the_wire(latent: torch.Tensor) -> torch.Tensor:
        sent = latent.to(torch.bfloat16)
        return q.dequantize(*q.quantize(sent), TensorSpec.of(sent), "cpu").float()

    return on_the_wire


def first_token_logits(receiver, prepared) -> torch.Tensor:
    with torch.inference_mode():
        cached = prepared.cache.get_seq_length()
        out = receiver.model(prepared.input_ids[:, cached:], past_key_values=prepared.cache)
    return out.logits[0, -1].float()


@pytest.fixture(scope="module")
def adapter_dirs(tiny_pair, tmp_path_factory):
    return {mode: services_adapter_dir(tiny_pair, tmp_path_factory, mode) for mode in ("lcf", "lcfx")}


@pytest.mark.parametrize("scheme", ["int8", "int4", "int4-hadamard"])
@pytest.mark.parametrize("mode", ["lcf", "lcfx"])
def test_quantized_handoff_through_both_services(tiny_pair, adapter_dirs, spans_exporter, mode, scheme):
    """The sharer quantizes (--quantize), the receiver dequantizes: the answer is the in-process
    answer with the same quantization applied, i.e. the services change nothing else; both
    services' spans say which quantization ran (the receiver's: as the header declared it)."""
    running = Pair(tiny_pair, adapter_dirs[mode], mode, spans_exporter, quantize=scheme)
    try:
        result = running.client.handoff(
            PROMPT, mode=mode, context=CONTEXT, receiver_context=RECEIVER_CONTEXT, max_new_tokens=6
        )
    finally:
        running.stop()
    expected = in_process_answer(tiny_pair, adapter_dirs[mode], mode, 6, through_the_wire(scheme))
    assert result.answer == expected
    spans = trace_spans(spans_exporter, result.summary.trace_id)
    assert spans[("lcflow-sharer", "sharer.stream")].attributes["lcflow.quantization"] == scheme
    assert spans[("lcflow-receiver", "receiver.unpack")].attributes["lcflow.quantization"] == scheme


def test_rows_the_int4_group_cannot_carry_are_refused_before_sending_and_a_named_group_carries_them(
    tiny_pair, tmp_path_factory, spans_exporter, caplog
):
    """A packet of 96-number rows (a narrowed adapter's b): --quantize int4 (groups of 64) is
    FAILED_PRECONDITION naming the group that fits, not an INTERNAL error mid-stream, and the
    sharer warns at start; with that group (int4-hadamard-g32) the answer is the in-process one
    through the same codec, and no warning."""
    import logging

    import grpc

    directory = services_adapter_dir(tiny_pair, tmp_path_factory, "lcfx", bottleneck=96)
    answers = {}
    warned = {}
    for quantize in ("int4", "int4-hadamard-g32"):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="lcflow.serving.sharer"):
            running = Pair(tiny_pair, directory, "lcfx", spans_exporter, quantize=quantize)
        warned[quantize] = [r.getMessage() for r in caplog.records if "cannot carry" in r.getMessage()]
        try:
            answers[quantize] = running.client.handoff(
                PROMPT, mode="lcfx", context=CONTEXT, receiver_context=RECEIVER_CONTEXT, max_new_tokens=6
            ).answer
        except grpc.RpcError as err:
            answers[quantize] = err
        finally:
            running.stop()
    assert len(warned["int4"]) == 1 and "--quantize int4-g32 or card" in warned["int4"][0]
    assert warned["int4-hadamard-g32"] == []
    refused = answers["int4"]
    assert isinstance(refused, grpc.RpcError) and refused.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "rows of 96 numbers" in refused.details() and "--quantize int4-g32" in refused.details()
    expected = in_process_answer(tiny_pair, directory, "lcfx", 6, through_the_wire("int4-hadamard-g32"))
    assert answers["int4-hadamard-g32"] == expected
    sent = [span for span in spans_exporter.get_finished_spans() if span.name == "receiver.unpack"]
    assert sent[-1].attributes["lcflow.quantization"] == "int4-hadamard-g32"  # the trace names the group


@pytest.mark.parametrize("quantize, sent", [("card", "int8"), ("none", "none"), ("int4", "int4")])
def test_by_default_each_adapter_goes_with_the_codec_its_card_chose(
    tiny_pair, tmp_path, tmp_path_factory, spans_exporter, quantize, sent
):
    """--quantize card (the default) sends an adapter's latents with the codec its model card
    chose (model_card.json "codec"); a fixed --quantize overrides every card."""
    import json
    import shutil

    directory = tmp_path / "carded"
    shutil.copytree(services_adapter_dir(tiny_pair, tmp_path_factory, "lcfx"), directory)
    (directory / "model_card.json").write_text(json.dumps({"codec": {"default": "int8"}}))
    options = {} if quantize == "card" else {"quantize": quantize}
    running = Pair(tiny_pair, directory, "lcfx", spans_exporter, **options)
    try:
        assert running.sharer_service.config.quantize == quantize
        result = running.client.handoff(PROMPT, mode="lcfx", context=CONTEXT, max_new_tokens=2)
    finally:
        running.stop()
    spans = trace_spans(spans_exporter, result.summary.trace_id)
    assert spans[("lcflow-sharer", "sharer.stream")].attributes["lcflow.quantization"] == sent
    assert spans[("lcflow-receiver", "receiver.unpack")].attributes["lcflow.quantization"] == sent


def test_the_card_chooses_the_smallest_codec_within_one_point():
    from lcflow.adapter.card import choose_codec

    assert choose_codec({"none": 0.865, "int8": 0.865, "int4": 0.865}) == "int4"
    assert choose_codec({"none": 0.82, "int8": 0.81, "int4": 0.62}) == "int8"  # exactly 1 point
    assert choose_codec({"none": 0.82, "int8": 0.80, "int4": 0.81}) == "int4"  # by EM, not by order
    assert choose_codec({"none": 0.82, "int8": 0.79}) == "none"
    # as small as int4: chosen over int8 when within the point, and int4 wins a tie with it
    assert choose_codec({"none": 0.82, "int8": 0.81, "int4-hadamard": 0.815, "int4": 0.62}) == "int4-hadamard"
    assert choose_codec({"none": 0.865, "int4-hadamard": 0.865, "int4": 0.865}) == "int4"
    # a named group: more scales than the default's, so g64 is the smaller where both are accurate
    assert choose_codec({"none": 0.82, "int4-g32": 0.82, "int4": 0.82}) == "int4"
    assert choose_codec({"none": 0.82, "int8": 0.82, "int4-hadamard-g32": 0.815, "int4-g32": 0.7}) == (
        "int4-hadamard-g32"
    )


@pytest.mark.parametrize("scheme, bound", [("int8", 0.01), ("int4", 0.1)])
@pytest.mark.parametrize("mode", ["lcf", "lcfx"])
def test_quantization_moves_the_first_token_logits_little(tiny_pair, adapter_dirs, mode, scheme, bound):
    """Against bf16 latents: the largest first-token logit change is within `bound` of the
    logits' spread (max - min). Measured on this tiny random pair: int8 0.22% (LCF) / 0.09%
    (LCF-X), int4 2.7% / 2.7% (bf16 itself vs float32: 0.09% / 0.03%); the bounds are ~4x
    that. int8 also keeps the greedy answer; int4 changes LCF's here (random weights, near
    ties), which is why its accuracy is measured on the shipped adapters, not asserted."""
    reference = first_token_logits(
        *in_process_prepared(tiny_pair, adapter_dirs[mode], mode, bf16_on_the_wire)
    )
    quantized = first_token_logits(
        *in_process_prepared(tiny_pair, adapter_dirs[mode], mode, through_the_wire(scheme))
    )
    spread = reference.max() - reference.min()
    assert (quantized - reference).abs().max() <= bound * spread
    if scheme == "int8":
        same = in_process_answer(tiny_pair, adapter_dirs[mode], mode, 6, through_the_wire(scheme))
        assert same == in_process_answer(tiny_pair, adapter_dirs[mode], mode, 6)


def test_eval_wire_forms_round_the_latents_as_the_services_would():
    """`lcflow eval --wire`: bf16 rounds, int8/int4 quantize within their bounds (per row / per
    group of the bf16 values), and the bytes counted are those of the tensors the codec sends."""
    from lcflow.eval.harness import through_the_wire
    from lcflow.handoff.pair import Latents

    torch.manual_seed(0)
    original = {3: torch.randn(1, 4, 10, 128), 5: torch.randn(1, 4, 10, 128) * 3}
    sent = {}
    for form in ("exact", "bf16", "int8", "int4"):
        latents = Latents("lcfx", {k: v.clone() for k, v in original.items()})
        sent[form] = through_the_wire(latents, form)
        for layer, z in original.items():
            got, rounded = latents.layers[layer], z.to(torch.bfloat16).float()
            if form == "exact":
                assert torch.equal(got, z)
            elif form == "bf16":
                assert torch.equal(got, rounded)
            else:
                qmax, group = (127, 128) if form == "int8" else (7, DEFAULT_INT4_GROUP)
                grouped = rounded.reshape(*z.shape[:-1], -1, group)
                # half a quantization step, plus the dequantized value's rounding to bf16
                step = grouped.abs().amax(-1, keepdim=True) / qmax
                bound = step * 0.51 + grouped.abs() * 2**-8 + 1e-4
                error = (got - rounded).reshape(grouped.shape).abs()
                assert bool((error <= bound).all()), form
                assert not torch.equal(got, rounded)
    numel = sum(z.numel() for z in original.values())
    assert sent["exact"] == sent["bf16"] == 2 * numel
    assert numel < sent["int8"] < 1.1 * numel and numel / 2 < sent["int4"] < sent["int8"]


def test_a_card_refuses_an_eval_that_ran_through_another_wire(tmp_path):
    """--codec-eval int4-hadamard-g32=X: X must have run with --wire int4-hadamard-g32 (results
    record it), not the default group's int4-hadamard; bf16 pairs with a --wire bf16 run."""
    import json

    from lcflow.adapter.card import add_codec

    row = {"method": "lcfx", "n": 2, "em": 0.5}
    meta = {"task": "facts-cross", "split": "test", "seed": 0, "max_new_tokens": 8}
    runs = {}
    for wire in ("bf16", "int4-hadamard"):
        runs[wire] = tmp_path / f"{wire}.json"
        runs[wire].write_text(json.dumps({"meta": {**meta, "wire": wire}, "summary": [row]}))
    (tmp_path / "model_card.json").write_text(json.dumps({"adapter": "x"}))
    with pytest.raises(ValueError, match="ran with --wire int4-hadamard, not int4-hadamard-g32"):
        add_codec(tmp_path, "lcfx", {"bf16": runs["bf16"], "int4-hadamard-g32": runs["int4-hadamard"]})


def test_a_card_chooses_its_codec_only_from_evals_of_the_same_samples(tmp_path):
    """add_codec records each codec's EM and the choice; evals of other samples (another split
    here) are refused and the card is left as it was."""
    import json
    import shutil
    from pathlib import Path

    from lcflow.adapter.card import CARD_JSON, add_codec

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    shipped = Path(__file__).parents[2] / "adapters" / "gemma3-to-gemma3-lcfx"
    for name in (CARD_JSON, "adapter_config.json"):  # the card's README shows what the config says
        shutil.copy(shipped / name, adapter)
    meta = {"task": "facts-cross", "split": "test", "seed": 0, "max_new_tokens": 12}

    def results(name: str, em: float, **changed) -> Path:
        path = tmp_path / f"{name}.json"
        summary = [{"method": "lcfx", "n": 200, "em": em}]
        path.write_text(json.dumps({"meta": meta | changed, "summary": summary}))
        return path

    evals = {"bf16": results("bf16", 0.82), "int8": results("int8", 0.81), "int4": results("int4", 0.62)}
    codec = add_codec(adapter, "lcfx", evals)
    assert codec["default"] == "int8" and codec["em"] == {"none": 0.82, "int8": 0.81, "int4": 0.62}
    assert (codec["task"], codec["split"], codec["n"]) == ("facts-cross", "test", 200)
    before = (adapter / CARD_JSON).read_text()
    evals["int4"] = results("int4-val", 0.82, split="validation")
    with pytest.raises(ValueError, match="not run on the same samples"):
        add_codec(adapter, "lcfx", evals)
    assert (adapter / CARD_JSON).read_text() == before

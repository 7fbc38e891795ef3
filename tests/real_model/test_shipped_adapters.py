"""The adapters we ship, with the real demo models: they load, serve, and reproduce their cards.

Needs the demo models: the `demo_models` fixture pulls them once per machine (as `lcflow demo`
does); skipped, with the reason repeated in the run's summary, only when that fails. Adapters of both directions are
checked: each card names its sharer and receiver.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lcflow.adapter import LatentAdapter
from lcflow.core.kv import model_identity
from lcflow.eval.harness import EvalModels, evaluate
from lcflow.handoff.generation import GenerationSettings
from lcflow.tasks import get_task

pytestmark = pytest.mark.real_model

ADAPTERS = Path(__file__).resolve().parents[2] / "adapters"
CARDS = sorted(ADAPTERS.glob("*/model_card.json"))
SHARER, RECEIVER = "smollm2-135m-instruct", "gemma3-270m"
REPLAY_SAMPLES = 20  # of each card's eval, from the first
AGREEMENT_SLACK = 2  # answers that may differ from the card's (float differences between CPUs)


@pytest.fixture(scope="module")
def real_models(demo_models) -> dict:
    """{name: (model, tokenizer)} for both demo models, loaded once for the module."""
    from lcflow.provision import load_model_and_tokenizer

    return {name: load_model_and_tokenizer(name, device="cpu") for name in (SHARER, RECEIVER)}


def load_adapter(name: str, pair, sharer: str, receiver: str):
    """An LCF / LCF-X adapter, or the C2C fuser, checked against the (sharer, receiver) pair."""
    (ms, ts), (mr, tr) = pair
    identities = {
        "sharer": model_identity(ms, ts, name=sharer),
        "receiver": model_identity(mr, tr, name=receiver),
    }
    if json.loads((ADAPTERS / name / "adapter_config.json").read_text())["mode"] == "c2c":
        from lcflow.adapter.c2c import C2CFuser

        return C2CFuser.from_pretrained(ADAPTERS / name, **identities)
    return LatentAdapter.from_pretrained(ADAPTERS / name, **identities)


def card_adapters(card: dict, pair) -> dict:
    """What the card's method needs, keyed as EvalModels.adapters holds it: the adapter under its
    method's name; a text reader of forward-selected also needs the LCF-X adapter whose selection
    it reads (shipped beside it)."""
    from lcflow.adapter.reader import TextReader

    name, method = card["adapter"], card["eval"]["method"]
    if card["mode"] != "text-reader":
        return {method: load_adapter(name, pair, card["sharer"], card["receiver"])}
    adapters = {method: TextReader.from_pretrained(ADAPTERS / name, *pair[1], name=card["receiver"])}
    selection_adapter = json.loads((ADAPTERS / name / "reader_config.json").read_text()).get(
        "selection_adapter"
    )
    if selection_adapter:  # the card holds no copy of the reader's config: read it
        selection = Path(selection_adapter).name
        adapters["lcfx"] = load_adapter(selection, pair, card["sharer"], card["receiver"])
    return adapters


def replay(method: str, adapters: dict, pair, samples, max_new_tokens: int, wire: str = "exact"):
    """The card's method on these samples, greedy, as `lcflow eval` ran it (through its --wire)."""
    torch.set_num_threads(2)
    return evaluate(
        [method],
        EvalModels(pair[0], pair[1], adapters, wire=wire),
        samples,
        GenerationSettings(max_new_tokens=max_new_tokens),
    )


@pytest.mark.skipif(not CARDS, reason="no shipped adapter has a model card yet")
@pytest.mark.parametrize("card_path", CARDS, ids=lambda p: p.parent.name)
def test_shipped_adapter_reproduces_its_card(card_path, real_models):
    """The first REPLAY_SAMPLES of the card's eval give the answers the card recorded (all but
    AGREEMENT_SLACK of them, for float differences between CPUs; so the EM on them too), and for
    LCF-X another sample's packet loses at least half of what the right packet answered."""
    card = json.loads(card_path.read_text())
    spec = card["eval"]
    assert len(spec.get("answers", [])) == spec["n"], (
        "the card has no per-sample answers: record them with scripts/record_card_answers.sh"
    )
    pair = real_models[card["sharer"]], real_models[card["receiver"]]
    adapters = card_adapters(card, pair)
    samples = get_task(spec["task"]).samples(spec["split"], spec["n"], seed=spec["seed"])
    recorded = spec["answers"][:REPLAY_SAMPLES]
    wire = spec.get("wire", "exact")  # cards before the field: measured as encoded
    outcomes = replay(spec["method"], adapters, pair, samples[: len(recorded)], spec["max_new_tokens"], wire)
    assert [o.sample_id for o in outcomes] == [r["id"] for r in recorded], "the task's samples changed"
    differ = [
        (r["prediction"], o.prediction)
        for r, o in zip(recorded, outcomes, strict=True)
        if r["prediction"] != o.prediction
    ]
    assert len(differ) <= AGREEMENT_SLACK, (
        f"{len(differ)} of {len(recorded)} answers differ (card, now): {differ}"
    )
    if card["mode"] == "lcfx" and "lcfx-wrong" in card["results"]:  # the packet must matter
        # on samples the card answered right (up to REPLAY_SAMPLES), another sample's packet must
        # answer at most half: an adapter that answers from the question alone keeps them all
        right = [i for i, r in enumerate(spec["answers"]) if r["em"]][:REPLAY_SAMPLES]
        assert len(right) >= 5, (
            f"the card answers only {len(right)} samples right: too few to test the packet"
        )
        adapters["lcfx-wrong"] = adapters[spec["method"]]
        wrong = replay(
            "lcfx-wrong", adapters, pair, [samples[i] for i in right], spec["max_new_tokens"], wire
        )
        kept = sum(o.em for o in wrong)
        assert kept <= len(right) / 2, f"another sample's packet still answers {kept:.0f} of {len(right)}"


@pytest.mark.parametrize(
    "name, mode, task",
    [
        ("smollm2-to-gemma3-lcfx-bridge", "lcfx", "facts-cross"),
        ("gemma3-to-smollm2-lcfx-bridge", "lcfx", "facts-cross"),
        ("smollm2-to-gemma3-c2c", "c2c", "facts-same"),
    ],
)
def test_real_pair_through_the_services(real_models, name, mode, task):
    """Both services in this process with the real models and a shipped adapter (the bridge's
    sharer loads the receiver's tokenizer by its name; C2C's receiver re-rotates SmolLM2's keys
    with the RoPE its config records), each beside TEXT."""
    from service_helpers import running_services

    from lcflow.client import HandoffClient
    from lcflow.tasks import question_prompt

    config_path = ADAPTERS / name / "adapter_config.json"
    if not config_path.is_file():
        pytest.skip(f"adapters/{name} is not shipped yet")
    config = json.loads(config_path.read_text())
    pair = real_models[config["sharer"]["name"]], real_models[config["receiver"]["name"]]
    sample = get_task(task).samples("test", 1, seed=0)[0]
    with running_services(pair, str(ADAPTERS / name)) as services:
        with HandoffClient(services.sharer, timeout_s=300) as client:
            for handoff_mode in (mode, "text"):
                result = client.handoff(
                    question_prompt(sample.question),
                    mode=handoff_mode,
                    context=sample.sharer_context,
                    receiver_context=sample.receiver_context,
                    max_new_tokens=6,
                )
                assert result.answer.strip() and "".join(result.deltas) == result.answer
                assert result.summary.timings.time_to_first_token > 0
                if handoff_mode == mode:
                    assert result.summary.adapter == name and result.summary.bytes_wire > 0


def test_the_compressed_packet_goes_through_the_services_as_its_card_measured_it(real_models):
    """The demo's adapter, gemma3-to-gemma3-lcfx-compressed, with the sharer's default --quantize
    card on a link between nodes (--link-mbit 100; on loopback --codec auto may find bf16 cheaper):
    its latents go as the card chose (int4-hadamard-g32), in about an eighth of the bytes of the
    full-width bf16 packet, and the answers are those its card recorded in-process through the
    same codec, for its eval's first samples."""
    from service_helpers import running_services

    from lcflow.client import HandoffClient
    from lcflow.eval.metrics import extract_answer
    from lcflow.tasks import question_prompt

    name = "gemma3-to-gemma3-lcfx-compressed"
    card = json.loads((ADAPTERS / name / "model_card.json").read_text())
    spec, full = (
        card["eval"],
        json.loads((ADAPTERS / "gemma3-to-gemma3-lcfx" / "adapter_config.json").read_text()),
    )
    full_width_bf16 = (
        full["slots"] * len(full["retained_layers"]) * full["bottleneck"] * 2
    )  # the packet it replaces
    assert card["codec"]["default"] == spec["wire"] == "int4-hadamard-g32"
    samples = get_task(spec["task"]).samples(spec["split"], 3, seed=spec["seed"])
    pair = real_models[card["sharer"]], real_models[card["receiver"]]
    with running_services(pair, str(ADAPTERS / name), sharer={"link_mbit": 100}) as services:
        with HandoffClient(services.sharer, timeout_s=300) as client:
            for sample, recorded in zip(samples, spec["answers"], strict=False):
                result = client.handoff(
                    question_prompt(sample.question),
                    mode="lcfx",
                    context=sample.sharer_context,
                    receiver_context=sample.receiver_context,
                    max_new_tokens=spec["max_new_tokens"],
                )
                assert result.summary.codec.startswith("int4-hadamard-g32/"), result.summary.codec
                # codes and scales are over 8x fewer bytes (docs/lcfx.md 13.3); the frames add a little
                assert 0 < result.summary.bytes_wire < full_width_bf16 / 7.5, result.summary.bytes_wire
                assert (sample.id, extract_answer(result.answer)) == (recorded["id"], recorded["prediction"])


def test_the_general_adapter_answers_open_prompts_from_the_packet_through_the_services(real_models):
    """The new user's session of the beyond-text issue, through the services with the shipped
    general adapter (gemma3-to-gemma3-lcfx-general) and the issue's document: every open prompt
    gets an answer (never an empty one) that states a fact of the sharer's document, and a
    one-word question gets the fact. (Whether the answer is a sentence varies with the prompt:
    docs/measurements.md, "The general adapter, shipped".)"""
    from service_helpers import running_services

    from lcflow.client import HandoffClient
    from lcflow.tasks import OPEN_ANSWER_TOKENS, OPEN_INSTRUCTION, question_prompt

    name = "gemma3-to-gemma3-lcfx-general"
    if not (ADAPTERS / name / "adapter_config.json").is_file():
        pytest.skip(f"adapters/{name} is not shipped yet")
    document = (
        "Mira Volkov lives in Oslo. She works as a glassblower and keeps two ferrets. "
        "Her sister Ana runs a bakery in Bergen."
    )
    facts = ("oslo", "glassblower", "ferret", "bakery", "bergen")
    pair = real_models[RECEIVER], real_models[RECEIVER]  # Gemma3 -> Gemma3
    with running_services(pair, str(ADAPTERS / name)) as services:
        with HandoffClient(services.sharer, timeout_s=300) as client:
            for prompt in (
                "Write two sentences about Mira Volkov.",
                "Summarize what you know about Mira.",
                "Describe Mira Volkov.",
            ):
                result = client.handoff(
                    question_prompt(prompt, OPEN_INSTRUCTION),
                    mode="lcfx",
                    context=document,
                    max_new_tokens=OPEN_ANSWER_TOKENS,
                )
                assert result.summary.adapter == name
                assert any(fact in result.answer.lower() for fact in facts), (prompt, result.answer)
            result = client.handoff(
                question_prompt("Where does Mira Volkov live?"),
                mode="lcfx",
                context=document,
                max_new_tokens=6,
            )
            assert "Oslo" in result.answer, result.answer

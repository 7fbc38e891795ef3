"""The adapters we ship, with the real demo models: they load, serve, and reproduce their cards.

Needs the demo models (`lcflow models pull smollm2-135m-instruct` and `gemma3-270m`; .ci/run
pulls them); skipped with the reason when they cannot be had. Adapters of both directions are
checked: each card names its sharer and receiver.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lcflow.adapter import LatentAdapter
from lcflow.evaluation import EvalModels, evaluate
from lcflow.handoff import GenerationSettings
from lcflow.kv import model_identity
from lcflow.tasks import get_task

pytestmark = pytest.mark.real_model

ADAPTERS = Path(__file__).resolve().parents[1] / "adapters"
CARDS = sorted(ADAPTERS.glob("*/model_card.json"))
SHARER, RECEIVER = "smollm2-135m-instruct", "gemma3-270m"
WRONG_PACKET_SAMPLES = 20


@pytest.fixture(scope="module")
def real_models() -> dict:
    """{name: (model, tokenizer)} for both demo models, loaded once for the module."""
    from lcflow.provision import ModelNotCachedError, load_model_and_tokenizer

    try:
        return {name: load_model_and_tokenizer(name, device="cpu") for name in (SHARER, RECEIVER)}
    except ModelNotCachedError as err:
        pytest.skip(f"demo models not provisioned: {err}")


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


@pytest.mark.skipif(not CARDS, reason="no shipped adapter has a model card yet")
@pytest.mark.parametrize("card_path", CARDS, ids=lambda p: p.parent.name)
def test_shipped_adapter_reproduces_its_card(card_path, real_models):
    card = json.loads(card_path.read_text())
    spec = card["eval"]
    pair = real_models[card["sharer"]], real_models[card["receiver"]]
    adapter = load_adapter(card["adapter"], pair, card["sharer"], card["receiver"])
    samples = get_task(spec["task"]).samples(spec["split"], spec["n"], seed=spec["seed"])
    torch.set_num_threads(2)
    outcomes = evaluate(
        [spec["method"]],
        EvalModels(pair[0], pair[1], {spec["method"]: adapter}),
        samples,
        GenerationSettings(max_new_tokens=spec["max_new_tokens"]),
    )
    em = sum(o.em for o in outcomes) / len(outcomes)
    low, high = card["results"][spec["method"]]["em_ci"]
    assert low - 1e-9 <= em <= high + 1e-9, f"EM {em:.3f} outside the card's CI [{low:.3f}, {high:.3f}]"
    if "lcfx-wrong" in card["results"]:  # the packet must matter: another sample's scores clearly less
        # against the right packet's EM on the same samples; where the card's margin is wide (>= 0.3)
        # the first WRONG_PACKET_SAMPLES decide it (keeping the suite's time down), else all of them
        margin = card["results"][spec["method"]]["em"] - card["results"]["lcfx-wrong"]["em"]
        subset = samples[:WRONG_PACKET_SAMPLES] if margin >= 0.3 else samples
        wrong = evaluate(
            ["lcfx-wrong"],
            EvalModels(pair[0], pair[1], {"lcfx-wrong": adapter}),
            subset,
            GenerationSettings(max_new_tokens=spec["max_new_tokens"]),
        )
        right_em = sum(o.em for o in outcomes[: len(subset)]) / len(subset)
        wrong_em = sum(o.em for o in wrong) / len(wrong)
        assert right_em - wrong_em >= 0.1, (
            f"first {len(subset)} samples: right packet EM {right_em:.3f} vs another sample's {wrong_em:.3f}"
        )


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
    from helpers import running_services

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

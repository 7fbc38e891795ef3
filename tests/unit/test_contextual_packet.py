"""lcflow.research.contextual_packet: the packet written and read by one LoRA'd model."""

from __future__ import annotations

import pytest
import torch

from lcflow.adapter.reader import TextReader
from lcflow.core.kv import kv_spec
from lcflow.handoff.pair import Receiver, Sharer
from lcflow.packets.alignment import identity_alignment
from lcflow.research.contextual_packet import (
    contextual_prepared,
    identity_packet_adapter,
    sample_loss,
    written_latents,
)
from lcflow.tasks import format_question_prompt, get_task
from tests.helpers import span_adapter


@pytest.fixture
def identity_setup(tiny_pair, tmp_path):
    """The tiny receiver on both sides, an identity packet of 8 positions, one test sample."""
    _, (model, tokenizer) = tiny_pair
    chooser = span_adapter(
        (model, tokenizer), (model, tokenizer), identity_alignment(kv_spec(model.config)), 8
    )
    chooser.save_pretrained(tmp_path / "chooser")
    adapter = identity_packet_adapter(str(tmp_path / "chooser"), model, tokenizer, "tiny")
    sample = get_task("facts-cross").samples("test", 1)[0]
    prompt = format_question_prompt(sample, include_context=False)
    return model, tokenizer, adapter, sample, prompt


def _prepared_logits(model, prepared) -> torch.Tensor:
    out = model(input_ids=prepared.input_ids[:, -1:], past_key_values=prepared.cache, use_cache=True)
    return out.logits[0, -1]


@torch.no_grad()
def test_contextual_packet_of_the_plain_model_is_the_plain_packet(identity_setup):
    """With no LoRA the contextual path (a prefill with gradients allowed) builds the same
    receiver cache as the service's path (Sharer.prefill -> encode -> prepare_lcfx)."""
    model, tokenizer, adapter, sample, prompt = identity_setup
    assert adapter.config.slots == 8 and adapter.config.bottleneck == kv_spec(model.config).kv_dim
    sharer = Sharer(model, tokenizer, adapter.encoder, adapter.config)
    context = sharer.prefill(sample.sharer_context)
    positions = sharer.select(context, question=prompt)
    plain = Receiver(model, tokenizer, adapter.decoder, adapter.config).prepare_lcfx(
        sharer.encode(context, question=prompt, positions=positions), prompt, sample.receiver_context
    )
    contextual = contextual_prepared(model, tokenizer, adapter, sample, prompt, positions)
    assert torch.equal(plain.input_ids, contextual.input_ids)
    torch.testing.assert_close(_prepared_logits(model, contextual), _prepared_logits(model, plain))

    # `local`: with no positions given, every token of the text after BOS is a row.
    text = "Mira lives in Oslo. She keeps two ferrets."
    rows = tokenizer(text, return_tensors="pt").input_ids.shape[1] - 1
    local = written_latents(model, tokenizer, adapter, text, prompt, None)
    assert {z.shape[1] for z in local.layers.values()} == {rows}


def test_the_loss_trains_the_lora_and_the_packet_is_written_by_it(identity_setup):
    """The loss gives the LoRA gradients; the packet's K/V alone carry gradients back to it (the
    sharer side is trained, not only the reading); and a moved LoRA writes another packet."""
    model, tokenizer, adapter, sample, prompt = identity_setup
    reader = TextReader.for_model(model, tokenizer, "lcfx", rank=4)
    selector, teacher = Sharer(model, tokenizer, adapter.encoder, adapter.config), Receiver(model, tokenizer)
    loss = sample_loss(reader.model, tokenizer, adapter, selector, teacher, sample, kl_weight=0.25)
    assert torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for _, p in reader.named_parameters()]
    assert grads and all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)

    with torch.no_grad():
        context = selector.prefill(sample.sharer_context)
        positions = selector.select(context, question=prompt)
    reader.model.zero_grad(set_to_none=True)
    latents = written_latents(reader.model, tokenizer, adapter, sample.sharer_context, prompt, positions)
    sum(z.square().sum() for z in latents.layers.values()).backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for _, p in reader.named_parameters())

    with torch.no_grad():
        for name, parameter in reader.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.5)

    with torch.no_grad():
        moved = written_latents(reader.model, tokenizer, adapter, sample.sharer_context, prompt, positions)
        plain = written_latents(model, tokenizer, adapter, sample.sharer_context, prompt, positions)
    layer = next(iter(plain.layers))
    assert not torch.allclose(moved.layers[layer], plain.layers[layer])

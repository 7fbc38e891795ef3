"""KVComm, the training-free KV baseline (lcflow.handoff.kvcomm), on tiny models: with every
layer kept it is `forward`; a layer that keeps only the sink computes what the receiver's tokens
alone would, after the sink; the bytes and the layer choice follow KVComm's rules."""

from __future__ import annotations

import contextlib

import pytest
import torch
from helpers import CONTEXT, PROMPT, RECEIVER_CONTEXT

from lcflow.handoff.kvcomm import (
    calibrate,
    choose_layers,
    kvcomm_input,
    prepare_receiver,
    send_layers,
    sharer_prefix,
)
from lcflow.handoff.pair import Receiver, reader_contexts


def _layers(model) -> int:
    return model.config.get_text_config().num_hidden_layers


def _next_logits(model, prepared, steps: int = 2) -> list[torch.Tensor]:
    """Greedy decoding by hand from a prepared input, under its restriction: each step's logits."""
    restriction = prepared.attention_restriction
    token, logits = prepared.input_ids[:, -1:], []
    with restriction() if restriction else contextlib.nullcontext():
        for _ in range(steps):
            out = model(input_ids=token, past_key_values=prepared.cache, use_cache=True)
            logits.append(out.logits[0, -1])
            token = out.logits[:, -1:].argmax(-1)
    return logits


@pytest.mark.parametrize("side", [0, 1], ids=["llama", "gemma3"])
@torch.no_grad()
def test_every_layer_kept_is_forward(tiny_pair, side):
    model, tokenizer = tiny_pair[side]
    handoff = kvcomm_input(tokenizer, PROMPT, CONTEXT, RECEIVER_CONTEXT)
    every = set(range(_layers(model)))
    kvcomm = prepare_receiver(model, handoff, sharer_prefix(model, handoff), every)
    forward = Receiver(model, tokenizer).prepare_plain(PROMPT, reader_contexts(CONTEXT, RECEIVER_CONTEXT))
    assert torch.equal(kvcomm.input_ids, forward.input_ids)
    for got, want in zip(_next_logits(model, kvcomm), _next_logits(model, forward), strict=True):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_a_layer_without_the_prefix_sees_only_the_sink_and_its_own_tokens(tiny_pair):
    """No layer kept: the receiver computes what it would on [sink] + its own tokens, placed at
    positions 0, P, P+1, ... (Llama: no sliding window, so indices do not matter beyond RoPE)."""
    model, tokenizer = tiny_pair[0]
    handoff = kvcomm_input(tokenizer, PROMPT, CONTEXT)
    p = handoff.prefix_length
    prepared = prepare_receiver(model, handoff, sharer_prefix(model, handoff), kept=set())
    got = _next_logits(model, prepared)

    ids = torch.cat([handoff.input_ids[:, :1], handoff.input_ids[:, p:]], dim=1)
    positions = torch.cat([torch.zeros(1, dtype=torch.long), torch.arange(p, handoff.input_ids.shape[1])])
    first = model(input_ids=ids, position_ids=positions[None])
    token = first.logits[:, -1:].argmax(-1)
    second = model(
        input_ids=torch.cat([ids, token], dim=1),
        position_ids=torch.cat([positions, positions[-1:] + 1])[None],
    )
    torch.testing.assert_close(got[0], first.logits[0, -1], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got[1], second.logits[0, -1], atol=1e-4, rtol=1e-4)
    # and not what the whole prefix gives
    full = prepare_receiver(model, handoff, sharer_prefix(model, handoff), set(range(_layers(model))))
    assert not torch.allclose(_next_logits(model, full, 1)[0], got[0], atol=1e-3)


def test_restriction_ends_with_the_handoff(tiny_pair):
    model, tokenizer = tiny_pair[0]
    handoff = kvcomm_input(tokenizer, PROMPT, CONTEXT)
    prepared = prepare_receiver(model, handoff, sharer_prefix(model, handoff), kept={0})
    Receiver(model, tokenizer).generate(prepared)
    backbone = model.get_decoder()
    assert all(not layer.self_attn._forward_pre_hooks for layer in backbone.layers)


def test_only_kept_layers_send_the_prefix(tiny_pair):
    model, tokenizer = tiny_pair[0]
    handoff = kvcomm_input(tokenizer, PROMPT, CONTEXT)
    cache, p = sharer_prefix(model, handoff), handoff.prefix_length
    original = [layer.keys.clone() for layer in cache.layers]
    sent = send_layers(cache, {0, 2}, p)
    heads, dim = cache.layers[0].keys.shape[1], cache.layers[0].keys.shape[-1]
    assert sent == (2 * p + 1) * heads * 2 * dim * 2  # two layers whole, one layer's sink; K and V; bf16
    assert not cache.layers[1].keys[:, :, 1:p].any() and not cache.layers[1].values[:, :, 1:p].any()
    assert torch.equal(cache.layers[1].keys[:, :, 0], original[1][:, :, 0].to(torch.bfloat16).float())
    assert cache.layers[2].keys[:, :, 1:p].any()


def test_the_layer_choice_keeps_layer_0_and_the_top_fraction():
    scores = torch.tensor([0.0, 0.9, 0.1, 0.5, 0.7, 0.2])
    assert choose_layers(scores, 0.34) == {0, 1, 4, 3}
    assert choose_layers(scores, 0.01) == {0, 1}
    assert choose_layers(scores, 1.0) == set(range(6))
    with pytest.raises(ValueError, match=r"in \(0, 1\]"):
        choose_layers(scores, 0)


def test_calibration_scores_every_layer(tiny_pair):
    model, tokenizer = tiny_pair[0]
    kept = calibrate(model, tokenizer, [(PROMPT, CONTEXT, ""), (PROMPT, CONTEXT, RECEIVER_CONTEXT)], 0.5)
    assert 0 in kept and len(kept) in (2, 3) and kept <= set(range(_layers(model)))
    assert model.config._attn_implementation != "eager"  # put back after reading the weights
    with pytest.raises(ValueError, match="calibration sample"):
        calibrate(model, tokenizer, [], 0.5)


def test_no_document_is_a_clear_error(tiny_pair):
    _, tokenizer = tiny_pair[0]
    with pytest.raises(ValueError, match="document"):
        kvcomm_input(tokenizer, PROMPT, "")


def test_prefix_is_the_head_and_the_document(tiny_pair):
    model, tokenizer = tiny_pair[1]
    handoff = kvcomm_input(tokenizer, PROMPT, CONTEXT, RECEIVER_CONTEXT)
    prefix = tokenizer.decode(handoff.input_ids[0, : handoff.prefix_length])
    assert prefix.rstrip().endswith(CONTEXT.rstrip()[-5:]) and PROMPT not in prefix

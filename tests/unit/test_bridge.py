"""The bridge packet (LCF-X across families): soft tokens in the receiver's input space, read by
the receiver's own span adapter (lcflow.adapter.bridge, lcflow.training.bridge_fit)."""

from __future__ import annotations

import pytest
import torch
from helpers import same_model_alignment, span_adapter
from service_helpers import running_services

from lcflow.adapter import LatentAdapter
from lcflow.adapter.bridge import INPUT_LAYER, reader_config
from lcflow.core.kv import model_identity
from lcflow.core.prompting import render_input
from lcflow.handoff.pair import Latents, Receiver, Sharer
from lcflow.packets.placement import document_ids
from lcflow.tasks import question_prompt
from lcflow.training import bridge_fit as bridge
from lcflow.training.corpus import alignment_corpus

DOC = (
    "Mira Volkov lives in Oslo. Lior Senn plays the violin and owns a cat. "
    "Ada Brook works as a baker. The quick brown fox jumps over the lazy dog."
)
PROMPT = question_prompt("Where does Mira Volkov live?")


def hidden_size(model) -> int:
    return model.get_input_embeddings().weight.shape[1]


def bridge_adapter(sharer, receiver, reader, slots: int = 8) -> LatentAdapter:
    adapter = bridge.new_bridge_adapter(
        model_identity(*sharer), model_identity(*receiver), hidden_size(receiver[0]), reader, slots
    )
    adapter.encoder.attach_receiver_tokenizer(receiver[1])
    return adapter.eval()


@pytest.fixture(scope="module")
def fitted(tiny_pair, tmp_path_factory):
    """A bridge adapter for the tiny pair, its translator fitted on 40 corpus documents (ridge +
    60 MLP steps), its reader an untrained receiver -> receiver span adapter; saved and reloaded."""
    sharer, receiver = tiny_pair
    reader = LatentAdapter.for_models(
        "lcfx", model_identity(*receiver), model_identity(*receiver), packet="spans", bottleneck=16, slots=8
    )
    adapter = bridge_adapter(sharer, receiver, reader)
    corpus = alignment_corpus(50)
    pairs = [bridge.translation_pairs(adapter, sharer, receiver, d) for d in corpus]
    fit, held_out = bridge.TranslationPairs.concat(pairs[:40]), bridge.TranslationPairs.concat(pairs[40:])
    bridge.fit_ridge(adapter, fit)
    scores = {"ridge": bridge.held_out_scores(adapter, held_out, receiver[0])}
    bridge.train_residual(adapter, fit, receiver[0], steps=60)
    scores["trained"] = bridge.held_out_scores(adapter, held_out, receiver[0])
    directory = adapter.save_pretrained(tmp_path_factory.mktemp("bridge") / "adapter")
    return directory, scores


def test_translator_recovers_the_receivers_tokens(fitted):
    """Each soft token's nearest entry of the receiver's vocabulary is its own token on documents
    it was not fitted on (chance: 1 in 400), and the trained MLP does not undo the ridge map."""
    _, scores = fitted
    assert scores["ridge"]["nearest_token"] > 0.5, scores
    assert scores["trained"]["nearest_token"] >= scores["ridge"]["nearest_token"] - 0.02, scores
    assert scores["trained"]["r2"] > 0.3, scores


def test_bridge_adapter_round_trips_and_packet_is_at_most_m_soft_tokens(fitted, tiny_pair):
    directory, _ = fitted
    sharer, receiver = tiny_pair
    adapter = LatentAdapter.from_pretrained(directory)
    assert adapter.config.packet == "bridge" and adapter.config.reader["packet"] == "spans"
    adapter.encoder.attach_receiver_tokenizer(receiver[1])
    side = Sharer(*sharer, adapter.encoder, adapter.config)
    for text in (DOC, " ".join([DOC] * 4)):
        context = side.prefill(text)
        positions = side.select(context, question=PROMPT)
        latents = side.encode(context, question=PROMPT, positions=positions)
        assert list(latents.layers) == [INPUT_LAYER]
        soft = latents.layers[INPUT_LAYER]
        assert soft.shape == (1, side.latent_rows(context, positions), hidden_size(receiver[0]))
        assert 0 < soft.shape[1] <= 8
    with pytest.raises(ValueError, match="tokenizer given is another one"):
        adapter.encoder.attach_receiver_tokenizer(sharer[1])


@torch.no_grad()
def test_receiver_half_reads_its_own_embeddings_like_the_document(tiny_pair):
    """The receiver half alone: given the receiver's *own* input embeddings of a document as the
    soft tokens and an exact reader (the receiver's alignment with itself, full width, m covering
    the document), the receiver's next-token logits match reading the document as text. So the
    receiver reads [BOS + soft tokens] as it reads the document's ids, and the entries land
    where the document would sit."""
    _, receiver = tiny_pair
    reader = span_adapter(
        receiver, receiver, same_model_alignment(receiver, bottleneck=64, documents=40), 200
    )
    adapter = bridge_adapter(receiver, receiver, reader, slots=200)
    soft = receiver[0].get_input_embeddings()(document_ids(receiver[1], DOC)[0])
    recv = Receiver(*receiver, adapter.decoder, adapter.config)
    own = "Lior Senn owns a cat."
    prepared = recv.prepare("lcfx", PROMPT, Latents("lcfx", {INPUT_LAYER: soft}), receiver_context=own)
    latent_logits = recv.model(prepared.input_ids[:, -1:], past_key_values=prepared.cache).logits[0, -1]
    text_logits = recv.model(render_input(recv.tokenizer, PROMPT, [DOC, own]).input_ids).logits[0, -1]
    assert torch.nn.functional.cosine_similarity(latent_logits, text_logits, dim=0) > 0.99
    # and another document's embeddings do not
    other = receiver[0].get_input_embeddings()(document_ids(receiver[1], "Tomas Hale plays chess.")[0])
    prepared = recv.prepare("lcfx", PROMPT, Latents("lcfx", {INPUT_LAYER: other}), receiver_context=own)
    wrong_logits = recv.model(prepared.input_ids[:, -1:], past_key_values=prepared.cache).logits[0, -1]
    assert torch.nn.functional.cosine_similarity(wrong_logits, text_logits, dim=0) < 0.99


def test_bridge_handoff_through_the_services_gives_the_in_process_answer(fitted, tiny_pair):
    """Sharer and receiver services with the bridge adapter: an LCF-X handoff streams one segment
    of soft tokens (its rows declared in the header before encoding) and answers exactly as the
    same handoff in-process does (soft tokens rounded to bf16, as on the wire)."""
    from lcflow.client import HandoffClient
    from lcflow.handoff.generation import GenerationSettings

    directory, _ = fitted
    sharer, receiver = tiny_pair
    own = "Lior owns a cat."
    adapter = LatentAdapter.from_pretrained(directory)
    adapter.encoder.attach_receiver_tokenizer(receiver[1])
    side, recv = (
        Sharer(*sharer, adapter.encoder, adapter.config),
        Receiver(*receiver, adapter.decoder, adapter.config),
    )
    with torch.inference_mode():
        latents = side.encode(side.prefill(DOC), question=PROMPT)
        soft = latents.layers[INPUT_LAYER]
        latents.layers = {INPUT_LAYER: soft.to(torch.bfloat16).float()}
        prepared = recv.prepare("lcfx", PROMPT, latents, receiver_context=own)
        expected = recv.generate(prepared, GenerationSettings(max_new_tokens=6))
    with running_services(tiny_pair, str(directory)) as services:
        with HandoffClient(services.sharer) as client:
            result = client.handoff(PROMPT, mode="lcfx", context=DOC, receiver_context=own, max_new_tokens=6)
    assert result.answer == expected
    assert result.summary.bytes_raw == soft.numel() * 2  # one bf16 segment: rows x hidden


def test_within_sharer_cutting_keeps_every_receiver_token_inside_one_sharer_token(tiny_pair):
    """`bridge_tokens: within-sharer`: the pieces spell the text again, each lies in one sharer
    token, and the position features tell the pieces of one sharer token apart."""
    from lcflow.adapter.bridge import POSITION_SCALE, piece_positions, within_sharer_ids
    from lcflow.core.prompting import tokenize_context
    from lcflow.core.tokens import align_spans

    (_, s_tok), (_, r_tok) = tiny_pair
    _, sharer_spans = tokenize_context(s_tok, DOC)
    ids, spans = within_sharer_ids(r_tok, DOC, sharer_spans)
    assert ids.shape == (1, spans.shape[0])
    assert "".join(DOC[a:b] for a, b in spans.tolist()) == "".join(DOC[a:b] for a, b in sharer_spans.tolist())
    alignment = align_spans(sharer_spans, spans)
    assert bool(alignment.covered.all()) and bool(((alignment.weights > 0).sum(1) == 1).all())
    positions = piece_positions(alignment) / POSITION_SCALE
    owner = alignment.weights.argmax(1)
    counts = torch.bincount(owner)[owner]
    assert bool((positions[:, 2] == (counts > 1)).all())  # "split" marks sharer tokens cut in pieces
    for row in range(len(owner)):  # the first and last piece of each sharer token
        first = row == 0 or owner[row - 1] != owner[row]
        last = row == len(owner) - 1 or owner[row + 1] != owner[row]
        assert (positions[row, 0] == 1) == first and (positions[row, 1] == 1) == last
    split = torch.nonzero(counts > 1).flatten()
    if len(split):  # a split's pieces differ, so the translator can tell them apart
        rows = split[owner[split] == owner[split[0]]]
        assert len({tuple(positions[r].tolist()) for r in rows}) == len(rows)


def test_within_sharer_bridge_sends_at_most_bridge_rows(tiny_pair):
    """A within-sharer bridge adapter: translator input widened by the position features, the
    packet capped by `bridge_rows` (not m), and the config refuses unknown cutting modes."""
    from lcflow.adapter import AdapterConfig
    from lcflow.adapter.bridge import POSITION_FEATURES, feature_dim

    sharer, receiver = tiny_pair
    reader = LatentAdapter.for_models(
        "lcfx", model_identity(*receiver), model_identity(*receiver), packet="spans", bottleneck=16, slots=8
    )
    adapter = bridge.new_bridge_adapter(
        model_identity(*sharer),
        model_identity(*receiver),
        hidden_size(receiver[0]),
        reader,
        8,
        tokens="within-sharer",
        rows=11,
    )
    adapter.encoder.attach_receiver_tokenizer(receiver[1])
    whole = bridge.new_bridge_adapter(
        model_identity(*sharer), model_identity(*receiver), hidden_size(receiver[0]), reader, 8
    )
    assert feature_dim(adapter.config) == feature_dim(whole.config) + POSITION_FEATURES
    assert adapter.config.max_rows() == 11 and whole.config.max_rows() == 8
    pairs = bridge.translation_pairs(adapter, sharer, receiver, DOC)
    assert pairs.x.shape[1] == feature_dim(adapter.config)
    side = Sharer(*sharer, adapter.encoder, adapter.config)
    context = side.prefill(" ".join([DOC] * 3))
    everything = torch.arange(1, context.input_ids.shape[1])  # more pieces than the cap
    soft = side.encode(context, question=PROMPT, positions=everything).layers[INPUT_LAYER]
    assert soft.shape[1] == side.latent_rows(context, everything) == 11
    data = adapter.config.to_dict() | {"bridge_tokens": "bytes"}
    with pytest.raises(ValueError, match="unknown bridge_tokens"):
        AdapterConfig.from_dict(data)


def test_vocabulary_documents_sweep_the_vocabulary_before_repeating(tiny_pair):
    from lcflow.training.corpus import vocabulary_documents

    (_, s_tok), _ = tiny_pair
    documents = vocabulary_documents(s_tok, 3, tokens_per_document=20, seed=1)
    assert documents == vocabulary_documents(s_tok, 3, tokens_per_document=20, seed=1)
    assert documents != vocabulary_documents(s_tok, 3, tokens_per_document=20, seed=2)
    special = {s_tok.decode([i]) for i in s_tok.all_special_ids}
    assert all(doc and not any(s in doc for s in special if s) for doc in documents)


@torch.no_grad()
def test_snap_replaces_each_soft_token_by_its_nearest_embedding(tiny_pair):
    """`bridge_snap`: a soft token near (not on) the receiver's embedding of a token, at another
    scale, is replaced by that embedding as the model's own embedding layer gives it (a scaled
    one for Gemma3), scanning the vocabulary in chunks or at once alike; the receiver half then
    reads noisy soft tokens exactly as it reads the clean ones."""
    from lcflow.adapter.bridge import snap_to_vocabulary

    _, receiver = tiny_pair
    embed = receiver[0].get_input_embeddings()
    ids = document_ids(receiver[1], DOC)[0]
    clean = embed(ids)
    noisy = 1.7 * clean + 0.05 * clean.std() * torch.randn(
        clean.shape, generator=torch.Generator().manual_seed(0)
    )
    assert not torch.equal(noisy, clean)
    assert torch.equal(snap_to_vocabulary(embed, noisy, chunk=64), clean)
    assert torch.equal(snap_to_vocabulary(embed, noisy), clean)

    reader = span_adapter(
        receiver, receiver, same_model_alignment(receiver, bottleneck=64, documents=40), 200
    )
    snapping = bridge_adapter(receiver, receiver, reader, slots=200)
    snapping.config.bridge_snap = True
    recv = Receiver(*receiver, snapping.decoder, snapping.config)
    (noisy_keys, noisy_values), (keys, values) = (
        recv.decoder.entries(recv.model, recv.tokenizer.bos_token_id, {INPUT_LAYER: soft})
        for soft in (noisy, clean)
    )
    assert len(noisy_keys) == len(keys) > 0
    assert all(torch.equal(a, b) for a, b in zip(noisy_keys + noisy_values, keys + values, strict=True))


def test_translator_from_swaps_the_reader_and_keeps_the_translator(fitted, tiny_pair, tmp_path, capsys):
    """`lcflow bridge --translator-from B --reader R`: B's translator, R's reader; a reader for
    another receiver is refused with one line."""
    from lcflow.cli import main

    directory, _ = fitted
    sharer, receiver = tiny_pair
    new_reader = LatentAdapter.for_models(
        "lcfx", model_identity(*receiver), model_identity(*receiver), packet="spans", bottleneck=16, slots=8
    )
    with torch.no_grad():  # a fresh span adapter starts as the exact map: make this one differ
        for weight in new_reader.decoder.parameters():
            weight.add_(0.01 * torch.randn_like(weight))
    new_reader.save_pretrained(tmp_path / "reader")
    out = tmp_path / "swapped"
    args = ["bridge", "--translator-from", str(directory), "--out", str(out)]
    assert main([*args, "--reader", str(tmp_path / "reader")]) == 0
    original, swapped = LatentAdapter.from_pretrained(directory), LatentAdapter.from_pretrained(out)
    assert reader_config(swapped.config) == LatentAdapter.from_pretrained(tmp_path / "reader").config
    assert swapped.config.selection_heads == original.config.selection_heads
    for name, value in original.encoder.state_dict().items():
        assert torch.equal(swapped.encoder.state_dict()[name], value), name
    for name, value in new_reader.decoder.state_dict().items():
        assert torch.equal(swapped.decoder.reader_decoder.state_dict()[name], value), name
    old_reader = original.decoder.reader_decoder.state_dict()
    assert any(  # the old reader is gone
        not torch.equal(value, old_reader[name]) for name, value in new_reader.decoder.state_dict().items()
    )

    wrong = LatentAdapter.for_models(
        "lcfx", model_identity(*sharer), model_identity(*sharer), packet="spans", bottleneck=16, slots=8
    )
    wrong.save_pretrained(tmp_path / "wrong")
    capsys.readouterr()
    assert main([*args, "--reader", str(tmp_path / "wrong")]) == 2
    assert "receiver -> receiver adapter" in capsys.readouterr().err

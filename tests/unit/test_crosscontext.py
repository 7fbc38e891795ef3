"""Cross-context building blocks: question attention, selection, placement, dense alignment,
the span packet end to end and the oracle ladder, on tiny random models."""

import copy
import dataclasses

import pytest
import torch
from helpers import same_model_alignment, span_adapter
from transformers import AutoModelForCausalLM

from lcflow.adapter import LatentAdapter
from lcflow.core.kv import RopeCodec, full_cache, model_identity, prefill
from lcflow.core.layer_map import build_layer_map
from lcflow.core.prompting import render_input, tokenize_context
from lcflow.handoff.generation import GenerationSettings
from lcflow.handoff.pair import Receiver, Sharer
from lcflow.packets.alignment import KVAlignment, collect_stats, fit_alignment, held_out_r2
from lcflow.packets.placement import finish_input, own_document_kv, slot_cache, slot_layout
from lcflow.packets.selection import (
    chunk_means,
    chunk_softmax,
    head_attention,
    question_attention,
    sentence_spans,
    top_sentences,
    top_tokens,
)
from lcflow.research.oracles import OracleModels, run_ladder, summarize
from lcflow.tasks import QASample, question_prompt
from lcflow.training.corpus import alignment_corpus

DOC = (
    "Mira Volkov lives in Oslo. Lior Senn plays the violin and owns a cat. "
    "Ada Brook works as a baker. The quick brown fox jumps over the lazy dog."
)
QUESTION = "Where does Mira Volkov live?"


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_question_attention_equals_the_models_own_attention_weights(tiny_dir, family):
    """Our scores from hooked queries and cached keys must equal eager attention's weights,
    including Gemma3's sliding window (the document is longer than its 32-token window)."""
    directory = tiny_dir(family, 400, 2)
    model = AutoModelForCausalLM.from_pretrained(directory, attn_implementation="eager").eval()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(directory)
    ids, _ = tokenize_context(tok, DOC)
    q_ids = tok("\n\n" + question_prompt(QUESTION), add_special_tokens=False, return_tensors="pt").input_ids
    cache = prefill(model, ids, full_cache())
    before = cache.get_seq_length()
    scores = question_attention(model, cache, q_ids, ids.shape[1])
    assert cache.get_seq_length() == before  # the caller's cache is left as it was
    with torch.no_grad():
        out = model(torch.cat([ids, q_ids], dim=1), output_attentions=True)
    t = ids.shape[1]
    expected = torch.stack([a[0, :, t:, :t].mean(dim=(0, 1)) for a in out.attentions]).mean(0)
    assert ids.shape[1] > 32
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=1e-4)
    # Per head, and one head alone: what retrieval heads select with.
    per_head = head_attention(model, cache, q_ids, ids.shape[1])
    for layer, attention in enumerate(out.attentions):
        torch.testing.assert_close(per_head[layer], attention[0, :, t:, :t].mean(dim=1), atol=1e-5, rtol=1e-4)
    one = question_attention(model, cache, q_ids, ids.shape[1], heads=[(1, 0)])
    torch.testing.assert_close(one, out.attentions[1][0, 0, t:, :t].mean(dim=0), atol=1e-5, rtol=1e-4)
    # Heads of the first layer only: the question runs through that layer alone, and the cache
    # comes back as it was in every layer.
    keys = [entry.keys.clone() for entry in cache.layers]
    first = question_attention(model, cache, q_ids, ids.shape[1], heads=[(0, 1)])
    torch.testing.assert_close(first, out.attentions[0][0, 1, t:, :t].mean(dim=0), atol=1e-5, rtol=1e-4)
    for before, entry in zip(keys, cache.layers, strict=True):
        assert torch.equal(before, entry.keys)


def test_chunked_question_attention_normalises_each_chunk_with_the_sink(tiny_dir):
    """With a chunk size, each question token's weights over one chunk (and the sink) sum to one,
    as a softmax over those logits alone would give; a chunk as long as the document is the whole
    document's softmax without the question's own positions."""
    directory = tiny_dir("llama", 400, 2)
    model = AutoModelForCausalLM.from_pretrained(directory, attn_implementation="eager").eval()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(directory)
    ids, _ = tokenize_context(tok, DOC)
    q_ids = tok("\n\n" + question_prompt(QUESTION), add_special_tokens=False, return_tensors="pt").input_ids
    cache = prefill(model, ids, full_cache())
    t, chunk = ids.shape[1], 7
    with torch.no_grad():
        out = model(torch.cat([ids, q_ids], dim=1), output_attentions=True)
    for layer, attention in enumerate(out.attentions):
        weights = attention[0, :, t:, :t]  # [heads, Q, t]: softmax over context + question
        logits = weights.log()  # logits up to a per-row constant, which a softmax ignores
        expected = torch.zeros_like(weights)
        for start in range(1, t, chunk):
            idx = [0, *range(start, min(t, start + chunk))]
            expected[..., idx[1:]] = logits[..., idx].softmax(dim=-1)[..., 1:]
        per_head = head_attention(model, cache, q_ids, t, chunk=chunk)
        torch.testing.assert_close(per_head[layer], expected.mean(dim=1), atol=1e-5, rtol=1e-4)
    whole = head_attention(model, cache, q_ids, t, chunk=t)
    for layer, attention in enumerate(out.attentions):
        context = attention[0, :, t:, :t]
        expected = context / context.sum(dim=-1, keepdim=True)
        expected[..., 0] = 0
        torch.testing.assert_close(whole[layer], expected.mean(dim=1), atol=1e-5, rtol=1e-4)


def test_chunk_softmax_gives_an_unseen_chunk_no_weight():
    logits = torch.tensor([[0.0, 1.0, 2.0, float("-inf"), float("-inf"), 3.0]])
    hidden = logits.clone()
    hidden[0, 0] = float("-inf")  # the sink hidden too: chunk [3, 4] sees nothing at all
    weights = chunk_softmax(hidden, 2)
    assert torch.equal(weights[0, 3:5], torch.zeros(2))
    assert weights[0, 0] == 0 and torch.isfinite(weights).all()
    torch.testing.assert_close(weights[0, 1:3].sum(), torch.tensor(1.0))
    torch.testing.assert_close(
        chunk_softmax(logits, 2)[0, 5], torch.tensor(3.0).exp() / (1 + torch.tensor(3.0).exp())
    )


def test_top_tokens_skip_the_sink_and_keep_document_order():
    scores = torch.tensor([9.0, 0.1, 0.5, 0.2, 0.9, 0.3])
    assert top_tokens(scores, 3).tolist() == [2, 4, 5]
    assert top_tokens(scores, 10).tolist() == [1, 2, 3, 4, 5]


def test_top_sentences_take_whole_sentences_best_first():
    text = "Ann is here. Bob lives in Rome. Cy has a dog."
    spans = sentence_spans(text)
    assert [text[a:b] for a, b in spans] == ["Ann is here.", "Bob lives in Rome.", "Cy has a dog."]
    # One token per word (plus a BOS with an empty span), as a tokenizer would give.
    words, offsets, start = text.split(" "), [(0, 0)], 0
    for w in words:
        start = text.index(w, start)
        offsets.append((start, start + len(w)))
        start += len(w)
    token_spans = torch.tensor(offsets)
    scores = torch.zeros(len(offsets))
    scores[5] = 1.0  # "in" of the second sentence
    chosen = top_sentences(scores, token_spans, text, 4).tolist()
    assert chosen == [4, 5, 6, 7]  # "Bob lives in Rome." and nothing else fits
    chosen = top_sentences(scores, token_spans, text, 6).tolist()
    assert set([4, 5, 6, 7]) <= set(chosen) and len(chosen) == 6 and chosen == sorted(chosen)
    assert 0 not in top_sentences(scores, token_spans, text, 20).tolist()  # never the BOS
    # "Ann is here." (tokens 1-3): 0.3 each, total 0.9; "Bob lives in Rome." (4-7): 0.25 each,
    # total 1.0. By total the long sentence wins, by mean per token the short one.
    scores = torch.tensor([0.0, 0.3, 0.3, 0.3, 0.25, 0.25, 0.25, 0.25, 0.0, 0.0, 0.0, 0.0])
    assert top_sentences(scores, token_spans, text, 4).tolist() == [4, 5, 6, 7]
    assert top_sentences(scores, token_spans, text, 3, per_token=True).tolist() == [1, 2, 3]
    assert top_sentences(scores, token_spans, text, 4, per_token=True).tolist()[:3] == [1, 2, 3]


def test_chunk_means_average_consecutive_chunks():
    x = torch.arange(12.0).reshape(1, 6, 2)
    out = chunk_means(x, 3)
    torch.testing.assert_close(out, torch.tensor([[[1.0, 2.0], [5.0, 6.0], [9.0, 10.0]]]))
    assert chunk_means(x, 10).shape == (1, 6, 2)  # never more chunks than tokens


@torch.no_grad()
def test_own_kv_in_the_slot_reproduces_reading_the_document(tiny_pair):
    """The receiver's own KV of the document, placed by slot_cache, must give the same next-token
    logits as the receiver reading [document, own context, question] as text."""
    _, (model, tok) = tiny_pair
    prompt, own = question_prompt(QUESTION), "Lior Senn owns a cat."
    layout = slot_layout(tok, prompt, own)
    captured, _ = own_document_kv(model, tok, DOC, layout)
    cache = slot_cache(model, RopeCodec(model), layout, captured.keys, captured.values)
    input_ids = finish_input(model, tok, layout, cache, captured.num_tokens)
    rendered = render_input(tok, prompt, [DOC, own]).input_ids
    assert input_ids.shape == rendered.shape
    latent_logits = model(input_ids[:, -1:], past_key_values=cache).logits[0, -1]
    text_logits = model(rendered).logits[0, -1]
    torch.testing.assert_close(latent_logits, text_logits, atol=1e-4, rtol=1e-4)


def test_alignment_of_a_model_with_itself_is_near_exact_at_full_width(tiny_pair, tmp_path):
    """Same model, same tokenizer: the first layer's K/V depend on the token alone, so a
    full-width fit explains them exactly on held-out text; deeper layers also see the preceding
    context, which differs (the receiver reads the document inside its chat template, the
    sharer as raw text), so there the fit is good but not exact. A narrow bottleneck fits less."""
    _, receiver = tiny_pair
    held_out = ["Nadia Orr keeps a parrot and lives in Lima.", "Tomas Hale plays chess on Sundays."]
    full = same_model_alignment(receiver, bottleneck=64)
    r2 = held_out_r2(full, receiver, receiver, held_out)
    assert r2[0]["k"] > 0.99 and r2[0]["v"] > 0.99, r2
    assert all(v["k"] > 0.5 and v["v"] > 0.5 for v in r2.values()), r2
    narrow = same_model_alignment(receiver, bottleneck=4)
    r2_narrow = held_out_r2(narrow, receiver, receiver, held_out)
    assert all(r2_narrow[t]["v"] < r2[t]["v"] for t in r2)
    full.save_pretrained(tmp_path / "al")
    loaded = KVAlignment.from_pretrained(tmp_path / "al")
    for t in full.maps:
        assert torch.equal(loaded.maps[t].encoder, full.maps[t].encoder)


def test_alignment_across_tokenizers_fits_its_training_text(tiny_pair):
    """Different families and tokenizers (pairs built through character spans): the fit explains
    much of the receiver's K/V on the text it saw. (Two *random* models share no structure, so
    held-out text is no test here; the real pair's held-out R^2 is in docs/results.)"""
    sharer, receiver = tiny_pair
    corpus = alignment_corpus(60)
    stats = collect_stats(sharer, receiver, corpus, build_layer_map(3, 2), 1, False)
    assert stats.moments[0].n > 60 * 10  # one pair per covered sharer token
    alignment = fit_alignment(stats, 1, 16)
    r2 = held_out_r2(alignment, sharer, receiver, corpus[:5])
    assert all(v["k"] > 0.1 and v["v"] > 0.1 for v in r2.values()), r2  # a broken fit is <= 0
    narrower = fit_alignment(stats, 0, 16)
    assert narrower.config.window == 0 and alignment.config.inputs_for(1) == [1, 2]


@torch.no_grad()
def test_span_packet_has_at_most_m_rows_and_reads_like_the_document(tiny_pair, tmp_path):
    """Same model on both sides, full-width alignment, m covering the whole document: the
    receiver's next-token logits through the span packet match reading the document."""
    _, receiver = tiny_pair
    alignment = same_model_alignment(receiver, bottleneck=64, documents=40)
    adapter = span_adapter(receiver, receiver, alignment, slots=200)
    adapter.save_pretrained(tmp_path / "spans")
    adapter = LatentAdapter.from_pretrained(tmp_path / "spans")
    assert adapter.config.packet == "spans"
    sharer = Sharer(*receiver, adapter.encoder, adapter.config)
    recv = Receiver(*receiver, adapter.decoder, adapter.config)
    prompt, own = question_prompt(QUESTION), "Lior Senn owns a cat."
    context = sharer.prefill(DOC)
    latents = sharer.encode(context, question=prompt)
    rows = context.input_ids.shape[1] - 1  # every token but BOS
    assert all(z.shape == (1, rows, 64) for z in latents.layers.values())
    prepared = recv.prepare("lcfx", prompt, latents, receiver_context=own)
    latent_logits = recv.model(prepared.input_ids[:, -1:], past_key_values=prepared.cache).logits[0, -1]
    text_logits = recv.model(render_input(recv.tokenizer, prompt, [DOC, own]).input_ids).logits[0, -1]
    assert torch.nn.functional.cosine_similarity(latent_logits, text_logits, dim=0) > 0.99
    # A small m: the packet keeps its size whatever the context's length.
    small = span_adapter(receiver, receiver, alignment, slots=8)
    sharer = Sharer(*receiver, small.encoder, small.config)
    for text in (DOC, DOC + " " + DOC + " " + DOC):
        latents = sharer.encode(sharer.prefill(text), question=prompt)
        assert all(z.shape == (1, 8, 64) for z in latents.layers.values())
    # No question: chunk means, still m rows.
    latents = sharer.encode(sharer.prefill(DOC))
    assert all(z.shape == (1, 8, 64) for z in latents.layers.values())


def test_span_adapter_cannot_be_pruned(tiny_pair):
    sharer, receiver = tiny_pair
    with pytest.raises(ValueError, match="cannot be pruned"):
        LatentAdapter.for_models(
            "lcfx", model_identity(*sharer), model_identity(*receiver), packet="spans"
        ).pruned(min_gate=2.0)


def test_oracle_ladder_runs_every_rung_and_own_full_equals_text(tiny_pair):
    sharer, receiver = tiny_pair
    stats = collect_stats(sharer, receiver, alignment_corpus(20), build_layer_map(3, 2), 0, False)
    models = OracleModels(sharer, receiver, fit_alignment(stats, 0, 16))
    samples = [
        QASample(f"s{i}", DOC, "Lior Senn owns a cat.", QUESTION, ["Oslo"], "t", False) for i in range(2)
    ]
    rungs = ["none", "text", "own-full", "own-sentences-8", "own-chunks-4", "xlat-tokens-6", "xlat-wrong-8"]
    outcomes = run_ladder(rungs, models, samples, GenerationSettings(max_new_tokens=3), progress=False)
    rows = {r["rung"]: r for r in summarize(outcomes)}
    assert list(rows) == rungs and all(r["n"] == 2 for r in rows.values())
    assert rows["own-full"]["answer_nll"] == pytest.approx(rows["text"]["answer_nll"], abs=1e-3)
    assert rows["own-sentences-8"]["entries_median"] <= 8
    assert rows["own-chunks-4"]["entries_median"] == 4 and rows["xlat-tokens-6"]["entries_median"] == 6
    assert rows["none"]["answer_nll"] != pytest.approx(rows["text"]["answer_nll"], abs=1e-3)
    assert copy.deepcopy(outcomes[0]).rung == "none"


def aligned_span_adapter(tiny_pair, directory):
    """A span adapter from the closed-form alignment of the tiny pair, saved to `directory`: what
    distillation starts from (cfg.init_adapter)."""
    sharer, receiver = tiny_pair
    stats = collect_stats(sharer, receiver, alignment_corpus(20), build_layer_map(3, 2), 0, False)
    adapter = span_adapter(sharer, receiver, fit_alignment(stats, 0, 16), slots=8)
    adapter.save_pretrained(directory)
    return adapter


def distill_config(tmp_path, out: str, **settings):
    """A tiny distillation run from the span adapter aligned_span_adapter wrote to tmp_path/init."""
    from lcflow.training.train import TrainConfig

    base = dict(sharer="s", receiver="r", batch_size=2, lr=1e-2, init_adapter=str(tmp_path / "init"))
    return TrainConfig(out=str(tmp_path / out), **(base | settings))


def test_distillation_refines_a_span_adapter_and_resumes(tiny_pair, tmp_path):
    from lcflow.training.distill import SpanDistillTrainer

    sharer, receiver = tiny_pair
    init = aligned_span_adapter(tiny_pair, tmp_path / "init")
    cfg = distill_config(tmp_path, "run", steps=2, checkpoint_every=1, kl_weight=1.0)
    trainer = SpanDistillTrainer(cfg, sharer, receiver)
    out = trainer.run()
    trained = LatentAdapter.from_pretrained(out)
    assert trained.config.packet == "spans" and len(trainer.losses) == 2
    assert all(loss > 0 for loss in trainer.losses)
    changed = [
        not torch.equal(a, b)
        for a, b in zip(init.state_dict().values(), trained.state_dict().values(), strict=True)
    ]
    assert any(changed)
    cfg.steps = 3  # resume from the checkpoint and take one more step
    again = SpanDistillTrainer(cfg, sharer, receiver)
    again.run()
    assert len(again.losses) == 3 and again.losses[:2] == trainer.losses


def test_distillation_with_the_wire_in_the_loop_trains_on_quantized_latents(tiny_pair, tmp_path):
    """--wire int4: the decoder reads int4-rounded latents, and the encoder still learns."""
    from lcflow.training.distill import SpanDistillTrainer

    sharer, receiver = tiny_pair
    init = aligned_span_adapter(tiny_pair, tmp_path / "init")
    losses = {}
    for wire in ("exact", "int4"):
        cfg = distill_config(tmp_path, wire, steps=1, checkpoint_every=1, kl_weight=1.0, wire=wire)
        trainer = SpanDistillTrainer(cfg, sharer, receiver)
        trained = LatentAdapter.from_pretrained(trainer.run())
        losses[wire] = trainer.losses[0]
        encoder_changed = [
            not torch.equal(a, b)
            for a, b in zip(
                init.encoder.state_dict().values(), trained.encoder.state_dict().values(), strict=True
            )
        ]
        assert any(encoder_changed), f"{wire}: the encoder got no gradient"
    assert losses["int4"] != losses["exact"]  # same samples and weights: only the rounding differs


def test_packet_donors_are_other_samples_of_the_same_task():
    from lcflow.tasks import get_task
    from lcflow.training.distill import packet_donors

    samples = get_task("facts-mix-words").samples("train", 12, seed=1)
    assert len({s.task for s in samples}) == 2  # both parts of the mix drawn
    donors = packet_donors(samples)
    for sample in samples:
        donor = donors[sample.id]
        assert donor.task == sample.task and donor.id != sample.id
        assert donor.sharer_context != sample.sharer_context


def test_a_teacher_adapter_replaces_the_document_as_the_kls_teacher(tiny_pair, tmp_path):
    """--teacher-adapter: with the student's own starting weights as the (frozen) teacher, the KL
    is 0 and the loss is the answer CE alone; the document-reading teacher gives a KL above 0."""
    from lcflow.training.distill import SpanDistillTrainer

    sharer, receiver = tiny_pair
    aligned_span_adapter(tiny_pair, tmp_path / "init")
    losses, trainers = {}, {}
    for name, settings in {
        "own": dict(teacher_adapter=str(tmp_path / "init")),
        "document": {},
        "ce": dict(kl_weight=0.0),
    }.items():
        trainer = SpanDistillTrainer(distill_config(tmp_path, name, steps=1, **settings), sharer, receiver)
        trainer.adapter.eval()
        with torch.no_grad():
            losses[name] = trainer.sample_loss(trainer.samples[0]).item()
        trainers[name] = trainer
    assert losses["own"] == pytest.approx(losses["ce"], abs=1e-5)
    assert losses["document"] > losses["ce"] + 1e-4
    teacher_sharer, teacher_receiver = trainers["own"].teacher
    frozen = [*teacher_sharer.encoder.parameters(), *teacher_receiver.decoder.parameters()]
    assert frozen and not any(p.requires_grad for p in frozen)
    assert trainers["document"].teacher is None


def test_contrast_hinge_is_the_margin_when_the_other_packet_is_the_same(tiny_pair, tmp_path):
    """With the sample's own packet as the control the hinge is exactly the margin; with another
    sample's it is what the two answer losses say, and a step with it trains."""
    from lcflow.training.distill import SpanDistillTrainer

    sharer, receiver = tiny_pair
    aligned_span_adapter(tiny_pair, tmp_path / "init")
    cfg = distill_config(tmp_path, "run", steps=1, kl_weight=0.0, contrast_weight=0.5, contrast_margin=2.0)
    trainer = SpanDistillTrainer(cfg, sharer, receiver)
    trainer.adapter.eval()
    sample = trainer.samples[0]
    with torch.no_grad():
        donors, trainer.donors = trainer.donors, {s.id: s for s in trainer.samples}  # the same packet
        same = trainer.sample_loss(sample).item()
        trainer.cfg.contrast_weight = 0.0
        plain = trainer.sample_loss(sample).item()
        trainer.cfg.contrast_weight = 0.5
        trainer.donors = donors  # another sample's packet
        other = trainer.sample_loss(sample).item()
    assert same == pytest.approx(plain + 0.5 * 2.0, abs=1e-4)
    assert plain <= other <= plain + 0.5 * (2.0 + plain)  # hinge in [0, margin + CE(right)]
    assert other != pytest.approx(same, abs=1e-6)  # another sample's packet changes the answer loss
    trainer.run()
    assert len(trainer.losses) == 1 and trainer.losses[0] > 0


@torch.no_grad()
def test_identity_alignment_reproduces_a_models_own_kv(tiny_pair):
    from lcflow.core.kv import capture_kv, kv_spec
    from lcflow.packets.alignment import identity_alignment

    _, (model, tok) = tiny_pair
    alignment = identity_alignment(kv_spec(model.config))
    ids, _ = tokenize_context(tok, DOC)
    captured = capture_kv(model, prefill(model, ids, full_cache()))
    z = alignment.encode(captured, 1)
    k, v = alignment.decode(z, 1, 2, 16)
    torch.testing.assert_close(k, captured.keys[1])
    torch.testing.assert_close(v, captured.values[1])


def test_question_attention_is_right_while_other_threads_use_the_model(tiny_pair):
    """Services run handoffs on one model from several threads: each thread's scores must be
    its own question's, not another pass's (hooks fire for every thread's forward)."""
    from concurrent.futures import ThreadPoolExecutor

    model, tok = tiny_pair[0]
    questions = ["Where does Mira Volkov live?", "Who plays the violin and owns a cat in the story?"]

    def scores(question: str) -> torch.Tensor:
        ids, _ = tokenize_context(tok, DOC)
        cache = prefill(model, ids, full_cache())
        q = tok("\n\n" + question_prompt(question), add_special_tokens=False, return_tensors="pt").input_ids
        return question_attention(model, cache, q, ids.shape[1])

    expected = {q: scores(q) for q in questions}
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda q: (q, scores(q)), questions * 8))
    for question, got in results:
        torch.testing.assert_close(got, expected[question])


@torch.no_grad()
def test_packet_diagnostics_tell_a_collapsed_packet_from_a_real_one(tiny_pair):
    """lcflow.research.diagnostics on the exact map: packets differ between samples, the
    receiver attends to them and the wrong packet changes the answer's NLL; an encoder whose
    projection is zero sends one packet for every document, and its share is 0."""
    from lcflow.core.kv import kv_spec
    from lcflow.packets.alignment import identity_alignment
    from lcflow.research.diagnostics import diagnose
    from lcflow.tasks import get_task

    _, receiver = tiny_pair
    adapter = span_adapter(receiver, receiver, identity_alignment(kv_spec(receiver[0].config)), slots=8)
    samples = get_task("facts-cross").samples("test", 4)
    sharer, recv = (
        Sharer(*receiver, adapter.encoder, adapter.config),
        Receiver(*receiver, adapter.decoder, adapter.config),
    )
    found = diagnose(sharer, recv, samples)
    summary = found["summary"]
    assert summary["n"] == 4 and summary["rows_median"] == 8 and len(found["readings"]) == 8
    assert summary["between_sample_share"]["min"] > 0.01
    assert 0 < summary["prefix_attention"]["right"] < 1
    assert summary["answer_nll"]["right"] != summary["answer_nll"]["wrong"]
    recall = summary["answer_recall"]
    assert recall["counted"] == 4 and 0 <= recall["share"] <= 1
    for projection in adapter.encoder.proj.values():
        projection.zero_()
    collapsed = diagnose(sharer, recv, samples)["summary"]
    assert collapsed["between_sample_share"]["mean"] == 0.0
    assert collapsed["answer_nll"]["right"] == pytest.approx(collapsed["answer_nll"]["wrong"])
    with pytest.raises(ValueError, match="at least 2"):
        diagnose(sharer, recv, samples[:1])


@torch.no_grad()
def test_answer_recall_says_whether_selection_covers_the_answer(tiny_pair):
    """A budget larger than the document selects everything: the answer is always covered; a
    budget of one token can cover at most one token; a two-hop answer is not in the document."""
    from lcflow.core.kv import kv_spec
    from lcflow.packets.alignment import identity_alignment
    from lcflow.research.diagnostics import packet_for
    from lcflow.tasks import get_task

    _, receiver = tiny_pair
    samples = get_task("facts-cross").samples("test", 6)
    alignment = identity_alignment(kv_spec(receiver[0].config))
    whole = span_adapter(receiver, receiver, alignment, slots=400)
    sharer = Sharer(*receiver, whole.encoder, whole.config)

    def answer_selected(sharer, sample):
        return packet_for(sharer, sample)[1]

    assert all(answer_selected(sharer, s) is True for s in samples)
    one = span_adapter(receiver, receiver, alignment, slots=1)
    sharer = Sharer(*receiver, one.encoder, one.config)
    tokens = [len(receiver[1](" " + s.answers[0], add_special_tokens=False).input_ids) for s in samples]
    hits = [answer_selected(sharer, s) for s in samples]
    assert all(hit is False for hit, n in zip(hits, tokens, strict=True) if n > 1)
    twohop = get_task("facts-twohop").samples("test", 1)[0]
    assert answer_selected(sharer, twohop) is None


def _fact_samples(count: int) -> list[QASample]:
    """Cross-context samples whose answer sits in one sentence of the sharer's document."""
    people = [("Mira Volkov", "Oslo"), ("Lior Senn", "Lima"), ("Ada Brook", "Kyoto"), ("Tomas Hale", "Quito")]
    samples = []
    for index in range(count):
        name, city = people[index % len(people)]
        others = " ".join(f"{n} plays chess." for n, _ in people if n != name)
        samples.append(
            QASample(
                id=f"s{index}",
                task="facts-cross",
                sharer_context=f"{others} {name} lives in {city}. The fox sleeps.",
                receiver_context="The sky is grey.",
                question=f"Where does {name} live?",
                answers=[city],
                same_context=False,
            )
        )
    return samples


def test_retrieval_heads_are_ranked_on_samples_and_steer_the_span_selection(tiny_pair, tmp_path):
    """`choose_heads` ranks every head, keeps the fewest within the tolerance of the best count,
    and an adapter that stores them selects with those heads alone."""
    from lcflow.training.heads import HEAD_COUNTS, choose_heads

    sharer, receiver = tiny_pair
    samples = _fact_samples(6)
    choice = choose_heads(*sharer, samples, m=8)
    layers, heads = sharer[0].config.num_hidden_layers, sharer[0].config.num_attention_heads
    assert choice.samples == 6 and set(choice.recall_by_count) == set(HEAD_COUNTS)
    assert 1 <= len(choice.heads) <= 16 and all(0 <= t < layers and 0 <= h < heads for t, h in choice.heads)
    best = max(choice.recall_by_count.values())
    assert choice.recall >= best - 0.01
    assert all(v < best - 0.01 for k, v in choice.recall_by_count.items() if k < len(choice.heads))
    assert [[t, h] for _, t, h in choice.ranked[: len(choice.heads)]] == choice.heads
    assert 0.0 <= choice.recall_all_heads <= 1.0

    alignment = same_model_alignment(receiver, bottleneck=16, documents=8)
    adapter = span_adapter(receiver, receiver, alignment, slots=8, selection="sentences-mean")
    adapter.config.selection_heads = [[1, 0]]
    adapter.save_pretrained(tmp_path / "heads")
    loaded = LatentAdapter.from_pretrained(tmp_path / "heads")
    assert loaded.config.selection_heads == [[1, 0]]
    model, tok = receiver
    prompt = question_prompt(QUESTION)
    context = Sharer(model, tok, loaded.encoder, loaded.config).prefill(DOC)
    chosen = Sharer(model, tok, loaded.encoder, loaded.config).select(context, question=prompt)
    cache = prefill(model, context.input_ids, full_cache())
    q_ids = tok("\n\n" + prompt, add_special_tokens=False, return_tensors="pt").input_ids
    one_head = head_attention(model, cache, q_ids, context.input_ids.shape[1])[1, 0]
    assert chosen.tolist() == top_sentences(one_head, context.spans, DOC, 8, per_token=True).tolist()
    # A chunk size in the config: the same head, its attention normalised chunk by chunk.
    loaded.config.selection_chunk = 5
    chunked = Sharer(model, tok, loaded.encoder, loaded.config).select(context, question=prompt)
    by_chunk = head_attention(model, cache, q_ids, context.input_ids.shape[1], chunk=5)[1, 0]
    assert chunked.tolist() == top_sentences(by_chunk, context.spans, DOC, 8, per_token=True).tolist()
    assert not torch.allclose(by_chunk, one_head)


def test_read_heads_reads_once_per_chunk_size_through_the_layers_asked(tiny_pair):
    """`read_heads_by_chunk` (what head choice and the selection probes read): one entry per chunk size,
    each the question's per-head attention as `head_attention` computes it over the document,
    layers past `layers` left NaN; the document's tokens and spans as a handoff tokenises them."""
    from lcflow.training.heads import read_heads, read_heads_by_chunk

    sharer, _ = tiny_pair
    model, tok = sharer
    sample = _fact_samples(1)[0]
    scores, spans = read_heads_by_chunk(model, tok, sample, chunks=(0, 5), layers=1)
    ids, expected_spans = tokenize_context(tok, sample.sharer_context)
    assert set(scores) == {0, 5} and torch.equal(spans, expected_spans)
    cache = prefill(model, ids, full_cache())
    q_ids = tok(
        "\n\n" + question_prompt(sample.question), add_special_tokens=False, return_tensors="pt"
    ).input_ids
    for chunk in (0, 5):
        expected = head_attention(model, cache, q_ids, ids.shape[1], layers=1, chunk=chunk)
        assert torch.allclose(scores[chunk], expected, equal_nan=True)
        assert not scores[chunk][0].isnan().any() and scores[chunk][1:].isnan().all()
    assert not torch.allclose(scores[0][0], scores[5][0])
    whole, _ = read_heads(model, tok, sample)  # every layer, one softmax
    assert torch.allclose(whole[:1], scores[0][:1]) and not whole[1].isnan().any()


def test_retrieval_heads_need_samples_whose_answer_is_in_the_document(tiny_pair):
    from lcflow.training.heads import choose_heads

    sharer, _ = tiny_pair
    sample = dataclasses.replace(_fact_samples(1)[0], answers=["Atlantis"])
    with pytest.raises(ValueError, match="no sample has its answer"):
        choose_heads(*sharer, [sample], m=8)


def test_selection_heads_must_be_layer_head_pairs(tiny_pair):
    _, receiver = tiny_pair
    with pytest.raises(ValueError, match="selection_heads"):
        LatentAdapter.for_models(
            "lcfx",
            model_identity(*receiver),
            model_identity(*receiver),
            packet="spans",
            selection_heads=[[1]],
        )
    with pytest.raises(ValueError, match="selection_chunk"):
        LatentAdapter.for_models(
            "lcfx", model_identity(*receiver), model_identity(*receiver), packet="spans", selection_chunk=-1
        )


def test_a_receiver_side_lora_trains_beside_the_decoder_resumes_and_is_read_by_eval(tiny_pair, tmp_path):
    """--receiver-lora: the packet's reader gets a text reader's capacity (a LoRA on the
    receiver), saved in OUT/receiver-reader; eval reads the packet through it; the receiver
    service refuses such an adapter instead of reading it with the decoder alone."""
    from lcflow.adapter.reader import RECEIVER_READER, TextReader, receiver_reader_model
    from lcflow.eval.harness import EvalModels, _halves
    from lcflow.serving.loading import load_adapter_half
    from lcflow.training.distill import SpanDistillTrainer

    sharer, receiver = tiny_pair
    aligned_span_adapter(tiny_pair, tmp_path / "init")
    before = {k: v.clone() for k, v in receiver[0].state_dict().items()}
    cfg = distill_config(tmp_path, "run", steps=2, checkpoint_every=1, receiver_lora=4)
    trainer = SpanDistillTrainer(cfg, sharer, receiver)
    out = trainer.run()
    assert trainer.receiver.model is trainer.reader.model and trainer.teacher_model is receiver[0]
    lora = TextReader.from_pretrained(out / RECEIVER_READER, *receiver)
    assert lora.config.channel == "lcfx" and lora.config.rank == 4
    trained = {k: v for k, v in trainer.reader.state_dict().items() if "lora_B" in k}
    assert trained and any(v.abs().sum() > 0 for v in trained.values())  # B starts at 0
    assert all(torch.equal(before[k], v) for k, v in receiver[0].state_dict().items())  # base untouched
    cfg.steps = 3  # resume: the LoRA comes back from the checkpoint too
    again = SpanDistillTrainer(cfg, sharer, receiver)
    again.resume()
    resumed = {k: v for k, v in again.reader.state_dict().items() if "lora_B" in k}
    assert all(torch.equal(resumed[k], trained[k]) for k in trained)

    model = receiver_reader_model(out, *receiver)
    ids = torch.tensor([[1, 5, 9, 13]])
    with torch.no_grad():
        assert not torch.allclose(model(ids).logits, receiver[0](ids).logits)
    assert receiver_reader_model(tmp_path / "init", *receiver) is None
    adapter = LatentAdapter.from_pretrained(out)
    models = EvalModels(sharer, receiver, adapters={"lcfx": adapter}, packet_readers={"lcfx": model})
    assert _halves(models, "lcfx")[1].model is model
    assert _halves(EvalModels(sharer, receiver, adapters={"lcfx": adapter}), "lcfx")[1].model is receiver[0]
    with pytest.raises(ValueError, match="receiver-side LoRA"):
        load_adapter_half(*receiver, str(out), "decoder", None)


@pytest.mark.parametrize("family", ["gemma3", "qwen3", "llama"])
@torch.no_grad()
def test_captured_queries_are_heads_first_in_every_family_even_with_as_many_tokens_as_heads(tiny_dir, family):
    """capture_queries gives [batch, heads, tokens, head_dim] whether the family's hook sees q_proj's
    output or q_norm's (before or after the transpose); a prompt of exactly `heads` tokens used to
    be read the wrong way round for Gemma3."""
    from lcflow.packets.selection import capture_queries
    from lcflow.testing.tiny import load_tiny

    model, _ = load_tiny(tiny_dir(family, 400, 2))
    attn = model.model.layers[0].self_attn
    heads, head_dim = attn.config.num_attention_heads, attn.head_dim
    projected = {}
    handle = attn.q_proj.register_forward_hook(lambda _m, _i, out: projected.setdefault("q", out))
    ids = torch.arange(1, heads + 1)[None]  # as many tokens as heads
    try:
        with capture_queries(model, 1) as queries:
            try:
                model.model(input_ids=ids)
            except Exception as stop:  # capture_queries ends the pass after its last layer
                assert type(stop).__name__ == "_EnoughLayers"
    finally:
        handle.remove()
    expected = projected["q"].view(1, heads, heads, head_dim)  # [batch, tokens, heads, D]
    if getattr(attn, "q_norm", None) is not None:
        expected = attn.q_norm(expected)  # per vector: the same before or after the transpose
    torch.testing.assert_close(queries[0], expected.transpose(1, 2))

import copy

import pytest
import torch

from lcflow.adapter import AdapterMismatchError, LatentAdapter
from lcflow.core.kv import model_identity
from lcflow.core.prompting import context_token_range, render_input, tokenize_context
from lcflow.core.tokens import align_spans
from lcflow.handoff.generation import GenerationSettings
from lcflow.handoff.pair import Receiver, Sharer
from lcflow.testing.tiny import load_tiny

CONTEXT = "Mira Volkov lives in Oslo. Lior Senn plays the violin and owns a cat."
PROMPT = "Where does Mira Volkov live?"


def make_adapter(tiny_pair, mode, **options):
    (ms, ts), (mr, tr) = tiny_pair
    options = {"bottleneck": 16, "slots": 4, **options}
    adapter = LatentAdapter.for_models(mode, model_identity(ms, ts), model_identity(mr, tr), **options)
    torch.manual_seed(1)
    for name, p in adapter.named_parameters():  # an untrained adapter is a no-op; make this one act
        if name.endswith("up.weight"):
            torch.nn.init.normal_(p, std=0.2)
    return adapter.eval()


def halves(tiny_pair, adapter):
    (ms, ts), (mr, tr) = tiny_pair
    return Sharer(ms, ts, adapter.encoder, adapter.config), Receiver(mr, tr, adapter.decoder, adapter.config)


def cache_tensors(prepared):
    return [(layer.keys.clone(), layer.values.clone()) for layer in prepared.cache.layers]


@torch.inference_mode()
def test_lcf_encoder_decoder_shapes_and_dtype(tiny_pair):
    adapter = make_adapter(tiny_pair, "lcf")
    sharer, receiver = halves(tiny_pair, adapter)
    context = sharer.prefill(CONTEXT)
    latents = sharer.encode(context)
    assert sorted(latents.layers) == [0, 1]  # every receiver layer
    for z in latents.layers.values():
        assert z.shape == (1, context.input_ids.shape[1], 16) and z.dtype == torch.float32
    prepared = receiver.prepare("lcf", PROMPT, latents, context=CONTEXT)
    spec = adapter.config.receiver.spec
    cached = prepared.input_ids.shape[1] - 1
    for layer, kind in zip(prepared.cache.layers, spec.layer_types, strict=True):
        # a sliding-window layer keeps only its window; the fusion must cope with that
        kept = min(cached, spec.sliding_window - 1) if kind == "sliding_attention" else cached
        assert layer.keys.shape == (1, spec.num_kv_heads, kept, spec.head_dim)
        assert layer.keys.dtype == torch.float32


@torch.inference_mode()
def test_closed_gate_leaves_receiver_cache_bit_identical(tiny_pair):
    adapter = make_adapter(tiny_pair, "lcf")
    sharer, receiver = halves(tiny_pair, adapter)
    latents = sharer.encode(sharer.prefill(CONTEXT))
    plain = cache_tensors(receiver.prepare_plain(PROMPT, [CONTEXT]))
    fused = cache_tensors(receiver.prepare("lcf", PROMPT, latents, context=CONTEXT))
    assert not torch.equal(plain[0][0], fused[0][0])  # open gate: the cache changed
    adapter.decoder.gates["0"].logit.fill_(-10.0)
    closed = cache_tensors(receiver.prepare("lcf", PROMPT, latents, context=CONTEXT))
    assert torch.equal(closed[0][0], plain[0][0]) and torch.equal(closed[0][1], plain[0][1])
    assert not torch.equal(closed[1][0], plain[1][0])  # the other layer's gate is still open


@torch.inference_mode()
def test_untrained_adapter_is_a_no_op_and_generation_continues_the_cache(tiny_pair):
    """With its zero-initialised output, LCF must reproduce the receiver reading the context itself."""
    (ms, ts), (mr, tr) = tiny_pair
    adapter = LatentAdapter.for_models(
        "lcf", model_identity(ms, ts), model_identity(mr, tr), bottleneck=16
    ).eval()
    sharer, receiver = halves(tiny_pair, adapter)
    settings = GenerationSettings(max_new_tokens=6)
    fused = receiver.generate(
        receiver.prepare("lcf", PROMPT, sharer.encode(sharer.prefill(CONTEXT)), context=CONTEXT), settings
    )
    plain = receiver.generate(receiver.prepare_plain(PROMPT, [CONTEXT]), settings)
    rendered = render_input(tr, PROMPT, [CONTEXT])
    reference = mr.generate(
        rendered.input_ids,
        attention_mask=torch.ones_like(rendered.input_ids),
        max_new_tokens=6,
        do_sample=False,
    )
    assert fused == plain == tr.decode(reference[0, rendered.input_ids.shape[1] :], skip_special_tokens=True)


def test_span_alignment_between_different_tokenizers(tiny_dir):
    _, coarse = load_tiny(tiny_dir("llama", 400, 2))
    _, fine = load_tiny(tiny_dir("llama", 300, 2))
    _, sharer_spans = tokenize_context(fine, CONTEXT)
    rendered = render_input(coarse, PROMPT, [CONTEXT])
    positions, receiver_spans = context_token_range(rendered, CONTEXT)
    assert len(sharer_spans) != len(receiver_spans)  # really different tokenisations
    alignment = align_spans(sharer_spans, receiver_spans)
    assert not alignment.identity and bool(alignment.covered.all())
    assert torch.allclose(alignment.weights.sum(1), torch.ones(len(receiver_spans)))
    # pooling position-marked latents: each receiver token gets the mean over exactly its overlapping tokens
    latents = torch.arange(len(sharer_spans), dtype=torch.float32)[:, None]
    pooled = alignment.apply(latents)[:, 0]
    for i, (start, end) in enumerate(receiver_spans.tolist()):
        hits = [j for j, (s, e) in enumerate(sharer_spans.tolist()) if min(end, e) > max(start, s)]
        assert pooled[i].item() == pytest.approx(sum(hits) / len(hits))
    same = align_spans(sharer_spans, sharer_spans)
    assert torch.equal(same.apply(latents), latents)


@torch.inference_mode()
def test_lcfx_packet_size_does_not_grow_with_context(tiny_pair):
    adapter = make_adapter(tiny_pair, "lcfx", receiver_aware=True)
    sharer, receiver = halves(tiny_pair, adapter)
    short = sharer.encode(sharer.prefill(CONTEXT), receiver_text=PROMPT)
    long = sharer.encode(sharer.prefill(" ".join([CONTEXT] * 8)), receiver_text=PROMPT)
    assert long.num_bytes() == short.num_bytes() == 2 * 4 * 16 * 4
    assert all(z.shape == (1, 4, 16) for z in long.layers.values())
    prepared = receiver.prepare("lcfx", PROMPT, long, receiver_context="Ada owns a cat.")
    assert prepared.input_ids.shape[1] == 4 + prepared.prompt_tokens
    assert isinstance(receiver.generate(prepared, GenerationSettings(max_new_tokens=3)), str)


@torch.inference_mode()
def test_receiver_aware_digest_changes_the_slots(tiny_pair):
    adapter = make_adapter(tiny_pair, "lcfx", receiver_aware=True)
    for pool in adapter.encoder.pool.values():
        torch.nn.init.normal_(pool.digest_in.weight, std=0.5)
    sharer, _ = halves(tiny_pair, adapter)
    context = sharer.prefill(CONTEXT)
    a = sharer.encode(context, receiver_text="Where does Mira live?").layers[0]
    b = sharer.encode(context, receiver_text="Which instrument does Lior play?").layers[0]
    assert not torch.allclose(a, b)


@pytest.mark.parametrize("mode", ["lcf", "lcfx"])
@torch.inference_mode()
def test_save_load_round_trip_gives_identical_outputs(tiny_pair, tmp_path, mode):
    adapter = make_adapter(tiny_pair, mode)
    adapter.save_pretrained(tmp_path / "adapter")
    assert {p.name for p in (tmp_path / "adapter").iterdir()} == {
        "adapter_config.json",
        "encoder.safetensors",
        "decoder.safetensors",
    }
    (ms, ts), (mr, tr) = tiny_pair
    encoder_only = LatentAdapter.from_pretrained(
        tmp_path / "adapter", part="encoder", sharer=model_identity(ms, ts)
    )
    decoder_only = LatentAdapter.from_pretrained(
        tmp_path / "adapter", part="decoder", receiver=model_identity(mr, tr)
    )
    assert encoder_only.decoder is None and decoder_only.encoder is None
    original_s, original_r = halves(tiny_pair, adapter)
    loaded_s = Sharer(ms, ts, encoder_only.encoder, encoder_only.config)
    loaded_r = Receiver(mr, tr, decoder_only.decoder, decoder_only.config)
    a = original_s.encode(original_s.prefill(CONTEXT), PROMPT)
    b = loaded_s.encode(loaded_s.prefill(CONTEXT), PROMPT)
    for t in a.layers:
        assert torch.equal(a.layers[t], b.layers[t])
    kwargs = {"context": CONTEXT, "receiver_context": "Ada owns a cat."}
    ca = cache_tensors(original_r.prepare(mode, PROMPT, a, **kwargs))
    cb = cache_tensors(loaded_r.prepare(mode, PROMPT, b, **kwargs))
    assert all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(ca, cb, strict=True))


def test_mismatched_models_are_refused_naming_both(tiny_pair, tiny_dir, tmp_path):
    adapter = make_adapter(tiny_pair, "lcf")
    adapter.save_pretrained(tmp_path / "adapter")
    other = model_identity(*load_tiny(tiny_dir("qwen3", 400, 2)))
    with pytest.raises(AdapterMismatchError) as err:
        LatentAdapter.from_pretrained(tmp_path / "adapter", receiver=other)
    message = str(err.value)
    assert adapter.config.receiver.config_hash[:8] in message and other.config_hash[:8] in message


@torch.inference_mode()
def test_pruning_drops_closed_layers_and_keeps_the_rest_identical(tiny_pair, tmp_path):
    (ms, ts), (mr, tr) = tiny_pair
    for mode in ("lcf", "lcfx"):
        adapter = make_adapter(tiny_pair, mode)
        adapter.decoder.gates["1"].logit.fill_(-10.0)
        pruned = adapter.pruned(min_gate=0.0)
        assert pruned.config.retained_layers == [0]
        assert pruned.parameter_counts()["total"] < adapter.parameter_counts()["total"]
        pruned.save_pretrained(tmp_path / mode)
        reloaded = LatentAdapter.from_pretrained(tmp_path / mode)
        full_s, full_r = halves(tiny_pair, adapter)
        small_s, small_r = halves(tiny_pair, reloaded)
        full = full_s.encode(full_s.prefill(CONTEXT), PROMPT)
        small = small_s.encode(small_s.prefill(CONTEXT), PROMPT)
        assert sorted(small.layers) == [0] and torch.equal(small.layers[0], full.layers[0])
        kwargs = {"context": CONTEXT, "receiver_context": "Ada owns a cat."}
        a = cache_tensors(full_r.prepare(mode, PROMPT, full, **kwargs))
        b = cache_tensors(small_r.prepare(mode, PROMPT, small, **kwargs))
        assert all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a, b, strict=True))


def test_untouched_copy_helper_is_deep(tiny_pair):
    adapter = make_adapter(tiny_pair, "lcf")
    clone = copy.deepcopy(adapter)
    clone.decoder.gates["0"].logit.data.fill_(3.0)
    assert adapter.gates()[0] != clone.gates()[0]


def test_unknown_packet_or_selection_is_refused_naming_the_choices(tiny_pair):
    (ms, ts), (mr, tr) = tiny_pair
    sharer, receiver = model_identity(ms, ts), model_identity(mr, tr)
    with pytest.raises(ValueError, match="sentences-mean"):
        LatentAdapter.for_models("lcfx", sharer, receiver, packet="spans", selection="paragraphs")
    with pytest.raises(ValueError, match="spans"):
        LatentAdapter.for_models("lcfx", sharer, receiver, packet="pools")

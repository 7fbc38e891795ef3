import copy

import pytest
import torch

from lcflow.adapter import AdapterMismatchError, LatentAdapter
from lcflow.adapter.c2c import C2CFuser, aligned_sharer_kv, record_sharer_rope
from lcflow.core.kv import RopeCodec, StoredRope, model_identity, prefill
from lcflow.core.prompting import context_token_range, render_input
from lcflow.core.tokens import align_spans
from lcflow.handoff.c2c import c2c_prepare
from lcflow.handoff.pair import Receiver, Sharer
from lcflow.testing.paper_pair import paper_pair_identities
from lcflow.testing.tiny import load_tiny

CONTEXT = "Mira Volkov lives in Oslo. Lior Senn plays the violin and owns a cat."
PROMPT = "Where does Mira Volkov live?"


def make_fuser(tiny_pair, key_logit=1.0, value_logit=1.0) -> C2CFuser:
    (ms, ts), (mr, tr) = tiny_pair
    torch.manual_seed(0)
    fuser = C2CFuser.for_models(model_identity(ms, ts), model_identity(mr, tr))
    with torch.no_grad():
        for projector in fuser.projectors.values():
            projector.key.gate_logit.fill_(key_logit)
            projector.value.gate_logit.fill_(value_logit)
    return fuser.eval()


@pytest.fixture(scope="module")
def fusion_inputs(tiny_pair):
    """The receiver's plain cache of [context + prompt] and the sharer's KV aligned onto it."""
    (ms, ts), (mr, tr) = tiny_pair
    shared = Sharer(ms, ts).prefill(CONTEXT)
    rendered = render_input(tr, PROMPT, [CONTEXT])
    cache = prefill(mr, rendered.input_ids[:, :-1])
    positions, spans = context_token_range(rendered, CONTEXT)
    alignment = align_spans(shared.spans, spans)
    kv = dict(enumerate(zip(shared.captured.keys, shared.captured.values, strict=True)))
    sharer_kv = aligned_sharer_kv(RopeCodec(ms), kv, alignment, positions)
    return cache, sharer_kv, positions, alignment.covered


def fused(fuser, fusion_inputs):
    cache, sharer_kv, positions, covered = fusion_inputs
    out = copy.deepcopy(cache)
    fuser.fuse(out, sharer_kv, positions, covered)
    return out


def test_paper_pair_parameter_count_matches_released_c2c():
    sharer, receiver = paper_pair_identities()
    with torch.device("meta"):  # 478M parameters: count them without allocating
        fuser = C2CFuser.for_models(sharer, receiver)
    counts = fuser.parameter_counts()
    S, R, H = 2 * 64, 8 * 128, 8
    path = S * R + 8 * R**2 + 5 * R + R * H + H + 1  # the docstring's closed form
    assert counts["per_layer"] == 2 * path == 17_066_002
    assert counts["total"] == 28 * 17_066_002 == 477_848_056
    assert fuser.config.layer_map[27] == 23 and fuser.config.layer_map[4] == 0  # last_aligned


@torch.inference_mode()
def test_c2c_prepare_keeps_shapes_and_changes_only_covered_context_tokens(tiny_pair, fusion_inputs):
    (ms, ts), (mr, tr) = tiny_pair
    fuser = make_fuser(tiny_pair)
    prepared, sent = c2c_prepare(fuser, (ms, ts), Receiver(mr, tr), CONTEXT, PROMPT)
    plain, sharer_kv, positions, covered = fusion_inputs
    s_spec = fuser.config.sharer.spec
    layers_read = len(fuser.config.sharer_layers_needed())  # keys and values in bf16, layers the fuser reads
    assert sent == 2 * 2 * layers_read * s_spec.num_kv_heads * s_spec.head_dim * _sharer_tokens(ms, ts)
    for layer, (fused_layer, plain_layer) in enumerate(zip(prepared.cache.layers, plain.layers, strict=True)):
        assert fused_layer.keys.shape == plain_layer.keys.shape
        assert fused_layer.values.shape == plain_layer.values.shape
        offset = plain_layer.get_seq_length() - plain_layer.keys.shape[-2]
        changed = (fused_layer.keys != plain_layer.keys).any(dim=(0, 1, 3))
        touched = torch.zeros_like(changed)
        inside = positions >= offset
        touched[positions[inside] - offset] = covered[inside]
        assert changed.any(), f"layer {layer}: an open fuser changed nothing"
        assert not (changed & ~touched).any(), f"layer {layer}: a token outside the covered context changed"


def _sharer_tokens(model, tokenizer) -> int:
    return Sharer(model, tokenizer).prefill(CONTEXT).input_ids.shape[1]


@torch.inference_mode()
def test_closed_hard_gate_leaves_receiver_cache_bit_identical(tiny_pair, fusion_inputs):
    plain = fusion_inputs[0]
    closed = fused(make_fuser(tiny_pair, key_logit=-0.5, value_logit=-2.0), fusion_inputs)
    for a, b in zip(closed.layers, plain.layers, strict=True):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
    # Only the value gate open: keys stay bit-identical, values change.
    half = fused(make_fuser(tiny_pair, key_logit=-1.0, value_logit=1.0), fusion_inputs)
    for a, b in zip(half.layers, plain.layers, strict=True):
        assert torch.equal(a.keys, b.keys) and not torch.equal(a.values, b.values)


def test_untrained_fuser_is_closed_at_inference(tiny_pair, fusion_inputs):
    (ms, ts), (mr, tr) = tiny_pair
    fuser = C2CFuser.for_models(model_identity(ms, ts), model_identity(mr, tr)).eval()  # logits 0
    out = fused(fuser, fusion_inputs)
    assert all(torch.equal(a.keys, b.keys) for a, b in zip(out.layers, fusion_inputs[0].layers, strict=True))


def test_gumbel_gate_in_training_is_stochastic_seeded_and_differentiable(tiny_pair, fusion_inputs):
    fuser = make_fuser(tiny_pair, key_logit=-1.0, value_logit=-1.0).train()  # closed logits still pass noise
    fuser.anneal(0)

    def run(seed):
        torch.manual_seed(seed)
        return fused(fuser, fusion_inputs).layers[1].keys

    a, b, c = run(1), run(1), run(2)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    assert not torch.equal(a, fusion_inputs[0].layers[1].keys)  # a negative logit is not a hard 0 in training
    run(3).square().sum().backward()
    projector = fuser.projectors["1"]
    assert projector.key.gate_logit.grad is not None and projector.key.gate_logit.grad != 0
    assert projector.key.fuse_in.weight.grad.abs().sum() > 0


def test_temperature_anneals_from_1_to_0_001():
    sharer, receiver = paper_pair_identities()
    with torch.device("meta"):
        fuser = C2CFuser.for_models(sharer, receiver)
    assert fuser.anneal(0) == 1.0
    assert fuser.anneal(50, anneal_steps=100) == pytest.approx(0.001**0.5)
    assert fuser.anneal(100, anneal_steps=100) == pytest.approx(0.001)
    assert fuser.anneal(10_000) == pytest.approx(0.001)
    with pytest.raises(ValueError):
        fuser.set_temperature(0.0)


@torch.inference_mode()
def test_save_load_round_trip_gives_identical_outputs(tiny_pair, fusion_inputs, tmp_path):
    fuser = make_fuser(tiny_pair, key_logit=0.5, value_logit=-0.5)
    fuser.save_pretrained(tmp_path / "c2c")
    assert sorted(p.name for p in (tmp_path / "c2c").iterdir()) == [
        "adapter_config.json",
        "fuser.safetensors",
    ]
    loaded = C2CFuser.from_pretrained(tmp_path / "c2c")
    assert loaded.config.mode == "c2c" and not loaded.training
    assert loaded.gate_logits() == fuser.gate_logits()
    before, after = fused(fuser, fusion_inputs), fused(loaded, fusion_inputs)
    for a, b in zip(before.layers, after.layers, strict=True):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)


def test_from_pretrained_refuses_other_models_and_other_modes(tiny_pair, tiny_dir, tmp_path):
    (ms, ts), (mr, tr) = tiny_pair
    make_fuser(tiny_pair).save_pretrained(tmp_path / "c2c")
    other, other_tok = load_tiny(tiny_dir("qwen2", 300, 3))
    with pytest.raises(AdapterMismatchError, match="sharer"):
        C2CFuser.from_pretrained(tmp_path / "c2c", sharer=model_identity(other, other_tok))
    C2CFuser.from_pretrained(tmp_path / "c2c", sharer=model_identity(ms, ts), receiver=model_identity(mr, tr))
    lcf = LatentAdapter.for_models("lcf", model_identity(ms, ts), model_identity(mr, tr), bottleneck=8)
    lcf.save_pretrained(tmp_path / "lcf")
    with pytest.raises(ValueError, match="LatentAdapter"):
        C2CFuser.from_pretrained(tmp_path / "lcf")


# --- C2C without the sharer model: the stored RoPE ------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_stored_rope_rotates_exactly_as_the_model(tiny_pair, family):
    """The receiver service re-rotates the sharer's keys with the RoPE the adapter recorded; it
    must be the model's own, bit for bit, on every layer type (Gemma3 has two bases)."""
    (ms, _), (mr, _) = tiny_pair
    model = ms if ms.config.model_type == family else mr
    assert model.config.model_type.startswith(family)
    codec, stored = RopeCodec(model), StoredRope.from_dict(StoredRope.of_model(model).to_dict())
    torch.manual_seed(0)
    spec = codec.spec
    keys = torch.randn(1, spec.num_kv_heads, 7, spec.head_dim)
    positions = torch.tensor([[0, 1, 5, 40, 41, 300, 2047]])
    assert len(set(spec.layer_types)) == (2 if family == "gemma3" else 1)
    for layer in range(spec.num_layers):
        assert torch.equal(stored.rotate(keys, positions, layer), codec.rotate(keys, positions, layer))


def test_stored_rope_refuses_what_does_not_fit(tiny_pair):
    """Read from an adapter's config: values that are not numbers, a malformed record, or one
    recorded for another model are ValueErrors saying so (the receiver lists the adapter unusable)."""
    (ms, _), _ = tiny_pair
    spec = RopeCodec(ms).spec
    data = StoredRope.of_model(ms).to_dict()
    StoredRope.from_dict(data, spec)  # fits
    kind = data["layer_types"][0]
    bad = {**data, "inv_freq": {kind: [float("nan"), *data["inv_freq"][kind][1:]]}}
    with pytest.raises(ValueError, match="not finite"):
        StoredRope.from_dict(bad)
    with pytest.raises(ValueError, match="malformed"):
        StoredRope.from_dict({"layer_types": data["layer_types"]})
    with pytest.raises(ValueError, match="does not fit the model"):
        StoredRope.from_dict({**data, "layer_types": data["layer_types"][:-1]}, spec)
    with pytest.raises(ValueError, match="does not fit the model"):
        StoredRope.from_dict({**data, "inv_freq": {kind: data["inv_freq"][kind][:-1]}}, spec)


@torch.inference_mode()
def test_the_receiver_half_alone_prepares_what_the_in_process_handoff_does(tiny_pair, tmp_path):
    """Served C2C: the receiver gets the sharer's KV as the C2C packet carries it and re-rotates
    with the RoPE recorded in the adapter; its cache equals the in-process one's (sharer model at hand)."""
    from lcflow.adapter.c2c import C2CSender
    from lcflow.handoff.pair import Latents

    (ms, ts), (mr, tr) = tiny_pair
    fuser = make_fuser(tiny_pair)
    record_sharer_rope(fuser.config, ms)
    fuser.save_pretrained(tmp_path / "c2c")
    loaded = C2CFuser.from_pretrained(tmp_path / "c2c")
    expected, _ = c2c_prepare(loaded, (ms, ts), Receiver(mr, tr), CONTEXT, PROMPT)
    shared = Sharer(ms, ts).prefill(CONTEXT)
    packet = Latents("c2c", dict(C2CSender(loaded.config).encode_layers(shared.captured)), shared.spans)
    assert sorted(packet.layers) == loaded.config.sharer_layers_needed()
    served = Receiver(mr, tr, loaded, loaded.config).prepare("c2c", PROMPT, packet, context=CONTEXT)
    assert torch.equal(served.input_ids, expected.input_ids)
    for a, b in zip(served.cache.layers, expected.cache.layers, strict=True):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)


def test_a_c2c_adapter_without_the_sharer_rope_says_how_to_fix_it(tiny_pair):
    fuser = make_fuser(tiny_pair)
    with pytest.raises(ValueError, match="sharer_rope"):
        fuser.sharer_rope()

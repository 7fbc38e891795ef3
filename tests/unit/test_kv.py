import pytest
import torch
from transformers import GPT2Config

from lcflow.core.kv import (
    RopeCodec,
    UnsupportedModelError,
    cache_kv,
    capture_kv,
    full_cache,
    kv_spec,
    model_identity,
    prefill,
    split_joint,
)
from lcflow.testing.tiny import load_tiny

FAMILIES = ["llama", "qwen2", "qwen3", "gemma3"]


@pytest.mark.parametrize("family", FAMILIES)
def test_capture_shapes_per_family(tiny_dir, family):
    model, tok = load_tiny(tiny_dir(family, 400, 3))
    spec = kv_spec(model.config)
    ids = tok("Mira lives in Oslo and works as a baker.", return_tensors="pt").input_ids
    captured = capture_kv(model, prefill(model, ids, full_cache()))
    assert len(captured.keys) == spec.num_layers == 3
    for k, v in zip(captured.keys, captured.values, strict=True):
        assert k.shape == v.shape == (1, spec.num_kv_heads, ids.shape[1], spec.head_dim)
    assert captured.joint(0).shape == (1, ids.shape[1], spec.kv_dim)
    k, v = split_joint(captured.joint(1), spec.num_kv_heads, spec.head_dim)
    assert torch.equal(k, captured.keys[1]) and torch.equal(v, captured.values[1])


def test_gemma3_mixes_sliding_and_full_layers(tiny_dir):
    model, _ = load_tiny(tiny_dir("gemma3", 400, 3))
    spec = kv_spec(model.config)
    assert set(spec.layer_types) == {"sliding_attention", "full_attention"}
    assert spec.sliding_window == 32


@pytest.mark.parametrize("family", FAMILIES)
def test_rope_round_trip_is_exact(tiny_dir, family):
    model, tok = load_tiny(tiny_dir(family, 400, 3))
    rope = RopeCodec(model)
    ids = tok("The quick brown fox jumps over the lazy dog again and again.", return_tensors="pt").input_ids
    cache = prefill(model, ids, full_cache())
    positions = torch.arange(ids.shape[1]).unsqueeze(0)
    for layer in range(3):
        stored, _ = cache_kv(cache, layer)
        plain = rope.derotate(stored, positions, layer)
        assert not torch.allclose(plain, stored, atol=1e-3)  # RoPE really was on the stored keys
        assert torch.allclose(rope.rotate(plain, positions, layer), stored, atol=1e-5)


def test_derotated_keys_do_not_depend_on_position(tiny_dir):
    """Re-rotating a captured key at other positions equals what the model computes there."""
    model, tok = load_tiny(tiny_dir("qwen3", 400, 2))
    rope = RopeCodec(model)
    ids = tok("Lior plays the violin.", return_tensors="pt").input_ids
    cache = prefill(model, ids, full_cache())
    stored, _ = cache_kv(cache, 0)
    plain = rope.derotate(stored, torch.arange(ids.shape[1])[None], 0)
    shifted = rope.rotate(plain, torch.arange(5, 5 + ids.shape[1])[None], 0)
    again = rope.derotate(shifted, torch.arange(5, 5 + ids.shape[1])[None], 0)
    assert torch.allclose(again, plain, atol=1e-5)


def test_unsupported_architecture_is_named():
    with pytest.raises(UnsupportedModelError, match="gpt2"):
        kv_spec(GPT2Config())


def test_identity_tells_models_apart(tiny_dir):
    a = model_identity(*load_tiny(tiny_dir("llama", 400, 2)))
    b = model_identity(*load_tiny(tiny_dir("llama", 300, 2)))
    a2 = model_identity(*load_tiny(tiny_dir("llama", 400, 2)))
    assert a.same_model(a2) and not a.same_model(b)

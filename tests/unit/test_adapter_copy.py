"""scripts/adapter_copy.py: a copy of an adapter with config fields changed, validated first."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from lcflow.adapter import AdapterConfig

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "adapters" / "gemma3-to-gemma3-lcfx"


def load_script():
    spec = importlib.util.spec_from_file_location("adapter_copy", ROOT / "scripts" / "adapter_copy.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_copy_changes_only_the_fields_asked_and_leaves_the_card_behind(tmp_path):
    script = load_script()
    settings = dict(map(script.parse_setting, ["slots=128", "selection_chunk=128"]))
    assert settings == {"slots": 128, "selection_chunk": 128}
    script.copy_adapter(SHIPPED, tmp_path / "copy", settings)
    source, copy = AdapterConfig.load(SHIPPED).to_dict(), AdapterConfig.load(tmp_path / "copy").to_dict()
    assert (copy["slots"], copy["selection_chunk"]) == (128, 128)
    assert copy["training"].pop("copied_from") == {"adapter": str(SHIPPED), "changed": settings}
    assert {k: v for k, v in copy.items() if k not in settings} == {
        k: v for k, v in source.items() if k not in settings
    }
    for weights in SHIPPED.glob("*.safetensors"):
        assert (tmp_path / "copy" / weights.name).read_bytes() == weights.read_bytes()
    assert (
        not (tmp_path / "copy" / "README.md").exists()
        and not (tmp_path / "copy" / "model_card.json").exists()
    )


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("selection_chunk=-1", "selection_chunk must be 0"),
        ("slot=3", "unknown adapter config field"),
        ("slots=abc", "slots expects int"),
        ("slots=true", "slots expects int"),
        ("training=1", "training expects dict"),
    ],
)
def test_a_bad_setting_is_refused_before_anything_is_written(tmp_path, setting, message):
    script = load_script()
    (tmp_path / "copy").mkdir()
    (tmp_path / "copy" / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match=message):
        script.copy_adapter(SHIPPED, tmp_path / "copy", dict([script.parse_setting(setting)]))
    assert [p.name for p in (tmp_path / "copy").iterdir()] == ["keep.txt"]


def test_a_value_that_is_not_json_is_a_string_and_a_setting_needs_an_equals_sign():
    script = load_script()
    assert script.parse_setting("selection=sentences-mean") == ("selection", "sentences-mean")
    assert script.parse_setting("selection_heads=[[5, 2]]") == ("selection_heads", [[5, 2]])
    with pytest.raises(ValueError, match="FIELD=VALUE"):
        script.parse_setting("slots")


def test_the_copy_never_replaces_its_source(tmp_path):
    script = load_script()
    source = tmp_path / "adapter"
    script.copy_adapter(SHIPPED, source, {})
    for destination in (source, tmp_path):
        with pytest.raises(ValueError, match="would replace"):
            script.copy_adapter(source, destination, {"slots": 64})
    assert AdapterConfig.load(source).slots == AdapterConfig.load(SHIPPED).slots

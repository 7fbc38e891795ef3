"""The paper's model pair by shape only: sharer Qwen2.5-0.5B-Instruct, receiver Qwen3-0.6B.

No model hub is reachable here, so the two published config.json files are typed in under
lcflow/data/paper_pair/. From them we get, without any weights:

    configs      transformers configs                           (paper_pair_configs)
    identities   ModelIdentity per model, for building adapters  (paper_pair_identities)
    models       random-weight models, for *speed only*          (build_paper_pair_models)

The identities carry a placeholder tokenizer hash, PAPER_PAIR_TOKENIZER_HASH, because no
tokenizer can be had: an adapter built for them is refused by the real, downloaded models
(their tokenizer hash differs), which is right since it was never trained on them.

Published sizes, checked in the tests: Qwen2.5-0.5B 494,032,768 parameters (24 layers,
2 KV heads x 64), Qwen3-0.6B 596,049,920 (28 layers, 8 KV heads x 128); both tie embeddings.
"""

from __future__ import annotations

import json
import logging
from importlib import resources

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from lcflow.core.kv import _IDENTITY_FIELDS, ModelIdentity, _sha256, kv_spec, text_config

log = logging.getLogger(__name__)

SHARER_NAME = "Qwen/Qwen2.5-0.5B-Instruct"
RECEIVER_NAME = "Qwen/Qwen3-0.6B"
CONFIG_FILES = {SHARER_NAME: "qwen2.5-0.5b-instruct.json", RECEIVER_NAME: "qwen3-0.6b.json"}

# Stands in for a tokenizer's vocabulary hash: the pair is known by its shapes only.
PAPER_PAIR_TOKENIZER_HASH = "paper-pair-shapes-only"

# What a random-weight model built from these configs may be used for: timings, never accuracy.
RANDOM_WEIGHTS_LABEL = "random weights (paper-pair shapes): speed measurements only"


def _load_config(filename: str) -> PretrainedConfig:
    data = json.loads((resources.files("lcflow") / "data" / "paper_pair" / filename).read_text())
    data = {k: v for k, v in data.items() if not k.startswith("_")}  # "_source" is our note
    return AutoConfig.for_model(data.pop("model_type"), **data)


def paper_pair_configs() -> tuple[PretrainedConfig, PretrainedConfig]:
    """(sharer config, receiver config) from the published values."""
    return _load_config(CONFIG_FILES[SHARER_NAME]), _load_config(CONFIG_FILES[RECEIVER_NAME])


def identity_from_config(config: PretrainedConfig, name: str, tokenizer_hash: str) -> ModelIdentity:
    """A ModelIdentity without instantiating the model: the config hash is computed exactly as
    lcflow.core.kv.model_identity does, so it equals the hash of a model built from this config."""
    cfg = text_config(config)
    fields = {f: getattr(cfg, f, None) for f in _IDENTITY_FIELDS}
    return ModelIdentity(
        name=name, config_hash=_sha256(fields), tokenizer_hash=tokenizer_hash, spec=kv_spec(config)
    )


def paper_pair_identities() -> tuple[ModelIdentity, ModelIdentity]:
    """(sharer, receiver) identities for building adapters of the paper pair's shapes."""
    sharer_cfg, receiver_cfg = paper_pair_configs()
    return (
        identity_from_config(sharer_cfg, SHARER_NAME, PAPER_PAIR_TOKENIZER_HASH),
        identity_from_config(receiver_cfg, RECEIVER_NAME, PAPER_PAIR_TOKENIZER_HASH),
    )


def model_parameter_count(config: PretrainedConfig) -> int:
    """Parameters of the model a config describes, counted on the meta device (nothing allocated)."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def build_paper_pair_models(dtype: torch.dtype = torch.float32, seed: int = 0):
    """Random-weight (sharer, receiver) models of the paper pair's shapes, frozen, in eval mode.

    For latency benchmarks only: ~1.1B parameters in all (4.4 GB in fp32), several seconds to
    build. Tests must not call this unless marked slow. Each model's `name_or_path` says what it is.
    """
    log.warning("building %s and %s with %s", SHARER_NAME, RECEIVER_NAME, RANDOM_WEIGHTS_LABEL)
    torch.manual_seed(seed)
    models = []
    for name, config in zip((SHARER_NAME, RECEIVER_NAME), paper_pair_configs(), strict=True):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
        model.requires_grad_(False)
        model.config._name_or_path = f"random:{name}"
        models.append(model)
    return models[0], models[1]

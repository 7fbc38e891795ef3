"""KV caches as plain tensors: what shape a model's cache has, how to capture it, how to undo RoPE.

A decoder-only transformer stores, per layer, keys and values of shape
[batch, kv_heads, tokens, head_dim]. Keys are stored *after* rotary position embedding
(RoPE), so they depend on the absolute position of each token. Latents must not: the
receiver places them at its own positions. So we de-rotate keys on the sharer side and
re-rotate them at the receiver's positions:

    RoPE:     k_rot = k * cos(p) + rotate_half(k) * sin(p)
    inverse:  k     = (k_rot * cos(p) - rotate_half(k_rot) * sin(p)) / (cos(p)^2 + sin(p)^2)

The denominator is 1 for plain RoPE; scaled variants (YaRN) fold an attention factor into
cos and sin, which the division undoes exactly.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

import torch
from transformers import DynamicCache

# model_type -> family name. Every family here uses rotate_half RoPE on full head_dim and stores
# keys after RoPE (Qwen3 and Gemma3 after a per-head k-norm, which is fine: we only undo RoPE).
SUPPORTED_FAMILIES = {
    "llama": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "gemma3_text": "gemma3",
    "gemma3": "gemma3",
}


class UnsupportedModelError(ValueError):
    """The model's architecture is not one whose KV cache we know how to read and write."""


@dataclass(frozen=True)
class KVSpec:
    """The shape of one model's KV cache."""

    family: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    layer_types: tuple[str, ...]  # "full_attention" or "sliding_attention", one per layer
    sliding_window: int | None

    @property
    def kv_dim(self) -> int:
        """Width of one token's keys and values together in one layer: 2 * heads * head_dim."""
        return 2 * self.num_kv_heads * self.head_dim

    def to_dict(self) -> dict:
        return asdict(self)


def text_config(config):
    """The decoder config (Gemma3's multimodal config nests it)."""
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def kv_spec(config) -> KVSpec:
    """Read the KV cache shape from a Hugging Face config, or refuse an unsupported architecture."""
    cfg = text_config(config)
    model_type = getattr(cfg, "model_type", None)
    if model_type not in SUPPORTED_FAMILIES:
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not supported: lcflow reads and writes the KV caches of "
            f"{sorted(set(SUPPORTED_FAMILIES.values()))} models ({sorted(SUPPORTED_FAMILIES)}). "
            "Use one of those families, or add yours to lcflow.core.kv.SUPPORTED_FAMILIES after checking its RoPE."
        )
    if getattr(cfg, "partial_rotary_factor", 1.0) not in (None, 1.0):
        raise UnsupportedModelError(f"{model_type}: partial rotary embeddings are not supported")
    num_heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // num_heads
    layer_types = getattr(cfg, "layer_types", None) or ["full_attention"] * cfg.num_hidden_layers
    sliding = getattr(cfg, "sliding_window", None) if "sliding_attention" in layer_types else None
    return KVSpec(
        family=SUPPORTED_FAMILIES[model_type],
        num_layers=cfg.num_hidden_layers,
        num_kv_heads=getattr(cfg, "num_key_value_heads", None) or num_heads,
        head_dim=head_dim,
        layer_types=tuple(layer_types),
        sliding_window=sliding,
    )


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """[x1, x2] -> [-x2, x1] over the last dimension: the RoPE convention of all supported families."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class RopeCodec:
    """Applies and removes a model's own RoPE, per layer (Gemma3 uses two RoPE bases)."""

    def __init__(self, model):
        self.backbone = decoder_backbone(model)
        self.rotary = self.backbone.rotary_emb
        self.spec = kv_spec(model.config)
        # Gemma3's rotary module takes the layer type; the others have one RoPE for all layers.
        self.per_layer_type = hasattr(self.rotary, "layer_types")

    def cos_sin(self, positions: torch.Tensor, layer: int, like: torch.Tensor):
        """cos, sin of shape [batch, 1, tokens, head_dim] for positions [batch, tokens]."""
        args = (like, positions.to(like.device))
        if self.per_layer_type:
            cos, sin = self.rotary(*args, layer_type=self.spec.layer_types[layer])
        else:
            cos, sin = self.rotary(*args)
        return cos.unsqueeze(1).to(like.dtype), sin.unsqueeze(1).to(like.dtype)

    def rotate(self, keys: torch.Tensor, positions: torch.Tensor, layer: int) -> torch.Tensor:
        """Apply RoPE to un-rotated keys [batch, heads, tokens, head_dim] at positions [batch, tokens]."""
        cos, sin = self.cos_sin(positions, layer, keys)
        return keys * cos + rotate_half(keys) * sin

    def derotate(self, keys: torch.Tensor, positions: torch.Tensor, layer: int) -> torch.Tensor:
        """Remove RoPE from stored keys: the exact inverse of `rotate`."""
        cos, sin = self.cos_sin(positions, layer, keys)
        return (keys * cos - rotate_half(keys) * sin) / (cos * cos + sin * sin)


STORABLE_ROPE_TYPES = ("default", "linear", "llama3", "yarn")  # independent of the sequence length


@dataclass
class StoredRope:
    """A model's RoPE as plain numbers, to rotate its keys where the model itself is not loaded.

    Per layer type t (Gemma3 has two, the other families one): the inverse frequencies f_t
    [head_dim / 2] and the amplitude a_t, as the model's rotary module holds them. At position p:

        angle = p * [f_t ; f_t]        cos = a_t cos(angle),  sin = a_t sin(angle)

    which is the rotary module's own arithmetic (float32), so `rotate` matches `RopeCodec.rotate`
    of the model exactly. Only position-independent RoPE types can be stored (default, linear,
    llama3, yarn); the others ("dynamic", "longrope") change with the sequence length and are refused.

    C2C over the wire needs it: the receiver re-rotates the sharer's keys at its own positions
    with the sharer's RoPE (lcflow.adapter.c2c), and the receiver service runs no sharer model."""

    layer_types: list[str]  # per layer
    inv_freq: dict[str, list[float]]  # per layer type
    scale: dict[str, float]  # per layer type (attention_scaling; 1.0 for plain RoPE)

    @classmethod
    def of_model(cls, model) -> StoredRope:
        codec = RopeCodec(model)
        rotary, types = codec.rotary, list(codec.spec.layer_types)
        inv_freq, scale = {}, {}
        for kind in sorted(set(types)):
            prefix = f"{kind}_" if codec.per_layer_type else ""
            freq = getattr(rotary, f"{prefix}inv_freq", None)
            rope_type = getattr(rotary, "rope_type", "default")
            rope_type = rope_type.get(kind, "default") if isinstance(rope_type, dict) else rope_type
            if freq is None or rope_type not in STORABLE_ROPE_TYPES:
                raise UnsupportedModelError(
                    f"cannot store this model's RoPE (type {rope_type!r}): C2C over the wire needs a "
                    "position-independent RoPE"
                )
            inv_freq[kind] = freq.detach().float().cpu().tolist()
            scale[kind] = float(getattr(rotary, f"{prefix}attention_scaling", 1.0))
        return cls(types, inv_freq, scale)

    def rotate(self, keys: torch.Tensor, positions: torch.Tensor, layer: int) -> torch.Tensor:
        """Apply the stored RoPE to un-rotated keys [batch, heads, tokens, head_dim] at positions
        [batch, tokens] (the same call as RopeCodec.rotate)."""
        kind = self.layer_types[layer]
        freq = torch.tensor(self.inv_freq[kind], dtype=torch.float32, device=keys.device)
        angles = positions.to(keys.device)[..., None].float() * freq  # [batch, tokens, head_dim / 2]
        angles = torch.cat((angles, angles), dim=-1).unsqueeze(1)  # [batch, 1, tokens, head_dim]
        cos, sin = (
            (angles.cos() * self.scale[kind]).to(keys.dtype),
            (angles.sin() * self.scale[kind]).to(keys.dtype),
        )
        return keys * cos + rotate_half(keys) * sin

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict, spec: KVSpec | None = None) -> StoredRope:
        """Checked (ValueError): every layer's type has frequencies and a scale, all finite numbers,
        and with `spec` (the model's) one type per layer and head_dim / 2 frequencies each."""
        try:
            rope = cls(list(data["layer_types"]), dict(data["inv_freq"]), dict(data["scale"]))
            values = {kind: [*rope.inv_freq[kind], rope.scale[kind]] for kind in set(rope.layer_types)}
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"stored RoPE is malformed: {err!r}") from None
        for kind, numbers in values.items():
            if not all(isinstance(v, (int, float)) and abs(v) < float("inf") for v in numbers):
                raise ValueError(f"stored RoPE for {kind!r} has values that are not finite numbers")
        if spec is not None:
            widths = {len(rope.inv_freq[kind]) for kind in values}
            if len(rope.layer_types) != spec.num_layers or widths != {spec.head_dim // 2}:
                raise ValueError(
                    f"stored RoPE ({len(rope.layer_types)} layers, {sorted(widths)} frequencies) does not fit "
                    f"the model ({spec.num_layers} layers, head_dim {spec.head_dim})"
                )
        return rope


@dataclass
class CapturedKV:
    """One prefill's KV cache as plain tensors, keys without RoPE.

    keys[l], values[l]: [batch, kv_heads, tokens, head_dim] for layer l.
    """

    keys: list[torch.Tensor]
    values: list[torch.Tensor]

    @property
    def num_tokens(self) -> int:
        return self.keys[0].shape[-2]

    def joint(self, layer: int) -> torch.Tensor:
        """Keys and values of one layer side by side per token: [batch, tokens, 2 * heads * head_dim]."""
        k, v = self.keys[layer], self.values[layer]
        batch, _, tokens, _ = k.shape
        return torch.cat(
            [k.transpose(1, 2).reshape(batch, tokens, -1), v.transpose(1, 2).reshape(batch, tokens, -1)], -1
        )


def split_joint(joint: torch.Tensor, num_heads: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of `CapturedKV.joint`: [batch, tokens, 2*H*D] -> keys, values [batch, H, tokens, D]."""
    batch, tokens, _ = joint.shape
    k, v = joint.split(num_heads * head_dim, dim=-1)
    return (
        k.reshape(batch, tokens, num_heads, head_dim).transpose(1, 2),
        v.reshape(batch, tokens, num_heads, head_dim).transpose(1, 2),
    )


def full_cache() -> DynamicCache:
    """A cache that keeps every token in every layer, also in sliding-window layers.

    Sliding-window layers of a config-built cache drop tokens older than the window; for
    capture we want the whole context, and the attention mask still enforces the window.
    """
    return DynamicCache()


def decoder_backbone(model):
    """The model's transformer layers without the LM head (`model.model` where there is no
    `get_decoder`)."""
    return model.get_decoder() if hasattr(model, "get_decoder") else model.model


def run_backbone(model, input_ids: torch.Tensor, cache: DynamicCache) -> None:
    """Fill `cache` with the transformer layers only: the LM head is skipped, since a prefill
    needs no logits (a 262k-vocabulary head over every prompt token costs more than the layers)."""
    decoder_backbone(model)(input_ids=input_ids.to(model.device), past_key_values=cache, use_cache=True)


@torch.no_grad()
def prefill(model, input_ids: torch.Tensor, cache: DynamicCache | None = None) -> DynamicCache:
    """Run the model over input_ids [batch, tokens] and return the filled cache."""
    cache = cache if cache is not None else DynamicCache(config=model.config)
    run_backbone(model, input_ids, cache)
    return cache


def cache_kv(cache: DynamicCache, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The stored (rotated) keys and values of one layer of a transformers cache."""
    entry = cache.layers[layer]
    return entry.keys, entry.values


def capture_kv(model, cache: DynamicCache, start: int = 0) -> CapturedKV:
    """Read a filled cache into plain tensors with RoPE removed (tokens from position `start`)."""
    rope = RopeCodec(model)
    keys, values = [], []
    for layer in range(rope.spec.num_layers):
        k, v = cache_kv(cache, layer)
        k, v = k[:, :, start:], v[:, :, start:]
        positions = torch.arange(start, start + k.shape[-2], device=k.device).expand(k.shape[0], -1)
        keys.append(rope.derotate(k, positions, layer))
        values.append(v)
    return CapturedKV(keys=keys, values=values)


@dataclass(frozen=True)
class ModelIdentity:
    """Who a model is, for refusing an adapter trained on another: name plus content hashes."""

    name: str
    config_hash: str
    tokenizer_hash: str
    spec: KVSpec

    def short(self) -> str:
        return f"{self.name} (config {self.config_hash[:8]}, tokenizer {self.tokenizer_hash[:8]})"

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "config_hash": self.config_hash,
            "tokenizer_hash": self.tokenizer_hash,
            "spec": self.spec.to_dict(),
        }

    @classmethod
    def from_dict(cls, data: dict) -> ModelIdentity:
        spec = dict(data["spec"])
        spec["layer_types"] = tuple(spec["layer_types"])
        return cls(data["name"], data["config_hash"], data["tokenizer_hash"], KVSpec(**spec))

    def same_model(self, other: ModelIdentity) -> bool:
        """Names may differ (a local path vs a hub id); weights' shapes and tokenizer must not."""
        return self.config_hash == other.config_hash and self.tokenizer_hash == other.tokenizer_hash


# Config fields that define a model's shape and numerics; paths, dtypes and flags do not count.
_IDENTITY_FIELDS = (
    "model_type",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
    "rope_parameters",
    "rope_theta",
    "layer_types",
    "sliding_window",
    "rms_norm_eps",
)


def _sha256(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def tokenizer_hash(tokenizer) -> str:
    """SHA-256 of the vocabulary (token -> id): two tokenizers that cut text alike hash alike."""
    return _sha256(sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]))


def model_identity(model, tokenizer, name: str | None = None) -> ModelIdentity:
    cfg = text_config(model.config)
    fields = {f: getattr(cfg, f, None) for f in _IDENTITY_FIELDS}
    return ModelIdentity(
        name=name or getattr(model.config, "_name_or_path", "") or cfg.model_type,
        config_hash=_sha256(fields),
        tokenizer_hash=tokenizer_hash(tokenizer),
        spec=kv_spec(model.config),
    )


def identity_id(identity: ModelIdentity) -> str:
    """How a model is named on the wire: its config and tokenizer hashes (names may differ)."""
    return f"{identity.name}@{identity.config_hash[:16]}.{identity.tokenizer_hash[:16]}"


def same_identity(a: str, b: str) -> bool:
    return a.rpartition("@")[2] == b.rpartition("@")[2]

"""The adapter's configuration: one dataclass, stored as adapter_config.json beside the weights."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from lcflow.core.kv import ModelIdentity
from lcflow.core.names import SELECTIONS

ADAPTER_FORMAT_VERSION = 1
ADAPTER_MODES = ("lcf", "lcfx", "c2c")
# An adapter directory's weight files: LCF and LCF-X have two halves, the sharer service loads the
# encoder and the receiver service the decoder; C2C has one fuser, which only the receiver loads
# (its sharer sends its own KV).
ENCODER_FILE, DECODER_FILE, FUSER_FILE = "encoder.safetensors", "decoder.safetensors", "fuser.safetensors"


def service_half_file(mode: str, role: str) -> str | None:
    """The weight file a `role` ("sharer" / "receiver") service loads for an adapter of `mode`."""
    if mode == "c2c":
        return None if role == "sharer" else FUSER_FILE
    return ENCODER_FILE if role == "sharer" else DECODER_FILE


PACKETS = ("slots", "spans", "bridge")
# bridge: how the selected text is cut into the receiver's tokens (lcflow.adapter.bridge)
BRIDGE_TOKENS = ("whole", "within-sharer")
CONFIG_NAME = "adapter_config.json"


class AdapterMismatchError(ValueError):
    """The adapter was trained for other models than the ones it is being used with."""


@dataclass
class AdapterConfig:
    """Everything needed to rebuild an adapter and to know which models it belongs to.

    layer_map maps each receiver layer to the sharer layer it reads; retained_layers are the
    receiver layers the adapter still writes (all of them until pruned).
    """

    mode: str  # "lcf" (same context, per token), "lcfx" (cross context, pooled slots), "c2c" (baseline)
    sharer: ModelIdentity
    receiver: ModelIdentity
    layer_map: dict[int, int]
    retained_layers: list[int]
    bottleneck: int = 128  # b: width of one latent vector
    slots: int = 32  # m: LCF-X slots per layer
    hidden_mult: int = 2  # width of the decoder's mixing MLP, in multiples of b
    receiver_aware: bool = False  # LCF-X: condition pooling queries on a digest of the receiver's context
    layer_map_strategy: str = "monotonic"
    # LCF-X packet: "slots" (m pooled slots, learned queries), "spans" (the sharer positions
    # the question attends to, translated per token; lcflow.adapter.spans) or "bridge" (those
    # positions as soft tokens in the receiver's input space, read by a receiver -> receiver
    # span adapter; across model families, lcflow.adapter.bridge).
    packet: str = "slots"
    selection: str = "sentences"  # spans: "sentences", "sentences-mean" or "tokens" (lcflow.adapter.spans)
    sharer_window: int = 0  # spans: sharer layers within +-window of the mapped one feed a layer
    # spans: the sharer's (layer, head) pairs whose question attention selects (its retrieval
    # heads, chosen on training samples by `lcflow heads`); empty: every head of every layer.
    selection_heads: list[list[int]] = field(default_factory=list)
    # spans: 0 normalises the question's attention over the whole context; c > 0 over the sink
    # and one chunk of c positions at a time (lcflow.packets.selection), for long documents.
    selection_chunk: int = 0
    # bridge: the receiver -> receiver span adapter's config (its weights are in the decoder file)
    reader: dict = field(default_factory=dict)
    # bridge: "whole" cuts the selected text as the receiver's tokenizer would; "within-sharer"
    # cuts each sharer token's text on its own, so every receiver token lies inside one sharer
    # token and is translated from that token alone (no word pooled from several pieces).
    bridge_tokens: str = "whole"
    bridge_rows: int = 0  # bridge: most soft tokens in a packet; 0 means m (`slots`)
    # bridge: the receiver replaces each soft token by its nearest input embedding (cosine)
    # before reading them: the reader was trained on real embeddings, and the translator's small
    # residual errors cost more answers than its rare wrong tokens (docs/lcfx.md, section 9).
    bridge_snap: bool = False
    # c2c: the sharer's RoPE (lcflow.core.kv.StoredRope.to_dict), recorded at training: a receiver
    # service re-rotates the sharer's keys at its own positions without the sharer model.
    sharer_rope: dict = field(default_factory=dict)
    dtype: str = "float32"  # dtype the weights are stored in
    format_version: int = ADAPTER_FORMAT_VERSION
    training: dict = field(default_factory=dict)  # provenance: task, steps, seed, loss, time

    def __post_init__(self):
        if self.mode not in ADAPTER_MODES:
            raise ValueError(f"unknown adapter mode {self.mode!r}; choose one of {ADAPTER_MODES}")
        if self.bottleneck < 1 or self.slots < 1:
            raise ValueError("bottleneck and slots must be positive")
        if self.packet not in PACKETS:
            raise ValueError(f"unknown LCF-X packet {self.packet!r}; choose one of {PACKETS}")
        if self.selection not in SELECTIONS:
            raise ValueError(f"unknown span selection {self.selection!r}; choose one of {SELECTIONS}")
        bad = [h for h in self.selection_heads if len(h) != 2 or min(h) < 0]
        if bad:
            raise ValueError(f"selection_heads must be [layer, head] pairs, not {bad}")
        if self.selection_chunk < 0:
            raise ValueError(
                f"selection_chunk must be 0 (the whole context) or positive, not {self.selection_chunk}"
            )
        if self.bridge_tokens not in BRIDGE_TOKENS:
            raise ValueError(f"unknown bridge_tokens {self.bridge_tokens!r}; choose one of {BRIDGE_TOKENS}")
        if self.bridge_rows < 0:
            raise ValueError("bridge_rows must be 0 (meaning m) or positive")
        if self.packet == "bridge" and not self.reader:
            raise ValueError("a bridge packet needs `reader`: the receiver -> receiver span adapter's config")
        missing = [t for t in self.retained_layers if t not in self.layer_map]
        if missing:
            raise ValueError(f"retained layers {missing} have no entry in the layer map")

    def max_rows(self) -> int:
        """The most rows per layer an LCF-X span or bridge packet may have."""
        if self.packet == "bridge" and self.bridge_rows:
            return self.bridge_rows
        return self.slots

    def sharer_layers_needed(self) -> list[int]:
        """The sharer layers the encoder reads: only those feeding a retained receiver layer."""
        return sorted({self.layer_map[t] for t in self.retained_layers})

    def packet_layers(self) -> list[int]:
        """The layers a packet of this adapter carries, one segment each: the retained receiver
        layers, or for C2C the sharer layers its fuser reads (their own KV travels)."""
        return self.sharer_layers_needed() if self.mode == "c2c" else sorted(self.retained_layers)

    def packet_width(self) -> int:
        """Values per row of a packet's layer tensor: b, or for C2C the sharer's 2 H_s D_s."""
        return self.sharer.spec.kv_dim if self.mode == "c2c" else self.bottleneck

    def check_models(
        self, sharer: ModelIdentity | None = None, receiver: ModelIdentity | None = None
    ) -> None:
        """Refuse models other than the ones this adapter was trained for, naming both."""
        for role, expected, actual in (
            ("sharer", self.sharer, sharer),
            ("receiver", self.receiver, receiver),
        ):
            if actual is not None and not expected.same_model(actual):
                raise AdapterMismatchError(
                    f"this adapter's {role} is {expected.short()} but the {role} model given is "
                    f"{actual.short()}; use the adapter trained for this pair or train one with `lcflow train`"
                )

    def to_dict(self) -> dict:
        data = asdict(self)
        data["sharer"] = self.sharer.to_dict()
        data["receiver"] = self.receiver.to_dict()
        data["layer_map"] = {str(t): s for t, s in self.layer_map.items()}
        return data

    @classmethod
    def from_dict(cls, data: dict) -> AdapterConfig:
        version = data.get("format_version")
        if version != ADAPTER_FORMAT_VERSION:
            raise ValueError(
                f"adapter format version {version} is not supported (this lcflow reads version "
                f"{ADAPTER_FORMAT_VERSION}); upgrade lcflow or re-save the adapter"
            )
        known = {f.name for f in fields(cls)}
        data = {k: v for k, v in data.items() if k in known}
        data["sharer"] = ModelIdentity.from_dict(data["sharer"])
        data["receiver"] = ModelIdentity.from_dict(data["receiver"])
        data["layer_map"] = {int(t): int(s) for t, s in data["layer_map"].items()}
        return cls(**data)

    def save_with_weights(self, directory: str | Path, dtype, weights: dict[str, object]) -> Path:
        """Write this config (recording `dtype`) and each {filename: module}'s state dict in `dtype`."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.dtype = str(dtype).removeprefix("torch.")
        self.save(directory)
        for filename, module in weights.items():
            tensors = {k: v.detach().to(dtype).contiguous() for k, v in module.state_dict().items()}
            save_file(tensors, str(directory / filename), metadata={"format": "pt", "mode": self.mode})
        return directory

    def save(self, directory: str | Path) -> None:
        Path(directory, CONFIG_NAME).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, directory: str | Path) -> AdapterConfig:
        path = Path(directory, CONFIG_NAME)
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} not found: an adapter directory holds {CONFIG_NAME} and *.safetensors"
            )
        return cls.from_dict(json.loads(path.read_text()))

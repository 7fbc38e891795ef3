"""An adapter is a directory, PEFT-style: adapter_config.json + encoder/decoder safetensors.

The two halves live in separate files so that the sharer service loads only the encoder
and the receiver service only the decoder. Both LLMs stay frozen; only the adapter trains.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from lcflow.adapter.blocks import parameter_count
from lcflow.adapter.bridge import BridgeDecoder, BridgeEncoder
from lcflow.adapter.config import DECODER_FILE, ENCODER_FILE, AdapterConfig
from lcflow.adapter.lcf import LCFDecoder, LCFEncoder
from lcflow.adapter.lcfx import LCFXDecoder, LCFXEncoder
from lcflow.adapter.spans import SpanDecoder, SpanEncoder
from lcflow.core.kv import ModelIdentity
from lcflow.core.layer_map import build_layer_map

ADAPTER_PARTS = ("both", "encoder", "decoder")


def _halves(config: AdapterConfig) -> tuple[type[nn.Module], type[nn.Module]]:
    if config.mode == "lcf":
        return LCFEncoder, LCFDecoder
    if config.mode == "lcfx" and config.packet == "spans":
        return SpanEncoder, SpanDecoder
    if config.mode == "lcfx" and config.packet == "bridge":
        return BridgeEncoder, BridgeDecoder
    if config.mode == "lcfx":
        return LCFXEncoder, LCFXDecoder
    raise ValueError(f"mode {config.mode!r} has no encoder/decoder halves; load it with lcflow.adapter.c2c")


class LatentAdapter(nn.Module):
    """Encoder (sharer side) and decoder (receiver side) of one LCF or LCF-X adapter."""

    def __init__(self, config: AdapterConfig, part: str = "both"):
        super().__init__()
        if part not in ADAPTER_PARTS:
            raise ValueError(f"part must be one of {ADAPTER_PARTS}, not {part!r}")
        self.config = config
        encoder_cls, decoder_cls = _halves(config)
        self.encoder = encoder_cls(config) if part in ("both", "encoder") else None
        self.decoder = decoder_cls(config) if part in ("both", "decoder") else None

    @classmethod
    def for_models(
        cls,
        mode: str,
        sharer: ModelIdentity,
        receiver: ModelIdentity,
        layer_map_strategy: str = "monotonic",
        **options,
    ) -> LatentAdapter:
        """A fresh (untrained) adapter for a sharer/receiver pair."""
        layer_map = build_layer_map(sharer.spec.num_layers, receiver.spec.num_layers, layer_map_strategy)
        config = AdapterConfig(
            mode=mode,
            sharer=sharer,
            receiver=receiver,
            layer_map=layer_map,
            retained_layers=sorted(layer_map),
            layer_map_strategy=layer_map_strategy,
            **options,
        )
        return cls(config)

    # --- sizes -------------------------------------------------------------------------------

    def parameter_counts(self) -> dict[str, int]:
        encoder = parameter_count(self.encoder) if self.encoder is not None else 0
        decoder = parameter_count(self.decoder) if self.decoder is not None else 0
        return {"encoder": encoder, "decoder": decoder, "total": encoder + decoder}

    def gates(self) -> dict[int, float]:
        """Gate value per retained receiver layer (needs the decoder)."""
        if self.decoder is None:
            raise ValueError("gates live in the decoder; load the adapter with part='both' or 'decoder'")
        return {t: self.decoder.gate(t).item() for t in self.decoder.layers}

    # --- files -------------------------------------------------------------------------------

    def save_pretrained(self, directory: str | Path, dtype: torch.dtype | None = None) -> Path:
        halves = {ENCODER_FILE: self.encoder, DECODER_FILE: self.decoder}
        weights = {name: half for name, half in halves.items() if half is not None}
        return self.config.save_with_weights(directory, dtype or getattr(torch, self.config.dtype), weights)

    @classmethod
    def from_pretrained(
        cls,
        directory: str | Path,
        part: str = "both",
        sharer: ModelIdentity | None = None,
        receiver: ModelIdentity | None = None,
        device: torch.device | str = "cpu",
    ) -> LatentAdapter:
        """Load an adapter directory; refuse it (naming both) if given models are not its models."""
        config = AdapterConfig.load(directory)
        config.check_models(sharer=sharer, receiver=receiver)
        adapter = cls(config, part=part)
        for half, filename in ((adapter.encoder, ENCODER_FILE), (adapter.decoder, DECODER_FILE)):
            if half is None:
                continue
            path = Path(directory, filename)
            if not path.is_file():
                raise FileNotFoundError(f"{path} is missing: the adapter directory is incomplete")
            state = {k: v.float() for k, v in load_file(str(path)).items()}
            half.load_state_dict(state, strict=True)
        adapter.requires_grad_(False)
        return adapter.to(device).eval()

    # --- pruning -----------------------------------------------------------------------------

    def pruned(self, min_gate: float = 0.0) -> LatentAdapter:
        """A copy without the receiver layers whose gate is at or below `min_gate`."""
        keep = [t for t, g in self.gates().items() if g > min_gate]
        config = AdapterConfig.from_dict(self.config.to_dict())
        config.retained_layers = keep
        config.training = {
            **config.training,
            "pruned_min_gate": min_gate,
            "pruned_from": self.config.retained_layers,
        }
        smaller = LatentAdapter(config, part="both" if self.encoder is not None else "decoder")
        for name in ("encoder", "decoder"):
            source, target = getattr(self, name), getattr(smaller, name)
            if source is None or target is None:
                continue
            state = source.state_dict()
            target.load_state_dict({k: state[k] for k in target.state_dict()}, strict=True)
        return smaller.eval()

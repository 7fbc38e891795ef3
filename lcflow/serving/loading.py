"""What a service runs on: its engine, the model with its half of an adapter (or of C2C's),
checked against each other. One engine class serves both roles: the sharer holds the encoder
half, the receiver the decoder half."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import grpc

from lcflow.adapter import LatentAdapter
from lcflow.adapter.c2c import C2CFuser, C2CSender
from lcflow.adapter.config import AdapterConfig
from lcflow.adapter.reader import RECEIVER_READER
from lcflow.core.kv import ModelIdentity, model_identity
from lcflow.handoff.pair import Receiver, Sharer
from lcflow.provision import load_model_and_tokenizer
from lcflow.serving.adapter_names import default_adapter_path
from lcflow.serving.config import ServiceConfig
from lcflow.serving.requests import adapter_id
from lcflow.serving.server import ServiceError


def load_model_for(config: ServiceConfig):
    """The service's model and tokenizer, as its flags say (name, device, dtype)."""
    return load_model_and_tokenizer(config.model, device=config.device, dtype=config.dtype)


def load_adapter_half(model, tokenizer, adapter_dir: str, part: str, name: str | None):
    """(model identity, adapter half or None, adapter id) for a service: the encoder half for the
    sharer, the decoder half for the receiver, refused if trained for another model."""
    identity = model_identity(model, tokenizer, name=name)
    if not adapter_dir:
        return identity, None, ""
    role = "sharer" if part == "encoder" else "receiver"
    if AdapterConfig.load(adapter_dir).mode == "c2c":
        adapter = load_c2c_half(adapter_dir, part, model.device, **{role: identity})
        return identity, adapter, adapter_id(adapter.config.to_dict())
    if part == "decoder" and (Path(adapter_dir) / RECEIVER_READER).is_dir():
        raise ValueError(
            f"{adapter_dir} carries a receiver-side LoRA ({RECEIVER_READER}/, from `lcflow train "
            "--receiver-lora`), which the receiver service does not apply yet: its decoder alone would "
            "read the packet wrongly. Evaluate it with `lcflow eval`, or serve an adapter without one"
        )
    adapter = LatentAdapter.from_pretrained(adapter_dir, part=part, device=model.device, **{role: identity})
    if part == "encoder" and adapter.config.packet == "bridge":
        adapter.encoder.tokenizer()  # the receiver's tokenizer, by name: fail at start, not mid-request
    return identity, adapter, adapter_id(adapter.config.to_dict())


@dataclass
class ServedC2C:
    """A C2C adapter as a service holds it, shaped like a LatentAdapter (config, encoder, decoder):
    the sharer's half is a C2CSender (no weights: it sends the sharer's KV), the receiver's the
    C2CFuser."""

    config: object  # AdapterConfig
    encoder: object | None = None
    decoder: object | None = None

    def state_dict(self) -> dict:
        """The loaded weights (for the registry's memory bound): the fuser's, none on the sharer."""
        return self.decoder.state_dict() if self.decoder is not None else {}


def load_c2c_half(adapter_dir: str, part: str, device, **models) -> ServedC2C:
    """C2C's half for a service: the sender (no weights) on the sharer, the fuser on the receiver."""
    if part == "encoder":
        config = AdapterConfig.load(adapter_dir)
        config.check_models(**models)
        return ServedC2C(config, encoder=C2CSender(config))
    fuser = C2CFuser.from_pretrained(adapter_dir, device=device, **models)
    fuser.sharer_rope()  # refuse an adapter without the sharer's RoPE now, not at the first request
    return ServedC2C(fuser.config, decoder=fuser)


def require_adapter(adapter, mode: str, role: str) -> None:
    """FAILED_PRECONDITION unless this engine holds an adapter of the requested latent mode."""
    have = f"a {adapter.config.mode} adapter" if adapter is not None else "no adapter"
    if adapter is None or adapter.config.mode != mode:
        raise ServiceError(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"mode {mode} needs a {mode} adapter but this {role} has {have}; "
            "start it with --adapter pointing at one or --adapters DIR holding one, or use TEXT or NONE",
        )


# The adapter half each role holds.
HALVES = {"sharer": "encoder", "receiver": "decoder"}


@dataclass
class Engine:
    """A service's model and, for the latent modes, its half of the adapter. `runner` runs the
    role's side of a handoff (a Sharer or a Receiver, lcflow.handoff.pair); SharerEngine and
    ReceiverEngine name the role, and `engine.sharer` / `engine.receiver` read as such."""

    runner: Sharer | Receiver
    identity: ModelIdentity
    adapter: LatentAdapter | ServedC2C | None = None  # a C2C adapter's decoder is its C2CFuser
    adapter_id: str = ""
    adapter_path: Path | None = None  # the adapter's directory
    role: ClassVar[str] = ""

    @classmethod
    def load(cls, config: ServiceConfig) -> Engine:
        adapter_dir = default_adapter_path(config.adapter, config.adapters)
        return cls.from_loaded(*load_model_for(config), adapter_dir, name=config.model)

    @classmethod
    def from_loaded(cls, model, tokenizer, adapter_dir: str = "", name: str | None = None) -> Engine:
        """The engine for a loaded model, with the half of the adapter in `adapter_dir` ("" for none)."""
        half = HALVES[cls.role]
        identity, adapter, adapter_id = load_adapter_half(model, tokenizer, adapter_dir, half, name)
        part, config = (getattr(adapter, half), adapter.config) if adapter else (None, None)
        runner = (Sharer if cls.role == "sharer" else Receiver)(model, tokenizer, part, config)
        return cls(runner, identity, adapter, adapter_id, Path(adapter_dir) if adapter_dir else None)

    def require_adapter(self, mode: str) -> None:
        require_adapter(self.adapter, mode, self.role)

    @property
    def sharer(self) -> Sharer:
        if self.role != "sharer":
            raise AttributeError("a receiver engine has no sharer")
        return self.runner

    @property
    def receiver(self) -> Receiver:
        if self.role != "receiver":
            raise AttributeError("a sharer engine has no receiver")
        return self.runner


class SharerEngine(Engine):
    role: ClassVar[str] = "sharer"


class ReceiverEngine(Engine):
    role: ClassVar[str] = "receiver"

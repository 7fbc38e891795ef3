"""What the sharer and receiver servicers share: a model that loads in the background, the
adapters that sit on it, and the ListAdapters RPC.
"""

from __future__ import annotations

from pathlib import Path

import grpc

from lcflow.core.kv import ModelIdentity
from lcflow.proto_gen.lcflow.v1 import lcflow_pb2 as pb
from lcflow.serving.adapter_names import identity_hash
from lcflow.serving.registry import AdapterRegistry
from lcflow.serving.server import ServiceError, status_on_error


def model_proto(identity: ModelIdentity | None) -> pb.ModelIdentity:
    if identity is None:
        return pb.ModelIdentity()
    return pb.ModelIdentity(name=identity.name, hash=identity_hash(identity))


def list_adapters_response(registry: AdapterRegistry, identity: ModelIdentity) -> pb.ListAdaptersResponse:
    """The ListAdapters answer of a service running `identity` with `registry`."""
    adapters = []
    for view in registry.list():
        info = view.info
        message = pb.AdapterInfo(
            name=info.name,
            mode=info.mode,
            sharer=model_proto(info.sharer),
            receiver=model_proto(info.receiver),
            parameters=info.parameters,
            size_bytes=info.size_bytes,
            memory_bytes=info.memory_bytes,
            loaded=view.loaded,
            usable=info.usable,
            reason=info.reason,
            is_default=view.is_default,
        )
        if info.card_em is not None:
            message.card_em = info.card_em
            message.card_task = info.card_task
        adapters.append(message)
    return pb.ListAdaptersResponse(
        role=registry.role,
        model=model_proto(identity),
        default_adapter=registry.default.info.name if registry.default is not None else "",
        adapters=adapters,
        memory_limit_bytes=registry.memory_limit,
        memory_used_bytes=registry.used_bytes(),
    )


class ModelService:
    """What the sharer and receiver services share: a model that loads in the background
    (`engine`, None until then) and the adapters that sit on it (`adapters`).

    A subclass sets `role` ("sharer" or "receiver", also the name of its engine's model
    attribute: SharerEngine.sharer, ReceiverEngine.receiver) and `engine_class` (whose
    `from_loaded(model, tokenizer, adapter_dir, name)` puts another adapter's half on the model)."""

    role: str
    engine_class: type
    engine = None
    adapters: AdapterRegistry

    def ready(self):
        """The loaded engine; UNAVAILABLE while the model is still loading."""
        if self.engine is None:
            raise ServiceError(
                grpc.StatusCode.UNAVAILABLE, f"the {self.role} model is still loading; retry shortly"
            )
        self.adapters.attach(self.engine)  # once: the registry checks adapters against this model
        return self.engine

    def engine_ready(self) -> None:
        """The model is loaded: read the adapters (and load them all with --preload)."""
        self.adapters.engine_ready(self.engine, self.config.preload)

    def _engine_with(self, adapter_dir: Path):
        """The loaded model with another adapter's half (checked against the model)."""
        engine = self.ready()
        loaded = getattr(engine, self.role)  # the Sharer or Receiver: its model and tokenizer
        return self.engine_class.from_loaded(
            loaded.model, loaded.tokenizer, str(adapter_dir), engine.identity.name
        )

    def ListAdapters(self, request, context):
        with status_on_error(context, "ListAdapters"):
            return list_adapters_response(self.adapters, self.ready().identity)

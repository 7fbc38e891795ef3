"""The sharer's latent stream to the receiver: a handoff's latents encoded layer by layer and
handed to the wire as the receiver asks for them (a LatentSender underneath), stopped at once
when the handoff is over.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from typing import Protocol

import torch
from opentelemetry import context as otel_context

from lcflow.core.kv import identity_id
from lcflow.core.names import LATENT_MODES, SAME_CONTEXT_MODES
from lcflow.proto_gen.lcflow.v1 import lcflow_pb2 as pb
from lcflow.serving.loading import SharerEngine
from lcflow.transport import CodecConfig, LatentSender, PacketWriter, TensorSpec

log = logging.getLogger(__name__)


WIRE_DTYPE = torch.bfloat16  # latents travel as bf16: half of fp32, and zstd packs it better than fp16


class StreamOwner(Protocol):
    """What a latent stream reads of the sharer service that starts it (lcflow.serving.sharer)."""

    codec: CodecConfig  # the service's default wire codec
    tracer: object  # its OpenTelemetry tracer


class _StreamStopped(Exception):
    """Raised inside a latent stream whose handoff has ended, instead of starting torch work."""


class LatentStream:
    """The request side of one Receive call. gRPC pulls these messages from its own thread, so
    each layer is encoded just before it is sent and the receiver unpacks while we encode."""

    def __init__(self, service: StreamOwner, engine: SharerEngine, mode, request, shared, receiver_text):
        self.service, self.engine, self.mode = service, engine, mode
        self.request, self.shared, self.receiver_text = request, shared, receiver_text
        self.parent = otel_context.get_current()  # spans made in gRPC's thread belong to this trace
        self.encode_ms = self.pack_ms = 0.0
        # () -> SharerContext: the context's prefill, when `shared` is not given (see _latents)
        self.prefill = None
        self.error: BaseException | None = None
        self.done = threading.Event()
        self._stopping = threading.Event()  # set by stop(): no further torch work is started
        # Held while the latent generator runs (prefilling, encoding, packing), never across a
        # yield; reentrant, for the torch work inside it (_torch_work).
        self._busy = threading.RLock()
        self._latent_messages = None  # the _latents generator, once started
        self.context_text = ""  # for the log line (its size only, unless --log-content)
        self.adapter_name = ""  # the adapter that encodes, for the summary and the trace
        self.adapter_wire_name = ""  # the name passed on to the receiver (Choice.wire_name)
        self.codec = service.codec  # the wire codec (SharerService._codec_for) and why it was chosen
        self.codec_reason = ""
        self.wire_stats = None  # the writer's counts once the latents went out (for the link meter)

    def stop(self) -> None:
        """Start no further prefill or encode, wait for the step running (if any) to finish, and
        close the latent generator here: gRPC cannot interrupt it, may never resume it once the
        call is over, and the handoff's slot, lease and trace (its sharer.stream span) must all
        outlast it."""
        self._stopping.set()
        with self._busy:
            if self._latent_messages is not None:
                self._latent_messages.close()  # ends its span now, not whenever it is collected

    @contextlib.contextmanager
    def _torch_work(self):
        """Hold the stream busy for one piece of torch work; _StreamStopped once the handoff stopped."""
        with self._busy:
            if self._stopping.is_set():
                raise _StreamStopped  # the call is over: nobody reads what would be produced
            with torch.inference_mode():
                yield

    def messages(self):
        try:
            yield pb.LatentMessage(request=self.request)
            if self.mode in LATENT_MODES:
                self._latent_messages = self._latents()
                while True:
                    with self._busy:  # one step of the generator: stop() waits for it, or closes it
                        if self._stopping.is_set():
                            raise _StreamStopped
                        message = next(self._latent_messages, None)
                    if message is None:
                        break
                    yield message
        except _StreamStopped:
            pass  # the handoff is over (stop()): end the stream quietly
        except Exception as err:  # reported by Handoff; ending the stream makes the receiver stop
            # (GeneratorExit is not caught: it means gRPC closed this stream, not that it failed)
            log.exception("latent stream failed")
            self.error = err
        finally:
            self.done.set()

    def _latents(self):
        engine, config = self.engine, self.engine.adapter.config
        tracer = self.service.tracer
        with tracer.start_as_current_span("sharer.stream", context=self.parent) as span:
            if self.shared is None:  # after the request went out: the receiver prefills meanwhile
                with self._torch_work():
                    self.shared = self.prefill()
            positions = None
            if getattr(config, "packet", "") == "bridge":  # its rows are the receiver tokens of
                begin = time.perf_counter()  # what is selected: select before the header
                with self._torch_work():
                    positions = engine.sharer.select(
                        self.shared, self.receiver_text, self.request.prompt_text
                    )
                self.encode_ms += (time.perf_counter() - begin) * 1000
            rows = engine.sharer.latent_rows(self.shared, positions)
            # C2C sends the sharer's KV of the layers its fuser reads; the others, latents per receiver layer
            wire_layers = config.packet_layers()
            spec = {
                "latent": TensorSpec(str(WIRE_DTYPE).removeprefix("torch."), (1, rows, config.packet_width()))
            }
            writer: LatentSender = PacketWriter(
                mode=self.mode,
                adapter_id=engine.adapter_id,
                sharer_id=identity_id(engine.identity),
                receiver_id=identity_id(config.receiver),
                layer_specs={t: spec for t in wire_layers},
                shared_specs={"token_spans": TensorSpec.of(self.shared.spans)}
                if self.mode in SAME_CONTEXT_MODES
                else None,
                codec=self.codec,
                # the receiver picks the same adapter by this name (resolved inside its --adapters)
                meta={"adapter": self.adapter_wire_name} if self.adapter_wire_name else None,
            )
            yield writer.header()
            if self.mode in SAME_CONTEXT_MODES:
                yield from writer.shared({"token_spans": self.shared.spans})
            layers = engine.sharer.encode_layers(
                self.shared, self.receiver_text, question=self.request.prompt_text, positions=positions
            )
            while True:
                begin = time.perf_counter()
                with self._torch_work():
                    item = next(layers, None)
                    if item is None:
                        break
                    layer, latent = item
                    # still on the model's device: a quantizing writer quantizes it there
                    latent = latent.to(WIRE_DTYPE).contiguous()
                self.encode_ms += (time.perf_counter() - begin) * 1000
                yield from writer.layer(layer, {"latent": latent})
            trailer = writer.trailer()
            stats = self.wire_stats = writer.stats
            self.pack_ms = stats.serialise_ms + stats.codec_ms
            span.set_attribute("lcflow.codec", self.codec.name)
            span.set_attribute("lcflow.codec_reason", self.codec_reason)
            span.set_attribute("lcflow.adapter", self.adapter_name)
            span.set_attribute("lcflow.layers", len(wire_layers))
            span.set_attribute("lcflow.tokens.context", self.shared.input_ids.shape[1])
            span.set_attribute("lcflow.bytes.raw", stats.bytes_raw)
            span.set_attribute("lcflow.bytes.wire", stats.bytes_wire)
            span.set_attribute("lcflow.compression_ratio", stats.bytes_raw / max(1, stats.bytes_wire))
            span.set_attribute("lcflow.quantization", writer.quantizer.name)
            span.set_attribute("lcflow.chunks", stats.chunks)
            span.set_attribute("lcflow.encode_ms", self.encode_ms)
            span.set_attribute("lcflow.pack_ms", self.pack_ms)
        yield trailer  # last: the receiver may answer at once, and our timings must be final by then

"""The receiver service: takes a latent stream, decodes it into its KV cache, generates.

One `Receive` call carries one handoff (see proto/lcflow/v1/lcflow.proto):

    ReceiverRequest            the prompt, contexts, mode and generation settings
    LatentHeader, chunks...    (LCF / LCF_X / C2C) the latents, verified chunk by chunk
    LatentTrailer              totals and the whole-payload checksum

and answers with TextDelta events as the answer is generated, then one HandoffSummary.
Everything is checked before anything is decoded: a bad stream changes nothing here. The
stream is strict: after a NONE or TEXT request it must end; a latent header must declare
exactly the tensors this receiver's adapter decodes; nothing may follow the trailer.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import socket
import time
from concurrent import futures

import grpc
import torch
from opentelemetry import context as otel_context

from lcflow.core.kv import identity_id, same_identity
from lcflow.core.names import LATENT_MODES, SAME_CONTEXT_MODES
from lcflow.handoff.pair import Latents, PreparedInput, reader_contexts, text_contexts
from lcflow.handoff.streaming import GenerationStream
from lcflow.proto_gen.lcflow.v1 import lcflow_pb2 as pb
from lcflow.proto_gen.lcflow.v1 import lcflow_pb2_grpc as pb_grpc
from lcflow.serving.concurrency import ConcurrencyLimit, queue_span
from lcflow.serving.config import ServiceConfig
from lcflow.serving.loading import (
    ReceiverEngine,
)
from lcflow.serving.readers import TextReaders, check_reader_request
from lcflow.serving.registry import AdapterRegistry
from lcflow.serving.requests import (
    check_text,
    check_tokens,
    describe_texts,
    generation_settings,
    mode_of,
    prompt_of,
)
from lcflow.serving.server import RECEIVER_SERVICE, ServiceError, invalid, serve_service, status_on_error
from lcflow.serving.servicer import ModelService
from lcflow.serving.telemetry import current_trace_id
from lcflow.transport import (
    MODE_FROM_PROTO,
    LatentReceiver,
    PacketAssembler,
    WireLimits,
    WireStats,
    mode_name,
)

log = logging.getLogger(__name__)

FLOAT_DTYPES = ("bfloat16", "float16", "float32")  # what a latent may travel as


class ReceiverService(ModelService, pb_grpc.ReceiverServicer):
    role, engine_class = "receiver", ReceiverEngine  # ModelService: ready, ListAdapters, ...

    def __init__(self, config: ServiceConfig, tracer_provider, engine: ReceiverEngine | None = None):
        self.config = config
        self.tracer = tracer_provider.get_tracer("lcflow.receiver")
        self.engine = engine
        self.limit = ConcurrencyLimit(config.max_concurrent, config.max_queue)
        self.wire_limits = WireLimits()
        self.cancelled_generations = 0  # generations stopped early (client gone, deadline passed)
        # Said in every summary (HandoffSummary.receiver): which of several receivers answered.
        self.name = f"{socket.gethostname()}:{config.port}"
        self.adapters = AdapterRegistry.for_service(config, self._engine_with)
        self.readers = TextReaders(config.adapters or None)  # text readers, named per request
        # LCF / C2C prefill the receiver's own input while the latents travel, one per admitted handoff
        self._prefills = futures.ThreadPoolExecutor(config.max_concurrent, thread_name_prefix="prefill")

    def Receive(self, request_iterator, context):
        with status_on_error(context, "Receive"):
            engine = self.ready()
            started = time.perf_counter()
            queued_at = time.time_ns()
            # the adapter (if any) is held until the answer is generated: it cannot be evicted
            with self.limit.slot(context) as queue_ms, contextlib.ExitStack() as held:
                queue_span(self.tracer, "receiver.queue", queued_at, queue_ms)
                summary = yield from self._receive(engine, request_iterator, context, started, queue_ms, held)
            # Sent once the slot is free: a client that sends its next request on seeing the
            # summary must find the slot released, not race this handler's exit.
            yield summary

    # --- one handoff --------------------------------------------------------------------------

    def _receive(self, engine: ReceiverEngine, messages, context, started, queue_ms, held):
        """Yields the answer's text events; returns the summary event (sent by Receive). The
        adapter's lease goes into `held` (an ExitStack closed once the answer is done)."""
        request = self._read_request(messages)
        mode = MODE_FROM_PROTO[request.mode]
        prompt = check_text("prompt", prompt_of(request), self.config)
        receiver_context = check_text(
            "receiver_context", request.receiver_context, self.config, required=False
        )
        settings = generation_settings(request.generation)
        timings: dict[str, float] = {"queue": queue_ms}
        latents, stats, adapter_name, early = None, WireStats(), "", None
        if mode in LATENT_MODES:
            if mode in SAME_CONTEXT_MODES:
                check_text("context_text", request.context_text, self.config)
                # Our cache of [context + prompt] does not depend on the sharer's side: prefill it
                # now, while the sharer prefills, encodes and sends, and fuse once it has arrived
                # (unless no adapter here could take this mode's latents: then refuse at once).
                self.adapters.require_mode(mode)
                early = self._prefill_early(engine, prompt, receiver_context, request)
            try:
                engine, latents, stats, timings["transfer"], adapter_name = self._read_latents(
                    request, messages, held
                )
            except BaseException:
                if early is not None and not early.cancel():
                    futures.wait([early])  # no prefill left running once the call has ended
                raise
            timings["unpack"] = stats.serialise_ms + stats.codec_ms
        else:
            if mode == "text":
                check_text("text_message", request.text_message, self.config, required=False)  # may be empty
                if request.text_channel not in pb.TextChannel.values():
                    raise invalid(f"text_channel {request.text_channel} is not a channel this receiver knows")
            self._expect_end(messages, f"a {mode_name(request.mode)} ReceiverRequest")
            if request.text_reader:
                engine = self._with_reader(engine, request)
        prefilled = early.result() if early is not None else None
        with torch.inference_mode():
            prepared = self._prepare(engine, mode, prompt, receiver_context, request, latents, prefilled)
        timings.update(prepared.timings_ms)
        stream = GenerationStream(lambda *hooks: engine.receiver.generate(prepared, settings, *hooks))
        # The client (or the sharer) gone, or the deadline passed: stop generating and free the cache.
        context.add_callback(stream.cancel)
        with self.tracer.start_as_current_span("receiver.generate") as span:
            try:
                with torch.inference_mode():
                    stream.start()
                    for delta in stream:
                        yield pb.HandoffEvent(text=pb.TextDelta(text=delta))
            finally:  # also when gRPC abandons this handler: never leave a generation running
                stream.cancel()
                stream.join()
                if stream.result.cancelled:
                    self.cancelled_generations += 1
                    log.info("generation cancelled after %d characters", len(stream.result.text))
            result = stream.result
            generated = len(engine.receiver.tokenizer(result.text, add_special_tokens=False).input_ids)
            span.set_attribute("lcflow.tokens.generated", generated)
        if result.first_token_at is not None:
            timings["time_to_first_token"] = (result.first_token_at - started) * 1000
        timings["total"] = (time.perf_counter() - started) * 1000
        texts = {"prompt": prompt, "receiver_context": receiver_context}
        texts.update({"context": request.context_text} if mode in SAME_CONTEXT_MODES else {})
        texts.update({"message": request.text_message} if mode == "text" else {})
        log.info(
            "answered %s in %.0f ms: %s",
            mode_name(request.mode),
            timings["total"],
            describe_texts(self.config, **texts, answer=result.text),
        )
        return pb.HandoffEvent(
            summary=pb.HandoffSummary(
                answer=result.text,
                timings=pb.StageTimings(**timings),
                bytes_raw=stats.bytes_raw,
                bytes_wire=stats.bytes_wire,
                chunks=stats.chunks,
                trace_id=current_trace_id(),
                mode=request.mode,
                tokens=pb.TokenCounts(prompt=prepared.prompt_tokens, generated=generated),
                adapter=adapter_name,
                receiver=self.name,
            )
        )

    def _read_request(self, messages) -> pb.ReceiverRequest:
        first = next(messages, None)
        if first is None or first.WhichOneof("message") != "request":
            raise invalid("a Receive stream must open with a ReceiverRequest")
        request = first.request
        mode = mode_of(request.mode)  # unset or unknown: INVALID_ARGUMENT before anything else
        check_reader_request(request.text_reader, mode, request.text_channel == pb.TEXT_CHANNEL_NOTE)
        return request

    def _with_reader(self, engine: ReceiverEngine, request: pb.ReceiverRequest) -> ReceiverEngine:
        """The engine with the named text reader in place of the plain receiver (forwarded text)."""
        channel = "forward" if request.text_channel == pb.TEXT_CHANNEL_FORWARD else "forward-selected"
        with self.tracer.start_as_current_span("receiver.text_reader") as span:
            span.set_attribute("lcflow.text_reader", request.text_reader)
            receiver = self.readers.receiver(
                request.text_reader,
                channel,
                engine.receiver.model,
                engine.receiver.tokenizer,
                engine.identity.name,
            )
        return dataclasses.replace(engine, runner=receiver)

    @staticmethod
    def _expect_end(messages, after: str) -> None:
        """The stream must close here: a message past its end means the sender and this receiver
        disagree about what the call carries, and guessing (ignoring it, or reading it as part of
        the handoff) could answer something the sender never meant. Nothing has been prepared or
        generated yet, so refusing changes nothing."""
        extra = next(messages, None)
        if extra is not None:
            kind = extra.WhichOneof("message") or "empty"
            raise invalid(
                f"a {kind} message arrived after {after}; nothing may follow it "
                "(one Receive stream carries one request and, for LCF, LCF_X and C2C only, one latent packet)"
            )

    def _read_latents(
        self, request: pb.ReceiverRequest, messages, held: contextlib.ExitStack
    ) -> tuple[ReceiverEngine, Latents, WireStats, float, str]:
        """Header, chunks and trailer -> (the engine whose decoder takes them, Latents, stats,
        window ms, the adapter's name), verifying all of it (WireError on any fault). The header
        may name the adapter (meta "adapter"); it resolves only inside --adapters. Without a
        name, the adapter whose id the header carries decodes (lcflow.serving.registry)."""
        assembler: LatentReceiver = PacketAssembler(self.wire_limits)
        first = next(messages, None)
        if first is None or first.WhichOneof("message") != "header":
            kind = "the end of the stream" if first is None else f"a {first.WhichOneof('message')} message"
            raise invalid(
                f"after an {mode_name(request.mode)} ReceiverRequest a latent stream must send its "
                f"LatentHeader, not {kind}"
            )
        header = first.header
        with self.tracer.start_as_current_span("receiver.unpack") as span:
            window_start = time.perf_counter()
            assembler.on_header(header)  # counts and total size against WireLimits
            mode = MODE_FROM_PROTO[request.mode]
            choice = self.adapters.for_header(header.meta.get("adapter", ""), mode, header.adapter_id)
            span.set_attribute("lcflow.adapter", choice.name)
            span.set_attribute("lcflow.adapter.chosen_by", choice.how)
            engine = held.enter_context(self.adapters.lease(choice.entry))
            engine.require_adapter(mode)
            self._check_identities(engine, header)
            self._check_header_fits(engine, request, header)  # every shape, before any chunk is read
            assembler.device = engine.receiver.model.device  # quantized latents are dequantized there
            for message in messages:
                kind = message.WhichOneof("message")
                if kind not in ("chunk", "chunks", "trailer"):
                    what = "a second ReceiverRequest" if kind == "request" else f"a {kind or 'empty'} message"
                    raise invalid(
                        f"{what} arrived inside the latent payload; only chunks and one trailer may"
                    )
                assembler.on_message(message)  # chunks (or batches of them), verified as they come
                if assembler.packet is not None:
                    break
            packet = assembler.packet or assembler.on_stream_end()  # DATA_LOSS if the trailer never came
            self._expect_end(messages, "the LatentTrailer")
            window_ms = (time.perf_counter() - window_start) * 1000
            stats = assembler.stats
            span.set_attribute("lcflow.bytes.raw", stats.bytes_raw)
            span.set_attribute("lcflow.bytes.wire", stats.bytes_wire)
            span.set_attribute("lcflow.compression_ratio", stats.bytes_raw / max(1, stats.bytes_wire))
            span.set_attribute("lcflow.quantization", assembler.quantizer.name)  # as the header declared it
            span.set_attribute("lcflow.chunks", stats.chunks)
            span.set_attribute("lcflow.layers", len(packet.layers))
        device = engine.receiver.model.device
        layers = {
            t: packet.tensors_per_layer[t]["latent"].to(device=device, dtype=torch.float32)
            for t in packet.layers
        }
        spans = packet.shared_tensors.get("token_spans")
        spans = spans.cpu() if spans is not None else None  # aligned with the tokenizer's, on the CPU
        return engine, Latents(packet.mode, layers, spans), stats, window_ms, choice.name

    def _check_identities(self, engine: ReceiverEngine, header: pb.LatentHeader) -> None:
        if header.adapter_id != engine.adapter_id:
            raise ServiceError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"the sharer encoded with adapter {header.adapter_id} but this receiver decodes with "
                f"{engine.adapter_id}; give both services the same adapter directory",
            )
        mine = identity_id(engine.identity)
        if not same_identity(header.receiver_id, mine):
            raise ServiceError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"the latents were made for receiver model {header.receiver_id} but this receiver runs {mine}",
            )
        expected = f"{engine.adapter.config.sharer.config_hash[:16]}.{engine.adapter.config.sharer.tokenizer_hash[:16]}"
        if header.sharer_id.rpartition("@")[2] != expected:
            raise ServiceError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"the latents come from sharer model {header.sharer_id} but this adapter was trained "
                f"with {engine.adapter.config.sharer.short()}",
            )

    def _check_header_fits(self, engine: ReceiverEngine, request: pb.ReceiverRequest, header) -> None:
        """Every tensor the header declares must be what this receiver's decoder takes: the
        adapter's retained layers, each one `latent` [1, rows, b] (rows = its m slots for LCF-X, at
        most m for a span packet, at most --max-context-tokens sharer tokens for LCF), plus LCF's
        int32 `token_spans` [rows, 2]. C2C: the sharer layers its fuser reads, each [1, rows,
        2 H_s D_s] (the sharer's keys and values per token), plus the token spans.

        The wire format alone bounds the total size; this bounds every shape by what can be
        decoded, so a stream that would only fail inside the decoder (or allocate far more than
        a real one) is refused before a single chunk is read."""
        config = engine.adapter.config
        mode = MODE_FROM_PROTO[request.mode]
        if header.mode != request.mode:
            raise invalid(
                f"the header is for {mode_name(header.mode)} but the request asked for "
                f"{mode_name(request.mode)}; one stream carries one mode"
            )
        layers = [s.layer for s in header.segments if s.HasField("layer")]
        expected = config.packet_layers()  # C2C: the sharer layers its fuser reads
        if sorted(layers) != expected:
            raise invalid(
                f"the header declares layers {sorted(layers)} but this receiver's adapter decodes "
                f"layers {expected}"
            )
        rows_seen = set()
        width = config.packet_width()
        for segment in header.segments:
            what = f"layer {segment.layer}" if segment.HasField("layer") else "the shared segment"
            specs = {t.name: (t.dtype, tuple(t.shape)) for t in segment.tensors}
            if segment.HasField("layer"):
                dtype, shape = specs.get("latent", ("", ()))
                if set(specs) != {"latent"} or dtype not in FLOAT_DTYPES or len(shape) != 3:
                    raise invalid(f"{what}: expected one float tensor 'latent' [1, rows, width], got {specs}")
                if shape[0] != 1 or shape[2] != width:
                    raise invalid(
                        f"{what}: latent shape {list(shape)} does not fit this adapter "
                        f"(expected [1, rows, {width}])"
                    )
                rows_seen.add(shape[1])
            elif mode not in SAME_CONTEXT_MODES:
                raise invalid(f"{what}: {mode_name(request.mode)} carries no shared tensors, got {specs}")
            elif set(specs) != {"token_spans"}:
                raise invalid(f"{what}: {mode_name(request.mode)} shares only token_spans, got {specs}")
        rows = rows_seen.pop() if len(rows_seen) == 1 else None
        if rows is None:
            raise invalid(f"the layers declare different numbers of rows {sorted(rows_seen)}; all must agree")
        # A slot packet has exactly m rows; a span packet (AdapterConfig.packet "spans", where the
        # adapter format has it) one per selected sharer position, at most m.
        if mode == "lcfx" and getattr(config, "packet", "slots") in ("spans", "bridge"):
            if not 0 < rows <= config.max_rows():
                raise invalid(
                    f"LCF-X span latents have {rows} rows; this adapter sends 1..{config.max_rows()}"
                )
        elif mode == "lcfx" and rows != config.slots:
            raise invalid(f"LCF-X latents have {rows} rows but this adapter pools into {config.slots} slots")
        if mode in SAME_CONTEXT_MODES:
            if not 0 < rows <= self.config.max_context_tokens:
                raise invalid(
                    f"{mode_name(request.mode)} latents for {rows} sharer tokens: allowed "
                    f"1..{self.config.max_context_tokens} (--max-context-tokens)"
                )
            shared = [s for s in header.segments if not s.HasField("layer")]
            spans = {t.name: (t.dtype, tuple(t.shape)) for t in shared[0].tensors} if shared else {}
            if spans != {"token_spans": ("int32", (rows, 2))}:
                raise invalid(
                    f"{mode_name(request.mode)} needs one int32 token_spans [{rows}, 2] shared tensor, got {spans}"
                )

    def _check_input_tokens(self, engine, prompt: str, receiver_context: str, request) -> None:
        tokenizer = engine.receiver.tokenizer
        tokens = len(tokenizer(receiver_context + prompt + request.context_text).input_ids)
        check_tokens("the receiver's input", tokens, self.config)

    def _prefill_early(self, engine, prompt: str, receiver_context: str, request) -> futures.Future:
        """LCF / C2C: start the receiver's prefill of [context + prompt] in the background (the
        model is the same whichever adapter the header names); its span is a child of this call's."""
        self._check_input_tokens(engine, prompt, receiver_context, request)
        receiver, parent = engine.receiver, otel_context.get_current()

        def prefill():
            with self.tracer.start_as_current_span("receiver.prefill_overlapped", context=parent):
                with torch.inference_mode():
                    return receiver.prefill_same_context(request.context_text, prompt)

        return self._prefills.submit(prefill)

    def _prepare(
        self, engine, mode, prompt, receiver_context, request, latents, prefilled=None
    ) -> PreparedInput:
        """The receiver's input and cache: for LCF / C2C `prefilled` (made while the latents
        travelled) is fused, for the other modes the prompt is prefilled here."""
        receiver = engine.receiver
        if prefilled is None:
            self._check_input_tokens(engine, prompt, receiver_context, request)
        with self.tracer.start_as_current_span("receiver.prefill") as span:
            if mode == "lcf":
                prepared = receiver.prepare_lcf(latents, request.context_text, prompt, prefilled=prefilled)
            elif mode == "c2c":
                prepared = receiver.prepare_c2c(latents, request.context_text, prompt, prefilled=prefilled)
            elif mode == "lcfx":
                prepared = receiver.prepare_lcfx(latents, prompt, receiver_context)
            elif mode == "text" and request.text_channel != pb.TEXT_CHANNEL_NOTE:  # forwarded text
                prepared = receiver.prepare_plain(
                    prompt, reader_contexts(request.text_message, receiver_context)
                )
            elif mode == "text":
                prepared = receiver.prepare_plain(
                    prompt, text_contexts(receiver_context, request.text_message)
                )
            else:
                prepared = receiver.prepare_plain(prompt, [receiver_context])
            span.set_attribute("lcflow.tokens.prompt", prepared.prompt_tokens)
            span.set_attribute("lcflow.mode", mode)
        return prepared


def serve(config: ServiceConfig, tracer_provider, engine: ReceiverEngine | None = None, on_load_error=None):
    """Start the receiver (health NOT_SERVING), load its model in the background (then SERVING).

    Returns (running server, service). `engine` skips loading (tests pass tiny models)."""
    service = ReceiverService(config, tracer_provider, engine)
    running = serve_service(
        config,
        RECEIVER_SERVICE,
        service,
        pb_grpc.add_ReceiverServicer_to_server,
        ReceiverEngine.load,
        tracer_provider,
        on_load_error,
    )
    return running, service

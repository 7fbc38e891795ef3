"""The sharer service: the client-facing `Handoff` RPC, and sessions.

A handoff: check the request; prefill the context (or take a session's); open a `Receive`
stream to the receiver; send the ReceiverRequest, then the header, then each layer's
latents as the encoder produces them, then the trailer; relay the receiver's text deltas
and summary to the client, adding the sharer's own timings. In TEXT mode the sharer
writes its message in words and sends it through the same path, so the baseline is
measured in the same system.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import threading
import time

import grpc
import torch
from google.protobuf.timestamp_pb2 import Timestamp
from opentelemetry import trace
from opentelemetry.instrumentation.grpc import client_interceptor
from opentelemetry.instrumentation.grpc.grpcext import intercept_channel

from lcflow.core.names import LATENT_MODES, SAME_CONTEXT_MODES
from lcflow.handoff.pair import SharerContext, receiver_view
from lcflow.handoff.sessions import SessionNotFound, SessionStore, SessionTooLarge
from lcflow.proto_gen.lcflow.v1 import lcflow_pb2 as pb
from lcflow.proto_gen.lcflow.v1 import lcflow_pb2_grpc as pb_grpc
from lcflow.serving.adapter_names import identity_hash
from lcflow.serving.concurrency import ConcurrencyLimit, queue_span
from lcflow.serving.config import ServiceConfig
from lcflow.serving.inspection import AdapterInfo
from lcflow.serving.latent_stream import LatentStream
from lcflow.serving.loading import SharerEngine
from lcflow.serving.readers import check_reader_request
from lcflow.serving.registry import AdapterRegistry, Choice
from lcflow.serving.requests import (
    check_text,
    check_tokens,
    describe_texts,
    generation_settings,
    messages_text,
    mode_of,
    prompt_of,
)
from lcflow.serving.security import SecurityConfigError
from lcflow.serving.server import (
    RECEIVER_SERVICE,
    SHARER_SERVICE,
    ServiceError,
    invalid,
    keepalive_options,
    serve_service,
    status_on_error,
)
from lcflow.serving.servicer import ModelService
from lcflow.transport import CodecConfig
from lcflow.transport.link import LinkMeter
from lcflow.transport.quantize import Quantization, rows_problem

log = logging.getLogger(__name__)

# How long the sharer trusts what the receiver said its model is (ListAdapters), when choosing an
# adapter by mode among several; while the receiver cannot be asked, it asks again this soon.
RECEIVER_MODEL_TTL_S, RECEIVER_MODEL_RETRY_S = 60.0, 5.0
# The channel to the receivers: round-robin over every address of --receiver, and gRPC's own
# client-side health checking (a grpc.health.v1 Watch per connection): a receiver that is not
# SERVING (loading its model, shutting down) or cannot be reached (dead, refused) gets no new
# handoffs; it is reconnected with backoff and used again once it says SERVING.
RECEIVER_SERVICE_CONFIG = {
    "loadBalancingConfig": [{"round_robin": {}}],
    "healthCheckConfig": {"serviceName": RECEIVER_SERVICE},
}


class SharerService(ModelService, pb_grpc.SharerServicer):
    role, engine_class = "sharer", SharerEngine  # ModelService: ready, ListAdapters, ...

    def __init__(
        self,
        config: ServiceConfig,
        tracer_provider,
        engine: SharerEngine | None = None,
        receiver_channel: grpc.Channel | None = None,
    ):
        self.config = config
        self.tracer = tracer_provider.get_tracer("lcflow.sharer")
        self.engine = engine
        self.limit = ConcurrencyLimit(config.max_concurrent, config.max_queue)
        self.sessions = SessionStore(config.session_memory_mb << 20, config.session_ttl_s)
        # Each handoff takes its adapter's quantization (--quantize card) and, with --codec auto,
        # zstd or not by what recent handoffs cost with each (_codec_for).
        self.codec = CodecConfig(level=config.zstd_level)
        self.link = LinkMeter(config.link_mbit)  # what each codec cost on recent handoffs
        self.adapters = AdapterRegistry.for_service(config, self._engine_with)
        self._receiver_model: str | None = None  # the receiver's model hash, as it last said
        self._receiver_model_until = 0.0
        self._receiver_model_lock = threading.Lock()
        # TLS and a token towards the receiver as --receiver-tls-* / --receiver-auth-token-file say.
        self.receiver_security = config.receiver_security()
        self._tracer_provider = tracer_provider
        self._own_channel = receiver_channel is None  # tests may pass a channel of their own
        self._receiver_files = self.receiver_security.files_signature()
        self._reconnect = False  # SIGHUP: make a new channel before the next handoff
        self._channel_lock = threading.Lock()
        self._connect(receiver_channel or self._receiver_channel())
        if self._own_channel:
            receivers = config.receivers().addresses
            log.info(
                "receiver%s: %s%s",
                "s" if len(receivers) > 1 else "",
                ", ".join(receivers),
                " (round-robin over the SERVING ones)" if len(receivers) > 1 else "",
            )

    def _receiver_channel(self) -> grpc.Channel:
        receivers = self.config.receivers()
        options = [
            ("grpc.service_config", json.dumps(RECEIVER_SERVICE_CONFIG)),
            # ours, not one a DNS TXT record might carry
            ("grpc.service_config_disable_resolution", 1),
            *keepalive_options(self.config, server=False),
            # A restarted receiver is found again within seconds, not after gRPC's default
            # reconnect backoff of up to 2 minutes.
            ("grpc.initial_reconnect_backoff_ms", 500),
            ("grpc.max_reconnect_backoff_ms", 5000),
        ]
        if receivers.authority and not self.receiver_security.tls_server_name:
            # A list on one host: that host is the name in :authority and in the TLS check
            # (gRPC's default for an ipv4: list is the whole list).
            options.append(("grpc.default_authority", receivers.authority))
        return self.receiver_security.channel(receivers.target, options=options)

    def engine_ready(self) -> None:
        """ModelService's, then a warning for each adapter whose packet rows an explicit --quantize
        cannot carry: its handoffs will be refused (_check_rows_fit); better said at start."""
        super().engine_ready()
        if self.config.quantize == "card":
            return
        for view in self.adapters.list():
            misfit = view.info.packet_width and self._rows_misfit(
                view.info.name, self.config.quantize, view.info.packet_width
            )
            if view.info.usable and misfit:
                log.warning("%s; its handoffs will be refused until then", misfit)

    def _connect(self, channel: grpc.Channel) -> None:
        # The interceptor puts this span's W3C trace context into the call's metadata.
        self.channel = intercept_channel(channel, client_interceptor(tracer_provider=self._tracer_provider))
        self.receiver = pb_grpc.ReceiverStub(self.channel)

    def reload_receiver_credentials(self) -> None:
        """SIGHUP: re-read the client certificate files before the next handoff."""
        self._reconnect = True

    def receiver_stub(self) -> pb_grpc.ReceiverStub:
        """The stub for the next call; first a new channel if the client TLS files were rotated.

        A channel's credentials are fixed when it is made, and an open connection would keep
        using the old certificate until it drops, so a rotation makes a new channel. Calls in
        flight finish on the old one (it closes when the last of them lets go of it)."""
        if not (self._own_channel and self.receiver_security.tls):
            return self.receiver
        files = self.receiver_security.files_signature()
        if files is None or (files == self._receiver_files and not self._reconnect):
            return self.receiver  # unchanged, or a file briefly missing mid-rotation
        with self._channel_lock:
            if files != self._receiver_files or self._reconnect:
                try:
                    channel = self._receiver_channel()
                except SecurityConfigError as err:  # half-written: keep the old channel for now
                    log.warning("receiver TLS files changed but cannot be used yet: %s", err)
                    return self.receiver
                self._connect(channel)
                self._receiver_files, self._reconnect = files, False
                log.info("receiver TLS files re-read: new channel to %s", self.config.receiver)
        return self.receiver

    # --- adapters -------------------------------------------------------------------------------

    def _choose_adapter(self, request: pb.HandoffRequest, mode: str) -> Choice:
        """The adapter the request names, or the one its mode gets (lcflow.serving.registry);
        said in the trace as lcflow.adapter and lcflow.adapter.chosen_by."""
        choice = self.adapters.pick(request.adapter, mode, fits=self._fits_receiver)
        span = trace.get_current_span()
        span.set_attribute("lcflow.adapter", choice.name)
        span.set_attribute("lcflow.adapter.chosen_by", choice.how)
        return choice

    def _fits_receiver(self, info: AdapterInfo) -> bool:
        """Whether an adapter was made for the receiver's model (True while that is unknown: the
        receiver checks it anyway)."""
        model = self._receiver_model_hash()
        return model is None or info.receiver is None or identity_hash(info.receiver) == model

    def _receiver_model_hash(self) -> str | None:
        """The receiver's model, by its ListAdapters, asked at most once a minute."""
        with self._receiver_model_lock:
            now = time.monotonic()
            if now >= self._receiver_model_until:
                try:
                    answer = self.receiver_stub().ListAdapters(pb.ListAdaptersRequest(), timeout=5)
                    self._receiver_model, ttl = answer.model.hash or None, RECEIVER_MODEL_TTL_S
                except grpc.RpcError as err:
                    log.info("cannot ask the receiver for its model (%s); choosing without it", err.code())
                    self._receiver_model, ttl = None, RECEIVER_MODEL_RETRY_S
                self._receiver_model_until = now + ttl
            return self._receiver_model

    # --- sessions -------------------------------------------------------------------------------

    def OpenSession(self, request, context):
        with status_on_error(context, "OpenSession"):
            engine = self.ready()
            which = request.WhichOneof("context")
            text = (
                request.context_text
                if which == "context_text"
                else messages_text(request.context_messages, "context_messages")
            )
            context_text = check_text("context", text, self.config)
            with self.limit.slot(context), torch.inference_mode():
                prefilled = self._prefill(engine, context_text)
            try:
                session = self.sessions.put(prefilled, request.session_id, float(request.ttl_seconds))
            except SessionTooLarge as err:
                raise ServiceError(grpc.StatusCode.RESOURCE_EXHAUSTED, str(err)) from err
            expires = Timestamp()
            expires.FromNanoseconds(int(session.expires_at * 1e9))
            return pb.OpenSessionResponse(
                session_id=session.session_id, tokens=prefilled.input_ids.shape[1], expires_at=expires
            )

    def CloseSession(self, request, context):
        return pb.CloseSessionResponse(closed=self.sessions.close(request.session_id))

    # --- handoff --------------------------------------------------------------------------------

    def Handoff(self, request, context):
        with status_on_error(context, "Handoff"):
            engine = self.ready()
            started = time.perf_counter()  # TTFT and total as the client sees them: queueing included
            queued_at = time.time_ns()
            # the adapter (if any) is held until the receiver's call has ended: it cannot be evicted
            with self.limit.slot(context) as queue_ms, contextlib.ExitStack() as held:
                queue_span(self.tracer, "sharer.queue", queued_at, queue_ms)
                summary = yield from self._handoff(engine, request, context, started, queue_ms, held)
            # Sent once the slot is free (and the receiver's call has ended, so its slot is free
            # too): a client that sends its next request on seeing the summary must not race us.
            if summary is not None:
                yield summary

    def _handoff(self, engine: SharerEngine, request: pb.HandoffRequest, context, started, queue_ms, held):
        """Yields the answer's text events; returns the summary event (sent by Handoff). The
        adapter's lease goes into `held` (an ExitStack closed once the call is over)."""
        handoff_span = trace.get_current_span()  # taken before the first yield
        mode = mode_of(request.mode)
        check_reader_request(request.text_reader, mode, request.text_channel == pb.TEXT_CHANNEL_NOTE)
        prompt = check_text("prompt", prompt_of(request), self.config)
        receiver_context = check_text(
            "receiver_context", request.receiver_context, self.config, required=False
        )
        generation_settings(request.generation)  # refuse bad settings before any work
        timings: dict[str, float] = {"queue": queue_ms}  # plus the receiver's, in _final_summary
        shared, context_text, choice = None, "", None
        if mode in LATENT_MODES:
            choice = self._choose_adapter(request, mode)
            engine = held.enter_context(self.adapters.lease(choice.entry))
            engine.require_adapter(mode)
            # A session's context is prefilled already. For LCF and C2C a fresh one is prefilled by
            # the stream once the request is on its way, so that the receiver's own prefill runs
            # meanwhile; LCF-X's receiver has nothing to do before the packet, so it is done here.
            shared = self._session_context(request)
            context_text = shared.text if shared is not None else self._context_text(request)
            if shared is None and mode not in SAME_CONTEXT_MODES:
                with torch.inference_mode():
                    shared = self._prefill(engine, context_text)
            elif shared is None:
                self._check_context_tokens(engine, context_text)  # refused before the receiver is called
        elif mode == "text" and request.text_channel == pb.TEXT_CHANNEL_FORWARD_SELECTED:
            # the sentences an LCF-X span packet would carry: that adapter's selection needs the KV
            choice = self._choose_adapter(request, "lcfx")
            engine = held.enter_context(self.adapters.lease(choice.entry))
            engine.require_adapter("lcfx")
            if engine.adapter.config.packet not in ("spans", "bridge"):
                raise ServiceError(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"TEXT_CHANNEL_FORWARD_SELECTED forwards what an LCF-X span packet selects, but "
                    f"adapter {choice.name} packs slots; name a span or bridge adapter",
                )
            shared = self._session_context(request)
            context_text = shared.text if shared is not None else self._context_text(request)
            if shared is None:
                with torch.inference_mode():
                    shared = self._prefill(engine, context_text)
        elif mode == "text":  # the message is written from the text; no KV is needed
            context_text = self._context_text(request)
        receiver_request = pb.ReceiverRequest(
            receiver_context=receiver_context,
            context_text=context_text if mode in SAME_CONTEXT_MODES else "",
            mode=request.mode,
            generation=request.generation,
            request_id=request.request_id,
        )
        if request.WhichOneof("receiver_prompt") == "prompt_messages":
            receiver_request.prompt_messages.CopyFrom(request.prompt_messages)
        else:
            receiver_request.prompt_text = prompt
        if mode == "text":
            receiver_request.text_channel = request.text_channel
            receiver_request.text_reader = request.text_reader
            with self.tracer.start_as_current_span("sharer.message") as span, torch.inference_mode():
                receiver_request.text_message = self._text_message(
                    engine, request.text_channel, context_text, prompt, shared, timings
                )
                span.set_attribute("lcflow.text_channel", pb.TextChannel.Name(request.text_channel))
                span.set_attribute("lcflow.message.chars", len(receiver_request.text_message))
        stream = LatentStream(
            self, engine, mode, receiver_request, shared, receiver_view(receiver_context, prompt)
        )
        stream.context_text = context_text
        stream.prefill = lambda: self._prefill(engine, context_text, checked=True)
        if choice is not None:
            stream.adapter_name, stream.adapter_wire_name = choice.name, choice.wire_name
        if choice is not None and mode in LATENT_MODES:
            width = engine.adapter.config.packet_width()
            stream.codec, stream.codec_reason = self._codec_for(choice, mode, width)
        call = self.receiver_stub().Receive(stream.messages(), timeout=context.time_remaining())
        context.add_callback(call.cancel)  # client gone: cancel downstream too
        first_token_at, summary = None, None
        try:
            for event in call:  # to the end of the call: the receiver's slot is free once it ends
                if event.HasField("text"):
                    first_token_at = first_token_at or time.perf_counter()
                    yield event
                else:
                    summary = self._final_summary(event.summary, timings, stream, started, first_token_at)
                    handoff_span.set_attribute("lcflow.receiver", event.summary.receiver)  # who answered
        except grpc.RpcError:
            if stream.error is not None:  # our own stream broke: that is the cause, not the receiver
                raise stream.error from None
            raise
        finally:
            # However the call ended (a refusal, the client gone, the deadline), the stream's torch
            # work (prefill, encode) stops before this handoff gives up its slot and adapter lease.
            call.cancel()
            stream.stop()
        return summary

    @staticmethod
    def _text_message(engine, channel: int, context_text: str, prompt: str, shared, timings) -> str:
        """TEXT mode's message on `channel`, timing what it costs (message_generate or select)."""
        begin = time.perf_counter()
        if channel == pb.TEXT_CHANNEL_FORWARD:
            return context_text
        if channel == pb.TEXT_CHANNEL_FORWARD_SELECTED:
            text = engine.sharer.selected_text(shared, prompt)
            timings["select"] = (time.perf_counter() - begin) * 1000
            return text
        if channel != pb.TEXT_CHANNEL_NOTE:
            raise invalid(
                f"text_channel {channel} is not a channel this server knows: choose TEXT_CHANNEL_NOTE, "
                "TEXT_CHANNEL_FORWARD or TEXT_CHANNEL_FORWARD_SELECTED"
            )
        note = engine.sharer.write_message(context_text, prompt)
        timings["message_generate"] = (time.perf_counter() - begin) * 1000
        return note

    def _codec_for(self, choice: Choice, mode: str, width: int) -> tuple[CodecConfig, str]:
        """The wire codec for a `mode` handoff with this adapter (packet rows of `width` numbers),
        and why.

        Quantization: --quantize, or with "card" (the default) one the adapter's model card
        allows (card_codecs: bf16, and each codec it measured within 1 EM point of bf16 up to
        its choice). Segment codec: --codec. With "auto" (the default) the link meter picks both,
        the quantization among those the card allows, so that they are used only where they save
        time on the link (lcflow.transport.link); with zstd or none, the card's choice goes."""
        card = self.config.quantize == "card"
        allowed = choice.entry.info.card_codecs if card else (self.config.quantize,)
        why = f"{', '.join(allowed)} allowed by {'the model card' if card else '--quantize'}; "
        if self.config.codec == "auto":
            picked = self.link.choose(allowed, payload=mode)
            quantization, name, why = picked.quantization, picked.name, why + picked.reason
        else:
            quantization, name, why = allowed[-1], self.config.codec, why + f"--codec {self.config.codec}"
        self._check_rows_fit(choice.name, quantization, width)
        return dataclasses.replace(self.codec, name=name, quantization=quantization), why

    @staticmethod
    def _check_rows_fit(adapter: str, quantization: str, width: int) -> None:
        """FAILED_PRECONDITION before anything is sent where `quantization` cannot group this
        adapter's packet rows (int4 in groups of 64, rows of 224 numbers): the operator's
        --quantize and the adapter disagree, and the message names a group that fits."""
        misfit = SharerService._rows_misfit(adapter, quantization, width)
        if misfit:
            raise ServiceError(grpc.StatusCode.FAILED_PRECONDITION, misfit)

    @staticmethod
    def _rows_misfit(adapter: str, quantization: str, width: int) -> str:
        """What to tell the operator where `quantization` cannot carry this adapter's packet rows
        (the refusal above, and the warning at start), "" where it can."""
        problem = rows_problem(quantization, width)
        if not problem:
            return ""
        return (
            f"adapter {adapter} sends packet rows of {width} numbers, which --quantize "
            f"{quantization} cannot carry ({problem}): start the sharer with --quantize "
            f"{Quantization.named(quantization).fitting_name(width)} or card (the codecs the adapter's "
            "model card measured)"
        )

    def _measure_link(self, stream: LatentStream, window_ms: float) -> None:
        """Teach the link meter what this handoff's latents cost beyond encoding (the receiver's
        latent window less the sharer's encode time: packing, the link, unpacking) and in zstd."""
        stats = stream.wire_stats
        if stats is None:
            return
        codec, cost_ms = stream.codec, window_ms - stream.encode_ms
        self.link.record_handoff(codec.quantization, codec.name, stats, cost_ms, payload=stream.mode)

    def _session(self, session_id: str):
        try:
            return self.sessions.get(session_id)
        except SessionNotFound as err:
            raise ServiceError(grpc.StatusCode.NOT_FOUND, str(err.args[0])) from err

    def _context_text(self, request: pb.HandoffRequest) -> str:
        which = request.WhichOneof("sharer_context")
        if which == "session_id":
            return self._session(request.session_id).context.text
        text = (
            messages_text(request.context_messages, "context_messages")
            if which == "context_messages"
            else request.context_text
        )
        return check_text("sharer context", text, self.config)

    def _session_context(self, request: pb.HandoffRequest) -> SharerContext | None:
        """The session's prefilled context (no prefill paid again), or None for a context given as text."""
        if request.WhichOneof("sharer_context") != "session_id":
            return None
        reused = self._session(request.session_id).context
        return SharerContext(reused.text, reused.input_ids, reused.spans, reused.captured, prefill_ms=0.0)

    def _check_context_tokens(self, engine: SharerEngine, text: str) -> None:
        check_tokens("the sharer context", len(engine.sharer.tokenizer(text).input_ids), self.config)

    def _prefill(self, engine: SharerEngine, text: str, checked: bool = False) -> SharerContext:
        with self.tracer.start_as_current_span("sharer.prefill") as span:
            if not checked:
                self._check_context_tokens(engine, text)
            prefilled = engine.sharer.prefill(text)
            span.set_attribute("lcflow.tokens.context", prefilled.input_ids.shape[1])
            return prefilled

    def _final_summary(self, summary, timings, stream, started, first_token_at) -> pb.HandoffEvent:
        """The receiver's summary plus the sharer's stages; TTFT and total as the client sees them."""
        merged = pb.HandoffSummary()
        merged.CopyFrom(summary)
        for name, value in timings.items():
            setattr(merged.timings, name, value)
        merged.timings.queue = timings["queue"] + summary.timings.queue  # waited on both services
        if stream.shared is not None:
            merged.timings.sharer_prefill = stream.shared.prefill_ms
        if stream.mode in LATENT_MODES:
            merged.timings.encode, merged.timings.pack = stream.encode_ms, stream.pack_ms
            # The receiver timed the whole latent window (header to trailer); the part not spent
            # encoding, packing or unpacking is the network and gRPC's own time.
            window = summary.timings.transfer
            merged.timings.transfer = max(
                0.0, window - stream.encode_ms - stream.pack_ms - summary.timings.unpack
            )
            merged.codec = f"{stream.codec.quantization}/{stream.codec.name}"
            merged.codec_reason = stream.codec_reason
            self._measure_link(stream, window)
        if first_token_at is not None:
            merged.timings.time_to_first_token = (first_token_at - started) * 1000
        merged.timings.total = (time.perf_counter() - started) * 1000
        merged.tokens.context = stream.shared.input_ids.shape[1] if stream.shared is not None else 0
        merged.adapter = stream.adapter_name
        if stream.request.text_message:  # TEXT mode: the message itself is what travelled
            merged.bytes_raw = merged.bytes_wire = len(stream.request.text_message.encode())
        log.info(
            "handoff %s%s%s in %.0f ms: %s",
            pb.Mode.Name(merged.mode),
            f" (adapter {merged.adapter})" if merged.adapter else "",
            f" via receiver {merged.receiver}" if merged.receiver else "",
            merged.timings.total,
            describe_texts(
                self.config,
                prompt=prompt_of(stream.request),
                context=stream.context_text,
                answer=merged.answer,
            ),
        )
        return pb.HandoffEvent(summary=merged)


def serve(config: ServiceConfig, tracer_provider, engine: SharerEngine | None = None, on_load_error=None):
    """Start the sharer (health NOT_SERVING), load its model in the background (then SERVING).

    Returns (running server, service). `engine` skips loading (tests pass tiny models)."""
    service = SharerService(config, tracer_provider, engine)
    running = serve_service(
        config,
        SHARER_SERVICE,
        service,
        pb_grpc.add_SharerServicer_to_server,
        SharerEngine.load,
        tracer_provider,
        on_load_error,
    )
    running.reload_hooks.append(service.reload_receiver_credentials)
    return running, service

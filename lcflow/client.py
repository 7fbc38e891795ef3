"""Clients for the sharer's RPCs (what `lcflow handoff`, the demo and agent code use): a
synchronous `HandoffClient` and an asyncio one, `AsyncHandoffClient` (grpc.aio), with the same
typed API. A handoff streams the answer's text, then a summary (stage timings, bytes, trace id):

    with HandoffClient("127.0.0.1:50051") as client:
        for event in client.stream("Where does Mira live?", context="...", mode="lcfx"):
            ...                                    # pb.HandoffEvent: text deltas, then a summary
        with client.session("the sharer's notes") as session_id:   # prefilled once, closed on exit
            result = client.handoff("Where does Mira live?", session_id=session_id)   # collected

    async with AsyncHandoffClient("127.0.0.1:50051") as client:
        async for event in client.stream("Where does Mira live?", context="...", mode="lcfx"):
            ...
        async with client.session("the sharer's notes") as session_id:
            result = await client.handoff("Where does Mira live?", session_id=session_id)

Both take the same options (`handoff_request`), security (lcflow.serving.security.ClientSecurity: TLS,
mutual TLS, a bearer token) and retries (`retry_options`); errors are grpc.RpcError (for the
async client grpc.aio.AioRpcError, a subclass) with the sharer's status code and details.

With a tracer provider, each handoff runs inside a `client.handoff` span whose context travels to
the sharer and on to the receiver: one trace from the client to the answer (the async client
through opentelemetry's grpc.aio interceptors).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass

import grpc
import grpc.aio

from lcflow.core.names import STAGE_ORDER
from lcflow.proto_gen.lcflow.v1 import lcflow_pb2 as pb
from lcflow.proto_gen.lcflow.v1 import lcflow_pb2_grpc as pb_grpc
from lcflow.serving.security import AUTH_HEADER, ClientSecurity, TokenFile

MODE_NAMES = {"lcf": pb.LCF, "lcfx": pb.LCF_X, "c2c": pb.C2C, "text": pb.TEXT, "none": pb.NONE}
TEXT_CHANNEL_NAMES = {
    "note": pb.TEXT_CHANNEL_NOTE,
    "forward": pb.TEXT_CHANNEL_FORWARD,
    "forward-selected": pb.TEXT_CHANNEL_FORWARD_SELECTED,
}


def summary_stages(timings: pb.StageTimings) -> list[str]:
    """The stages this handoff ran (set in its summary, even at 0 ms), in the order a handoff runs
    them; TTFT and total span them and are not listed."""
    return [
        name for name in STAGE_ORDER if name in timings.DESCRIPTOR.fields_by_name and timings.HasField(name)
    ]


@dataclass
class HandoffResult:
    answer: str
    deltas: list[str]
    summary: pb.HandoffSummary


def retry_options(retries: int) -> list[tuple[str, object]]:
    """Channel options for gRPC's own retries of the Sharer's RPCs: UNAVAILABLE (not up yet, a
    connection lost before an answer) and RESOURCE_EXHAUSTED (its queue full), with exponential
    backoff, or after the server's `grpc-retry-pushback-ms` hint when it sends one. gRPC retries
    only calls that have received nothing yet, so a streaming answer is never repeated halfway."""
    if retries <= 0:
        return []
    policy = {
        "maxAttempts": min(5, retries + 1),  # gRPC caps attempts at 5
        "initialBackoff": "0.2s",
        "maxBackoff": "5s",
        "backoffMultiplier": 2,
        "retryableStatusCodes": ["UNAVAILABLE", "RESOURCE_EXHAUSTED"],
    }
    config = {"methodConfig": [{"name": [{"service": "lcflow.v1.Sharer"}], "retryPolicy": policy}]}
    return [("grpc.enable_retries", 1), ("grpc.service_config", json.dumps(config))]


# --- requests and results: one place for both clients ---------------------------------------------


def handoff_request(
    prompt: str,
    mode: str = "lcfx",
    context: str = "",
    session_id: str = "",
    receiver_context: str = "",
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    top_p: float = 1.0,
    stop: list[str] | None = None,
    seed: int | None = None,
    request_id: str = "",
    adapter: str = "",
    text_channel: str = "note",
    text_reader: str = "",
) -> pb.HandoffRequest:
    """The HandoffRequest for these options. The sharer's context is `session_id` (an open
    session, `open_session` / `session`) or else `context`; `mode` is one of MODE_NAMES;
    `adapter` names one inside the services' --adapters (unset: their --adapter when its mode is
    `mode`, else their best-measured one of that mode; the summary's `adapter` says which ran).
    `text_channel` (mode "text"): "note", "forward" (the whole context) or "forward-selected"
    (the sentences an LCF-X span packet would carry, chosen with that adapter); `text_reader` names
    a text reader in the receiver's --adapters to read forwarded text with."""
    if mode not in MODE_NAMES:
        raise ValueError(f"mode must be one of {list(MODE_NAMES)}, not {mode!r}")
    if text_channel not in TEXT_CHANNEL_NAMES:
        raise ValueError(f"text_channel must be one of {list(TEXT_CHANNEL_NAMES)}, not {text_channel!r}")
    generation = pb.GenerationSettings(
        max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, stop=stop or []
    )
    if seed is not None:
        generation.seed = seed
    request = pb.HandoffRequest(
        prompt_text=prompt,
        receiver_context=receiver_context,
        mode=MODE_NAMES[mode],
        generation=generation,
        request_id=request_id,
        text_channel=TEXT_CHANNEL_NAMES[text_channel],
        text_reader=text_reader,
    )
    if adapter:
        request.adapter = adapter
    if session_id:
        request.session_id = session_id
    elif context:
        request.context_text = context
    return request


def session_request(context: str, session_id: str = "", ttl_s: int = 0) -> pb.OpenSessionRequest:
    """An OpenSessionRequest: the server makes the id when `session_id` is empty; `ttl_s` 0 = its default."""
    request = pb.OpenSessionRequest(context_text=context, ttl_seconds=ttl_s)
    if session_id:
        request.session_id = session_id
    return request


class _Collector:
    """Gathers a handoff's events into a HandoffResult."""

    def __init__(self):
        self.deltas: list[str] = []
        self.summary: pb.HandoffSummary | None = None

    def add(self, event: pb.HandoffEvent) -> None:
        if event.HasField("text"):
            self.deltas.append(event.text.text)
        else:
            self.summary = event.summary

    def result(self) -> HandoffResult:
        if self.summary is None:
            raise RuntimeError("the sharer ended the stream without a summary")
        return HandoffResult(self.summary.answer, self.deltas, self.summary)


# --- the synchronous client -----------------------------------------------------------------------


class HandoffClient:
    """`security` (lcflow.serving.security.ClientSecurity) turns on TLS, mutual TLS and a bearer token:

    HandoffClient("sharer:50051", security=ClientSecurity(tls_ca="ca.pem", auth_token_file="token"))

    `retries`: how often gRPC retries a call refused with UNAVAILABLE or RESOURCE_EXHAUSTED
    (retry_options); 0 = never. `timeout_s`: each call's deadline (None: none).
    """

    def __init__(
        self,
        target: str,
        tracer_provider=None,
        timeout_s: float | None = 300.0,
        security: ClientSecurity | None = None,
        retries: int = 3,
    ):
        channel = (security or ClientSecurity()).channel(target, retry_options(retries))
        self.tracer = tracer_provider.get_tracer("lcflow.client") if tracer_provider else None
        if tracer_provider is not None:
            # imported here: it is slow to import, and `lcflow --help` imports this module
            from opentelemetry.instrumentation.grpc import client_interceptor
            from opentelemetry.instrumentation.grpc.grpcext import intercept_channel

            channel = intercept_channel(channel, client_interceptor(tracer_provider=tracer_provider))
        self.channel = channel
        self.stub = pb_grpc.SharerStub(channel)
        self.timeout_s = timeout_s

    def request(self, prompt: str, **options) -> pb.HandoffRequest:
        """`handoff_request(prompt, **options)`."""
        return handoff_request(prompt, **options)

    def stream(self, prompt: str, **options) -> Iterator[pb.HandoffEvent]:
        """The handoff's events: text deltas as they are generated, then one summary.
        `options`: those of `handoff_request` (mode, context or session_id, max_new_tokens, ...)."""
        request = handoff_request(prompt, **options)
        if self.tracer is None:
            yield from self.stub.Handoff(request, timeout=self.timeout_s)
            return
        with self.tracer.start_as_current_span("client.handoff") as span:
            span.set_attribute("lcflow.mode", options.get("mode", "lcfx"))
            yield from self.stub.Handoff(request, timeout=self.timeout_s)

    def handoff(self, prompt: str, **options) -> HandoffResult:
        """The whole handoff, collected: answer, its deltas and the summary."""
        collected = _Collector()
        for event in self.stream(prompt, **options):
            collected.add(event)
        return collected.result()

    def open_session(self, context: str, session_id: str = "", ttl_s: int = 0) -> pb.OpenSessionResponse:
        """Prefill `context` once on the sharer; pass the returned id as `session_id` to handoffs."""
        return self.stub.OpenSession(session_request(context, session_id, ttl_s), timeout=self.timeout_s)

    def close_session(self, session_id: str) -> bool:
        """False when there was no such session (already closed, or expired)."""
        return self.stub.CloseSession(
            pb.CloseSessionRequest(session_id=session_id), timeout=self.timeout_s
        ).closed

    def list_adapters(self) -> pb.ListAdaptersResponse:
        """The sharer's adapters: names, modes, models, sizes, loaded or not, usable or why not."""
        return self.stub.ListAdapters(pb.ListAdaptersRequest(), timeout=self.timeout_s)

    @contextlib.contextmanager
    def session(self, context: str, session_id: str = "", ttl_s: int = 0) -> Iterator[str]:
        """`with client.session(context) as session_id:` a session open for the block, closed on
        exit, also when the block raises (then a failure to close does not hide its error)."""
        opened = self.open_session(context, session_id, ttl_s)
        try:
            yield opened.session_id
        except BaseException:
            with contextlib.suppress(grpc.RpcError):
                self.close_session(opened.session_id)
            raise
        self.close_session(opened.session_id)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> HandoffClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --- the asyncio client ---------------------------------------------------------------------------


class _AioToken:
    """lcflow.serving.security.TokenClientInterceptor for grpc.aio: `authorization: Bearer <token>` on
    every call, the token re-read when its file changes. grpc.aio takes one interceptor object
    per kind of call, hence one subclass each (aio_token_interceptors)."""

    def __init__(self, token: TokenFile):
        self.token = token

    def _details(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        metadata = grpc.aio.Metadata(*tuple(details.metadata or ()))
        metadata.add(AUTH_HEADER, "Bearer " + self.token.value().decode())
        return grpc.aio.ClientCallDetails(
            details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
        )


class _AioTokenUnaryUnary(_AioToken, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, client_call_details, request):
        return await continuation(self._details(client_call_details), request)


class _AioTokenUnaryStream(_AioToken, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation, client_call_details, request):
        return await continuation(self._details(client_call_details), request)


class _AioTokenStreamUnary(_AioToken, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        return await continuation(self._details(client_call_details), request_iterator)


class _AioTokenStreamStream(_AioToken, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        return await continuation(self._details(client_call_details), request_iterator)


def aio_token_interceptors(token: TokenFile) -> list:
    """grpc.aio interceptors that send the bearer token on every kind of call."""
    return [
        kind(token)
        for kind in (_AioTokenUnaryUnary, _AioTokenUnaryStream, _AioTokenStreamUnary, _AioTokenStreamStream)
    ]


def aio_channel(
    security: ClientSecurity, target: str, options: Sequence = (), interceptors: Sequence = ()
) -> grpc.aio.Channel:
    """`ClientSecurity.channel` for grpc.aio: the same credentials (TLS, mutual TLS), server-name
    override and bearer token. Make it inside a running event loop."""
    options, interceptors = list(options), list(interceptors)
    if security.auth_token_file:
        interceptors += aio_token_interceptors(TokenFile(security.auth_token_file))
    if security.tls:
        if security.tls_server_name:
            options.append(("grpc.ssl_target_name_override", security.tls_server_name))
        return grpc.aio.secure_channel(target, security.credentials(), options, interceptors=interceptors)
    return grpc.aio.insecure_channel(target, options, interceptors=interceptors)


class AsyncHandoffClient:
    """HandoffClient for asyncio (grpc.aio), with the same arguments and methods, awaited:

    async with AsyncHandoffClient("sharer:50051", security=ClientSecurity(...)) as client:
        async for event in client.stream(prompt, context=notes, mode="lcfx"): ...
        result = await client.handoff(prompt, session_id=session_id)

    Make it inside a running event loop (grpc.aio channels belong to one). Many handoffs may run
    at once on one client (asyncio.gather). Errors are grpc.aio.AioRpcError.
    """

    def __init__(
        self,
        target: str,
        tracer_provider=None,
        timeout_s: float | None = 300.0,
        security: ClientSecurity | None = None,
        retries: int = 3,
    ):
        interceptors = []
        self.tracer = tracer_provider.get_tracer("lcflow.client") if tracer_provider else None
        if tracer_provider is not None:
            from opentelemetry.instrumentation.grpc import aio_client_interceptors

            interceptors = aio_client_interceptors(tracer_provider=tracer_provider)
        self.channel = aio_channel(security or ClientSecurity(), target, retry_options(retries), interceptors)
        self.stub = pb_grpc.SharerStub(self.channel)
        self.timeout_s = timeout_s

    def request(self, prompt: str, **options) -> pb.HandoffRequest:
        """`handoff_request(prompt, **options)`."""
        return handoff_request(prompt, **options)

    async def stream(self, prompt: str, **options) -> AsyncIterator[pb.HandoffEvent]:
        """The handoff's events: text deltas as they are generated, then one summary. A stream
        left early is cancelled (the sharer then cancels the receiver's generation) once it is
        closed: when asyncio finalizes it, or at once with `contextlib.aclosing`."""
        request = handoff_request(prompt, **options)
        span = None
        if self.tracer is None:
            call = self.stub.Handoff(request, timeout=self.timeout_s)
        else:
            from opentelemetry import trace

            mode = options.get("mode", "lcfx")
            span = self.tracer.start_span("client.handoff", attributes={"lcflow.mode": mode})
            # The call's interceptors run in a task made here, which copies this context: the
            # call's span, and the trace context sent to the sharer, are children of this one.
            with trace.use_span(span):
                call = self.stub.Handoff(request, timeout=self.timeout_s)
        try:
            async for event in call:
                yield event
        except Exception as err:
            if span is not None:  # as the sync client's start_as_current_span records it
                from opentelemetry.trace import Status, StatusCode

                span.record_exception(err)
                span.set_status(Status(StatusCode.ERROR, f"{type(err).__name__}: {err}"))
            raise
        finally:
            call.cancel()  # nothing once the call has ended; stops it when the caller stopped early
            if span is not None:
                span.end()

    async def handoff(self, prompt: str, **options) -> HandoffResult:
        """The whole handoff, collected: answer, its deltas and the summary."""
        collected = _Collector()
        async for event in self.stream(prompt, **options):
            collected.add(event)
        return collected.result()

    async def open_session(
        self, context: str, session_id: str = "", ttl_s: int = 0
    ) -> pb.OpenSessionResponse:
        """Prefill `context` once on the sharer; pass the returned id as `session_id` to handoffs."""
        return await self.stub.OpenSession(
            session_request(context, session_id, ttl_s), timeout=self.timeout_s
        )

    async def close_session(self, session_id: str) -> bool:
        """False when there was no such session (already closed, or expired)."""
        response = await self.stub.CloseSession(
            pb.CloseSessionRequest(session_id=session_id), timeout=self.timeout_s
        )
        return response.closed

    async def list_adapters(self) -> pb.ListAdaptersResponse:
        """The sharer's adapters: names, modes, models, sizes, loaded or not, usable or why not."""
        return await self.stub.ListAdapters(pb.ListAdaptersRequest(), timeout=self.timeout_s)

    @contextlib.asynccontextmanager
    async def session(self, context: str, session_id: str = "", ttl_s: int = 0) -> AsyncIterator[str]:
        """`async with client.session(context) as session_id:` a session open for the block,
        closed on exit, also when the block raises (then a failure to close does not hide its error)."""
        opened = await self.open_session(context, session_id, ttl_s)
        try:
            yield opened.session_id
        except BaseException:
            with contextlib.suppress(grpc.RpcError):
                await self.close_session(opened.session_id)
            raise
        await self.close_session(opened.session_id)

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> AsyncHandoffClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

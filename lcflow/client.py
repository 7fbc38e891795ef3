"""A small client for the sharer's `Handoff` RPC (what `lcflow handoff` and the demo use).

    client = HandoffClient("127.0.0.1:50051")
    for event in client.stream(context="...", prompt="...", mode="lcfx"):
        ...                                       # pb.HandoffEvent: text deltas, then a summary
    result = client.handoff(context="...", prompt="...", mode="text")   # collected

With a tracer provider, the call runs inside a `client.handoff` span whose context travels to
the sharer and on to the receiver: one trace from the client to the answer.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass

from lcflow.proto_gen.lcflow.v1 import lcflow_pb2 as pb
from lcflow.proto_gen.lcflow.v1 import lcflow_pb2_grpc as pb_grpc
from lcflow.security import ClientSecurity

MODE_NAMES = {"lcf": pb.LCF, "lcfx": pb.LCF_X, "text": pb.TEXT, "none": pb.NONE}


def summary_stages(timings: pb.StageTimings) -> list[str]:
    """The stages this handoff ran (set in its summary, even at 0 ms), in the order a handoff runs
    them; TTFT and total span them and are not listed."""
    from lcflow.report import STAGE_ORDER

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


class HandoffClient:
    """`security` (lcflow.security.ClientSecurity) turns on TLS, mutual TLS and a bearer token:

    HandoffClient("sharer:50051", security=ClientSecurity(tls_ca="ca.pem", auth_token_file="token"))

    `retries`: how often gRPC retries a call refused with UNAVAILABLE or RESOURCE_EXHAUSTED
    (retry_options); 0 = never.
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

    def request(
        self,
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
    ) -> pb.HandoffRequest:
        if mode not in MODE_NAMES:
            raise ValueError(f"mode must be one of {list(MODE_NAMES)}, not {mode!r}")
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
        )
        if adapter:  # by name, inside the services' --adapter-dir; unset: their --adapter
            request.adapter = adapter
        if session_id:
            request.session_id = session_id
        elif context:
            request.context_text = context
        return request

    def stream(self, prompt: str, **options) -> Iterator[pb.HandoffEvent]:
        request = self.request(prompt, **options)
        if self.tracer is None:
            yield from self.stub.Handoff(request, timeout=self.timeout_s)
            return
        with self.tracer.start_as_current_span("client.handoff") as span:
            span.set_attribute("lcflow.mode", options.get("mode", "lcfx"))
            yield from self.stub.Handoff(request, timeout=self.timeout_s)

    def handoff(self, prompt: str, **options) -> HandoffResult:
        deltas, summary = [], None
        for event in self.stream(prompt, **options):
            if event.HasField("text"):
                deltas.append(event.text.text)
            else:
                summary = event.summary
        if summary is None:
            raise RuntimeError("the sharer ended the stream without a summary")
        return HandoffResult(summary.answer, deltas, summary)

    def open_session(self, context: str, session_id: str = "", ttl_s: int = 0) -> pb.OpenSessionResponse:
        request = pb.OpenSessionRequest(context_text=context, ttl_seconds=ttl_s)
        if session_id:
            request.session_id = session_id
        return self.stub.OpenSession(request, timeout=self.timeout_s)

    def close_session(self, session_id: str) -> bool:
        return self.stub.CloseSession(
            pb.CloseSessionRequest(session_id=session_id), timeout=self.timeout_s
        ).closed

    def close(self) -> None:
        self.channel.close()

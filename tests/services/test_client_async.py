"""AsyncHandoffClient (grpc.aio) against both services on loopback with tiny models: the same API
as HandoffClient (streamed events then a summary, collected handoffs, sessions as context
managers), the same security and tracing, and errors as grpc.aio.AioRpcError with their status."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from helpers import tiny_adapter_dir
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from service_helpers import mutual_tls_server_settings, running_services, trace_spans

from lcflow.client import MODE_NAMES, AsyncHandoffClient, HandoffClient
from lcflow.proto_gen.lcflow.v1 import lcflow_pb2 as pb
from lcflow.serving.security import ClientSecurity
from lcflow.serving.telemetry import make_tracer_provider

CONTEXT = "Mira Volkov lives in Oslo. Lior Senn plays the violin and owns a cat."
PROMPT = "Where does Mira Volkov live?"


class Boom(Exception):
    pass


@pytest.fixture(scope="module")
def spans():
    return InMemorySpanExporter()


@pytest.fixture(scope="module")
def services(tiny_pair, tmp_path_factory, spans):
    adapter_dir = tiny_adapter_dir(tiny_pair, tmp_path_factory.mktemp("adapter-lcfx"))
    with running_services(tiny_pair, adapter_dir, spans) as running:
        yield running


def run(make_coroutine):
    """Runs `make_coroutine(client)` with a fresh AsyncHandoffClient of the services, in a new loop."""

    def with_client(target, **options):
        async def main():
            async with AsyncHandoffClient(target, timeout_s=60, **options) as client:
                return await make_coroutine(client)

        return asyncio.run(main())

    return with_client


def test_stream_yields_text_deltas_then_one_summary(services):
    async def body(client):
        return [
            event async for event in client.stream(PROMPT, mode="lcfx", context=CONTEXT, max_new_tokens=5)
        ]

    *texts, last = run(body)(services.sharer)
    assert texts and all(event.HasField("text") for event in texts)
    assert last.HasField("summary") and last.summary.mode == pb.LCF_X
    assert "".join(event.text.text for event in texts) == last.summary.answer
    assert last.summary.bytes_raw > 0 and last.summary.timings.total > 0


@pytest.mark.parametrize("mode", ["lcfx", "none"])
def test_handoff_collects_what_the_sync_client_gets(services, mode):
    options = {
        "mode": mode,
        "context": CONTEXT,
        "receiver_context": "Ada owns a turtle.",
        "max_new_tokens": 5,
    }

    async def body(client):
        return await client.handoff(PROMPT, **options)

    result = run(body)(services.sharer)
    with HandoffClient(services.sharer, timeout_s=60) as sync_client:
        expected = sync_client.handoff(PROMPT, **options)
    assert result.answer == expected.answer and "".join(result.deltas) == result.answer
    assert result.summary.mode == expected.summary.mode == MODE_NAMES[mode]


def test_handoffs_run_concurrently_on_one_client(services):
    async def body(client):
        return await asyncio.gather(
            *(client.handoff(PROMPT, mode="lcfx", context=CONTEXT, max_new_tokens=3) for _ in range(3))
        )

    results = run(body)(services.sharer)
    assert len(results) == 3 and len({r.answer for r in results}) == 1  # greedy: the same answer


def test_session_context_manager_opens_reuses_and_closes(services):
    store = services.sharer_service.sessions
    before = len(store)

    async def body(client):
        async with client.session(CONTEXT) as session_id:
            assert len(store) == before + 1
            reused = await client.handoff(PROMPT, mode="lcfx", session_id=session_id, max_new_tokens=4)
            again = await client.handoff(PROMPT, mode="lcfx", session_id=session_id, max_new_tokens=4)
        fresh = await client.handoff(PROMPT, mode="lcfx", context=CONTEXT, max_new_tokens=4)
        with pytest.raises(grpc.aio.AioRpcError) as err:  # closed on exit: gone
            await client.handoff(PROMPT, mode="lcfx", session_id=session_id, max_new_tokens=2)
        return session_id, reused, again, fresh, err.value, await client.close_session(session_id)

    session_id, reused, again, fresh, error, closed_again = run(body)(services.sharer)
    assert session_id and len(store) == before and closed_again is False
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert reused.answer == again.answer == fresh.answer
    assert reused.summary.timings.sharer_prefill == again.summary.timings.sharer_prefill == 0
    assert fresh.summary.timings.sharer_prefill > 0


def test_session_is_closed_when_the_body_raises(services):
    store = services.sharer_service.sessions
    before = len(store)

    async def body(client):
        with pytest.raises(Boom):
            async with client.session(CONTEXT, session_id="planner-notes", ttl_s=60) as session_id:
                assert session_id == "planner-notes" and len(store) == before + 1
                raise Boom
        return await client.close_session("planner-notes")

    assert run(body)(services.sharer) is False and len(store) == before
    # the synchronous client's session does the same
    with HandoffClient(services.sharer, timeout_s=60) as client, pytest.raises(Boom):
        with client.session(CONTEXT, session_id="sync-notes") as session_id:
            assert session_id == "sync-notes" and len(store) == before + 1
            raise Boom
    assert len(store) == before


@pytest.mark.parametrize(
    "options, code",
    [
        ({"prompt": "   ", "context": CONTEXT}, grpc.StatusCode.INVALID_ARGUMENT),
        ({"prompt": PROMPT, "context": ""}, grpc.StatusCode.INVALID_ARGUMENT),
        ({"prompt": PROMPT, "context": CONTEXT, "max_new_tokens": 100_000}, grpc.StatusCode.INVALID_ARGUMENT),
        ({"prompt": PROMPT, "session_id": "no-such-session"}, grpc.StatusCode.NOT_FOUND),
    ],
    ids=["empty-prompt", "empty-context", "too-many-tokens", "unknown-session"],
)
def test_errors_are_aio_rpc_errors_with_their_status(services, options, code):
    options = dict(options)
    prompt = options.pop("prompt")

    async def body(client):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await client.handoff(prompt, mode="lcfx", **options)
        # the client still serves the next handoff
        return err.value, await client.handoff(PROMPT, mode="none", context=CONTEXT, max_new_tokens=2)

    error, after = run(body)(services.sharer)
    assert error.code() == code and len(error.details()) > 10
    assert after.summary.mode == pb.NONE


def test_a_bad_mode_is_refused_before_any_call(services):
    async def body(client):
        with pytest.raises(ValueError, match="mode must be one of"):
            await client.handoff(PROMPT, mode="latent", context=CONTEXT)

    run(body)(services.sharer)


def test_stopping_early_cancels_the_call(services):
    receiver = services.receiver_service
    cancelled_before = receiver.cancelled_generations

    async def eventually(condition, seconds=10.0):
        for _ in range(int(seconds / 0.05)):
            if condition():
                return True
            await asyncio.sleep(0.05)
        return condition()

    async def body(client):
        async for event in client.stream(PROMPT, mode="lcfx", context=CONTEXT, max_new_tokens=2000):
            assert event.HasField("text")
            break  # the stream is finalized, its call cancelled: the receiver stops generating
        stopped = await eventually(lambda: receiver.cancelled_generations == cancelled_before + 1)
        freed = await eventually(lambda: services.sharer_service.limit.in_flight == 0)
        after = await client.handoff(PROMPT, mode="none", context=CONTEXT, max_new_tokens=2)
        return stopped, freed, after

    stopped, freed, after = run(body)(services.sharer)
    assert stopped and freed and after.summary.mode == pb.NONE


def test_one_trace_from_the_async_client_to_the_receiver(services, spans):
    spans.clear()
    provider = make_tracer_provider("client", spans)

    async def body(client):
        return await client.handoff(PROMPT, mode="lcfx", context=CONTEXT, max_new_tokens=3)

    result = run(body)(services.sharer, tracer_provider=provider)
    by_name = trace_spans(spans, result.summary.trace_id)
    root = by_name[("client", "client.handoff")]
    client_call = by_name[("client", "/lcflow.v1.Sharer/Handoff")]
    sharer_server = by_name[("lcflow-sharer", "/lcflow.v1.Sharer/Handoff")]
    receiver_server = by_name[("lcflow-receiver", "/lcflow.v1.Receiver/Receive")]
    assert root.parent is None and root.attributes["lcflow.mode"] == "lcfx"
    assert client_call.parent.span_id == root.context.span_id
    assert sharer_server.parent.span_id == client_call.context.span_id
    assert receiver_server.context.trace_id == root.context.trace_id


def test_mutual_tls_and_token_like_the_sync_client(tiny_pair, tmp_path):
    sharer = mutual_tls_server_settings(tmp_path, "s3cret")
    certificate = {
        "tls_ca": str(tmp_path / "ca.pem"),
        "tls_client_cert": str(tmp_path / "client.pem"),
        "tls_client_key": str(tmp_path / "client-key.pem"),
    }

    async def body(client):
        try:
            return await client.handoff(PROMPT, mode="none", context=CONTEXT, max_new_tokens=2)
        except grpc.aio.AioRpcError as err:
            return err.code()

    with running_services(tiny_pair, sharer=sharer) as secure:
        full = ClientSecurity(**certificate, auth_token_file=str(tmp_path / "token"))
        assert run(body)(secure.sharer, security=full).summary.mode == pb.NONE
        no_token = ClientSecurity(**certificate)
        assert run(body)(secure.sharer, security=no_token) == grpc.StatusCode.UNAUTHENTICATED
        plaintext = ClientSecurity(auth_token_file=str(tmp_path / "token"))
        assert run(body)(secure.sharer, security=plaintext, retries=0) == grpc.StatusCode.UNAVAILABLE

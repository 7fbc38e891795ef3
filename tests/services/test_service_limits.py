"""The services under load and at their edges: deadlines, cancellation, the concurrency bound and
its queue, retries, graceful shutdown, health while the model loads."""

from __future__ import annotations

import contextlib
import time

import grpc
import pytest
from helpers import CONTEXT, PROMPT, free_port, make_adapter_dir
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from service_helpers import Pair, latent_messages, plain_request, receive_status, still_serves

from lcflow.client import HandoffClient
from lcflow.proto_gen.lcflow.v1 import lcflow_pb2 as pb
from lcflow.serving.concurrency import ConcurrencyLimit
from lcflow.serving.config import ServiceConfig
from lcflow.serving.telemetry import make_tracer_provider


def test_deadline_exceeded_stops_the_handoff(pair):
    client = HandoffClient(f"127.0.0.1:{pair.sharer_port}", timeout_s=0.3)
    with pytest.raises(grpc.RpcError) as err:
        client.handoff(PROMPT, mode=pair.mode, context=CONTEXT * 20, max_new_tokens=2000)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    still_serves(pair)


def test_stream_must_open_with_a_request(pair):
    messages = latent_messages(pair)
    assert receive_status(pair, messages[1:]) == grpc.StatusCode.INVALID_ARGUMENT


def wait_until(condition, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


def test_client_cancellation_stops_the_receiver(pair):
    events = pair.sharer_stub.Handoff(
        pair.client.request(PROMPT, mode=pair.mode, context=CONTEXT, max_new_tokens=2000), timeout=60
    )
    first = next(events)
    assert first.HasField("text")
    assert pair.receiver_service.limit.in_flight == 1
    cancelled_before = pair.receiver_service.cancelled_generations
    events.cancel()
    # the receiver's generation is stopped early (not run to 2000 tokens) and its slot freed
    assert wait_until(lambda: pair.receiver_service.cancelled_generations == cancelled_before + 1, 10)
    assert wait_until(lambda: pair.receiver_service.limit.in_flight == 0, 10)
    assert wait_until(lambda: pair.sharer_service.limit.in_flight == 0, 10)
    still_serves(pair)


def pushback_ms(err: grpc.RpcError) -> int | None:
    hint = dict(err.trailing_metadata() or ()).get("grpc-retry-pushback-ms")
    return int(hint) if hint is not None else None


def one_slot_pair(tiny_pair, tmp_path_factory, spans) -> Pair:
    """Both services with one handoff at a time and no queue: a second one is refused at once."""
    adapter_dir = make_adapter_dir(tiny_pair, tmp_path_factory, "lcfx")
    return Pair(tiny_pair, adapter_dir, "lcfx", spans, max_concurrent=1, max_queue=0)


def test_without_a_queue_the_bound_gives_resource_exhausted_with_a_retry_hint(
    tiny_pair, tmp_path_factory, spans
):
    bounded = one_slot_pair(tiny_pair, tmp_path_factory, spans)
    client = HandoffClient(f"127.0.0.1:{bounded.sharer_port}", timeout_s=30, retries=0)
    try:
        # Hold the one slot as an in-flight handoff would (deterministic: a real one may finish
        # before the second request arrives, since a tiny model can stop at EOS at any time).
        with bounded.sharer_service.limit.slot():
            with pytest.raises(grpc.RpcError) as err:
                client.handoff(PROMPT, context=CONTEXT, max_new_tokens=2)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "--max-concurrent" in err.value.details() and "--max-queue" in err.value.details()
        assert 50 <= pushback_ms(err.value) <= 10_000
        assert client.handoff(PROMPT, context=CONTEXT, max_new_tokens=2).summary.timings.total > 0
        with bounded.receiver_service.limit.slot():  # the receiver has its own bound, and its hint travels
            with pytest.raises(grpc.RpcError) as err:
                client.handoff(PROMPT, context=CONTEXT, max_new_tokens=2)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert err.value.details().startswith("receiver:") and pushback_ms(err.value) is not None
    finally:
        client.close()
        bounded.stop()


@pytest.fixture
def queued(tiny_pair, tmp_path_factory, spans):
    """One slot and a queue of two on each service."""
    running = Pair(
        tiny_pair,
        make_adapter_dir(tiny_pair, tmp_path_factory, "lcfx"),
        "lcfx",
        spans,
        max_concurrent=1,
        max_queue=2,
    )
    yield running
    running.stop()


def hold_slot(limit, seconds: float):
    """Hold one of `limit`'s slots from another thread for `seconds`; returns (thread, held event)."""
    import threading

    held = threading.Event()

    def hold():
        with limit.slot():
            held.set()
            time.sleep(seconds)

    thread = threading.Thread(target=hold)
    thread.start()
    assert held.wait(10)
    return thread


def test_a_burst_waits_in_the_queue_and_is_served(queued, spans):
    spans.clear()
    holder = hold_slot(queued.sharer_service.limit, 0.6)
    client = HandoffClient(f"127.0.0.1:{queued.sharer_port}", timeout_s=30, retries=0)
    result = client.handoff(PROMPT, context=CONTEXT, max_new_tokens=2)  # waits, then runs
    holder.join()
    t = result.summary.timings
    assert t.HasField("queue") and t.queue >= 300  # it waited for the held slot, and says so
    assert t.time_to_first_token >= t.queue and t.total >= t.queue
    names = {s.name for s in spans.get_finished_spans()}
    assert {"sharer.queue", "receiver.queue"} <= names
    fresh = client.handoff(PROMPT, context=CONTEXT, max_new_tokens=2)  # nothing to wait for
    assert fresh.summary.timings.HasField("queue") and fresh.summary.timings.queue < 100
    client.close()


def test_a_full_queue_is_refused_at_once_and_the_queued_are_served(queued):
    from concurrent.futures import ThreadPoolExecutor

    limit = queued.sharer_service.limit
    holder = hold_slot(limit, 1.5)
    client = HandoffClient(f"127.0.0.1:{queued.sharer_port}", timeout_s=30, retries=0)
    with ThreadPoolExecutor(2) as pool:
        waiting = [pool.submit(client.handoff, PROMPT, context=CONTEXT, max_new_tokens=2) for _ in range(2)]
        assert wait_until(lambda: limit.queued == 2, 10)
        with pytest.raises(grpc.RpcError) as err:
            client.handoff(PROMPT, context=CONTEXT, max_new_tokens=2)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and pushback_ms(err.value) >= 50
        results = [future.result(timeout=60) for future in waiting]
    holder.join()
    assert all(r.summary.timings.queue > 0 for r in results)
    assert limit.queued == 0 and limit.in_flight == 0
    client.close()


def test_a_deadline_ends_the_wait_in_the_queue(queued):
    limit = queued.sharer_service.limit
    holder = hold_slot(limit, 1.5)
    client = HandoffClient(f"127.0.0.1:{queued.sharer_port}", timeout_s=0.4, retries=0)
    with pytest.raises(grpc.RpcError) as err:
        client.handoff(PROMPT, context=CONTEXT, max_new_tokens=2)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert wait_until(lambda: limit.queued == 0, 5)  # its place in the queue is given up
    holder.join()
    client.close()


def test_the_client_retries_a_full_queue_with_grpc_retries(tiny_pair, tmp_path_factory, spans):
    bounded = one_slot_pair(tiny_pair, tmp_path_factory, spans)
    try:
        holder = hold_slot(bounded.sharer_service.limit, 0.5)
        started = time.monotonic()
        for retries, expected in ((0, grpc.StatusCode.RESOURCE_EXHAUSTED), (3, grpc.StatusCode.OK)):
            client = HandoffClient(f"127.0.0.1:{bounded.sharer_port}", timeout_s=30, retries=retries)
            try:
                client.handoff(PROMPT, context=CONTEXT, max_new_tokens=2)
                code = grpc.StatusCode.OK
            except grpc.RpcError as err:
                code = err.code()
            client.close()
            assert code == expected, retries
        assert time.monotonic() - started >= 0.3  # the retried call got through after the slot freed
        holder.join()
    finally:
        bounded.stop()


class SlowRelease(ConcurrencyLimit):
    """A limit whose slots take `delay_s` to come free after the work is done, as on a loaded
    machine where the handler's thread is scheduled late."""

    def __init__(self, limit: int, max_queue: int, delay_s: float):
        super().__init__(limit, max_queue)
        self.delay_s = delay_s

    @contextlib.contextmanager
    def slot(self, context=None):
        with super().slot(context) as waited_ms:
            try:
                yield waited_ms
            finally:
                time.sleep(self.delay_s)


def test_a_client_may_send_its_next_request_as_soon_as_it_sees_the_summary(
    tiny_pair, tmp_path_factory, spans
):
    """The summary is sent only once the slot is free (on both services), so a client that stops
    reading at the summary and sends its next request at once is never refused, even with one
    slot and no queue. (Sent inside the slot, the summary would reach the client while the slot
    is still held: RESOURCE_EXHAUSTED here every time.)"""
    bounded = one_slot_pair(tiny_pair, tmp_path_factory, spans)
    bounded.sharer_service.limit = SlowRelease(1, 0, delay_s=0.5)
    bounded.receiver_service.limit = SlowRelease(1, 0, delay_s=0.5)
    client = HandoffClient(f"127.0.0.1:{bounded.sharer_port}", timeout_s=30, retries=0)
    try:
        for _ in range(2):
            calls = [
                lambda: client.stream(PROMPT, context=CONTEXT, max_new_tokens=2),
                lambda: bounded.receiver_stub.Receive(iter([plain_request(pb.NONE)]), timeout=30),
            ]
            for call in calls:
                events = call()
                for event in events:  # stop at the summary: do not wait for the call's status
                    if event.HasField("summary"):
                        break
                else:
                    pytest.fail("the stream ended without a summary")
    finally:
        client.close()
        bounded.stop()


def test_graceful_shutdown_finishes_in_flight_handoffs(tiny_pair, tmp_path_factory, spans):
    import threading

    stopping = Pair(tiny_pair, make_adapter_dir(tiny_pair, tmp_path_factory, "lcfx"), "lcfx", spans)
    events = stopping.sharer_stub.Handoff(
        stopping.client.request(PROMPT, context=CONTEXT, max_new_tokens=300), timeout=60
    )
    next(events)
    stopper = threading.Thread(target=stopping.sharer_running.stop, args=(30,))
    stopper.start()
    rest = list(events)  # the in-flight handoff runs to its summary
    stopper.join(30)
    assert rest[-1].HasField("summary") and rest[-1].summary.tokens.generated > 1
    with pytest.raises(grpc.RpcError) as err:  # and new work is refused
        stopping.client.handoff(PROMPT, context=CONTEXT, max_new_tokens=2)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    stopping.receiver_running.stop(1)


def test_health_is_not_serving_until_the_model_loads(tiny_dir, tmp_path):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from lcflow.serving.receiver import serve

    port = free_port()

    running, service = serve(
        ServiceConfig("receiver", model=str(tiny_dir("gemma3", 400, 2)), port=port),
        make_tracer_provider("lcflow-receiver", InMemorySpanExporter()),
    )
    try:
        stub = health_pb2_grpc.HealthStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
        first = stub.Check(health_pb2.HealthCheckRequest(service="lcflow.v1.Receiver"), timeout=5).status
        assert wait_until(lambda: service.engine is not None, 60)
        time.sleep(0.1)
        after = stub.Check(health_pb2.HealthCheckRequest(service="lcflow.v1.Receiver"), timeout=5).status
        assert first == health_pb2.HealthCheckResponse.NOT_SERVING or service.engine is not None
        assert after == health_pb2.HealthCheckResponse.SERVING
    finally:
        running.stop(1)


def test_a_client_that_cancels_while_queued_gives_up_its_place(queued):
    limit = queued.sharer_service.limit
    holder = hold_slot(limit, 1.5)
    call = queued.sharer_stub.Handoff(
        queued.client.request(PROMPT, context=CONTEXT, max_new_tokens=2), timeout=30
    )
    assert wait_until(lambda: limit.queued == 1, 10)
    call.cancel()
    assert wait_until(lambda: limit.queued == 0, 5)  # left the queue without waiting for the slot
    assert limit.in_flight == 1  # only the holder
    holder.join()
    assert queued.client.handoff(PROMPT, context=CONTEXT, max_new_tokens=2).summary.timings.total > 0

"""The admission bound (`ConcurrencyLimit`) at its exact edge, without a server: a client that keeps
max_concurrent + max_queue requests outstanding is never refused, and one more is refused at once
with the pushback hint. Driven hard: hundreds of requests, each sent the moment the last ended."""

from __future__ import annotations

import threading
import time

import grpc
import pytest

from lcflow.serving.concurrency import ConcurrencyLimit
from lcflow.serving.server import ServiceError

LIMIT, QUEUE = 4, 8


def keep_outstanding(limit: ConcurrencyLimit, clients: int, requests_each: int) -> list[ServiceError]:
    """`clients` threads, each sending its next request as soon as its previous one is done;
    returns every refusal."""
    refused: list[ServiceError] = []
    start = threading.Barrier(clients)

    def client() -> None:
        start.wait()
        for _ in range(requests_each):
            try:
                with limit.slot():
                    time.sleep(0.001)  # short work, so the queue stays full and releases meet arrivals
            except ServiceError as err:
                refused.append(err)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not any(thread.is_alive() for thread in threads), "a request never got its slot"
    return refused


def test_exactly_the_limits_outstanding_is_never_refused():
    limit = ConcurrencyLimit(LIMIT, QUEUE)
    refused = keep_outstanding(limit, clients=LIMIT + QUEUE, requests_each=30)  # 360 requests
    assert refused == [], refused[0].details if refused else ""
    assert limit.in_flight == 0 and limit.queued == 0


def hold_slots(limit: ConcurrencyLimit, n: int) -> tuple[threading.Event, list[threading.Thread]]:
    """n threads that take a slot (or a place in the queue) and hold it until the event is set."""
    release = threading.Event()

    def hold() -> None:
        with limit.slot():
            release.wait(30)

    threads = [threading.Thread(target=hold) for _ in range(n)]
    for thread in threads:
        thread.start()
    return release, threads


def wait_for(condition, seconds: float = 10) -> None:
    done = threading.Event()
    for _ in range(int(seconds / 0.01)):
        if condition():
            return
        done.wait(0.01)
    raise AssertionError("timed out")


def test_one_more_than_the_limits_is_refused_with_the_pushback_hint():
    limit = ConcurrencyLimit(LIMIT, QUEUE)
    release, threads = hold_slots(limit, LIMIT + QUEUE)
    wait_for(lambda: limit.in_flight == LIMIT and limit.queued == QUEUE)
    with pytest.raises(ServiceError) as err:
        with limit.slot():
            pass
    assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "--max-queue" in err.value.details
    hint = dict(err.value.trailing)["grpc-retry-pushback-ms"]
    assert 50 <= int(hint) <= 10_000
    release.set()
    for thread in threads:
        thread.join(10)
    assert limit.in_flight == 0 and limit.queued == 0  # every queued call was served, then freed


def test_one_more_than_the_limits_under_load_loses_no_slot():
    """13 clients on 4 + 8: whatever is refused is RESOURCE_EXHAUSTED, and the bound ends empty (no
    slot lost or doubled when refusals and releases cross)."""
    limit = ConcurrencyLimit(LIMIT, QUEUE)
    refused = keep_outstanding(limit, clients=LIMIT + QUEUE + 1, requests_each=40)
    assert all(err.code == grpc.StatusCode.RESOURCE_EXHAUSTED for err in refused)
    assert limit.in_flight == 0 and limit.queued == 0


class GoneAsItsSlotArrives:
    """A client context that goes away in the same instant the holder hands it the slot."""

    def __init__(self, limit: ConcurrencyLimit):
        self.limit = limit

    def time_remaining(self):
        return None

    def is_active(self) -> bool:
        with self.limit._cond:
            self.limit._release()  # the holder finishes: its slot goes to this waiter
        return False


def test_a_waiter_that_leaves_as_its_slot_arrives_frees_the_slot():
    limit = ConcurrencyLimit(1, 2)
    limit.in_flight = 1  # held by a call elsewhere
    with pytest.raises(ServiceError) as err:
        with limit.slot(GoneAsItsSlotArrives(limit)):
            pytest.fail("a cancelled waiter must not run")
    assert err.value.code == grpc.StatusCode.CANCELLED
    assert limit.in_flight == 0 and limit.queued == 0  # handed on (to nobody): free

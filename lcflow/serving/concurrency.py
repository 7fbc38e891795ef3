"""The concurrency bound of a service: at most --max-concurrent handoffs at once, --max-queue more
waiting in arrival order, the rest refused with a pushback hint; a freed slot goes straight to
the first waiter.
"""

from __future__ import annotations

import collections
import contextlib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import grpc

from lcflow.serving.server import ServiceError

# --- concurrency ------------------------------------------------------------------------------


class ConcurrencyLimit:
    """At most `limit` handoffs at once; up to `max_queue` more wait for a slot, in arrival order,
    each no longer than its own deadline (DEADLINE_EXCEEDED) or its client (CANCELLED); past that,
    RESOURCE_EXHAUSTED at once, with a retry hint (`grpc-retry-pushback-ms`) that gRPC's retry
    policy honours.

    Why a queue: a burst of requests a little larger than the slots should be served a little
    later, not refused; why bounded: beyond a few per slot the wait outlasts any sensible
    deadline, and each waiting call holds a server thread and its request's memory."""

    def __init__(self, limit: int, max_queue: int = 0):
        self.limit, self.max_queue = limit, max_queue
        self._cond = threading.Condition()
        self._waiting: collections.deque[_Ticket] = collections.deque()
        self.in_flight = 0
        self._hold_s = 1.0  # moving average of how long a slot is held, for the retry hint

    @property
    def queued(self) -> int:
        return len(self._waiting)

    def retry_hint_ms(self) -> int:
        """Roughly when a slot should be free for one more request: the queue ahead of it times
        the average hold, spread over the slots; within 50 ms .. 10 s."""
        estimate = self._hold_s * (len(self._waiting) + 1) / self.limit * 1000
        return int(min(10_000, max(50, estimate)))

    @contextlib.contextmanager
    def slot(self, context: grpc.ServicerContext | None = None) -> Iterator[float]:
        """Hold a slot for the `with` block; yields the milliseconds spent queued for it."""
        queued_at = time.perf_counter()
        with self._cond:
            if self.in_flight >= self.limit or self._waiting:
                self._wait_in_queue(context)  # returns holding a slot handed over by _release
            else:
                self.in_flight += 1
        waited_ms = (time.perf_counter() - queued_at) * 1000
        started = time.perf_counter()
        try:
            yield waited_ms
        finally:
            with self._cond:
                self._hold_s = 0.8 * self._hold_s + 0.2 * (time.perf_counter() - started)
                self._release()

    def _release(self) -> None:
        """With the lock held: give the slot to the first in line, or free it.

        Why hand it over here rather than let the waiter take it when it wakes: the queue must
        shrink at the same instant the slot frees. Otherwise a client that sends its next request
        as soon as its previous one ends finds the queue still full (the woken waiter has not run
        yet) and is refused, though it never had more than max_concurrent + max_queue outstanding."""
        if self._waiting:
            self._waiting.popleft().granted = True  # in_flight unchanged: the slot changes hands
            self._cond.notify_all()
        else:
            self.in_flight -= 1

    def _wait_in_queue(self, context) -> None:
        """With the lock held: queue up, and return once _release has handed this call a slot."""
        if len(self._waiting) >= self.max_queue:
            hint = self.retry_hint_ms()
            raise ServiceError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{self.limit} handoffs are in flight and {len(self._waiting)} waiting (the limits); "
                f"retry in about {hint} ms, or raise --max-concurrent / --max-queue",
                trailing=(("grpc-retry-pushback-ms", str(hint)),),
            )
        ticket = _Ticket()
        self._waiting.append(ticket)
        try:
            while not ticket.granted:
                remaining = context.time_remaining() if context is not None else None
                if context is not None and not context.is_active():
                    raise ServiceError(grpc.StatusCode.CANCELLED, "the client went away while queued")
                if remaining is not None and remaining <= 0:
                    raise ServiceError(
                        grpc.StatusCode.DEADLINE_EXCEEDED,
                        f"the deadline passed while queued for a slot ({self.limit} handoffs in flight); "
                        "retry later, give a longer deadline, or raise --max-concurrent",
                    )
                # woken when a slot is handed over; the timeout only bounds how late a deadline is noticed
                self._cond.wait(timeout=0.1 if remaining is None else min(remaining, 0.1))
        except BaseException:
            if ticket.granted:  # handed a slot just as it gave up: pass it on
                self._release()
            else:
                self._waiting.remove(ticket)
            raise


@dataclass
class _Ticket:
    """A call's place in the queue; `granted` once a freed slot has been handed to it."""

    granted: bool = False


def queue_span(tracer, name: str, queued_at_ns: int, queue_ms: float) -> None:
    """The wait for a slot as its own span (recorded once it is over), so traces show queueing."""
    span = tracer.start_span(name, start_time=queued_at_ns)
    span.set_attribute("lcflow.queue_ms", queue_ms)
    span.end(end_time=queued_at_ns + int(queue_ms * 1e6))

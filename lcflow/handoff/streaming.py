"""Generation as a stream of text deltas that a gRPC handler can yield, and cancel.

`generate` blocks until the answer is complete; a streaming RPC wants each piece as it comes.
So generation runs in a worker thread that puts deltas on a queue, and the handler's
iterator takes them off. Cancelling (client gone, deadline passed, server stopping) sets a
flag the generation loop polls after every token, so the worker stops within one token and
the cache it held is freed.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

_DONE = object()


@dataclass
class StreamResult:
    text: str = ""
    first_token_at: float | None = None  # time.perf_counter() of the first delta
    finished_at: float | None = None
    cancelled: bool = False


class GenerationStream:
    """Runs `generate(on_text, should_stop, on_first_token) -> str` in a thread; iterate to get the deltas."""

    def __init__(self, generate: Callable[..., str]):
        self._generate = generate
        self._queue: queue.Queue = queue.Queue()
        self._cancel = threading.Event()
        self.result = StreamResult()
        self._error: BaseException | None = None
        self._finished = False
        self._thread = threading.Thread(target=self._run, name="lcflow-generate", daemon=True)

    def start(self) -> GenerationStream:
        self._thread.start()
        return self

    def cancel(self) -> None:
        if not self._finished:
            self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def _on_first_token(self) -> None:
        self.result.first_token_at = time.perf_counter()

    def _on_text(self, text: str) -> None:
        if self.result.first_token_at is None:
            self._on_first_token()
        self._queue.put(text)

    def _run(self) -> None:
        try:
            self.result.text = self._generate(self._on_text, self._cancel.is_set, self._on_first_token)
        except BaseException as err:  # handed to the consumer, which re-raises it
            self._error = err
        finally:
            self.result.finished_at = time.perf_counter()
            # cancelled = stopped early; a cancel() after the answer was complete changes nothing
            self.result.cancelled = self._cancel.is_set()
            self._finished = True
            self._queue.put(_DONE)

    def __iter__(self) -> Iterator[str]:
        while True:
            item = self._queue.get()
            if item is _DONE:
                break
            yield item
        self._thread.join()
        if self._error is not None:
            raise self._error

    def join(self, timeout: float | None = None) -> None:
        if self._thread.is_alive() or self._thread.ident is not None:
            self._thread.join(timeout)

"""Sharer sessions: a context prefilled once, reused by later handoffs.

An agent's context is usually already in the sharer's cache when it hands off. A session
keeps that prefilled context (its KV without RoPE) under an id, with a time-to-live and a
memory bound over all sessions; the least recently used session is evicted first. A handoff
naming an evicted or unknown session gets NOT_FOUND and must open it again.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass

from lcflow.handoff.pair import SharerContext


class SessionNotFound(KeyError):
    pass


class SessionTooLarge(ValueError):
    pass


def context_bytes(context: SharerContext) -> int:
    tensors = context.captured.keys + context.captured.values
    return sum(t.numel() * t.element_size() for t in tensors)


@dataclass
class Session:
    session_id: str
    context: SharerContext
    expires_at: float  # time.time() seconds
    ttl_s: float
    size_bytes: int


class SessionStore:
    """Thread-safe LRU store of prefilled contexts with TTL and a total memory bound."""

    def __init__(self, max_bytes: int, default_ttl_s: float = 600.0, clock=time.time):
        self.max_bytes, self.default_ttl_s, self.clock = max_bytes, default_ttl_s, clock
        self._sessions: OrderedDict[str, Session] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def used_bytes(self) -> int:
        return sum(s.size_bytes for s in self._sessions.values())

    def put(self, context: SharerContext, session_id: str = "", ttl_s: float = 0.0) -> Session:
        size = context_bytes(context)
        if size > self.max_bytes:
            raise SessionTooLarge(
                f"this context needs {size / 2**20:.1f} MiB of KV, more than the session memory bound "
                f"({self.max_bytes / 2**20:.1f} MiB); shorten it or raise --session-memory-mb"
            )
        ttl = ttl_s if ttl_s > 0 else self.default_ttl_s
        session = Session(session_id or uuid.uuid4().hex, context, self.clock() + ttl, ttl, size)
        with self._lock:
            self._expire()
            self._sessions.pop(session.session_id, None)
            while self._sessions and self.used_bytes + size > self.max_bytes:
                self._sessions.popitem(last=False)  # least recently used first
            self._sessions[session.session_id] = session
        return session

    def get(self, session_id: str) -> Session:
        """The session, refreshed as most recently used and with its TTL renewed."""
        with self._lock:
            self._expire()
            session = self._sessions.get(session_id)
            if session is None:
                raise SessionNotFound(
                    f"session {session_id!r} does not exist or was evicted (TTL or memory bound); "
                    "open it again with OpenSession"
                )
            self._sessions.move_to_end(session_id)
            session.expires_at = self.clock() + session.ttl_s
            return session

    def close(self, session_id: str) -> bool:
        with self._lock:
            return self._sessions.pop(session_id, None) is not None

    def __len__(self) -> int:
        with self._lock:
            self._expire()
            return len(self._sessions)

    def _expire(self) -> None:
        now = self.clock()
        for sid in [sid for sid, s in self._sessions.items() if s.expires_at <= now]:
            del self._sessions[sid]

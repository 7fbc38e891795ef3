import pytest
import torch

from lcflow.core.kv import CapturedKV
from lcflow.handoff.pair import SharerContext
from lcflow.handoff.sessions import SessionNotFound, SessionStore, SessionTooLarge


def fake_context(tokens: int) -> SharerContext:
    kv = CapturedKV(keys=[torch.zeros(1, 1, tokens, 256)], values=[torch.zeros(1, 1, tokens, 256)])
    return SharerContext("x", torch.zeros(1, tokens, dtype=torch.long), torch.zeros(tokens, 2), kv, 1.0)


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_ttl_expiry_and_renewal():
    clock = Clock()
    store = SessionStore(max_bytes=10**9, default_ttl_s=10, clock=clock)
    sid = store.put(fake_context(4)).session_id
    clock.now += 8
    store.get(sid)  # renews
    clock.now += 8
    assert store.get(sid).session_id == sid
    clock.now += 11
    with pytest.raises(SessionNotFound, match="open it again"):
        store.get(sid)


def test_memory_bound_evicts_least_recently_used():
    one = 2 * 4 * 256 * 4  # bytes of fake_context(4)
    store = SessionStore(max_bytes=2 * one)
    a = store.put(fake_context(4), "a")
    store.put(fake_context(4), "b")
    store.get(a.session_id)  # a is now the most recent
    store.put(fake_context(4), "c")
    assert store.get("a") and store.get("c")
    with pytest.raises(SessionNotFound):
        store.get("b")
    assert store.used_bytes <= 2 * one


def test_oversized_context_is_refused_and_nothing_evicted():
    store = SessionStore(max_bytes=100_000)
    store.put(fake_context(4), "keep")
    with pytest.raises(SessionTooLarge, match="session memory bound"):
        store.put(fake_context(1000))
    assert store.get("keep")


def test_close():
    store = SessionStore(max_bytes=10**9)
    store.put(fake_context(2), "s")
    assert store.close("s") and not store.close("s") and len(store) == 0

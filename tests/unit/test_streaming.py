import threading

import pytest

from lcflow.handoff.generation import GenerationSettings
from lcflow.handoff.pair import Receiver
from lcflow.handoff.streaming import GenerationStream
from lcflow.testing.tiny import load_tiny


def test_stream_yields_the_same_text_as_generate(tiny_dir):
    receiver = Receiver(*load_tiny(tiny_dir("gemma3", 400, 2)))
    settings = GenerationSettings(max_new_tokens=8)
    whole = receiver.generate(receiver.prepare_plain("Where does Mira live?", []), settings)
    prepared = receiver.prepare_plain("Where does Mira live?", [])
    stream = GenerationStream(lambda *hooks: receiver.generate(prepared, settings, *hooks)).start()
    deltas = list(stream)
    assert "".join(deltas).strip() == whole.strip() == stream.result.text.strip()
    assert stream.result.first_token_at is not None and not stream.result.cancelled


def test_cancel_stops_generation_within_a_token(tiny_dir):
    receiver = Receiver(*load_tiny(tiny_dir("gemma3", 400, 2)))
    prepared = receiver.prepare_plain("Tell me a long story.", [])
    tokens = []
    release = threading.Event()

    def generate(on_text, should_stop, on_first_token):
        def polled():
            tokens.append(1)
            if len(tokens) == 3:
                release.set()
            return should_stop()

        return receiver.generate(
            prepared, GenerationSettings(max_new_tokens=500), on_text, polled, on_first_token
        )

    stream = GenerationStream(generate).start()
    release.wait(10)
    stream.cancel()
    stream.join(10)
    assert stream.result.cancelled and len(tokens) < 500


def test_errors_reach_the_consumer():
    def broken(on_text, should_stop, on_first_token):
        on_text("partial")
        raise RuntimeError("model exploded")

    stream = GenerationStream(broken).start()
    with pytest.raises(RuntimeError, match="exploded"):
        list(stream)

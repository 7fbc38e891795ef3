"""Text readers on the receiver service: the LoRA readers (lcflow.adapter.reader) in its --adapters
directory, named per request (HandoffRequest.text_reader), loaded on first use and kept.

A reader is the control LCF-X is measured against, so the services run it on the same path as
every other channel: the sharer sends forwarded text (TEXT_CHANNEL_FORWARD or _FORWARD_SELECTED),
and the receiver reads it with the named reader instead of its plain model. Each loaded reader is
a copy of the receiver's weights with the LoRA merged in (no switching of adapters on a model
that concurrent requests share); at most `keep` stay loaded, the least recently used goes first.

Statuses: INVALID_ARGUMENT for a name that is not a plain name, or a reader on a channel it does
not read (a note, or TEXT without text_channel); NOT_FOUND for no such directory; FAILED_PRECONDITION
for a directory that is not a text reader, or one trained for another receiver or channel.
"""

from __future__ import annotations

import collections
import threading
from pathlib import Path

import grpc

from lcflow.adapter.config import AdapterMismatchError
from lcflow.adapter.reader import TextReader, is_reader_dir
from lcflow.handoff.pair import Receiver
from lcflow.serving.adapter_names import resolve_adapter_name
from lcflow.serving.server import ServiceError, invalid

DEFAULT_KEEP = 2


class TextReaders:
    """The readers of one receiver model, by name inside `root` (None: no --adapters, no readers)."""

    def __init__(self, root: str | Path | None, keep: int = DEFAULT_KEEP):
        self.root, self.keep = (Path(root) if root else None), keep
        self._loaded: collections.OrderedDict[str, tuple[TextReader, Receiver]] = collections.OrderedDict()
        self._lock = threading.Lock()

    def receiver(self, name: str, channel: str, model, tokenizer, model_name: str | None = None) -> Receiver:
        """A Receiver that reads `channel` ("forward" or "forward-selected") with reader `name`."""
        if self.root is None:
            raise ServiceError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"text_reader {name!r} was asked for, but this receiver serves no adapter directory "
                "(start it with --adapters DIR holding the reader)",
            )
        directory = resolve_adapter_name(self.root, name)
        if not is_reader_dir(directory):
            raise ServiceError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"adapter {name!r} is not a text reader (no reader_config.json); name one made by "
                "`lcflow train --mode text-reader`",
            )
        reader, receiver = self._get(name, directory, model, tokenizer, model_name)
        if reader.config.channel != channel:
            raise ServiceError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"text reader {name!r} reads {reader.config.channel}, not {channel}; "
                "choose the channel it was trained on or another reader",
            )
        return receiver

    def _get(self, name: str, directory: Path, model, tokenizer, model_name) -> tuple[TextReader, Receiver]:
        with self._lock:  # loads are rare; one at a time keeps memory bounded
            if name in self._loaded:
                self._loaded.move_to_end(name)
                return self._loaded[name]
            try:
                reader = TextReader.from_pretrained(directory, model, tokenizer, name=model_name)
            except AdapterMismatchError as err:
                raise ServiceError(grpc.StatusCode.FAILED_PRECONDITION, str(err)) from err
            except (OSError, ValueError, KeyError) as err:  # an incomplete or unreadable directory
                raise ServiceError(
                    grpc.StatusCode.FAILED_PRECONDITION, f"text reader {name!r} cannot be loaded: {err}"
                ) from err
            self._loaded[name] = reader, Receiver(reader.model, tokenizer)
            while len(self._loaded) > self.keep:
                self._loaded.popitem(last=False)
            return self._loaded[name]

    def loaded(self) -> list[str]:
        with self._lock:
            return list(self._loaded)


def check_reader_request(text_reader: str, mode: str, channel_is_note: bool) -> None:
    """A text reader reads forwarded text: refuse it on any other handoff (INVALID_ARGUMENT)."""
    if text_reader and (mode != "text" or channel_is_note):
        raise invalid(
            "text_reader reads forwarded text: use it with mode TEXT and text_channel "
            "TEXT_CHANNEL_FORWARD or TEXT_CHANNEL_FORWARD_SELECTED"
        )

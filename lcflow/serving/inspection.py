"""What an adapter directory is, read from its files (config, safetensors headers, model card),
never by loading its weights: the registry lists adapters by this, and marks the unusable ones
with the reason.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

from lcflow.adapter.c2c import stored_sharer_rope
from lcflow.adapter.card import accurate_codecs, by_size, bytes_per_number, is_card_codec
from lcflow.adapter.config import CONFIG_NAME, AdapterConfig, AdapterMismatchError, service_half_file
from lcflow.adapter.reader import READER_CONFIG
from lcflow.core.kv import ModelIdentity
from lcflow.core.names import canonical_wire_name
from lcflow.serving.requests import adapter_id
from lcflow.transport.quantize import rows_problem

LOADED_BYTES_PER_PARAMETER = 4  # halves are loaded in float32 (LatentAdapter.from_pretrained)
MAX_SAFETENSORS_HEADER = 100 << 20
CARD_NAME = "model_card.json"


@dataclass
class AdapterInfo:
    """One adapter as ListAdapters reports it; `reason` says why this service cannot use it."""

    name: str
    path: Path | None
    mode: str = ""
    sharer: ModelIdentity | None = None
    receiver: ModelIdentity | None = None
    adapter_id: str = ""
    parameters: int = 0  # all weight files
    size_bytes: int = 0  # all weight files, on disk
    memory_bytes: int = 0  # this service's half, loaded (measured once it is)
    card_em: float | None = None
    packet_width: int = 0  # numbers per row of a packet's layer tensor (AdapterConfig.packet_width)
    card_task: str = ""  # what that EM measured: "task/split" of the card's eval, "" without
    # the wire codecs its model card allows, largest first, its choice last (card_codecs)
    card_codecs: tuple[str, ...] = ("none",)
    reason: str = ""

    @property
    def usable(self) -> bool:
        return not self.reason


def safetensors_parameters(path: Path) -> int:
    """Parameters in a safetensors file, from its header alone (8 bytes of length, then JSON)."""
    with path.open("rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        if length > MAX_SAFETENSORS_HEADER:
            raise ValueError(f"{path.name}: a header of {length} bytes is not a safetensors header")
        header = json.loads(f.read(length))
    return sum(math.prod(t["shape"]) for key, t in header.items() if key != "__metadata__")


def card_result(directory: Path, mode: str) -> tuple[float | None, str]:
    """The exact match its model card reports (results[eval method].em) and what it measured,
    "task/split" of the card's eval ("facts-cross/test"); (None, "") without a readable card, ""
    for the task where the card names none. EMs of different tasks are not compared
    (AdapterRegistry.candidates)."""
    try:
        card = json.loads((directory / CARD_NAME).read_text())
        run = card.get("eval") or {}
        results = card.get("results") or {}
        row = results.get(run.get("method") or mode) or results.get(mode) or {}
        task = f"{run['task']}/{run.get('split') or 'test'}" if run.get("task") else ""
        return float(row["em"]), task
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None, ""


def card_codecs(directory: Path, width: int | None = None) -> tuple[str, ...]:
    """The quantizations a sharer's `--codec auto` may send this adapter's latents with, largest
    first: bf16 ("none"), then each codec up to the card's choice that the card measured within
    1 EM point of bf16, ending with that choice. A codec with a smaller one of the same bytes also
    in the list is left out (int4-hadamard beside int4: the same bytes and a rotation at each end,
    so it can never cost less). The last is the card's choice (card "codec": {"default": ...}, the
    smallest codec measured within 1 EM point of bf16). ("none",) without a readable card or a
    known choice, so that an unreadable card can only make the packet larger, never lossy; the
    choice alone where the card has no EMs to judge the others by. With the adapter's packet
    `width`, a codec that cannot group rows of that many numbers is left out (bf16 stays)."""
    try:
        codec = json.loads((directory / CARD_NAME).read_text())["codec"]
        chosen = codec["default"]
    except (OSError, ValueError, KeyError, TypeError):
        return ("none",)
    if not isinstance(chosen, str) or not is_card_codec(chosen):
        return ("none",)
    chosen = canonical_wire_name(chosen)
    try:
        em = {canonical_wire_name(name): float(value) for name, value in codec["em"].items()}
        measured = set(accurate_codecs(em))
    except (ValueError, KeyError, TypeError, AttributeError):  # no EMs: the choice alone
        codecs = [chosen]
    else:
        ordered = by_size(measured | {"none", chosen})
        codecs = ordered[: ordered.index(chosen) + 1]
        sizes = [bytes_per_number(c) for c in codecs]
        codecs = [c for i, c in enumerate(codecs) if sizes[i] not in sizes[i + 1 :]]  # a tie: the later
    if width is not None:
        codecs = [c for c in codecs if carries(c, width)] or ["none"]
    return tuple(codecs)


def carries(quantization: str, width: int) -> bool:
    """Whether `quantization` can send packet rows of `width` numbers (its groups divide them)."""
    return not rows_problem(quantization, width)


def c2c_rope_problem(config: AdapterConfig) -> str:
    """Why a receiver cannot serve this C2C adapter's sharer RoPE ("" when it can)."""

    try:
        stored_sharer_rope(config)
    except ValueError as err:
        return str(err)
    return ""


def inspect_adapter(directory: Path, name: str, role: str, identity: ModelIdentity | None) -> AdapterInfo:
    """What `directory` holds and whether a `role` service running `identity` can use it. Reads
    the config, the weight files' headers and the card; never raises for a bad directory."""
    info = AdapterInfo(name, directory)
    if (directory / READER_CONFIG).is_file():  # lcflow.adapter.reader: named per request, never by mode
        info.mode = "text-reader"
        info.reason = (
            "a text reader: a TEXT handoff of forwarded text names it (text_reader); it decodes no latents"
        )
        return info
    try:
        config = AdapterConfig.from_dict(json.loads((directory / CONFIG_NAME).read_text()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:  # not JSON, not an object, ...
        info.reason = f"its {CONFIG_NAME} cannot be used: {err}"
        return info
    info.mode, info.sharer, info.receiver = config.mode, config.sharer, config.receiver
    info.adapter_id = adapter_id(config.to_dict())
    info.card_em, info.card_task = card_result(directory, config.mode)
    info.packet_width = config.packet_width()
    info.card_codecs = card_codecs(directory, info.packet_width)
    try:
        weights = sorted(directory.glob("*.safetensors"))
        counts = {path.name: safetensors_parameters(path) for path in weights}
        info.size_bytes = sum(path.stat().st_size for path in weights)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, struct.error) as err:
        info.reason = f"its weights cannot be read: {err}"
        return info
    info.parameters = sum(counts.values())
    half = service_half_file(config.mode, role)
    info.memory_bytes = counts.get(half, 0) * LOADED_BYTES_PER_PARAMETER
    if half is not None and half not in counts:
        info.reason = f"it has no {half}, the half a {role} loads"
    elif config.mode == "c2c" and role == "receiver" and (why := c2c_rope_problem(config)):
        info.reason = why
    elif identity is not None:
        try:
            config.check_models(**{role: identity})
        except AdapterMismatchError as err:
            info.reason = str(err)
    return info


def loaded_bytes(module) -> int:
    """Bytes held by a loaded adapter half (its parameters and buffers)."""
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())

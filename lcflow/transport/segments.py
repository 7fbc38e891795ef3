"""One segment = the tensors of one receiver layer (or the shared tensors) as a safetensors blob.

The blob is written by `safetensors.torch.save`; with byte-shuffle on, each tensor's data
region inside the blob is regrouped by byte plane, leaving the JSON header readable. The
receiver checks the blob's header against what the LatentHeader declared (names, dtypes,
shapes, offsets) *before* handing the bytes to safetensors.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import safetensors.torch
import torch

from lcflow.transport.codec import shuffle_bytes, unshuffle_bytes
from lcflow.transport.errors import invalid

# torch dtype name on the wire -> (torch dtype, safetensors dtype code)
DTYPES: dict[str, tuple[torch.dtype, str]] = {
    "float16": (torch.float16, "F16"),
    "bfloat16": (torch.bfloat16, "BF16"),
    "float32": (torch.float32, "F32"),
    "int32": (torch.int32, "I32"),
}
DTYPE_NAMES = {torch_dtype: name for name, (torch_dtype, _) in DTYPES.items()}
ITEMSIZE = {
    name: torch.empty((), dtype=torch_dtype).element_size() for name, (torch_dtype, _) in DTYPES.items()
}
ITEMSIZE_BY_CODE = {code: ITEMSIZE[name] for name, (_, code) in DTYPES.items()}
MAX_SAFETENSORS_HEADER = 64 << 10  # a few tensors need ~100 bytes each; safetensors itself allows 100 MB
MAX_DIMS = 8


@dataclass(frozen=True)
class TensorSpec:
    """dtype and shape of one tensor, as the LatentHeader declares it."""

    dtype: str  # a key of DTYPES
    shape: tuple[int, ...]

    @classmethod
    def of(cls, tensor: torch.Tensor) -> TensorSpec:
        if tensor.dtype not in DTYPE_NAMES:
            raise ValueError(f"dtype {tensor.dtype} cannot be sent: use one of {sorted(DTYPES)}")
        return cls(DTYPE_NAMES[tensor.dtype], tuple(tensor.shape))

    @property
    def itemsize(self) -> int:
        return ITEMSIZE[self.dtype]

    @property
    def num_bytes(self) -> int:
        return math.prod(self.shape) * self.itemsize


def segment_bytes(specs: dict[str, TensorSpec]) -> int:
    return sum(spec.num_bytes for spec in specs.values())


def max_blob_bytes(specs: dict[str, TensorSpec]) -> int:
    """The most bytes a segment's blob may decompress to: its data plus a bounded JSON header.

    One header entry is ~80 bytes plus its name (at most 256): 512 per tensor is ample, and keeps
    the bound within a few hundred bytes of the declared data.
    """
    header_allowance = min(MAX_SAFETENSORS_HEADER, 256 + 512 * len(specs))
    return 8 + header_allowance + segment_bytes(specs)


def serialise_segment(tensors: dict[str, torch.Tensor]) -> bytearray:
    """Tensors -> safetensors blob (a mutable copy, so it can be shuffled in place)."""
    contiguous = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    return bytearray(safetensors.torch.save(contiguous))


def shuffle_segment(blob: bytearray) -> None:
    """Byte-shuffle each tensor's data region in place; the JSON header stays as it is."""
    view = memoryview(blob)
    for start, end, itemsize in _data_regions(_read_header(blob, "own segment")):
        shuffle_bytes(view[start:end], itemsize)


def check_segment(blob: bytearray, specs: dict[str, TensorSpec], what: str) -> dict:
    """Check a received blob holds exactly `specs` (names, dtypes, shapes, offsets); returns its header."""
    header = _read_header(blob, what)
    _check_against_specs(header, specs, len(blob), what)
    return header


def unshuffle_segment(blob: bytearray, header: dict) -> None:
    """Undo shuffle_segment in place, for a blob that passed check_segment."""
    view = memoryview(blob)
    for start, end, itemsize in _data_regions(header):
        unshuffle_bytes(view[start:end], itemsize)


def load_segment(blob: bytearray, what: str) -> dict[str, torch.Tensor]:
    """A checked, unshuffled blob -> tensors."""
    try:
        return safetensors.torch.load(bytes(blob))
    except Exception as err:  # safetensors raises its own SafetensorError for malformed blobs
        raise invalid(f"{what}: safetensors could not read the segment ({err})") from err


def _read_header(blob: bytearray, what: str) -> dict:
    if len(blob) < 8:
        raise invalid(f"{what}: {len(blob)} bytes is too short for a safetensors blob")
    header_len = int.from_bytes(blob[:8], "little")
    # Check the declared header size before reading it: a hostile size must not make us slice or parse megabytes.
    if header_len > MAX_SAFETENSORS_HEADER or 8 + header_len > len(blob):
        raise invalid(
            f"{what}: safetensors header declares {header_len} bytes "
            f"(limit {MAX_SAFETENSORS_HEADER}, blob {len(blob)} bytes)"
        )
    try:
        header = json.loads(bytes(blob[8 : 8 + header_len]).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise invalid(f"{what}: safetensors header is not valid JSON ({err})") from err
    if not isinstance(header, dict):
        raise invalid(f"{what}: safetensors header is not a JSON object")
    header.pop("__metadata__", None)
    header["__data_start__"] = 8 + header_len
    return header


def _check_against_specs(header: dict, specs: dict[str, TensorSpec], blob_len: int, what: str) -> None:
    data_start = header["__data_start__"]
    entries = {k: v for k, v in header.items() if k != "__data_start__"}
    if set(entries) != set(specs):
        raise invalid(f"{what}: blob holds tensors {sorted(entries)}, header declared {sorted(specs)}")
    spans = []
    for name, spec in specs.items():
        entry = entries[name]
        if not isinstance(entry, dict):
            raise invalid(f"{what}: safetensors entry {name!r} is not an object")
        dtype_code, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if dtype_code != DTYPES[spec.dtype][1] or shape != list(spec.shape):
            raise invalid(
                f"{what}: tensor {name!r} is {dtype_code} {shape}, header declared {spec.dtype} {list(spec.shape)}"
            )
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            raise invalid(f"{what}: tensor {name!r} has malformed data_offsets {offsets!r}")
        if offsets[1] - offsets[0] != spec.num_bytes:
            raise invalid(f"{what}: tensor {name!r} spans {offsets}, expected {spec.num_bytes} bytes")
        spans.append(tuple(offsets))
    # Tensors must tile the data area exactly: no gaps, no overlap, nothing after the end.
    position = 0
    for start, end in sorted(spans):
        if start != position:
            raise invalid(f"{what}: tensor data is not contiguous at byte {start} (expected {position})")
        position = end
    if data_start + position != blob_len:
        raise invalid(f"{what}: blob is {blob_len} bytes, its header describes {data_start + position}")


def _data_regions(header: dict) -> list[tuple[int, int, int]]:
    """(start, end, itemsize) in the blob of each tensor's data."""
    data_start = header["__data_start__"]
    regions = []
    for name, entry in header.items():
        if name == "__data_start__":
            continue
        start, end = entry["data_offsets"]
        regions.append((data_start + start, data_start + end, ITEMSIZE_BY_CODE[entry["dtype"]]))
    return regions

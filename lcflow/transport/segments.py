"""One segment = the tensors of one receiver layer (or the shared tensors) as a safetensors blob.

The blob is in the safetensors format (8-byte little-endian header length, JSON header padded
with spaces to 8 bytes, then the tensors' data back to back); with byte-shuffle on, each
tensor's data region is regrouped by byte plane, leaving the JSON header readable. Unshuffled,
a blob is exactly what `safetensors.torch.load` reads (tests check this).

Both ends write the format themselves instead of calling safetensors: `save` -> bytes ->
bytearray -> shuffle, and bytes -> `load`, cost four full copies of every segment, while
writing the tensors' bytes straight into their (shuffled) place costs one, and reading an
unshuffled blob costs none for each tensor whose offset suits its dtype (a view of the blob;
the others are copied).
The receiver checks the blob's header against what the LatentHeader declared (names, dtypes,
shapes, offsets) *before* it reads a byte of tensor data, and never unpickles anything.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np
import torch

from lcflow.transport.errors import invalid

# torch dtype name on the wire -> (torch dtype, safetensors dtype code)
DTYPES: dict[str, tuple[torch.dtype, str]] = {
    "float16": (torch.float16, "F16"),
    "bfloat16": (torch.bfloat16, "BF16"),
    "float32": (torch.float32, "F32"),
    "int32": (torch.int32, "I32"),
    "int8": (torch.int8, "I8"),  # quantized codes (quantize.py)
    "uint8": (torch.uint8, "U8"),  # int4 codes, two a byte
}
DTYPE_NAMES = {torch_dtype: name for name, (torch_dtype, _) in DTYPES.items()}
ITEMSIZE = {
    name: torch.empty((), dtype=torch_dtype).element_size() for name, (torch_dtype, _) in DTYPES.items()
}
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


def serialise_segment(tensors: dict[str, torch.Tensor], byte_shuffle: bool = False) -> bytes | bytearray:
    """Tensors -> safetensors blob in one copy: unshuffled, `bytes` joined straight from the
    tensors' memory (what protobuf takes, so it is not copied again); shuffled, a bytearray
    each tensor's byte planes are written into."""
    contiguous = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    entries, offset = {}, 0
    for name, tensor in contiguous.items():
        spec = TensorSpec.of(tensor)
        entries[name] = {
            "dtype": DTYPES[spec.dtype][1],
            "shape": list(spec.shape),
            "data_offsets": [offset, offset + spec.num_bytes],
        }
        offset += spec.num_bytes
    header = json.dumps(entries, separators=(",", ":")).encode("utf-8")
    header += b" " * (-len(header) % 8)  # as safetensors pads it: tensor data stays 8-byte aligned
    if not byte_shuffle:
        return b"".join([len(header).to_bytes(8, "little"), header, *map(_tensor_bytes, contiguous.values())])
    data_start = 8 + len(header)
    blob = bytearray(data_start + offset)
    blob[:8] = len(header).to_bytes(8, "little")
    blob[8:data_start] = header
    data = np.frombuffer(blob, dtype=np.uint8)[data_start:]
    for name, tensor in contiguous.items():
        start, end = entries[name]["data_offsets"]
        if start != end:
            shuffle_into(data[start:end], _tensor_bytes(tensor), tensor.element_size())
    return blob


def check_segment(blob: bytearray, specs: dict[str, TensorSpec], what: str) -> dict:
    """Check a received blob holds exactly `specs` (names, dtypes, shapes, offsets); returns its header."""
    header = _read_header(blob, what)
    _check_against_specs(header, specs, len(blob), what)
    return header


def load_segment(
    blob: bytearray, header: dict, specs: dict[str, TensorSpec], byte_shuffle: bool
) -> dict[str, torch.Tensor]:
    """A blob that passed check_segment -> tensors. Unshuffled in a bytearray, each tensor is a
    view of the blob where its bytes are aligned for its dtype (no copy; the tensors keep the
    blob alive), else a copy; shuffled, the bytes are unshuffled straight into each tensor."""
    data_start = header["__data_start__"]
    data = np.frombuffer(blob, dtype=np.uint8)[data_start:]
    # only a blob of our own (the receiver's bytearray) is viewed: immutable bytes are copied;
    # and only from a start aligned for every dtype (8 bytes, as malloc gives), so that an offset
    # divisible by the itemsize, which Tensor.view(dtype) needs, is an aligned address too
    viewable = not byte_shuffle and isinstance(blob, bytearray) and len(blob) > 0
    flat = torch.frombuffer(blob, dtype=torch.uint8) if viewable else None
    if flat is not None and flat.data_ptr() % 8:
        flat = None
    tensors = {}
    for name, spec in specs.items():
        start, end = header[name]["data_offsets"]
        dtype = DTYPES[spec.dtype][0]
        offset = data_start + start
        if flat is not None and start != end and offset % spec.itemsize == 0:
            tensors[name] = flat[offset : data_start + end].view(dtype).reshape(spec.shape)
            continue
        tensor = torch.empty(spec.shape, dtype=dtype)
        if start != end:
            target = _tensor_bytes(tensor)
            if byte_shuffle:
                unshuffle_into(target, data[start:end], spec.itemsize)
            else:
                target[:] = data[start:end]
        tensors[name] = tensor
    return tensors


def _tensor_bytes(tensor: torch.Tensor) -> np.ndarray:
    """A contiguous tensor's memory as a flat uint8 array (shared, not copied)."""
    return tensor.reshape(-1).view(torch.uint8).numpy()


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


# --- byte-shuffle: each tensor's bytes regrouped by byte plane (zstd compresses the planes better) ---


SHUFFLE_BLOCK = 1 << 15  # elements per step: the shifted temporaries stay in cache


def shuffle_into(dest: np.ndarray, source: np.ndarray, itemsize: int) -> None:
    """dest = the byte planes of source's elements: [a0 a1 | b0 b1 | ...] -> [a0 b0 ... | a1 b1 ...].

    Both are flat uint8 arrays of the same length. Plane p holds byte p of each element in
    memory order; reading the elements as little-endian words makes that a shift and a
    truncating cast, which numpy vectorises (~5x faster than a strided copy per plane).
    """
    if itemsize == 1:
        dest[:] = source
        return
    words = source.view(f"<u{itemsize}")
    planes = dest.reshape(itemsize, words.size)
    shifted = np.empty(min(words.size, SHUFFLE_BLOCK), dtype=words.dtype)
    for start in range(0, words.size, SHUFFLE_BLOCK):
        block = words[start : start + SHUFFLE_BLOCK]
        np.copyto(planes[0, start : start + block.size], block, casting="unsafe")  # keeps the low byte
        for plane in range(1, itemsize):
            np.right_shift(block, 8 * plane, out=shifted[: block.size])
            np.copyto(planes[plane, start : start + block.size], shifted[: block.size], casting="unsafe")


def unshuffle_into(dest: np.ndarray, source: np.ndarray, itemsize: int) -> None:
    """The inverse of shuffle_into: dest gets back the elements whose byte planes source holds."""
    if itemsize == 1:
        dest[:] = source
        return
    words = dest.view(f"<u{itemsize}")
    planes = source.reshape(itemsize, words.size)
    widened = np.empty(min(words.size, SHUFFLE_BLOCK), dtype=words.dtype)
    for start in range(0, words.size, SHUFFLE_BLOCK):
        block = words[start : start + SHUFFLE_BLOCK]
        np.copyto(block, planes[0, start : start + block.size], casting="unsafe")  # zero-extends
        for plane in range(1, itemsize):
            part = widened[: block.size]
            np.copyto(part, planes[plane, start : start + block.size], casting="unsafe")
            np.left_shift(part, 8 * plane, out=part)
            np.bitwise_or(block, part, out=block)

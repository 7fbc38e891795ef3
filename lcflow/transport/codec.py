"""Segment codec: byte-shuffle, zstd with a frame checksum, and decompression with a hard size bound.

Why these defaults (level 1, `float_params` on, byte-shuffle on), with the measurements per dtype,
shuffle, level and parameters: docs/results/transport-design.md. In short: after byte-shuffle
nearly all of zstd's time goes on the exponent plane (few real matches), where level 1 probes a
large hash table at every position for matches that are rarely there; `float_params` asks for
long matches through zstd's smallest, cache-resident table, which is faster and compresses
slightly better. Negative levels with it store the data raw; higher levels gain nothing. Sending
the near-random mantissa plane raw, or one frame per byte plane, was no faster.

Byte-shuffle (shift and truncating cast per plane, in cache-sized blocks) is written straight
into the segment blob (segments.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import zstandard

from lcflow.transport.quantize import Quantization

# The same CRC-32 as zlib.crc32, much faster (docs/results/transport-design.md); zlib without ISA-L.
try:
    from isal.isal_zlib import crc32 as crc32  # re-exported for wire.py
except ImportError:  # pragma: no cover
    from zlib import crc32 as crc32

from lcflow.transport.errors import WireError, data_loss, invalid

if TYPE_CHECKING:
    from lcflow.transport.quantize import Quantization

MAX_CHUNK_BYTES = (
    1 << 20
)  # gRPC streams best with 256 KiB - 1 MiB messages; the default receive limit is 4 MiB
CODECS = ("zstd", "none")


@dataclass(frozen=True)
class CodecConfig:
    """How the sender encodes each segment."""

    name: str = "zstd"  # "zstd" or "none"
    level: int = 1  # higher levels gain nothing on float latents and are several times slower
    byte_shuffle: bool = True  # regroup each tensor's bytes by byte plane (compresses better)
    float_params: bool = True  # min_match 7 and a 64-entry hash table (see the module docstring)
    chunk_size: int = MAX_CHUNK_BYTES  # largest chunk payload, at most 1 MiB
    quantization: str = "none"  # "int8" / "int4": float tensors go as codes + scales (quantize.py)
    group_size: int | None = None  # elements per scale; None = the scheme's measured default

    def __post_init__(self) -> None:
        if self.name not in CODECS:
            raise ValueError(f"unknown codec {self.name!r}: use one of {CODECS}")
        if not 0 < self.chunk_size <= MAX_CHUNK_BYTES:
            raise ValueError(f"chunk_size must be in 1..{MAX_CHUNK_BYTES} bytes, got {self.chunk_size}")
        self.quantizer()  # raises on an unknown scheme or a negative group size

    @property
    def shuffles(self) -> bool:
        """Byte-shuffle only feeds zstd: without compression it would cost a pass at each end for nothing."""
        return self.byte_shuffle and self.name == "zstd"

    def quantizer(self) -> Quantization:
        # Imported here: quantize.py builds on segments.py, which imports this module.

        return Quantization.named(self.quantization, self.group_size)

    def compressor(self) -> SegmentCompressor:
        return SegmentCompressor(self)

    def zstd_parameters(self) -> zstandard.ZstdCompressionParameters:
        # python-zstandard writes no frame checksum unless asked; the content size lets the
        # receiver refuse an oversized frame before decompressing a byte of it.
        tuning = {"min_match": 7, "hash_log": 6} if self.float_params else {}
        return zstandard.ZstdCompressionParameters.from_level(
            self.level, write_checksum=True, write_content_size=True, **tuning
        )


class SegmentCompressor:
    """Compresses segment after segment with one reused zstd context (creating one is not free)."""

    def __init__(self, config: CodecConfig):
        self.config = config
        self.zstd = None
        if config.name == "zstd":
            self.zstd = zstandard.ZstdCompressor(compression_params=config.zstd_parameters())

    def compress(self, data: bytes | bytearray) -> bytes:
        if self.zstd is not None:
            return self.zstd.compress(data)
        return data if isinstance(data, bytes) else bytes(data)  # protobuf takes bytes, nothing else


class _BoundedSink:
    """Collects decompressed bytes; refuses to grow past `limit` (a zstd bomb stops here)."""

    def __init__(self, limit: int, what: str):
        self.buffer = bytearray()
        self.size = 0  # bytes written; the buffer may be allocated ahead of them
        self.limit = limit
        self.what = what

    def reserve(self, size: int) -> None:
        """Allocate the declared output at once (size <= limit): no regrowing and recopying."""
        self.buffer = bytearray(size)

    def write(self, data: bytes) -> int:
        end = self.size + len(data)
        if end > self.limit:
            raise invalid(
                f"{self.what} decompresses to more than the {self.limit} bytes its header declares; "
                "the sender's header and payload disagree"
            )
        if end <= len(self.buffer):
            self.buffer[self.size : end] = data
        else:
            self.buffer[self.size :] = data
        self.size = end
        return len(data)

    def result(self) -> bytearray:
        # A complete zstd frame always fills what it declared (zstd checks); this trim is a guard.
        if self.size < len(self.buffer):
            del self.buffer[self.size :]
        return self.buffer


class SegmentDecoder:
    """Decodes one segment's chunks as they arrive, never holding more than `limit` output bytes.

    A zstd segment must be exactly one frame that declares its content size and carries a
    checksum, as PacketWriter writes it: then every byte accepted is covered by the frame
    checksum, zstd itself refuses output past the declared size (so a bomb cannot inflate),
    and a frame cut short or followed by more data is caught here.
    """

    def __init__(
        self, codec_name: str, limit: int, what: str, decompressor: zstandard.ZstdDecompressor | None = None
    ):
        self.codec_name = codec_name
        self.what = what
        self.sink = _BoundedSink(limit, what)
        self.decompressor = None
        self.frame = None  # the zstd decompression object, made from the first chunk's header
        if codec_name == "zstd":
            self.decompressor = decompressor or zstandard.ZstdDecompressor()  # reusable

    def feed(self, payload: bytes) -> None:
        if self.decompressor is None:
            self.sink.write(payload)
            return
        if self.frame is None:
            self._check_frame_header(payload)
            # write_size bounds each step of output; the declared size bounds the sum.
            self.frame = self.decompressor.decompressobj(write_size=1 << 17)
        elif self.frame.eof:  # the frame ended with the previous chunk
            raise self._data_after_frame()
        try:
            self.sink.write(self.frame.decompress(payload))
        except zstandard.ZstdError as err:
            raise data_loss(f"{self.what}: corrupt zstd data ({err}); resend the handoff") from err
        if self.frame.eof and self.frame.unused_data:  # the frame ended inside this chunk
            raise self._data_after_frame()

    def _data_after_frame(self) -> WireError:
        return invalid(f"{self.what}: data after the end of its zstd frame; a segment is one frame")

    def _check_frame_header(self, first_payload: bytes) -> None:
        try:
            params = zstandard.get_frame_parameters(first_payload)
        except zstandard.ZstdError as err:
            raise data_loss(f"{self.what}: not a zstd frame ({err})") from err
        if not params.has_checksum:
            raise invalid(f"{self.what}: zstd frame without a checksum; the format requires frame checksums")
        if params.content_size == zstandard.CONTENTSIZE_UNKNOWN:
            raise invalid(
                f"{self.what}: zstd frame without a content size; the format requires frames that "
                "declare it (compress in one call, with write_content_size=True)"
            )
        if params.content_size > self.sink.limit:
            raise invalid(
                f"{self.what}: zstd frame declares {params.content_size} bytes, more than the "
                f"{self.sink.limit} its header allows"
            )
        self.sink.reserve(params.content_size)

    def finish(self) -> bytearray:
        if self.decompressor is not None and (self.frame is None or not self.frame.eof):
            # Also catches a frame whose content arrived but whose checksum did not.
            raise data_loss(f"{self.what}: its zstd frame ends early (truncated); resend the handoff")
        return self.sink.result()

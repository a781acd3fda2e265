"""The frame the LMCache serde writes around kvkernels' container (no LMCache import here).

LMCache hands the deserializer the whole temp buffer (the serializer's size estimate), not
just the bytes written, and an L2 tier may return anything, so every object starts with a
fixed 32-byte little-endian header that says what follows and how long it is:

====== ==== ===================================================================
offset size field
====== ==== ===================================================================
0      8    magic ``b"KVKLMC\\x00\\x01"`` (the last byte is the frame version, 1)
8      1    mode: 0 = kvkernels codec container, 1 = raw source bytes (fallback)
9      1    dtype code of the source (see ``DTYPE_CODES``)
10     2    reserved, 0
12     4    CRC-32 of the payload (``zlib.crc32``)
16     8    payload length in bytes
24     8    source size in bytes (numel * itemsize of the KV object)
====== ==== ===================================================================

The payload follows at offset 32. Mode 0's payload is a complete ``kvkernels.codec``
container (self-delimiting: its header's ``nbytes`` must equal the payload length). Mode 1
is written when the source layout is not one the codec takes or its container would not fit
the estimate: the source bytes verbatim (lossless), so the estimate
``HEADER_BYTES + source bytes`` is a true upper bound for every preset.
"""
from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

import torch

MAGIC = b"KVKLMC\x00\x01"
HEADER_BYTES = 32
MODE_CONTAINER = 0
MODE_RAW = 1
_HEADER = struct.Struct("<8sBBHIQQ")
assert _HEADER.size == HEADER_BYTES

DTYPE_CODES = {torch.float32: 1, torch.float16: 2, torch.bfloat16: 3, torch.uint8: 4, torch.int8: 5,
               torch.float64: 6, torch.int32: 7, torch.int64: 8}
_CODE_DTYPES = {v: k for k, v in DTYPE_CODES.items()}


class FrameError(ValueError):
    """A malformed, truncated or corrupted frame."""


@dataclass(frozen=True)
class Frame:
    mode: int
    dtype: torch.dtype
    crc32: int
    payload_bytes: int
    source_bytes: int


def pack_header(mode: int, dtype: torch.dtype, payload: memoryview | bytes, source_bytes: int) -> bytes:
    if mode not in (MODE_CONTAINER, MODE_RAW):
        raise ValueError(f"mode: expected 0 or 1, got {mode}")
    if dtype not in DTYPE_CODES:
        raise TypeError(f"dtype: expected one of {sorted(map(str, DTYPE_CODES))}, got {dtype}")
    return _HEADER.pack(MAGIC, mode, DTYPE_CODES[dtype], 0, zlib.crc32(payload) & 0xFFFFFFFF,
                        len(payload), int(source_bytes))


def parse_header(buf: memoryview | bytes) -> Frame:
    """Parse and bounds-check the header of ``buf`` (the whole buffer LMCache loaded)."""
    if len(buf) < HEADER_BYTES:
        raise FrameError(f"buffer of {len(buf)} bytes is shorter than the {HEADER_BYTES}-byte header")
    magic, mode, code, reserved, crc, payload_bytes, source_bytes = _HEADER.unpack_from(buf, 0)
    if magic != MAGIC:
        raise FrameError(f"bad magic {bytes(magic)!r} (not a kvkernels LMCache object, or a newer frame version)")
    if mode not in (MODE_CONTAINER, MODE_RAW):
        raise FrameError(f"unknown mode {mode}")
    if code not in _CODE_DTYPES:
        raise FrameError(f"unknown dtype code {code}")
    if reserved != 0:
        raise FrameError("reserved header field is not 0")
    if payload_bytes > len(buf) - HEADER_BYTES:
        raise FrameError(f"payload length {payload_bytes} exceeds the {len(buf) - HEADER_BYTES} bytes present")
    return Frame(mode, _CODE_DTYPES[code], crc, payload_bytes, source_bytes)


def payload_of(buf: memoryview, frame: Frame) -> memoryview:
    """The payload bytes, after checking their CRC-32."""
    payload = buf[HEADER_BYTES:HEADER_BYTES + frame.payload_bytes]
    if zlib.crc32(payload) & 0xFFFFFFFF != frame.crc32:
        raise FrameError("payload CRC-32 mismatch (corrupted object)")
    return payload

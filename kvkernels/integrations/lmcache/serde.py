"""kvkernels' codec as an LMCache serde (``"serde": {"type": "kvkernels", ...}`` on an L2 adapter).

LMCache (>= 0.5.6, ``lmcache/v1/distributed/serde/``) calls, per KV object (one chunk of
``--chunk-size`` tokens of one request):

* ``KVKernelsSerializer.estimate_serialized_size(layout_desc) -> int`` before serializing:
  ``HEADER_BYTES + numel * itemsize`` of the source, a true upper bound for every preset
  because the serializer falls back to storing the source bytes verbatim (frame mode 1)
  whenever the codec's container would not fit.
* ``KVKernelsSerializer.serialize(src, dst, key) -> int``: ``src.tensor`` is the KV object in
  host memory, shape ``[2, L, T, H*D]`` (K/V, layers, tokens, heads*head_dim), dtype
  bf16/fp16/fp32; ``dst.tensor`` is a ``uint8`` buffer of the estimated size. Writes the
  32-byte frame header (:mod:`.frame`) and a ``kvkernels.codec`` container of
  ``src`` viewed as ``[2, L, T, H, D]`` (``H = H*D // head_dim``); returns the bytes written.
* ``KVKernelsDeserializer.deserialize(src, dst, key)``: ``src.tensor`` is the whole buffer the
  L2 tier loaded into (the estimate, not the bytes written); the frame's own length, its
  CRC-32, the container's ``nbytes`` and (``verify=True``) every container checksum are
  checked, and the container's L/T/H*D/dtype must match ``dst``, before ``dst`` is written.
  Any mismatch raises :class:`~.frame.FrameError` / ``kvkernels.codec.CodecError`` (both
  ``ValueError``); LMCache then reports the object as a miss instead of returning it.

Options (the ``"serde"`` JSON object's keys besides ``"type"``):

``preset`` (str, ``"default"``), ``chunk_tokens`` (int, 256), ``coder`` (str, ``"rans"``),
``model`` (str, ``""``: the model name whose profiled tables the codec uses; a container whose
model differs from a non-empty ``model`` is refused on load) -- passed to
``kvkernels.codec.encode``; ``head_dim`` (int; default: 128, else 64, else the
whole H*D, whichever divides H*D) -- how H*D splits into heads; ``device`` (``"cpu"``,
``"cuda"`` or ``"auto"``; where encode/decode run, host copies either side); ``verify``
(bool, true) -- run ``kvkernels.codec.verify`` before decoding; ``max_workers`` (int, 1) --
LMCache's serde thread pool.
"""
from __future__ import annotations

import importlib
import logging
import threading
from typing import Any

import numpy as np
import torch

from .frame import (HEADER_BYTES, MODE_CONTAINER, MODE_RAW, DTYPE_CODES, FrameError, pack_header,
                    parse_header, payload_of)

log = logging.getLogger(__name__)

SERDE_NAME = "kvkernels"
CODEC_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
OPTIONS = ("preset", "chunk_tokens", "coder", "model", "head_dim", "device", "verify", "max_workers")


def _codec():
    # Imported on first use so the plugin module loads (and reports) without the codec.
    return importlib.import_module("kvkernels.codec")


def _layout_bytes(shapes, dtypes) -> int:
    total = 0
    for shape, dtype in zip(shapes, dtypes, strict=True):
        n = 1
        for d in shape:
            n *= int(d)
        total += n * dtype.itemsize
    return total


def _default_head_dim(hd: int) -> int:
    for d in (128, 64):
        if hd % d == 0:
            return d
    return hd


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ValueError(f"device: expected 'cpu', 'cuda[:N]' or 'auto', got {device!r}")
    return torch.device(device)


def _byte_view(t: torch.Tensor) -> np.ndarray:
    """A flat, writable uint8 numpy view of a contiguous CPU tensor's storage."""
    if t.device.type != "cpu" or not t.is_contiguous():
        raise ValueError("LMCache buffers must be contiguous host tensors")
    return t.reshape(-1).view(torch.uint8).numpy()


class _Stats:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counts = {"container": 0, "raw": 0, "source_bytes": 0, "written_bytes": 0}

    def add(self, mode: int, source: int, written: int) -> None:
        with self._lock:
            self.counts["container" if mode == MODE_CONTAINER else "raw"] += 1
            self.counts["source_bytes"] += source
            self.counts["written_bytes"] += written


class KVKernelsSerializer:
    """Encode an LMCache KV object into a framed ``kvkernels.codec`` container (see module doc)."""

    def __init__(self, preset: str = "default", *, chunk_tokens: int = 256, coder: str = "rans",
                 model: str = "", head_dim: int | None = None, device: str = "cpu") -> None:
        if not isinstance(preset, str) or not preset:
            raise ValueError(f"preset: expected a non-empty string, got {preset!r}")
        if not isinstance(chunk_tokens, int) or isinstance(chunk_tokens, bool) or chunk_tokens < 1:
            raise ValueError(f"chunk_tokens: expected a positive int, got {chunk_tokens!r}")
        if head_dim is not None and (not isinstance(head_dim, int) or isinstance(head_dim, bool) or head_dim < 1):
            raise ValueError(f"head_dim: expected a positive int or None, got {head_dim!r}")
        self.preset, self.chunk_tokens, self.coder, self.head_dim = preset, chunk_tokens, str(coder), head_dim
        self.model = str(model)
        self.device = _resolve_device(device)
        self.stats = _Stats()
        self._warned: set[str] = set()

    # -- LMCache Serializer API -------------------------------------------------------------
    def estimate_serialized_size(self, layout_desc) -> int:
        return HEADER_BYTES + _layout_bytes(layout_desc.shapes, layout_desc.dtypes)

    def serialize(self, src, dst, key) -> int:
        t = src.tensor
        out = dst.tensor
        if t is None or out is None:
            raise ValueError("kvkernels serde: src and dst must expose tensors")
        if t.dtype not in DTYPE_CODES:
            raise TypeError(f"kvkernels serde: unsupported source dtype {t.dtype}")
        source_bytes = t.numel() * t.element_size()
        buf = _byte_view(out)
        capacity = buf.size - HEADER_BYTES
        if capacity < source_bytes:
            raise ValueError(f"kvkernels serde: dst holds {buf.size} bytes, the estimate is "
                             f"{HEADER_BYTES + source_bytes}")
        data, why = self._encode(t)
        if data is not None and len(data) > capacity:
            data, why = None, f"container of {len(data)} bytes exceeds the raw size {source_bytes}"
        if data is None:
            self._warn_once(why)
            payload = _byte_view(t.contiguous())
            mode = MODE_RAW
        else:
            payload = np.frombuffer(data, dtype=np.uint8)
            mode = MODE_CONTAINER
        n = payload.size
        buf[:HEADER_BYTES] = np.frombuffer(pack_header(mode, t.dtype, memoryview(payload), source_bytes),
                                           dtype=np.uint8)
        buf[HEADER_BYTES:HEADER_BYTES + n] = payload
        self.stats.add(mode, source_bytes, HEADER_BYTES + n)
        return HEADER_BYTES + n

    # -- helpers ------------------------------------------------------------------------------
    def flat_kv(self, t: torch.Tensor) -> tuple[torch.Tensor | None, str]:
        """``t`` ``[2, L, T, H*D]`` as the codec's ``[2, L, T, H, D]`` view, or (None, reason)."""
        if t.dim() != 4 or t.shape[0] != 2:
            return None, f"layout {tuple(t.shape)} is not [2, L, T, H*D]"
        if t.dtype not in CODEC_DTYPES:
            return None, f"dtype {t.dtype} is not one the codec takes"
        hd = int(t.shape[3])
        d = self.head_dim if self.head_dim is not None else _default_head_dim(hd)
        if hd % d:
            return None, f"H*D={hd} is not a multiple of head_dim={d}"
        if t.numel() == 0:
            return None, "empty object"
        return t.contiguous().view(2, t.shape[1], t.shape[2], hd // d, d), ""

    def _encode(self, t: torch.Tensor) -> tuple[bytes | None, str]:
        kv, why = self.flat_kv(t)
        if kv is None:
            return None, why
        codec = _codec()
        try:
            return codec.encode(kv.to(self.device), self.preset, chunk_tokens=self.chunk_tokens,
                                coder=self.coder, model=self.model), ""
        except (TypeError, ValueError) as e:  # the codec refusing this input; store it raw
            return None, f"codec refused the object: {e}"

    def _warn_once(self, why: str) -> None:
        if why not in self._warned:
            self._warned.add(why)
            log.warning("kvkernels serde: storing raw bytes (lossless) because %s", why)


class KVKernelsDeserializer:
    """Check and decode what :class:`KVKernelsSerializer` wrote (see module doc)."""

    def __init__(self, *, device: str = "cpu", verify: bool = True, model: str = "") -> None:
        self.device = _resolve_device(device)
        self.model = str(model)
        self.verify = bool(verify)

    def deserialize(self, src, dst, key) -> None:
        s, d = src.tensor, dst.tensor
        if s is None or d is None:
            raise ValueError("kvkernels serde: src and dst must expose tensors")
        buf = memoryview(_byte_view(s))
        frame = parse_header(buf)
        nbytes = d.numel() * d.element_size()
        if frame.dtype != d.dtype or frame.source_bytes != nbytes:
            raise FrameError(f"object holds {frame.source_bytes} bytes of {frame.dtype}, the destination "
                             f"expects {nbytes} bytes of {d.dtype}")
        payload = payload_of(buf, frame)
        if frame.mode == MODE_RAW:
            if frame.payload_bytes != nbytes:
                raise FrameError(f"raw payload of {frame.payload_bytes} bytes, expected {nbytes}")
            decoded = torch.from_numpy(np.frombuffer(payload, dtype=np.uint8))
            d.reshape(-1).view(torch.uint8).copy_(decoded) if d.is_contiguous() else \
                d.copy_(decoded.view(d.dtype).view(d.shape))
            return
        data = bytes(payload)
        codec = _codec()
        info = codec.inspect(data)
        if int(info.nbytes) != len(data):
            raise FrameError(f"container says {info.nbytes} bytes, the frame holds {len(data)}")
        if self.model and info.model != self.model:
            raise FrameError(f"container is for model {info.model!r}, this serde for {self.model!r}")
        if d.dim() != 4 or tuple(d.shape) != (2, int(info.L), int(info.T), int(info.H) * int(info.D)):
            raise FrameError(f"container holds [2, {info.L}, {info.T}, {info.H}*{info.D}], the "
                             f"destination is {list(d.shape)}")
        if self.verify:
            codec.verify(data)
        kv = codec.decode(data, dtype=d.dtype, device=str(self.device))
        if tuple(kv.shape) != (2, int(info.L), int(info.T), int(info.H), int(info.D)) or kv.dtype != d.dtype:
            raise FrameError(f"decoder returned {tuple(kv.shape)} {kv.dtype}")
        d.copy_(kv.reshape(d.shape).to(d.device))


def make_serde(kwargs: dict[str, Any] | None = None):
    """LMCache serde factory: ``kwargs`` are the ``"serde"`` JSON keys besides ``"type"``."""
    from lmcache.v1.distributed.serde import AsyncSerdeProcessor, Deserializer, Serializer

    kwargs = dict(kwargs or {})
    unknown = sorted(set(kwargs) - set(OPTIONS))
    if unknown:
        raise ValueError(f"kvkernels serde: unknown option(s) {unknown}; known: {list(OPTIONS)}")
    max_workers = int(kwargs.pop("max_workers", 1))
    if max_workers < 1:
        raise ValueError(f"kvkernels serde: max_workers must be >= 1, got {max_workers}")
    device = str(kwargs.pop("device", "cpu"))
    verify = kwargs.pop("verify", True)
    if not isinstance(verify, bool):
        raise ValueError(f"kvkernels serde: verify must be a boolean, got {verify!r}")
    model = str(kwargs.pop("model", ""))
    ser = _bind(Serializer, KVKernelsSerializer)(
        str(kwargs.pop("preset", "default")), chunk_tokens=int(kwargs.pop("chunk_tokens", 256)),
        coder=str(kwargs.pop("coder", "rans")), model=model, head_dim=kwargs.pop("head_dim", None),
        device=device)
    de = _bind(Deserializer, KVKernelsDeserializer)(device=device, verify=verify, model=model)
    return AsyncSerdeProcessor(ser, de, max_workers=max_workers)


_BOUND: dict[tuple[type, type], type] = {}


def _bind(base: type, impl: type) -> type:
    """``impl`` as a subclass of LMCache's ABC ``base`` (created once; keeps this module importable
    without LMCache)."""
    k = (base, impl)
    if k not in _BOUND:
        _BOUND[k] = type(impl.__name__, (impl, base), {"__module__": impl.__module__})
    return _BOUND[k]

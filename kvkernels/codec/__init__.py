"""kvkernels.codec: entropy-coded KV bitstreams in a safe, versioned container.

* :func:`encode` ``(kv [2, L, T, H, D], preset="default", *, chunk_tokens=256, coder="rans",
  model="") -> bytes``
* :func:`decode` ``(data, *, dtype=None, device="cpu", layers=None, chunks=None) -> Tensor
  [2, L', T', H, D]`` (``layers``/``chunks``: ``range`` or None; only their bytes are read)
* :func:`inspect` ``(data) -> ContainerInfo`` (header only), :func:`verify` (every checksum)
* :func:`decode_into_pages` ``(data, layout, slot_mapping, *, layers=None, chunks=None, ...)``:
  a container straight into an engine's paged caches (rANS: one fused kernel; docs/codec.md)
* :class:`CodecError` (a ``ValueError``) for any malformed container.

Presets (``kvkernels.codec.presets``): ``"cachegen"`` (CacheGen as released) and
``"default"``. Coders (``kvkernels.codec.coders``): ``"rans"`` (GPU-friendly interleaved
rANS) and ``"ac"`` (torchac-compatible arithmetic coding). Format: docs/codec-spec.md.
"""
from . import presets, tables
from .container import CodecError, ContainerInfo, decode, encode, inspect, verify
from .paged import decode_into_pages, rans_decode_pages  # noqa: E402 (registers kvkernels::rans_decode_pages)

__all__ = ["CodecError", "ContainerInfo", "decode", "decode_into_pages", "encode", "inspect", "presets",
           "rans_decode_pages", "tables", "verify"]

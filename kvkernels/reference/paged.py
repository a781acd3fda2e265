"""Torch reference for paged ``scatter`` / ``gather`` (the executable spec; also the CPU path).

Layouts are :class:`kvkernels.layouts.PagedLayout` values; the reference addresses each
(kv, layer) cache through its canonical strided view ``[NB, BS, H, D // x, x]``
(:meth:`PagedLayout.views`), exactly the offsets the kernels compute.

Every backend implements the same two functions with the same arguments:

* ``scatter_into(layout, kv, scale, zero, fmt, slots, cache_scale, oob_count)``: the flat side
  into the caches of all layers.
  - ``kv``: flat ``[num_kv, L, T_in, H, D]`` bf16/fp16/fp32 with ``stride(-1) == 1`` (``fmt`` None),
    or the codes of a :class:`~kvkernels.formats.QuantizedKV` of ``[num_kv * L, T_in, H, D]``
    (K layers then V layers): contiguous uint8 ``[num_kv * L, T_in, H, D * bits / 8]`` with
    contiguous float32 ``scale`` / ``zero`` of ``fmt.scale_shape(num_kv * L, T_in, H, D)``
    (``zero`` None for fp8), dequantized on the fly (docs/quant-spec.md).
  - ``slots``: int32/int64 ``[T]``, ``T <= T_in``: flat token ``t`` goes to block
    ``slots[t] // BS``, offset ``slots[t] % BS``; ``slots[t] < 0`` skips the token; a slot
    ``>= NB * BS`` is out of range: skipped, and counted into ``oob_count`` (int32/int64 ``[1]``,
    added to; may be None). Two tokens with the same slot: which one lands is unspecified.
  - ``max_sms``: a bound on the kernel's thread blocks (0: none); the reference ignores it.
  - ``cache_scale``: fp8 caches only, a tuple ``(k_scale, v_scale)`` of float32 ``[L, H]`` (any strides, 0 for broadcast
    dims: per tensor, per layer or per head as vLLM's ``k_scale`` / ``v_scale``); the cache gets
    ``e4m3(clamp(x * min(1 / scale, FLT_MAX), +-448))`` of the float32 value ``x`` (the
    foundation's fp8 math with a given scale: the same codes as ``quantize(x, "fp8:head",
    scale=...)``). Other caches get ``x`` rounded to the cache dtype.
* ``gather_into(layout, slots, out, codes, scale, zero, fmt, cache_scale, oob_count)``: the
  caches of all layers into the flat side.
  - ``fmt`` None: ``out`` flat ``[num_kv, L, T, H, D]`` bf16/fp16/fp32, ``stride(-1) == 1``;
    token ``t`` of every (kv, layer) gets the cache element (decoded ``e4m3 * scale`` for fp8
    caches, then rounded to ``out``'s dtype); skipped / out-of-range tokens leave ``out`` as it was.
  - ``fmt`` given: ``out`` is None and ``codes`` / ``scale`` / ``zero`` (as in ``scatter_into``,
    with ``T_in = T``) receive ``quantize`` of the gathered float32 values, skipped tokens
    counting as zeros.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..formats import FP8_MAX, QuantFormat
from ..layouts import PagedLayout
from . import quant as qref

FLT_MAX = torch.finfo(torch.float32).max


def _recip(den: torch.Tensor) -> torch.Tensor:
    """min(1 / den, FLT_MAX) with IEEE division (a tensor numerator, as the quant reference)."""
    return (torch.ones_like(den) / den).clamp_(max=FLT_MAX)


def _addressing(layout: PagedLayout, slots: torch.Tensor, oob_count: Optional[torch.Tensor]):
    s = slots.to(torch.int64)
    inside = (s >= 0) & (s < layout.num_slots)
    if oob_count is not None:
        oob_count.add_((s >= layout.num_slots).sum().to(oob_count.dtype))
    idx = torch.nonzero(inside).flatten()
    sv = s[idx]
    return idx, sv // layout.block_size, sv % layout.block_size


def fp8_encode(x: torch.Tensor, cache_scale_kl: torch.Tensor) -> torch.Tensor:
    """float32 ``[T, H, D]`` -> e4m3 bytes with a per-head scale ``[H]``."""
    inv = _recip(cache_scale_kl.to(torch.float32)).view(1, -1, 1)
    return qref.e4m3_codes((x * inv).clamp_(-FP8_MAX, FP8_MAX))


def fp8_decode(b: torch.Tensor, cache_scale_kl: torch.Tensor) -> torch.Tensor:
    """e4m3 bytes ``[T, H, D]`` -> float32 times the per-head scale ``[H]``."""
    return b.view(torch.float8_e4m3fn).to(torch.float32) * cache_scale_kl.to(torch.float32).view(1, -1, 1)


def _source(layout: PagedLayout, kv, scale, zero, fmt: Optional[QuantFormat], T: int) -> torch.Tensor:
    """The flat values ``[num_kv, L, T, H, D]`` (float32 when dequantized, else kv's dtype)."""
    if fmt is None:
        return kv[:, :, :T]
    R, T_in, H, _ = kv.shape
    D = layout.head_dim
    vals = torch.empty(R, T_in, H, D, dtype=torch.float32, device=kv.device)
    qref.dequantize_into(kv, scale, zero, fmt, vals)
    return vals.view(layout.num_kv, layout.num_layers, T_in, H, D)[:, :, :T]


def scatter_into(layout: PagedLayout, kv, scale, zero, fmt: Optional[QuantFormat], slots, cache_scale,
                 oob_count, max_sms: int = 0) -> None:
    T = slots.shape[0]
    idx, blk, off = _addressing(layout, slots, oob_count)
    src = _source(layout, kv, scale, zero, fmt, T)
    L, H, D, x = layout.num_layers, layout.num_heads, layout.head_dim, layout.x
    for i, view in enumerate(layout.views()):
        k, l = divmod(i, L)
        vals = src[k, l, idx]                                   # [n, H, D]
        if layout.fp8:
            y = fp8_encode(vals.to(torch.float32), cache_scale[k][l])
        else:
            y = vals.to(layout.dtype)
        view[blk, off] = y.reshape(-1, H, D // x, x)


def _gathered(layout: PagedLayout, slots, cache_scale, oob_count, dtype):
    """(idx of addressed tokens, per (kv, layer) values [n, H, D] in ``dtype``)."""
    idx, blk, off = _addressing(layout, slots, oob_count)
    H, D, L = layout.num_heads, layout.head_dim, layout.num_layers
    vals = []
    for i, view in enumerate(layout.views()):
        k, l = divmod(i, L)
        c = view[blk, off].reshape(-1, H, D)
        vals.append(fp8_decode(c, cache_scale[k][l]).to(dtype) if layout.fp8 else c.to(dtype))
    return idx, vals


def gather_into(layout: PagedLayout, slots, out, codes, scale, zero, fmt: Optional[QuantFormat], cache_scale,
                oob_count, max_sms: int = 0) -> None:
    T = slots.shape[0]
    L, H, D, NKV = layout.num_layers, layout.num_heads, layout.head_dim, layout.num_kv
    if fmt is None:
        idx, vals = _gathered(layout, slots, cache_scale, oob_count, out.dtype)
        for i, v in enumerate(vals):
            out[i // L, i % L, idx] = v
        return
    idx, vals = _gathered(layout, slots, cache_scale, oob_count, torch.float32)
    flat = torch.zeros(NKV * L, T, H, D, dtype=torch.float32, device=slots.device)
    for i, v in enumerate(vals):
        flat[i, idx] = v
    qref.quantize_into(flat, fmt, codes, scale, zero, True)

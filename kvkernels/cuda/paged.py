"""CUDA backend for paged ``scatter`` / ``gather``: a thin launcher over ``kvkernels._C``.

Same functions and conventions as ``kvkernels/reference/paged.py`` (the spec):
``scatter_into(layout, kv, scale, zero, fmt, slots, cache_scale, oob_count, max_sms=0)`` and
``gather_into(layout, slots, out, codes, scale, zero, fmt, cache_scale, oob_count, max_sms=0)``,
plus ``supports_scatter`` / ``supports_gather`` (why a case cannot run, None if it can).

One launch for all layers (csrc/paged.cu; gather + quantize in csrc/paged_gather_quant.cu). The flat side may be pinned host memory, read or
written by the kernel directly (UVA); ``max_sms > 0`` bounds the grid to that many blocks (one
SM each at most) so that a host transfer does not starve concurrent work. Gather with an int
``channel`` format (groups of a multiple of 4 channels) or fp8 ``token_head`` is fused (a thread
quantizes one group); other formats gather, then quantize. Runs on torch's current stream;
nothing synchronises.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..formats import QuantFormat
from ..layouts import PagedLayout
from . import quant as _quant

_DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def _ext():
    from .. import _C  # noqa: WPS433 (lazy)

    return _C


def _esize(layout: PagedLayout, t: Optional[torch.Tensor], fmt) -> int:
    """Elements per thread group (csrc/paged_common.cuh min_e)."""
    widest = max(layout.element_size, t.element_size() if (t is not None and fmt is None) else 1)
    return 4 if widest == 4 else 8


def _refusal(layout: PagedLayout, t: Optional[torch.Tensor], fmt) -> Optional[str]:
    why = _quant.available()
    if why:
        return why
    if not hasattr(_ext(), "paged_call"):
        return "kvkernels._C was built without the paged kernels (rebuild the extension)"
    if layout.device.type != "cuda":
        return f"the CUDA kernels need caches on a CUDA device (got {layout.device})"
    if t is not None and t.device != layout.device and not (t.device.type == "cpu" and t.is_pinned()):
        return f"the flat side is on {t.device}, neither the caches' device nor pinned host memory"
    E = _esize(layout, t, fmt)
    if layout.head_dim % E:
        return f"head_dim {layout.head_dim} is not a multiple of {E} (16-byte groups)"
    if layout.num_heads * layout.head_dim // E >= 2**30:
        return "too many heads x channels per token"
    return None


def supports_scatter(layout: PagedLayout, kv: torch.Tensor, fmt: Optional[QuantFormat], max_sms: int = 0):
    return _refusal(layout, kv, fmt)


def supports_gather(layout: PagedLayout, t: torch.Tensor, fmt: Optional[QuantFormat], max_sms: int = 0):
    if fmt is not None:
        if fmt.kind == "int":
            if fmt.axis != "channel":
                return f"{fmt}: groups along tokens are not fused into the gather"
            if fmt.group_size % 4 or layout.head_dim % fmt.group_size:
                return f"group_size {fmt.group_size}: the fused gather takes groups of a multiple of 4 channels"
        elif fmt.scope != "token_head":
            return f"{fmt}: a scale per layer / head is not fused into the gather"
        elif layout.head_dim % 4:
            return f"head_dim {layout.head_dim} is not a multiple of 4"
        return _refusal(layout, None, None)
    return _refusal(layout, t, None)


def _scale_args(layout: PagedLayout, cache_scale):
    if not layout.fp8:
        return (0, 0, 0, 0, 0, 0)
    ks, vs = cache_scale
    vs = ks if vs is None else vs
    return (ks.data_ptr(), ks.stride(0), ks.stride(1), vs.data_ptr(), vs.stride(0), vs.stride(1))


def _common(layout: PagedLayout, slots, cache_scale, oob_count):
    aligned = all(b.data_ptr() % 16 == 0 for b in layout.bases)
    dev = layout.device
    tail = (slots.data_ptr(), slots.dtype == torch.int64, int(slots.shape[0]),
            oob_count.data_ptr() if oob_count is not None else 0,
            oob_count is not None and oob_count.dtype == torch.int64)
    return (layout.ptrs.data_ptr(), layout.spec(), aligned, *_scale_args(layout, cache_scale)), tail, \
        (dev.index if dev.index is not None else torch.cuda.current_device(), torch.cuda.current_stream(dev).cuda_stream)


def scatter_into(layout: PagedLayout, kv, scale, zero, fmt: Optional[QuantFormat], slots, cache_scale, oob_count,
                 max_sms: int = 0) -> None:
    head, tail, dev = _common(layout, slots, cache_scale, oob_count)
    L, H, D = layout.num_layers, layout.num_heads, layout.head_dim
    if fmt is None:
        flat = (0, _DTYPE_CODE[kv.dtype], kv.data_ptr(), [kv.stride(0), kv.stride(1), kv.stride(2), kv.stride(3)], 8,
                0, 0, [1, 1, 0, 0, 0, 0])
    else:
        codes = kv.view(torch.uint8)
        _, T_in, _, Dp = codes.shape
        fs = [L * T_in * H * Dp, T_in * H * Dp, H * Dp, Dp]
        if fmt.kind == "int":
            G = fmt.group_size
            if fmt.axis == "channel":
                q = [1, G, T_in * H * (D // G), H * (D // G), D // G, 1]
            else:
                q = [G, 1, -(-T_in // G) * H * D, H * D, D, 1]
            flat = (1, 0, codes.data_ptr(), fs, fmt.bits, scale.data_ptr(), zero.data_ptr(), q)
        else:
            q = {"tensor": [1, 1, 1, 0, 0, 0], "head": [1, 1, H, 0, 1, 0],
                 "token_head": [1, 1, T_in * H, H, 1, 0]}[fmt.scope]
            flat = (2, 0, codes.data_ptr(), fs, 8, scale.data_ptr(), 0, q)
    _ext().paged_call(True, *head, *flat, *tail, int(max_sms), *dev)


def gather_into(layout: PagedLayout, slots, out, codes, scale, zero, fmt: Optional[QuantFormat], cache_scale,
                oob_count, max_sms: int = 0) -> None:
    head, tail, dev = _common(layout, slots, cache_scale, oob_count)
    if fmt is not None:  # fused quantize: codes [R, T, H, D*bits/8], scale / zero [R, T, H, D/G] (fp8: [R, T, H])
        D = layout.head_dim
        c = codes.view(torch.uint8)
        G = fmt.group_size if fmt.kind == "int" else D
        flat = (1 if fmt.kind == "int" else 2, 0, c.data_ptr(), [0, 0, 0, c.shape[-1]], fmt.bits, scale.data_ptr(),
                zero.data_ptr() if zero is not None else 0, [1, G, 0, 0, 0, 0])
        _ext().paged_call(False, *head, *flat, *tail, int(max_sms), *dev)
        return
    flat = (0, _DTYPE_CODE[out.dtype], out.data_ptr(), [out.stride(0), out.stride(1), out.stride(2), out.stride(3)], 8,
            0, 0, [1, 1, 0, 0, 0, 0])
    _ext().paged_call(False, *head, *flat, *tail, int(max_sms), *dev)

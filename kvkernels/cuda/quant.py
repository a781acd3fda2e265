"""CUDA backend for ``quantize`` / ``dequantize``: thin launchers over ``kvkernels._C``.

Same functions and argument conventions as ``kvkernels/reference/quant.py`` (the spec):

* ``quantize_into(x, fmt, codes, scale, zero, compute_scale)``
  - ``x``: ``[L, T, H, D]`` bf16/fp16/fp32 CUDA tensor, ``x.stride(-1) == 1``, other strides
    arbitrary.
  - ``codes``: contiguous ``uint8 [L, T, H, D*bits/8]`` (fp8 codes viewed as uint8), written.
  - ``scale``/``zero``: contiguous float32 of ``fmt.scale_shape(L, T, H, D)``, written (fp8 with
    ``compute_scale=False``: ``scale`` is read); ``zero`` is None for fp8.
* ``dequantize_into(codes, scale, zero, fmt, out)``: ``out`` ``[L, T, H, D]`` bf16/fp16/fp32,
  ``out.stride(-1) == 1`` (or head_dim 1), elements distinct in memory, written.

Both check every buffer with ``kvkernels._validate`` before launching (the C++ side trusts its
pointers and extents).

Kernels run on the tensors' device, on torch's current stream; nothing synchronises. The
extension is imported lazily so that the package imports without it. The C++ side is
csrc/quant.{h,cu} (kernels) and python/quant.cpp (bindings).
"""
from __future__ import annotations

import functools
from typing import Optional

import torch

from .._validate import check_dequantize, check_quantize, is_dense_last
from ..formats import QuantFormat

_DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_SCOPE_CODE = {"tensor": 0, "head": 1, "token_head": 2}
_AXIS_CODE = {"channel": 0, "token": 1}
_MAX_COUNT = 2**31 - 1
_MAX_VECTORS_PER_GROUP = 128  # 32 lanes x 4 vectors (csrc/quant.cu, quant_rows_kernel)


def _ext():
    from .. import _C  # noqa: WPS433 (lazy: the package must import without the extension)

    return _C


def available() -> Optional[str]:
    """None if the CUDA kernels can run here, else why not."""
    try:
        _C = _ext()
    except ImportError as e:
        return f"the CUDA extension kvkernels._C is not built or cannot load ({e})"
    if _C.device_count() == 0:
        return f"kvkernels._C (CUDA {_C.cuda_version()}) sees no CUDA device"
    if not torch.cuda.is_available():
        return "torch was built without CUDA or sees no CUDA device"
    return None


def _vec(esize: int, D: int, G: int, codes_per_byte: int, limit_lanes: bool) -> int:
    """Mirror of pick_vec in csrc/quant.cu: elements per thread-vector, 0 if none works."""
    for e in (16 // esize, codes_per_byte):
        if e < codes_per_byte or D % e or (G % e and e % G):
            continue
        if limit_lanes and max(G, e) // e > _MAX_VECTORS_PER_GROUP:
            continue
        return e
    return 0


def supports(t: torch.Tensor, fmt: QuantFormat) -> Optional[str]:
    """None if the CUDA kernels can quantize / dequantize ``t`` (x or out, ``[L, T, H, D]``) in
    ``fmt``, else a human-readable reason."""
    if t.device.type != "cuda":
        return f"the CUDA kernels need a CUDA tensor (got one on {t.device})"
    if t.dtype not in _DTYPE_CODE:
        return f"dtype {t.dtype} is not one of fp32/fp16/bf16"
    if t.dim() != 4 or not is_dense_last(t):
        return "expects a [L, T, H, D] tensor with a dense last dim"
    L, T, H, D = t.shape
    esize = t.element_size()
    k = fmt.per_byte
    if D % k:
        return f"head_dim {D} is not a multiple of {k} (codes per byte of {fmt})"
    if fmt.kind == "int" and fmt.axis == "channel":
        G = fmt.group_size
        if D % G:
            return f"group_size {G} does not divide head_dim {D}"
        if not _vec(esize, D, G, k, True):
            if G % k and k % G:
                return (f"group_size {G} cannot be split into whole code bytes per thread for {fmt.bits}-bit "
                        f"codes (needs a multiple of {k}, or a divisor of it)")
            return f"group_size {G} is larger than {_MAX_VECTORS_PER_GROUP} vectors of a thread"
        e = _vec(esize, D, G, k, True)
    elif fmt.kind == "fp8":
        e = _vec(esize, D, D, 1, True)
        if not e:
            return f"head_dim {D} is larger than {_MAX_VECTORS_PER_GROUP} vectors of a thread"
    else:
        e = 16 // esize if D % (16 // esize) == 0 else k
    if T * H * (D // e) > _MAX_COUNT:
        return f"one layer of {T} tokens x {H} heads x {D} channels is too large (2^31 vectors)"
    return None


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _stream(t: torch.Tensor) -> int:
    return torch.cuda.current_stream(t.device).cuda_stream


def _prepare(codes: torch.Tensor, scale: torch.Tensor, zero: Optional[torch.Tensor], kv: torch.Tensor):
    """Shared launcher prologue (after the caller's ``_validate`` check): codes as bytes and the
    arguments every binding takes about the KV tensor ``kv`` (x or out)."""
    codes = codes if codes.dtype == torch.uint8 else codes.view(torch.uint8)
    sL, sT, sH, _ = kv.stride()
    geometry = (_DTYPE_CODE[kv.dtype], *kv.shape, sL, sT, sH)
    return _ext(), codes, geometry, (kv.device.index, _stream(kv))


def quantize_into(x: torch.Tensor, fmt: QuantFormat, codes: torch.Tensor, scale: torch.Tensor,
                  zero: Optional[torch.Tensor], compute_scale: bool = True) -> None:
    """Check every buffer (``_validate.check_quantize``: the C++ side trusts its pointers and
    extents), then launch. The registered op checks before dispatch and calls
    :func:`quantize_into_checked` (no second check)."""
    check_quantize(x, fmt, codes, scale, zero, compute_scale)
    quantize_into_checked(x, fmt, codes, scale, zero, compute_scale)


def dequantize_into(codes: torch.Tensor, scale: torch.Tensor, zero: Optional[torch.Tensor], fmt: QuantFormat,
                    out: torch.Tensor) -> None:
    """Check every buffer (``_validate.check_dequantize``), then launch; see :func:`quantize_into`."""
    check_dequantize(codes, scale, zero, fmt, out)
    dequantize_into_checked(codes, scale, zero, fmt, out)


def quantize_into_checked(x: torch.Tensor, fmt: QuantFormat, codes: torch.Tensor, scale: torch.Tensor,
                          zero: Optional[torch.Tensor], compute_scale: bool = True) -> None:
    """The launch alone: only for arguments that ``_validate.check_quantize`` accepted."""
    _C, codes, geo, tail = _prepare(codes, scale, zero, x)
    if fmt.kind == "fp8":
        scope = _SCOPE_CODE[fmt.scope]
        ws = None
        if compute_scale and scope != 2:
            # scratch for the one-pass kernel: an amax slot per (layer[, head], block); its grid
            # has at most 2 blocks per SM, 4 leaves room. Any content: the kernel clears what it
            # uses. Held until the launch is enqueued; the stream orders its reuse after the kernel.
            L, _, H, _ = x.shape
            ws = torch.empty(L * (H if scope == 1 else 1) * 4 * _sm_count(x.device), dtype=torch.int32,
                             device=x.device)
        _C.quantize_fp8(x.data_ptr(), *geo, codes.data_ptr(), scale.data_ptr(), scope, bool(compute_scale),
                        0 if ws is None else ws.data_ptr(), 0 if ws is None else ws.numel(), *tail)
    else:
        _C.quantize_int(x.data_ptr(), *geo, codes.data_ptr(), scale.data_ptr(), zero.data_ptr(), fmt.bits,
                        fmt.group_size, _AXIS_CODE[fmt.axis], *tail)


def dequantize_into_checked(codes: torch.Tensor, scale: torch.Tensor, zero: Optional[torch.Tensor],
                            fmt: QuantFormat, out: torch.Tensor) -> None:
    """The launch alone: only for arguments that ``_validate.check_dequantize`` accepted."""
    _C, codes, geo, tail = _prepare(codes, scale, zero, out)
    if fmt.kind == "fp8":
        _C.dequantize_fp8(codes.data_ptr(), scale.data_ptr(), out.data_ptr(), *geo, _SCOPE_CODE[fmt.scope], *tail)
    else:
        _C.dequantize_int(codes.data_ptr(), scale.data_ptr(), zero.data_ptr(), out.data_ptr(), *geo, fmt.bits,
                          fmt.group_size, _AXIS_CODE[fmt.axis], *tail)

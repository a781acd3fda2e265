"""Host-side argument checks shared by the public API, the registered ops and every backend.

Every op of the package checks each buffer it reads or writes *before* anything runs, from
metadata only (type, dtype, device, shape, strides: no device sync, no ``.item()``), and raises
``TypeError`` (wrong type or dtype) or ``ValueError`` (wrong shape, device or layout) whose
message starts with the argument's name. The checks live here, in one place, so that an engine
that calls ``torch.ops.kvkernels.*`` directly with its own buffers gets the same refusals as a
user of the Python API, whichever backend runs.

The building block is :func:`check_tensor`; an op family writes one function per op that
derives the expected shapes from its format and calls it for each buffer (as
:func:`check_quantize` / :func:`check_dequantize` do for ``kvkernels.quant``)::

    check_tensor("out", out, dtype=INPUT_DTYPES, dim=4, dense_last=True, no_overlap=True)
    check_tensor("codes", codes, shape=fmt.codes_shape(*out.shape), dtype=torch.uint8,
                 device=out.device, contiguous=True)

The checks also run on fake tensors (``torch.compile`` tracing), which carry the same metadata.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch

from .formats import INPUT_DTYPES

DTypes = Union[torch.dtype, Tuple[torch.dtype, ...]]


def _dtype_names(dtype: DTypes) -> str:
    if isinstance(dtype, torch.dtype):
        return str(dtype)
    return " or ".join(str(d) for d in dtype)


def has_internal_overlap(t: torch.Tensor) -> bool:
    """Whether two different indices of ``t`` may address the same memory (a write through it
    would race with itself), from its sizes and strides alone.

    Size-1 dims are ignored; a stride of 0 on a longer dim (``expand``) overlaps. Otherwise the
    dims are sorted by stride and each stride must exceed the extent of all smaller ones
    (``stride >= sum((size - 1) * stride) + 1``): true of every contiguous tensor, permutation,
    slice and step of one. Layouts that interleave dims in a way this cannot prove disjoint are
    reported as overlapping (conservative: a caller can pass a dense buffer instead)."""
    if t.is_contiguous():  # fast path (row-major dense, size-1 dims aside)
        return False
    dims = sorted((st, sz) for sz, st in zip(t.shape, t.stride()) if sz != 1)
    extent = 0  # largest offset reachable with the dims seen so far
    for st, sz in dims:
        if st <= extent:
            return True
        extent += (sz - 1) * st
    return False


def is_dense_last(t: torch.Tensor) -> bool:
    """Whether the last dim is dense: stride 1, or size 1 (a lone element has no stride)."""
    return t.shape[-1] == 1 or t.stride(-1) == 1


def check_tensor(name: str, t, *, shape: Optional[Sequence[int]] = None, dtype: Optional[DTypes] = None,
                 device: Optional[torch.device] = None, dim: Optional[Union[int, Tuple[int, ...]]] = None,
                 contiguous: bool = False, dense_last: bool = False, no_overlap: bool = False,
                 nonempty: bool = False) -> None:
    """Check one buffer; raise ``TypeError``/``ValueError`` naming ``name`` and what was expected.

    Args:
        name: the argument's name as the caller knows it (``"codes"``, ``"q.scale"``).
        t: the value to check (anything; a non-tensor raises ``TypeError``).
        shape: exact expected shape.
        dtype: the expected dtype, or a tuple of accepted dtypes.
        device: the expected device (a ``torch.device``; compared with its index).
        dim: expected number of dims (an int or a tuple of accepted counts).
        contiguous: require ``t.is_contiguous()`` (row-major; size-1 dims' strides are free).
        dense_last: require the last dim to be dense (stride 1, or size 1).
        no_overlap: refuse a tensor whose elements may share memory (for outputs: stride 0,
            expanded views); see :func:`has_internal_overlap`.
        nonempty: refuse a tensor with no elements.

    Order of checks: type, dtype, device, dim, shape, emptiness, layout.
    """
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if dtype is not None:
        ok = t.dtype == dtype if isinstance(dtype, torch.dtype) else t.dtype in dtype
        if not ok:
            raise TypeError(f"{name}: expected dtype {_dtype_names(dtype)}, got {t.dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"{name}: expected a tensor on {device}, got one on {t.device}")
    ts = t.shape
    if dim is not None:
        ok = len(ts) == dim if isinstance(dim, int) else len(ts) in dim
        if not ok:
            raise ValueError(f"{name}: expected {dim} dims, got shape {tuple(ts)}")
    if shape is not None and ts != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(ts)}")
    if nonempty and t.numel() == 0:
        raise ValueError(f"{name}: expected a non-empty tensor, got shape {tuple(ts)}")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{name}: expected a contiguous tensor, got strides {t.stride()} for shape {tuple(ts)}")
    if dense_last and ts and ts[-1] != 1 and t.stride(-1) != 1:
        raise ValueError(f"{name}: the last dim must be dense (stride 1), got strides {t.stride()}")
    if no_overlap and has_internal_overlap(t):
        raise ValueError(f"{name}: elements overlap in memory (strides {t.stride()} for shape "
                         f"{tuple(ts)}, e.g. an expanded view); pass a buffer whose elements are distinct")


def check_none(name: str, t, why: str) -> None:
    """Refuse a buffer that must be absent (e.g. a zero point for a format without one)."""
    if t is not None:
        raise ValueError(f"{name}: expected None ({why}), got a {type(t).__name__}")


# ---- quantize / dequantize -------------------------------------------------------------------
def check_kv(name: str, t, *, dims=(4,), output: bool = False) -> None:
    """A KV tensor ``x`` / ``out``: bf16/fp16/fp32, ``dims`` dims, non-empty, last dim dense;
    an output also must not overlap itself."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in INPUT_DTYPES:
        raise TypeError(f"{name}: expected dtype {_dtype_names(INPUT_DTYPES)}, got {t.dtype}")
    ts = t.shape
    if len(ts) not in dims:
        want = " or ".join("[L, T, H, D]" if d == 4 else "[T, H, D]" for d in sorted(dims))
        raise ValueError(f"{name}: expected shape {want}, got {tuple(ts)}")
    check_tensor(name, t, nonempty=True, dense_last=True, no_overlap=output)


def _check_codes_scale_zero(fmt, L: int, T: int, H: int, D: int, codes, scale, zero, device, prefix: str = "") -> None:
    cd = fmt.codes_dtype()
    check_tensor(prefix + "codes", codes, dtype=(cd, torch.uint8) if cd != torch.uint8 else cd, device=device,
                 shape=fmt.codes_shape(L, T, H, D), contiguous=True)
    sshape = fmt.scale_shape(L, T, H, D)
    check_tensor(prefix + "scale", scale, dtype=torch.float32, device=device, shape=sshape, contiguous=True)
    if fmt.has_zero:
        check_tensor(prefix + "zero", zero, dtype=torch.float32, device=device, shape=sshape, contiguous=True)
    else:
        check_none(prefix + "zero", zero, f"{fmt} has no zero point")


def check_quantize(x, fmt, codes, scale, zero, compute_scale) -> None:
    """Every argument of ``quantize_into(x, fmt, codes, scale, zero, compute_scale)`` (the
    registered op and every backend): ``x`` ``[L, T, H, D]`` bf16/fp16/fp32, non-empty, last dim
    dense (other strides arbitrary, overlap allowed: it is only read), a shape ``fmt`` can
    quantize; ``codes`` contiguous ``fmt.codes_shape`` of ``fmt.codes_dtype()`` (or uint8,
    its bytes); ``scale`` / ``zero`` contiguous float32 ``fmt.scale_shape`` (``zero`` None for
    fp8); all on ``x``'s device; ``compute_scale`` a bool, False only for fp8 (a given scale).
    Written outputs are contiguous, so they cannot overlap themselves."""
    check_kv("x", x)
    L, T, H, D = x.shape
    fmt.check_shape(T, H, D)
    _check_codes_scale_zero(fmt, L, T, H, D, codes, scale, zero, x.device)
    if not isinstance(compute_scale, bool):
        raise TypeError(f"compute_scale: expected a bool, got {type(compute_scale).__name__}")
    if not compute_scale and fmt.kind != "fp8":
        raise ValueError(f"compute_scale: only fp8 formats take a given scale; {fmt} computes its own")


def check_dequantize(codes, scale, zero, fmt, out) -> None:
    """Every argument of ``dequantize_into(codes, scale, zero, fmt, out)``: ``out`` ``[L, T, H, D]``
    bf16/fp16/fp32, non-empty, last dim dense, elements distinct in memory (no stride-0 /
    expanded views: its rows would overwrite each other); ``codes`` / ``scale`` / ``zero`` as
    :func:`check_quantize` states for the shape of ``out``, on its device."""
    check_kv("out", out, output=True)
    L, T, H, D = out.shape
    fmt.check_shape(T, H, D, name="out")
    _check_codes_scale_zero(fmt, L, T, H, D, codes, scale, zero, out.device)

"""Fused KV quantize / dequantize: public API and ``torch.library`` ops.

``quantize(x, format)`` -> :class:`QuantizedKV`; ``dequantize(q)`` -> tensor. The math is in
docs/quant-spec.md and, executable, in ``kvkernels/reference/quant.py``.
"""
from __future__ import annotations

import functools
from typing import Optional, Union

import torch

from . import dispatch
from .formats import INPUT_DTYPES, QuantFormat, QuantizedKV

for _b, _mod in (("cuda", "kvkernels.cuda.quant"), ("triton", "kvkernels.triton_kernels.quant"),
                 ("torch", "kvkernels.reference.quant")):
    dispatch.register("quantize", _b, _mod, "quantize_into", None if _b == "torch" else "supports")
    dispatch.register("dequantize", _b, _mod, "dequantize_into", None if _b == "torch" else "supports")


@functools.lru_cache(maxsize=256)
def _fmt(spec: str) -> QuantFormat:
    return QuantFormat.parse(spec)


def _key(t: torch.Tensor, fmt: QuantFormat):
    # everything a backend's supports() looks at: device (capability), dtype, format, head_dim,
    # and whether one layer exceeds 2^31 elements (32-bit index limits)
    return (t.device, t.dtype, fmt, t.shape[-1], t[0].numel() >= 2**31)


# ---- torch.library ops (mutate caller-owned outputs; fake kernels do nothing) ----------------
@torch.library.custom_op("kvkernels::quantize", mutates_args=("codes", "scale", "zero"))
def quantize_op(x: torch.Tensor, fmt: str, codes: torch.Tensor, scale: torch.Tensor,
                zero: Optional[torch.Tensor], compute_scale: bool, backend: Optional[str]) -> None:
    """x [L,T,H,D] -> codes/scale/zero (see ``reference.quant`` for the conventions)."""
    f = _fmt(fmt)
    _, impl = dispatch.resolve("quantize", _key(x, f), (x, f), backend, x.device.type)
    impl(x, f, codes.view(torch.uint8), scale, zero, compute_scale)


@quantize_op.register_fake
def _(x, fmt, codes, scale, zero, compute_scale, backend) -> None:
    return None


@torch.library.custom_op("kvkernels::dequantize", mutates_args=("out",))
def dequantize_op(codes: torch.Tensor, scale: torch.Tensor, zero: Optional[torch.Tensor], fmt: str,
                  out: torch.Tensor, backend: Optional[str]) -> None:
    """codes/scale/zero -> out [L,T,H,D]."""
    f = _fmt(fmt)
    _, impl = dispatch.resolve("dequantize", _key(out, f), (out, f), backend, out.device.type)
    impl(codes.view(torch.uint8), scale, zero, f, out)


@dequantize_op.register_fake
def _(codes, scale, zero, fmt, out, backend) -> None:
    return None


# ---- validation ------------------------------------------------------------------------------
def _check_kv(name: str, t, *, dtypes=INPUT_DTYPES) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        raise TypeError(f"{name}: expected dtype in {[str(d) for d in dtypes]}, got {t.dtype}")
    if t.dim() not in (3, 4):
        raise ValueError(f"{name}: expected shape [T, H, D] or [L, T, H, D], got {tuple(t.shape)}")
    if t.numel() == 0:
        raise ValueError(f"{name}: expected a non-empty tensor, got shape {tuple(t.shape)}")
    if t.stride(-1) != 1:
        raise ValueError(f"{name}: the last dim (head_dim) must be dense (stride 1), got strides {t.stride()}")


def _as4d(t: torch.Tensor) -> torch.Tensor:
    return t if t.dim() == 4 else t.unsqueeze(0)


def _check_aux(name: str, t, shape, dtype, device) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype != dtype:
        raise TypeError(f"{name}: expected dtype {dtype}, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name}: expected a tensor on {device}, got {t.device}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(t.shape)}")


# ---- public API ------------------------------------------------------------------------------
def quantize(x: torch.Tensor, format: Union[str, QuantFormat], *, scale: Optional[torch.Tensor] = None,
             backend: Optional[str] = None) -> QuantizedKV:
    """Quantize KV.

    Args:
        x: ``[T, H, D]`` or ``[L, T, H, D]`` (tokens, KV heads, head_dim; optional layers),
            bf16/fp16/fp32, on any device; head_dim dense, other strides arbitrary.
        format: a :class:`QuantFormat` or its string (``"int4:g32:channel"``, ``"int2:g32:token"``,
            ``"fp8:token_head"``, ...; see docs/quant-spec.md).
        scale: fp8 only: given float32 scales of ``format.scale_shape`` (``L`` dropped for 3-D
            input; a scalar is accepted for ``fp8:tensor`` on 3-D input). Default: computed (amax/448).
        backend: ``"cuda"``, ``"triton"`` or ``"torch"``; default: ``KVKERNELS_BACKEND`` or the
            first backend that supports the case.

    Returns:
        :class:`QuantizedKV` with contiguous ``codes`` (uint8 ``[.., T, H, D*bits/8]`` or
        float8_e4m3fn ``[.., T, H, D]``), float32 ``scale`` and (int formats) ``zero``.
    """
    fmt = QuantFormat.parse(format)
    _check_kv("x", x)
    x4 = _as4d(x)
    L, T, H, D = x4.shape
    fmt.check_shape(T, H, D)
    sshape4 = fmt.scale_shape(L, T, H, D)
    drop = x.dim() == 3
    pub_shape = sshape4[1:] if drop else sshape4
    codes = torch.empty(fmt.codes_shape(L, T, H, D), dtype=fmt.codes_dtype(), device=x.device)
    if scale is not None:
        if fmt.kind != "fp8":
            raise ValueError(f"scale: only fp8 formats take a given scale; {fmt} computes its own")
        want = pub_shape
        if drop and fmt.scope == "tensor" and isinstance(scale, torch.Tensor) and scale.numel() == 1:
            scale = scale.reshape(())
        _check_aux("scale", scale, want, torch.float32, x.device)
        sc = scale.reshape(sshape4).clone(memory_format=torch.contiguous_format)  # ours: written by no one else
    else:
        sc = torch.empty(sshape4, dtype=torch.float32, device=x.device)
    zp = torch.empty(sshape4, dtype=torch.float32, device=x.device) if fmt.has_zero else None
    quantize_op(x4, str(fmt), codes, sc, zp, scale is None, backend)
    if drop:
        codes, sc = codes[0], sc.reshape(pub_shape)
        zp = zp[0] if zp is not None else None
    return QuantizedKV(codes=codes, scale=sc, zero=zp, format=fmt, dtype=x.dtype, head_dim=D)


def _check_quantized(q) -> None:
    if not isinstance(q, QuantizedKV):
        raise TypeError(f"q: expected a QuantizedKV, got {type(q).__name__}")
    fmt = q.format
    c = q.codes
    if not isinstance(c, torch.Tensor) or c.dim() not in (3, 4):
        raise ValueError("q.codes: expected a [T, H, Dp] or [L, T, H, Dp] tensor")
    if c.dtype != fmt.codes_dtype():
        raise TypeError(f"q.codes: expected dtype {fmt.codes_dtype()} for {fmt}, got {c.dtype}")
    if not c.is_contiguous():
        raise ValueError("q.codes: expected a contiguous tensor")
    c4 = _as4d(c)
    L, T, H, Dp = c4.shape
    D = q.head_dim
    if D * fmt.bits != Dp * 8:
        raise ValueError(f"q.codes: last dim {Dp} does not match head_dim {D} at {fmt.bits} bits")
    fmt.check_shape(T, H, D)
    sshape = fmt.scale_shape(L, T, H, D)
    pub = sshape[1:] if c.dim() == 3 else sshape
    _check_aux("q.scale", q.scale, pub, torch.float32, c.device)
    if not q.scale.is_contiguous():
        raise ValueError("q.scale: expected a contiguous tensor")
    if fmt.has_zero:
        _check_aux("q.zero", q.zero, pub, torch.float32, c.device)
        if not q.zero.is_contiguous():
            raise ValueError("q.zero: expected a contiguous tensor")


def dequantize(q: QuantizedKV, dtype: Optional[torch.dtype] = None, *, out: Optional[torch.Tensor] = None,
               backend: Optional[str] = None) -> torch.Tensor:
    """Dequantize :class:`QuantizedKV` back to ``q.shape``.

    Args:
        q: from :func:`quantize`.
        dtype: bf16/fp16/fp32 (default ``q.dtype``, or ``out.dtype`` when ``out`` is given).
        out: optional output ``[.., T, H, D]`` (head_dim dense, other strides arbitrary), written.
        backend: as in :func:`quantize`.
    """
    _check_quantized(q)
    if out is not None:
        _check_kv("out", out)
        if tuple(out.shape) != q.shape:
            raise ValueError(f"out: expected shape {q.shape}, got {tuple(out.shape)}")
        if out.device != q.codes.device:
            raise ValueError(f"out: expected a tensor on {q.codes.device}, got {out.device}")
        if dtype is not None and out.dtype != dtype:
            raise TypeError(f"out: dtype {out.dtype} does not match dtype={dtype}")
    else:
        dtype = q.dtype if dtype is None else dtype
        if dtype not in INPUT_DTYPES:
            raise TypeError(f"dtype: expected one of {[str(d) for d in INPUT_DTYPES]}, got {dtype}")
        out = torch.empty(q.shape, dtype=dtype, device=q.codes.device)
    L = q.codes.shape[0] if q.has_layers else 1
    sshape = q.format.scale_shape(L, *_as4d(q.codes).shape[1:3], q.head_dim)
    zero = q.zero.reshape(sshape) if q.zero is not None else None
    dequantize_op(_as4d(q.codes), q.scale.reshape(sshape), zero, str(q.format), _as4d(out), backend)
    return out

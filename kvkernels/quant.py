"""Fused KV quantize / dequantize: public API and ``torch.library`` ops.

``quantize(x, format)`` -> :class:`QuantizedKV`; ``dequantize(q)`` -> tensor. The math is in
docs/quant-spec.md and, executable, in ``kvkernels/reference/quant.py``.
"""
from __future__ import annotations

import functools
from typing import Optional, Union

import torch

from . import dispatch
from ._validate import check_dequantize, check_kv, check_quantize, check_tensor
from .formats import INPUT_DTYPES, QuantFormat, QuantizedKV

# The ops check every buffer before dispatch (kvkernels/_validate.py); the CUDA launchers'
# ``quantize_into`` / ``dequantize_into`` check again for direct callers, so the ops call their
# ``*_checked`` halves (one check per call).
for _b, _mod, _sfx in (("cuda", "kvkernels.cuda.quant", "_checked"), ("triton", "kvkernels.triton_kernels.quant", ""),
                       ("torch", "kvkernels.reference.quant", "")):
    dispatch.register("quantize", _b, _mod, "quantize_into" + _sfx, None if _b == "torch" else "supports")
    dispatch.register("dequantize", _b, _mod, "dequantize_into" + _sfx, None if _b == "torch" else "supports")


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
    """x [L,T,H,D] -> codes/scale/zero (see ``reference.quant`` for the conventions). Every
    buffer is checked against ``fmt`` here, before dispatch (``_validate.check_quantize``), so
    a caller of ``torch.ops.kvkernels.quantize`` gets the same refusals on every backend."""
    f = _fmt(fmt)
    check_quantize(x, f, codes, scale, zero, compute_scale)
    _, impl = dispatch.resolve("quantize", _key(x, f), (x, f), backend, x.device.type)
    impl(x, f, codes.view(torch.uint8), scale, zero, compute_scale)


@quantize_op.register_fake
def _(x, fmt, codes, scale, zero, compute_scale, backend) -> None:
    check_quantize(x, _fmt(fmt), codes, scale, zero, compute_scale)  # metadata only: fine on fakes
    return None


@torch.library.custom_op("kvkernels::dequantize", mutates_args=("out",))
def dequantize_op(codes: torch.Tensor, scale: torch.Tensor, zero: Optional[torch.Tensor], fmt: str,
                  out: torch.Tensor, backend: Optional[str]) -> None:
    """codes/scale/zero -> out [L,T,H,D]; every buffer checked (``_validate.check_dequantize``:
    shapes from ``out`` and ``fmt``, ``out`` must not overlap itself) before dispatch."""
    f = _fmt(fmt)
    check_dequantize(codes, scale, zero, f, out)
    _, impl = dispatch.resolve("dequantize", _key(out, f), (out, f), backend, out.device.type)
    impl(codes.view(torch.uint8), scale, zero, f, out)


@dequantize_op.register_fake
def _(codes, scale, zero, fmt, out, backend) -> None:
    check_dequantize(codes, scale, zero, _fmt(fmt), out)
    return None


# ---- validation (the shared checks are in kvkernels/_validate.py) ----------------------------
def _check_kv(name: str, t, *, dtypes=INPUT_DTYPES) -> None:
    check_kv(name, t, dims=(3, 4), output=name == "out")


def _as4d(t: torch.Tensor) -> torch.Tensor:
    return t if t.dim() == 4 else t.unsqueeze(0)


# ---- public API ------------------------------------------------------------------------------
def quantize(x: torch.Tensor, format: Union[str, QuantFormat], *, scale: Optional[torch.Tensor] = None,
             backend: Optional[str] = None) -> QuantizedKV:
    """Quantize KV.

    Args:
        x: ``[T, H, D]`` or ``[L, T, H, D]`` (tokens, KV heads, head_dim; optional layers),
            bf16/fp16/fp32, non-empty, on any device; head_dim dense (stride 1, or size 1),
            other strides arbitrary.
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
        check_tensor("scale", scale, shape=want, dtype=torch.float32, device=x.device)
        sc = scale.reshape(sshape4).clone(memory_format=torch.contiguous_format)  # ours: written by no one else
    else:
        sc = torch.empty(sshape4, dtype=torch.float32, device=x.device)
    zp = torch.empty(sshape4, dtype=torch.float32, device=x.device) if fmt.has_zero else None
    quantize_op(x4, str(fmt), codes, sc, zp, scale is None, backend)
    if drop:
        codes, sc = codes[0], sc.reshape(pub_shape)
        zp = zp[0] if zp is not None else None
    return QuantizedKV._unchecked(codes, sc, zp, fmt, x.dtype, D)  # our buffers: shapes by construction


def _check_quantized(q) -> None:
    if not isinstance(q, QuantizedKV):
        raise TypeError(f"q: expected a QuantizedKV, got {type(q).__name__}")
    q.validate(prefix="q.")  # fields may have been reassigned since construction


def dequantize(q: QuantizedKV, dtype: Optional[torch.dtype] = None, *, out: Optional[torch.Tensor] = None,
               backend: Optional[str] = None) -> torch.Tensor:
    """Dequantize :class:`QuantizedKV` back to ``q.shape``.

    Args:
        q: from :func:`quantize`.
        dtype: bf16/fp16/fp32 (default ``q.dtype``, or ``out.dtype`` when ``out`` is given).
        out: optional output ``[.., T, H, D]`` (head_dim dense or of size 1, other strides
            arbitrary but its elements distinct in memory: an expanded / stride-0 view is
            refused), written.
        backend: as in :func:`quantize`.
    """
    _check_quantized(q)
    if out is not None:
        _check_kv("out", out)
        check_tensor("out", out, shape=q.shape, device=q.codes.device)
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

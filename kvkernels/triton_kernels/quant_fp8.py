"""Triton kernels for fp8 e4m3: the tensor/head amax, quantize and dequantize rows. See quant.py."""
from __future__ import annotations

import triton
import triton.language as tl

from .quant_common import FLT_MAX, FLT_MIN, _load_d, _rmax, _row_chunks, _rows_program


@triton.jit
def _fp8_amax(x_ptr, amax_ptr, T, H, s_l, s_t, s_h,
              D: tl.constexpr, DP: tl.constexpr, TB: tl.constexpr, HB: tl.constexpr,
              SCOPE: tl.constexpr):
    # Program: tokens [pid0*TB, +TB), heads [pid1*HB, +HB), layer pid2.
    l = tl.program_id(2)
    t = tl.program_id(0) * TB + tl.arange(0, TB)
    h = tl.program_id(1) * HB + tl.arange(0, HB)
    hmask = h < H
    t = tl.minimum(t, T - 1)   # copies of real tokens/heads: the amax is unchanged
    hc = tl.minimum(h, H - 1)
    d = tl.arange(0, DP)
    off = (l.to(tl.int64) * s_l + t.to(tl.int64)[:, None, None] * s_t
           + hc.to(tl.int64)[None, :, None] * s_h + d[None, None, :])
    if D == DP:
        x = tl.load(x_ptr + off)
    else:
        x = tl.load(x_ptr + off, mask=(d < D)[None, None, :], other=0.0)
    a = _finite_abs(x.to(tl.float32))
    a = _rmax(_rmax(a, 2), 0)                                              # [HB]
    if SCOPE == 0:
        v = _rmax(a, 0)
        tl.atomic_max(amax_ptr + l, v.to(tl.int32, bitcast=True))
    else:
        tl.atomic_max(amax_ptr + (l * H + h), a.to(tl.int32, bitcast=True), mask=hmask)


@triton.jit
def _finite_abs(x):
    """|x| where x is finite, else 0 (the scale's amax is over finite values; NaN < FLT_MAX is false)."""
    a = tl.abs(x)
    return tl.where(a <= FLT_MAX, a, 0.0)


@triton.jit
def _fp8_scale(amax):
    """amax / 448 (IEEE), at least FLT_MIN (1 / scale finite); 0 -> 1."""
    s = tl.math.div_rn(amax, tl.full(amax.shape, 448.0, tl.float32))
    return tl.where(s > 0, tl.maximum(s, FLT_MIN), 1.0)


@triton.jit
def _fp8_scale_index(l, t, h, T, H, SCOPE: tl.constexpr):
    """Index of the scale of rows (l, t, h) for the scope (tensor / head / token_head)."""
    if SCOPE == 0:
        return l + 0 * t
    elif SCOPE == 1:
        return l * H + h
    else:
        return (l * T + t) * H + h


@triton.jit
def _q_fp8(x_ptr, codes_ptr, scale_ptr, amax_ptr, T, H, s_l, s_t, s_h,
           D: tl.constexpr, DP: tl.constexpr, TB: tl.constexpr, HB: tl.constexpr,
           GC: tl.constexpr, CV: tl.constexpr, SCOPE: tl.constexpr, COMPUTE: tl.constexpr):
    # Rows (token, head) as a [NC chunks, RB rows, GC] block, as in _q_int_channel.
    FMAX: tl.constexpr = 448.0
    NC: tl.constexpr = DP // GC
    l, t, h, xrow, row, rmask = _rows_program(T, H, s_l, s_t, s_h, DP, 1, TB, HB, 1)
    d = _row_chunks(NC, GC)
    x = _load_d(x_ptr + (xrow[:, None, None] + d), d, D, DP).to(tl.float32)
    sidx = _fp8_scale_index(l, t, h, T, H, SCOPE)
    if COMPUTE:
        if SCOPE == 2:
            amax = _rmax(_rmax(_finite_abs(x), 2), 1)
        else:
            amax = tl.load(amax_ptr + sidx).to(tl.float32, bitcast=True)
        s = _fp8_scale(amax)
        if SCOPE == 2:
            tl.store(scale_ptr + sidx, s, mask=rmask)
        elif SCOPE == 1:
            tl.store(scale_ptr + sidx, s, mask=rmask & (t == 0))
        else:
            tl.store(scale_ptr + sidx, s, mask=rmask & (t == 0) & (h == 0))
    else:
        s = tl.load(scale_ptr + sidx)
    inv = tl.minimum(tl.math.div_rn(tl.full(s.shape, 1.0, tl.float32), s), FLT_MAX)
    y = x * inv[:, None, None]
    # the spec's saturation, explicit on every device (the GPU's cvt.rn.satfinite would do it
    # alone; the interpreter's cast would not): +-Inf and overflow -> +-448, NaN stays NaN
    y = tl.minimum(tl.maximum(y, -FMAX, propagate_nan=tl.PropagateNan.ALL), FMAX, propagate_nan=tl.PropagateNan.ALL)
    c = y.to(tl.float8e4nv).to(tl.uint8, bitcast=True)
    cp = codes_ptr + tl.max_contiguous(row[:, None, None] * D + d, [1, 1, CV])
    if D == DP:
        tl.store(cp, c, mask=rmask[:, None, None])
    else:
        tl.store(cp, c, mask=rmask[:, None, None] & (d < D))


@triton.jit
def _dq_fp8(codes_ptr, scale_ptr, out_ptr, T, H, s_l, s_t, s_h,
            D: tl.constexpr, DP: tl.constexpr, TB: tl.constexpr, HB: tl.constexpr,
            GC: tl.constexpr, SCOPE: tl.constexpr, CV: tl.constexpr):
    NC: tl.constexpr = DP // GC
    l, t, h, orow, row, rmask = _rows_program(T, H, s_l, s_t, s_h, DP, 1, TB, HB, 1)
    d = _row_chunks(NC, GC)
    s = tl.load(scale_ptr + _fp8_scale_index(l, t, h, T, H, SCOPE))[:, None, None]
    c = _load_d(codes_ptr + tl.max_contiguous(row[:, None, None] * D + d, [1, 1, CV]), d, D, DP)
    y = c.to(tl.float8e4nv, bitcast=True).to(tl.float32) * s
    y = y.to(out_ptr.dtype.element_ty)
    if D == DP:
        tl.store(out_ptr + (orow[:, None, None] + d), y, mask=rmask[:, None, None])
    else:
        tl.store(out_ptr + (orow[:, None, None] + d), y, mask=rmask[:, None, None] & (d < D))

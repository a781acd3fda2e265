"""Triton quantize / dequantize (docs/quant-spec.md; the torch reference is the spec).

Same functions and conventions as ``kvkernels/reference/quant.py``:

* ``quantize_into(x, fmt, codes, scale, zero, compute_scale)``: ``x`` ``[L, T, H, D]``
  bf16/fp16/fp32 with ``stride(-1) == 1`` (other strides arbitrary); ``codes`` contiguous uint8
  ``[L, T, H, D*bits/8]``; ``scale``/``zero`` contiguous float32 of ``fmt.scale_shape``.
* ``dequantize_into(codes, scale, zero, fmt, out)``: ``out`` ``[L, T, H, D]``, ``stride(-1) == 1``.
* ``supports(t, fmt)``: why this backend cannot run a case (None if it can).

Kernels (all memory bound):

* int ``channel`` quantize: one block row per group, ``[RB groups, GP channels]`` (int8) or
  ``[RB, GP/K, K]`` (int4/int2: channel ``j = jb*K + k``, so packing is an in-thread sum of
  shifted codes over the last axis). ``G`` is padded to a power of two and masked, so head_dim
  80/96 and any ``G`` dividing ``D`` (and a multiple of ``K``) work; ~16 KiB of input per program.
* rows kernels (int ``channel`` dequantize, fp8 quantize/dequantize): a program owns ``ROWS``
  (layer, token, head) rows as a ``[ROWS, NGP, GP]`` / ``[ROWS, DP]`` block.
  All row addresses come from the layer/token/head strides in int64.
* int ``token`` quantize: a program (1 warp) owns one (layer, token group, head); the channels
  are taken as ``K`` strided ``[TB, 1, D/K]`` blocks (one per code position in the byte),
  min/max reduce over the tokens (axis 0) and the codes are ORed into the bytes; groups longer
  than ``TB`` tokens take two passes over chunks (codes ORed into memory per position).
  int ``token`` dequantize loops over ``[TB, HB, DP]`` chunks with the group's scale/zero in
  registers.
* fp8 ``tensor``/``head`` scopes with computed scales: an amax kernel (``atomic_max`` on the
  float bits as int32 into a zeroed buffer; |x| >= 0 so int order is float order) runs first.

Quantize math is float32 as in docs/quant-spec.md: IEEE divisions (``div_rn``) once per group /
scale for ``scale`` and the clamped reciprocal ``inv``, then sub/mul/add per element; kernels are
compiled with ``enable_fp_fusion=False`` so that nothing is contracted into an FMA (dequantize
is then bit-identical to the reference too). Codes: first channel in the low bits.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

from ..formats import QuantFormat

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_SCOPE = {"tensor": 0, "head": 1, "token_head": 2}
_MAX_D = 4096
FLT_MAX: tl.constexpr = tl.constexpr(3.4028234663852886e38)


def _p2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


# ---------------------------------------------------------------------------------------------
# kernels
# ---------------------------------------------------------------------------------------------
@triton.jit
def _int_params(mn, mx, QMAX: tl.constexpr):
    """Per group: scale = (mx - mn) / qmax and inv = min(qmax / (mx - mn), FLT_MAX), both IEEE."""
    rng = mx - mn
    scale = tl.math.div_rn(rng, tl.full(rng.shape, QMAX, tl.float32))
    inv = tl.minimum(tl.math.div_rn(tl.full(rng.shape, QMAX, tl.float32), rng), FLT_MAX)
    return scale, inv


@triton.jit
def _int_codes(x, mn, inv, pos, QMAX: tl.constexpr):
    """clamp(floor((x - mn) * inv + 0.5), 0, qmax) (sub, mul, add: three roundings, no FMA),
    0 where scale == 0; int32. x >= mn, so the value is >= 0.5 and truncation is floor."""
    v = (x - mn) * inv + 0.5
    q = tl.minimum(v.to(tl.int32), QMAX)
    return tl.where(pos, q, 0)


@triton.jit
def _row_offsets(pid, R, T, H, s_l, s_t, s_h, ROWS: tl.constexpr):
    rows = pid * ROWS + tl.arange(0, ROWS)
    rmask = rows < R
    rows = tl.where(rmask, rows, 0)
    h = rows % H
    lt = rows // H
    t = lt % T
    l = lt // T
    off = l.to(tl.int64) * s_l + t.to(tl.int64) * s_t + h.to(tl.int64) * s_h
    return rows, rmask, l, t, h, off


@triton.jit
def _q_int_channel(x_ptr, codes_ptr, scale_ptr, zero_ptr, RG, T, H, s_l, s_t, s_h,
                   G: tl.constexpr, NG: tl.constexpr, GP: tl.constexpr, BITS: tl.constexpr,
                   RB: tl.constexpr):
    # One block row per group, loaded as [RB groups, GPB bytes, K codes per byte] (channel
    # j = jb * K + k), so packing is a sum over the in-thread last axis. Group rg = row * NG + g.
    QMAX: tl.constexpr = (1 << BITS) - 1
    K: tl.constexpr = 8 // BITS
    GB: tl.constexpr = G // K          # bytes per group
    GPB: tl.constexpr = GP // K
    pid = tl.program_id(0)
    rg = pid * RB + tl.arange(0, RB)
    gmask = rg < RG
    rg = tl.where(gmask, rg, 0)
    g = rg % NG
    r = rg // NG
    h = r % H
    lt = r // H
    t = lt % T
    l = lt // T
    xoff = l.to(tl.int64) * s_l + t.to(tl.int64) * s_t + h.to(tl.int64) * s_h + g * G
    rg64 = rg.to(tl.int64)
    jb = tl.arange(0, GPB)
    if G == GP:
        bmask = gmask[:, None]
    else:
        bmask = gmask[:, None] & (jb[None, :] < GB)
    if K == 1:  # int8: a plain [RB, GP] block
        x = tl.load(x_ptr + (xoff[:, None] + jb[None, :]), mask=bmask, other=0.0).to(tl.float32)
        mn = tl.min(tl.where(bmask, x, float("inf")), axis=1)               # [RB]
        mx = tl.max(tl.where(bmask, x, float("-inf")), axis=1)
    else:
        k = tl.arange(0, K)
        j = jb[:, None] * K + k[None, :]                                    # [GPB, K]
        mask = bmask[:, :, None]
        x = tl.load(x_ptr + (xoff[:, None, None] + j[None, :, :]), mask=mask, other=0.0).to(tl.float32)
        mn = tl.min(tl.min(tl.where(mask, x, float("inf")), axis=2), axis=1)
        mx = tl.max(tl.max(tl.where(mask, x, float("-inf")), axis=2), axis=1)
    mn = tl.where(gmask, mn, 0.0)  # keep masked-out groups finite
    mx = tl.where(gmask, mx, 0.0)
    scale, inv = _int_params(mn, mx, QMAX)
    pos = scale > 0
    tl.store(scale_ptr + rg64, scale, mask=gmask)
    tl.store(zero_ptr + rg64, mn, mask=gmask)
    if K == 1:
        b = _int_codes(x, mn[:, None], inv[:, None], pos[:, None], QMAX)
    else:
        q = _int_codes(x, mn[:, None, None], inv[:, None, None], pos[:, None, None], QMAX)
        b = tl.sum(q << (k * BITS)[None, None, :], axis=2)                  # [RB, GPB]
    tl.store(codes_ptr + (rg64[:, None] * GB + jb[None, :]), b.to(tl.uint8), mask=bmask)


@triton.jit
def _dq_int_channel(codes_ptr, scale_ptr, zero_ptr, out_ptr, R, T, H, s_l, s_t, s_h,
                    G: tl.constexpr, NG: tl.constexpr, GP: tl.constexpr, NGP: tl.constexpr,
                    BITS: tl.constexpr, ROWS: tl.constexpr):
    K: tl.constexpr = 8 // BITS
    GB: tl.constexpr = G // K
    GPB: tl.constexpr = GP // K
    DB: tl.constexpr = NG * GB
    pid = tl.program_id(0)
    rows, rmask, l, t, h, ooff = _row_offsets(pid, R, T, H, s_l, s_t, s_h, ROWS)
    r64 = rows.to(tl.int64)
    g = tl.arange(0, NGP)
    j = tl.arange(0, GP)
    col = g[:, None] * G + j[None, :]
    mask = rmask[:, None, None] & ((g[:, None] < NG) & (j[None, :] < G))[None, :, :]
    gmask = rmask[:, None] & (g[None, :] < NG)
    soff = r64[:, None] * NG + g[None, :]
    scale = tl.load(scale_ptr + soff, mask=gmask, other=0.0)
    zero = tl.load(zero_ptr + soff, mask=gmask, other=0.0)
    if K == 1:
        q = tl.load(codes_ptr + (r64[:, None, None] * DB + col[None, :, :]), mask=mask, other=0).to(tl.int32)
    else:
        jb = tl.arange(0, GPB)
        bcol = g[:, None] * GB + jb[None, :]
        bmask = rmask[:, None, None] & ((g[:, None] < NG) & (jb[None, :] < GB))[None, :, :]
        c = tl.load(codes_ptr + (r64[:, None, None] * DB + bcol[None, :, :]), mask=bmask, other=0).to(tl.int32)
        sh = tl.arange(0, K) * BITS
        q = (c[:, :, :, None] >> sh[None, None, None, :]) & ((1 << BITS) - 1)
        q = tl.reshape(q, (ROWS, NGP, GP))
    y = q.to(tl.float32) * scale[:, :, None] + zero[:, :, None]
    tl.store(out_ptr + (ooff[:, None, None] + col[None, :, :]), y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _q_int_token(x_ptr, codes_ptr, scale_ptr, zero_ptr, T, H, NGT, s_l, s_t, s_h,
                 D: tl.constexpr, DP: tl.constexpr, G: tl.constexpr, TB: tl.constexpr,
                 HB: tl.constexpr, BITS: tl.constexpr):
    # A program owns one (layer, token group) and HB heads. Channels are taken as K strided
    # [TB tokens, HB heads, DPB bytes] blocks, one per code position k in the byte
    # (channel d = db * K + k); each is reduced over its tokens and ORed into the bytes.
    QMAX: tl.constexpr = (1 << BITS) - 1
    K: tl.constexpr = 8 // BITS
    DB: tl.constexpr = D // K
    DPB: tl.constexpr = DP // K
    NCH: tl.constexpr = (G + TB - 1) // TB
    pid = tl.program_id(0)
    l = pid // NGT
    tg = pid % NGT
    h = tl.program_id(1) * HB + tl.arange(0, HB)
    db = tl.arange(0, DPB)
    i = tl.arange(0, TB)
    hb_mask = (h[:, None] < H) & (db[None, :] < DB)                          # [HB, DPB]
    base = l.to(tl.int64) * s_l
    hb_off = h.to(tl.int64)[:, None] * s_h + db[None, :] * K                # [HB, DPB]
    s_base = ((l.to(tl.int64) * NGT + tg) * H + h.to(tl.int64)[:, None]) * D + db[None, :] * K
    t0 = tg * G
    if NCH == 1:
        t = t0 + i
        tmask = (i < G) & (t < T)
        m = tmask[:, None, None] & hb_mask[None, :, :]
        ptrs = x_ptr + (base + t.to(tl.int64)[:, None, None] * s_t + hb_off[None, :, :])
        crow = (l.to(tl.int64) * T + t.to(tl.int64)[:, None]) * H + h.to(tl.int64)[None, :]
        acc = tl.zeros((TB, HB, DPB), tl.int32)
        for k in tl.static_range(K):
            x = tl.load(ptrs + k, mask=m, other=0.0).to(tl.float32)
            mn = tl.min(tl.where(m, x, float("inf")), axis=0)               # [HB, DPB]
            mx = tl.max(tl.where(m, x, float("-inf")), axis=0)
            mn = tl.where(hb_mask, mn, 0.0)  # keep masked-out lanes finite
            mx = tl.where(hb_mask, mx, 0.0)
            scale, inv = _int_params(mn, mx, QMAX)
            tl.store(scale_ptr + (s_base + k), scale, mask=hb_mask)
            tl.store(zero_ptr + (s_base + k), mn, mask=hb_mask)
            q = _int_codes(x, mn[None], inv[None], (scale > 0)[None], QMAX)
            acc = acc | (q << (k * BITS))
        tl.store(codes_ptr + (crow[:, :, None] * DB + db[None, None, :]), acc.to(tl.uint8), mask=m)
    else:
        # groups longer than one block: per code position k, pass 1 reduces the group chunk by
        # chunk, pass 2 reloads the chunks and ORs the codes into the bytes in memory (the bytes
        # are written at k = 0; each thread reads back only bytes it wrote itself)
        for k in tl.static_range(K):
            mn = tl.full((HB, DPB), float("inf"), tl.float32)
            mx = tl.full((HB, DPB), float("-inf"), tl.float32)
            for c in range(NCH):
                ii = c * TB + i
                t = t0 + ii
                m = ((ii < G) & (t < T))[:, None, None] & hb_mask[None, :, :]
                x = tl.load(x_ptr + (base + t.to(tl.int64)[:, None, None] * s_t + hb_off[None, :, :] + k),
                            mask=m, other=0.0).to(tl.float32)
                mn = tl.minimum(mn, tl.min(tl.where(m, x, float("inf")), axis=0))
                mx = tl.maximum(mx, tl.max(tl.where(m, x, float("-inf")), axis=0))
            mn = tl.where(hb_mask, mn, 0.0)
            mx = tl.where(hb_mask, mx, 0.0)
            scale, inv = _int_params(mn, mx, QMAX)
            tl.store(scale_ptr + (s_base + k), scale, mask=hb_mask)
            tl.store(zero_ptr + (s_base + k), mn, mask=hb_mask)
            for c in range(NCH):
                ii = c * TB + i
                t = t0 + ii
                m = ((ii < G) & (t < T))[:, None, None] & hb_mask[None, :, :]
                x = tl.load(x_ptr + (base + t.to(tl.int64)[:, None, None] * s_t + hb_off[None, :, :] + k),
                            mask=m, other=0.0).to(tl.float32)
                q = _int_codes(x, mn[None], inv[None], (scale > 0)[None], QMAX) << (k * BITS)
                crow = (l.to(tl.int64) * T + t.to(tl.int64)[:, None]) * H + h.to(tl.int64)[None, :]
                cptr = codes_ptr + (crow[:, :, None] * DB + db[None, None, :])
                if k > 0:
                    q = q | tl.load(cptr, mask=m, other=0).to(tl.int32)
                tl.store(cptr, q.to(tl.uint8), mask=m)


@triton.jit
def _dq_int_token(codes_ptr, scale_ptr, zero_ptr, out_ptr, T, H, NGT, s_l, s_t, s_h,
                  D: tl.constexpr, DP: tl.constexpr, G: tl.constexpr, TB: tl.constexpr,
                  HB: tl.constexpr, BITS: tl.constexpr):
    K: tl.constexpr = 8 // BITS
    DB: tl.constexpr = D // K
    DPB: tl.constexpr = DP // K
    NCH: tl.constexpr = (G + TB - 1) // TB
    pid = tl.program_id(0)
    l = pid // NGT
    tg = pid % NGT
    h = tl.program_id(1) * HB + tl.arange(0, HB)
    d = tl.arange(0, DP)
    i = tl.arange(0, TB)
    hd_mask = (h[:, None] < H) & (d[None, :] < D)
    soff = ((l.to(tl.int64) * NGT + tg) * H + h.to(tl.int64)[:, None]) * D + d[None, :]
    scale = tl.load(scale_ptr + soff, mask=hd_mask, other=0.0)
    zero = tl.load(zero_ptr + soff, mask=hd_mask, other=0.0)
    base = l.to(tl.int64) * s_l
    hd_off = h.to(tl.int64)[:, None] * s_h + d[None, :]
    t0 = tg * G
    for c in range(NCH):
        ii = c * TB + i
        t = t0 + ii
        tmask = (ii < G) & (t < T)
        m = tmask[:, None, None] & hd_mask[None, :, :]
        crow = (l.to(tl.int64) * T + t.to(tl.int64)[:, None]) * H + h.to(tl.int64)[None, :]
        if K == 1:
            q = tl.load(codes_ptr + (crow[:, :, None] * DB + d[None, None, :]), mask=m, other=0).to(tl.int32)
        else:
            db = tl.arange(0, DPB)
            bm = tmask[:, None, None] & ((h[:, None] < H) & (db[None, :] < DB))[None, :, :]
            cb = tl.load(codes_ptr + (crow[:, :, None] * DB + db[None, None, :]), mask=bm, other=0).to(tl.int32)
            sh = tl.arange(0, K) * BITS
            q = (cb[:, :, :, None] >> sh[None, None, None, :]) & ((1 << BITS) - 1)
            q = tl.reshape(q, (TB, HB, DP))
        y = q.to(tl.float32) * scale[None, :, :] + zero[None, :, :]
        tl.store(out_ptr + (base + t.to(tl.int64)[:, None, None] * s_t + hd_off[None, :, :]),
                 y.to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def _fp8_amax(x_ptr, amax_ptr, T, H, NTB, s_l, s_t, s_h,
              D: tl.constexpr, DP: tl.constexpr, TB: tl.constexpr, HB: tl.constexpr,
              SCOPE: tl.constexpr):
    pid = tl.program_id(0)
    l = pid // NTB
    t = (pid % NTB) * TB + tl.arange(0, TB)
    h = tl.program_id(1) * HB + tl.arange(0, HB)
    d = tl.arange(0, DP)
    m = (t < T)[:, None, None] & ((h[:, None] < H) & (d[None, :] < D))[None, :, :]
    off = (l.to(tl.int64) * s_l + t.to(tl.int64)[:, None, None] * s_t
           + h.to(tl.int64)[None, :, None] * s_h + d[None, None, :])
    a = tl.abs(tl.load(x_ptr + off, mask=m, other=0.0).to(tl.float32))
    a = tl.max(tl.max(a, axis=2), axis=0)                                  # [HB]
    if SCOPE == 0:
        v = tl.max(a, axis=0)
        tl.atomic_max(amax_ptr + l, v.to(tl.int32, bitcast=True))
    else:
        tl.atomic_max(amax_ptr + (l * H + h), a.to(tl.int32, bitcast=True), mask=h < H)


@triton.jit
def _q_fp8(x_ptr, codes_ptr, scale_ptr, amax_ptr, R, T, H, s_l, s_t, s_h,
           D: tl.constexpr, DP: tl.constexpr, ROWS: tl.constexpr, SCOPE: tl.constexpr,
           COMPUTE: tl.constexpr):
    FMAX: tl.constexpr = 448.0
    pid = tl.program_id(0)
    rows, rmask, l, t, h, xoff = _row_offsets(pid, R, T, H, s_l, s_t, s_h, ROWS)
    r64 = rows.to(tl.int64)
    d = tl.arange(0, DP)
    mask = rmask[:, None] & (d[None, :] < D)
    x = tl.load(x_ptr + (xoff[:, None] + d[None, :]), mask=mask, other=0.0).to(tl.float32)
    if SCOPE == 0:
        sidx = l.to(tl.int64)
    elif SCOPE == 1:
        sidx = l.to(tl.int64) * H + h
    else:
        sidx = r64
    if COMPUTE:
        if SCOPE == 2:
            amax = tl.max(tl.abs(x), axis=1)
        else:
            amax = tl.load(amax_ptr + sidx, mask=rmask, other=0).to(tl.float32, bitcast=True)
        s = tl.math.div_rn(amax, tl.full(amax.shape, FMAX, tl.float32))
        s = tl.where(s > 0, s, 1.0)
        if SCOPE == 2:
            tl.store(scale_ptr + sidx, s, mask=rmask)
        elif SCOPE == 1:
            tl.store(scale_ptr + sidx, s, mask=rmask & (t == 0))
        else:
            tl.store(scale_ptr + sidx, s, mask=rmask & (t == 0) & (h == 0))
    else:
        s = tl.load(scale_ptr + sidx, mask=rmask, other=1.0)
    inv = tl.minimum(tl.math.div_rn(tl.full(s.shape, 1.0, tl.float32), s), FLT_MAX)
    y = x * inv[:, None]
    y = tl.minimum(tl.maximum(y, -FMAX), FMAX)
    c = y.to(tl.float8e4nv).to(tl.uint8, bitcast=True)
    tl.store(codes_ptr + (r64[:, None] * D + d[None, :]), c, mask=mask)


@triton.jit
def _dq_fp8(codes_ptr, scale_ptr, out_ptr, R, T, H, s_l, s_t, s_h,
            D: tl.constexpr, DP: tl.constexpr, ROWS: tl.constexpr, SCOPE: tl.constexpr):
    pid = tl.program_id(0)
    rows, rmask, l, t, h, ooff = _row_offsets(pid, R, T, H, s_l, s_t, s_h, ROWS)
    r64 = rows.to(tl.int64)
    d = tl.arange(0, DP)
    mask = rmask[:, None] & (d[None, :] < D)
    if SCOPE == 0:
        sidx = l.to(tl.int64)
    elif SCOPE == 1:
        sidx = l.to(tl.int64) * H + h
    else:
        sidx = r64
    s = tl.load(scale_ptr + sidx, mask=rmask, other=1.0)
    c = tl.load(codes_ptr + (r64[:, None] * D + d[None, :]), mask=mask, other=0)
    y = c.to(tl.float8e4nv, bitcast=True).to(tl.float32) * s[:, None]
    tl.store(out_ptr + (ooff[:, None] + d[None, :]), y.to(out_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------
# launch helpers
# ---------------------------------------------------------------------------------------------
_LAUNCH = {} if _INTERPRET else {"enable_fp_fusion": False}
_TARGET_ELEMS = 8192  # elements per program (16 KiB of bf16 input)


def _warps(elems: int) -> int:
    return 8 if elems >= 4096 else 4


def _rows_for(width: int, esize: int) -> int:
    """Rows per program so that one program moves ~16 KiB of its wide side."""
    target = max(1, (_TARGET_ELEMS * 2) // max(esize, 1))
    return max(1, min(1024, target // width)) if width <= target else 1


def _pow2_floor(n: int) -> int:
    return 1 << (max(int(n), 1).bit_length() - 1)


def _channel_blocks(D: int, G: int):
    NG = D // G
    return NG, _p2(G), _p2(NG)


def _token_blocks(G: int, H: int, D: int, esize: int):
    DP = _p2(D)
    target = max(DP, (_TARGET_ELEMS * 2) // esize)
    TB = min(_p2(G), max(1, _pow2_floor(target // DP)))
    HB = min(_p2(H), max(1, _pow2_floor(target // (TB * DP))))
    return DP, TB, HB


def _strides(t: torch.Tensor):
    return int(t.stride(0)), int(t.stride(1)), int(t.stride(2))


# ---------------------------------------------------------------------------------------------
# public functions
# ---------------------------------------------------------------------------------------------
def supports(t: torch.Tensor, fmt: QuantFormat) -> Optional[str]:
    """None if these kernels can run ``fmt`` on tensors like ``t`` (x or out), else why not."""
    dev = t.device.type
    if dev == "cpu":
        if os.environ.get("TRITON_INTERPRET") != "1":
            return "CPU tensors need the Triton interpreter (TRITON_INTERPRET=1)"
    elif dev != "cuda":
        return f"tensors on {dev} are not supported (CUDA only)"
    if t.dtype not in _DTYPES:
        return f"dtype {t.dtype} is not supported"
    D = int(t.shape[-1])
    if D > _MAX_D:
        return f"head_dim {D} > {_MAX_D} is not supported"
    if fmt.kind == "fp8":
        if dev == "cuda":
            cap = torch.cuda.get_device_capability(t.device)
            if cap < (8, 9):
                return f"fp8 e4m3 (tl.float8e4nv) needs compute capability >= 8.9, got {cap[0]}.{cap[1]}"
        return None
    k = fmt.per_byte
    if fmt.axis == "channel":
        if fmt.group_size % k:
            return f"group_size {fmt.group_size} is not a multiple of {k} codes per byte for {fmt}"
        if _p2(fmt.group_size) * _p2(D // max(fmt.group_size, 1)) > 4 * _MAX_D:
            return f"head_dim {D} with group_size {fmt.group_size} is too large a block"
    return None


def quantize_into(x, fmt: QuantFormat, codes, scale, zero, compute_scale: bool = True) -> None:
    L, T, H, D = x.shape
    R = L * T * H
    if R == 0:
        return
    s_l, s_t, s_h = _strides(x)
    es = x.element_size()
    if fmt.kind == "fp8":
        scope = _SCOPE[fmt.scope]
        DP = _p2(D)
        ROWS = _rows_for(DP, es)
        amax = scale  # placeholder pointer when unused
        if compute_scale and scope != 2:
            amax = torch.zeros(scale.shape, dtype=torch.int32, device=x.device)
            tDP, TB, HB = _token_blocks(1 << 30, H, D, es)
            NTB = triton.cdiv(T, TB)
            _fp8_amax[(L * NTB, triton.cdiv(H, HB))](
                x, amax, T, H, NTB, s_l, s_t, s_h, D=D, DP=tDP, TB=TB, HB=HB, SCOPE=scope,
                num_warps=_warps(TB * HB * tDP), **_LAUNCH)
        _q_fp8[(triton.cdiv(R, ROWS),)](
            x, codes, scale, amax, R, T, H, s_l, s_t, s_h, D=D, DP=DP, ROWS=ROWS, SCOPE=scope,
            COMPUTE=bool(compute_scale), num_warps=_warps(ROWS * DP), **_LAUNCH)
        return
    G = fmt.group_size
    if fmt.axis == "channel":
        NG, GP, _ = _channel_blocks(D, G)
        RB = _rows_for(GP, es)
        RG = R * NG
        _q_int_channel[(triton.cdiv(RG, RB),)](
            x, codes, scale, zero, RG, T, H, s_l, s_t, s_h, G=G, NG=NG, GP=GP,
            BITS=fmt.bits, RB=RB, num_warps=_warps(RB * GP), **_LAUNCH)
    else:
        NGT = triton.cdiv(T, G)
        # Measured on H100 (bf16 [32, 4096, 8, 128], G = 32): one warp per (layer, group, head)
        # with short token chunks is fastest; cross-warp reductions over tokens were 3-5x slower.
        DP = _p2(D)
        TB = min(_p2(G), 16 if fmt.bits == 8 else 8)
        HB = 1
        nw = 1 if TB * DP <= 4096 else 2
        _q_int_token[(L * NGT, triton.cdiv(H, HB))](
            x, codes, scale, zero, T, H, NGT, s_l, s_t, s_h, D=D, DP=DP, G=G, TB=TB, HB=HB,
            BITS=fmt.bits, num_warps=nw, **_LAUNCH)


def dequantize_into(codes, scale, zero, fmt: QuantFormat, out) -> None:
    L, T, H, D = out.shape
    R = L * T * H
    if R == 0:
        return
    s_l, s_t, s_h = _strides(out)
    es = out.element_size()
    if fmt.kind == "fp8":
        DP = _p2(D)
        ROWS = _rows_for(DP, es)
        _dq_fp8[(triton.cdiv(R, ROWS),)](
            codes, scale, out, R, T, H, s_l, s_t, s_h, D=D, DP=DP, ROWS=ROWS,
            SCOPE=_SCOPE[fmt.scope], num_warps=_warps(ROWS * DP), **_LAUNCH)
        return
    G = fmt.group_size
    if fmt.axis == "channel":
        NG, GP, NGP = _channel_blocks(D, G)
        ROWS = _rows_for(GP * NGP, es)
        _dq_int_channel[(triton.cdiv(R, ROWS),)](
            codes, scale, zero, out, R, T, H, s_l, s_t, s_h, G=G, NG=NG, GP=GP, NGP=NGP,
            BITS=fmt.bits, ROWS=ROWS, num_warps=_warps(ROWS * GP * NGP), **_LAUNCH)
    else:
        NGT = triton.cdiv(T, G)
        DP, TB, HB = _token_blocks(G, H, D, es)
        _dq_int_token[(L * NGT, triton.cdiv(H, HB))](
            codes, scale, zero, out, T, H, NGT, s_l, s_t, s_h, D=D, DP=DP, G=G, TB=TB, HB=HB,
            BITS=fmt.bits, num_warps=_warps(TB * HB * DP), **_LAUNCH)

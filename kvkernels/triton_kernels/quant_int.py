"""Triton kernels for the int formats: channel groups (quantize, dequantize, the flat sub-byte
dequantize) and token groups (quantize, incl. the packed bf16x2/f16x2 path, and dequantize),
with their launch helpers. See quant.py for the design."""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .quant_common import (
    _INTERPRET, _LAUNCH, _capability, _channel_dims, _code_to_float, _int_codes, _int_params, _int_params_plain,
    _load_d, _max_nan_fn, _min_nan_fn, _minmax_fin, _minmax_fin_fn, _not_plain, _p2, _rmax, _rmin, _row_chunks,
    _rows_launch, _rows_program, _unpack,
)


@triton.jit
def _q_int_channel(x_ptr, codes_ptr, scale_ptr, zero_ptr, T, H, s_l, s_t, s_h,
                   G: tl.constexpr, NG: tl.constexpr, GP: tl.constexpr, NGP: tl.constexpr,
                   BITS: tl.constexpr, TB: tl.constexpr, HB: tl.constexpr, GC: tl.constexpr,
                   CV: tl.constexpr):
    # Block [RB groups, NC chunks, GC channels] (channel j = c*GC + jj of a group row). GC =
    # lanes per group x one 16-byte vector; with Triton 3.6's layouts (dims of equal contiguity
    # in ascending order) a warp's lanes span GC/vector pieces x consecutive groups and each
    # thread holds NC vectors of its group (e.g. g32 bf16: GC = 8, a whole group per thread),
    # so the min/max needs no (or few) shuffles and few lanes repeat a group's divisions.
    # NaN-propagating min / max: a program whose groups are all plain (_not_plain: finite
    # values, a range that fits float32) takes the fast path (_int_params_plain, codes without
    # saturation: the instructions of the kernel before the non-finite policy); the others
    # (rare) the general one: the finite values' min / max, _int_params, saturated codes. Each
    # branch stores its own results (sm_90: 84-88 registers, 80 for the fast path alone; the
    # general pass as a second, noinline call after the fast one: 90-94).
    QMAX: tl.constexpr = (1 << BITS) - 1
    NC: tl.constexpr = GP // GC
    RB: tl.constexpr = TB * HB * NGP
    _, _, _, xrow, grp, rmask = _rows_program(T, H, s_l, s_t, s_h, G, NG, TB, HB, NGP)
    j = _row_chunks(NC, GC)                                                 # [1, NC, GC]
    xp = x_ptr + (xrow[:, None, None] + j)
    if G == GP:
        x = tl.load(xp).to(tl.float32)
        mn = _rmin(_rmin(x, 2), 1)                                          # [RB]
        mx = _rmax(_rmax(x, 2), 1)
    else:
        jm = j < G
        x = tl.load(xp, mask=jm, other=0.0).to(tl.float32)
        mn = _rmin(_rmin(tl.where(jm, x, float("inf")), 2), 1)
        mx = _rmax(_rmax(tl.where(jm, x, float("-inf")), 2), 1)
    if tl.max(_not_plain(mn, mx), 0) > 0:
        if G == GP:
            mn, mx = _minmax_fin(x, 2)
        else:  # padding lanes: NaN drops them from the finite min / max
            mn, mx = _minmax_fin(tl.where(jm, x, float("nan")), 2)
        mn, mx = tl.reduce((mn, mx), 1, _minmax_fin_fn)
        mn, p, mnp, scale, inv = _int_params(mn, mx, QMAX)
        tl.store(scale_ptr + grp, scale, mask=rmask)
        tl.store(zero_ptr + grp, mn, mask=rmask)
        _q_channel_codes(x, p[:, None, None], mnp[:, None, None], inv[:, None, None], codes_ptr, grp, rmask,
                         G, GP, BITS, NC, GC, CV, RB, True)
    else:
        scale, inv = _int_params_plain(mn, mx, QMAX)
        tl.store(scale_ptr + grp, scale, mask=rmask)
        tl.store(zero_ptr + grp, mn, mask=rmask)
        _q_channel_codes(x, 1.0, mn[:, None, None], inv[:, None, None], codes_ptr, grp, rmask,
                         G, GP, BITS, NC, GC, CV, RB, False)


@triton.jit
def _q_channel_codes(x, p, mnp, inv, codes_ptr, grp, rmask, G: tl.constexpr, GP: tl.constexpr,
                     BITS: tl.constexpr, NC: tl.constexpr, GC: tl.constexpr, CV: tl.constexpr,
                     RB: tl.constexpr, SAT: tl.constexpr):
    """_q_int_channel's codes of a program's groups, packed and stored."""
    K: tl.constexpr = 8 // BITS
    GB: tl.constexpr = G // K          # code bytes per group
    GCB: tl.constexpr = GC // K
    q = _int_codes(x, p, mnp, inv, (1 << BITS) - 1, SAT)
    if K > 1:
        q = tl.reshape(q, (RB, NC, GCB, K))
        q = tl.sum(q << (tl.arange(0, K) * BITS)[None, None, None, :], axis=3)   # [RB, NC, GCB]
    jb = _row_chunks(NC, GCB)
    # CV = code bytes per thread piece: stores in the layout the codes were computed in
    coff = tl.max_contiguous(grp[:, None, None] * GB + jb, [1, 1, CV])
    if G == GP:
        tl.store(codes_ptr + coff, q.to(tl.uint8), mask=rmask[:, None, None])
    else:
        tl.store(codes_ptr + coff, q.to(tl.uint8), mask=rmask[:, None, None] & (jb < GB))


@triton.jit
def _dq_int_channel(codes_ptr, scale_ptr, zero_ptr, out_ptr, T, H, s_l, s_t, s_h,
                    G: tl.constexpr, NG: tl.constexpr, GP: tl.constexpr, NGP: tl.constexpr,
                    BITS: tl.constexpr, TB: tl.constexpr, HB: tl.constexpr, GC: tl.constexpr,
                    CV: tl.constexpr):
    # Same block as _q_int_channel; codes are loaded CV bytes per thread piece (the layout of
    # the output's 16-byte vectors after unpacking).
    K: tl.constexpr = 8 // BITS
    GB: tl.constexpr = G // K
    NC: tl.constexpr = GP // GC
    GCB: tl.constexpr = GC // K
    RB: tl.constexpr = TB * HB * NGP
    _, _, _, orow, grp, rmask = _rows_program(T, H, s_l, s_t, s_h, G, NG, TB, HB, NGP)
    scale = tl.load(scale_ptr + grp)[:, None, None]
    zero = tl.load(zero_ptr + grp)[:, None, None]
    jb = _row_chunks(NC, GCB)
    cp = codes_ptr + tl.max_contiguous(grp[:, None, None] * GB + jb, [1, 1, CV])
    if G == GP:
        c = tl.load(cp).to(tl.int32)
    else:
        c = tl.load(cp, mask=jb < GB, other=0).to(tl.int32)
    q = _unpack(c, BITS, (RB, NC, GC))
    y = tl.fma(_code_to_float(q), scale, zero).to(out_ptr.dtype.element_ty)
    j = _row_chunks(NC, GC)
    if G == GP:
        tl.store(out_ptr + (orow[:, None, None] + j), y, mask=rmask[:, None, None])
    else:
        tl.store(out_ptr + (orow[:, None, None] + j), y, mask=rmask[:, None, None] & (j < G))


@triton.jit
def _dq_int_channel_flat(codes_ptr, scale_ptr, zero_ptr, out_ptr, R, T, H, s_l, s_t, s_h,
                         G: tl.constexpr, NG: tl.constexpr, GP: tl.constexpr, NGP: tl.constexpr,
                         BITS: tl.constexpr, ROWS: tl.constexpr):
    # Sub-byte channel dequantize, kept from the previous version (measured faster than
    # _dq_int_channel for int4/int2 codes: 93-95% of copy vs 88-93% on an H200): a program
    # owns ROWS flat (layer, token, head) rows as a [ROWS, NGP, GP] block; codes are loaded a
    # group (GP/K bytes) per thread and unpacked with shifts.
    K: tl.constexpr = 8 // BITS
    GB: tl.constexpr = G // K
    GPB: tl.constexpr = GP // K
    DB: tl.constexpr = NG * GB
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    rmask = rows < R
    rows = tl.where(rmask, rows, 0)
    h = rows % H
    t = (rows // H) % T
    l = rows // H // T
    ooff = l.to(tl.int64) * s_l + t.to(tl.int64) * s_t + h.to(tl.int64) * s_h
    r64 = rows.to(tl.int64)
    g = tl.arange(0, NGP)
    j = tl.arange(0, GP)
    col = g[:, None] * G + j[None, :]
    mask = rmask[:, None, None] & ((g[:, None] < NG) & (j[None, :] < G))[None, :, :]
    gmask = rmask[:, None] & (g[None, :] < NG)
    soff = r64[:, None] * NG + g[None, :]
    scale = tl.load(scale_ptr + soff, mask=gmask, other=0.0)
    zero = tl.load(zero_ptr + soff, mask=gmask, other=0.0)
    jb = tl.arange(0, GPB)
    bcol = g[:, None] * GB + jb[None, :]
    bmask = rmask[:, None, None] & ((g[:, None] < NG) & (jb[None, :] < GB))[None, :, :]
    c = tl.load(codes_ptr + (r64[:, None, None] * DB + bcol[None, :, :]), mask=bmask, other=0).to(tl.int32)
    q = (c[:, :, :, None] >> (tl.arange(0, K) * BITS)[None, None, None, :]) & ((1 << BITS) - 1)
    q = tl.reshape(q, (ROWS, NGP, GP))
    y = tl.fma(q.to(tl.float32), scale[:, :, None], zero[:, :, None])
    tl.store(out_ptr + (ooff[:, None, None] + col[None, :, :]), y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _q_int_token(x_ptr, codes_ptr, scale_ptr, zero_ptr, T, H, s_l, s_t, s_h, tg0,
                 D: tl.constexpr, DC: tl.constexpr, G: tl.constexpr, TA: tl.constexpr,
                 TL: tl.constexpr, HB: tl.constexpr, BITS: tl.constexpr, VX: tl.constexpr,
                 XS: tl.constexpr, CS: tl.constexpr, PAIRS: tl.constexpr,
                 PART: tl.constexpr):
    # Program: token group pid0; heads [hb*HB, +HB) and channels [dc*DC, +DC) from pid1; layer
    # pid2. Block [TL, HB, TA, DC]: token i = a*TL + b of the group. x is loaded VX = 2K
    # channels per thread (two code bytes), so with Triton 3.6's layouts (dims of equal
    # contiguity in ascending order) a warp's lanes span DC/VX channel pieces x TL tokens,
    # warps span the heads and the TA tokens stay inside each thread: min/max over the tokens
    # is in-thread plus log2(TL) shuffles, few threads compute a channel's scale/inv, and the K
    # channels of a code byte are in one thread. Groups longer than TA*TL tokens take two
    # passes over chunks (min/max, then quantize; the re-read hits L1/L2). Full groups (all but
    # a partial last one) take a path without token clamps or masks. XS / CS: the token strides
    # of x and of the codes (s_t, H * D / K) as constexprs when small (0: use s_t), so that a
    # token's offset is an immediate of the load/store instead of 64-bit arithmetic per token.
    # PART: this launch is the partial last group alone (tg0 = its index; else tg0 = 0 and the
    # launch covers the full groups): the two paths are separate kernels, so the full-group
    # one is not given the register count of the masked one.
    tg = tl.program_id(0) + tg0
    if PART:
        _q_token_group(x_ptr, codes_ptr, scale_ptr, zero_ptr, T, H, s_l, s_t, s_h, tg,
                       D, DC, G, TA, TL, HB, BITS, VX, XS, CS, False)
    elif PAIRS:
        _q_token_group_x2(x_ptr, codes_ptr, scale_ptr, zero_ptr, T, H, s_l, s_t, s_h, tg,
                          D, DC, G, TA, TL, HB, BITS, VX, XS, CS)
    else:
        _q_token_group(x_ptr, codes_ptr, scale_ptr, zero_ptr, T, H, s_l, s_t, s_h, tg,
                       D, DC, G, TA, TL, HB, BITS, VX, XS, CS, True)


@triton.jit
def _stride(S: tl.constexpr, s):
    """The constexpr stride S if given (> 0), else the run-time one."""
    if S > 0:
        return S
    else:
        return s


@triton.jit
def _token_rows(i, c, CH: tl.constexpr, G: tl.constexpr, n, FULL: tl.constexpr):
    """Tokens (local to the group) of chunk c, clamped onto the group's last real token (n =
    tokens in this group; G if FULL), and the mask of the real ones (store with it unless
    _token_rows_exact)."""
    ti = c * CH + i
    if FULL:
        if CH * ((G + CH - 1) // CH) == G:
            return ti, ti < G
        else:
            return tl.minimum(ti, G - 1), ti < G
    else:
        return tl.minimum(ti, n - 1), ti < n


@triton.jit
def _token_rows_exact(CH: tl.constexpr, G: tl.constexpr, FULL: tl.constexpr):
    """True if every token of every chunk is a real one (no store mask needed)."""
    return FULL and CH * ((G + CH - 1) // CH) == G


@triton.jit
def _token_program(H, D: tl.constexpr, DC: tl.constexpr, HB: tl.constexpr):
    """Token-group quantize programs: (layer as int64, channel block, the HB heads clamped onto
    the last real one, the mask of the real heads) from program ids 2 and 1."""
    NDC: tl.constexpr = (D + DC - 1) // DC
    h = (tl.program_id(1) // NDC) * HB + tl.arange(0, HB)
    return tl.program_id(2).to(tl.int64), tl.program_id(1) % NDC, tl.minimum(h, H - 1), h < H


# Packed (min, max) per 16-bit half of int32 words. NaN-propagating (min.NaN / max.NaN) for the
# plain programs, NaN-ignoring (a NaN half gives the other operand's, NaN only if both are) on the
# finite-only path. Four literal-asm functions rather than one taking the type as a string: Triton
# 3.6 does not pass a str constexpr into a jit function called from a reduce combine.
@triton.jit
def _bf16x2_minmax(mn_a, mx_a, mn_b, mx_b):
    return tl.inline_asm_elementwise("min.NaN.bf16x2 $0, $2, $4;\n\tmax.NaN.bf16x2 $1, $3, $5;", "=r,=r,r,r,r,r",
                                     [mn_a, mx_a, mn_b, mx_b], dtype=(tl.int32, tl.int32), is_pure=True, pack=1)


@triton.jit
def _f16x2_minmax(mn_a, mx_a, mn_b, mx_b):
    return tl.inline_asm_elementwise("min.NaN.f16x2 $0, $2, $4;\n\tmax.NaN.f16x2 $1, $3, $5;", "=r,=r,r,r,r,r",
                                     [mn_a, mx_a, mn_b, mx_b], dtype=(tl.int32, tl.int32), is_pure=True, pack=1)


@triton.jit
def _bf16x2_minmax_nonan(mn_a, mx_a, mn_b, mx_b):
    return tl.inline_asm_elementwise("min.bf16x2 $0, $2, $4;\n\tmax.bf16x2 $1, $3, $5;", "=r,=r,r,r,r,r",
                                     [mn_a, mx_a, mn_b, mx_b], dtype=(tl.int32, tl.int32), is_pure=True, pack=1)


@triton.jit
def _f16x2_minmax_nonan(mn_a, mx_a, mn_b, mx_b):
    return tl.inline_asm_elementwise("min.f16x2 $0, $2, $4;\n\tmax.f16x2 $1, $3, $5;", "=r,=r,r,r,r,r",
                                     [mn_a, mx_a, mn_b, mx_b], dtype=(tl.int32, tl.int32), is_pure=True, pack=1)


@triton.jit
def _bf16x2_minmax_fin(mn_a, mx_a, mn_b, mx_b):
    """Packed (min, max) of the finite halves (NaN where neither operand's is): the non-finite
    halves made NaN in the combine, so that no sanitized copy of x is held beside x (registers)."""
    return _bf16x2_minmax_nonan(_x2_nan_nonfinite(mn_a, True), _x2_nan_nonfinite(mx_a, True),
                                _x2_nan_nonfinite(mn_b, True), _x2_nan_nonfinite(mx_b, True))


@triton.jit
def _f16x2_minmax_fin(mn_a, mx_a, mn_b, mx_b):
    return _f16x2_minmax_nonan(_x2_nan_nonfinite(mn_a, False), _x2_nan_nonfinite(mx_a, False),
                               _x2_nan_nonfinite(mn_b, False), _x2_nan_nonfinite(mx_b, False))


@triton.jit
def _x2_nan_nonfinite(w, BF16: tl.constexpr):
    """int32 words of two bf16 / fp16: each half whose exponent is all ones (Inf or NaN) made a
    quiet NaN (its quiet bit set), the others unchanged: integer ops on the packed word, no
    widening (an exponent of all ones plus one exponent step sets the half's bit 15, without a
    carry out of the half)."""
    if BF16:
        t = (w & 0x7F807F80) + 0x00800080
        return w | ((t >> 9) & 0x00400040)    # bit 15 of each half -> its quiet bit 6
    else:
        t = (w & 0x7C007C00) + 0x04000400
        return w | ((t >> 6) & 0x02000200)    # bit 15 -> quiet bit 9


@triton.jit
def _half_lo(w, BF16: tl.constexpr):
    """The float32 value of the 16-bit float in the low half of the int32 w."""
    if BF16:
        return (w << 16).to(tl.float32, bitcast=True)
    else:
        return w.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _half_hi(w, BF16: tl.constexpr):
    """The float32 value of the 16-bit float in the high half of the int32 w."""
    if BF16:
        return (w & -65536).to(tl.float32, bitcast=True)
    else:
        return (w >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _q_token_group_x2(x_ptr, codes_ptr, scale_ptr, zero_ptr, T, H, s_l, s_t, s_h, tg,
                      D: tl.constexpr, DC: tl.constexpr, G: tl.constexpr, TA: tl.constexpr,
                      TL: tl.constexpr, HB: tl.constexpr, BITS: tl.constexpr,
                      VX: tl.constexpr, XS: tl.constexpr, CS: tl.constexpr):
    # A full group of bf16/fp16 x with D % DC == 0, one chunk (TA * TL >= G), 2+ codes per byte
    # and even element strides (the host checks): x is read as int32 words of two channels, the
    # min/max are packed x2 instructions on the words (exact: a min/max picks an element; half
    # the instructions and no widening), and each word is widened (bf16: a shift / a mask) only
    # where a code is computed. Measured on an H200: int4/int2 g32 from 75-86% of copy to 99-101%.
    QMAX: tl.constexpr = (1 << BITS) - 1
    K: tl.constexpr = 8 // BITS
    DB: tl.constexpr = D // K
    DCB: tl.constexpr = DC // K
    DC2: tl.constexpr = DC // 2
    NGT = tl.cdiv(T, G)
    l, dc, h, hmask = _token_program(H, D, DC, HB)
    d2 = dc * DC2 + tl.arange(0, DC2)
    db = dc * DCB + tl.arange(0, DCB)
    t0 = tg * G
    xw_ptr = x_ptr.to(tl.pointer_type(tl.int32))
    xp = xw_ptr + (l * (s_l // 2) + t0.to(tl.int64) * (s_t // 2))
    xp = xp + tl.max_contiguous((h.to(tl.int64)[:, None] * (s_h // 2) + d2[None, :])[None, :, None, :],
                                [1, 1, 1, VX // 2])
    cp = codes_ptr + (l * T + t0) * H * DB
    cp = cp + tl.max_contiguous((h[:, None] * DB + db[None, :])[None, :, None, :], [1, 1, 1, VX // K])
    ti = (tl.arange(0, TA) * TL)[None, :] + tl.arange(0, TL)[:, None]     # [TL, TA]
    if TA * TL > G:
        ti = tl.minimum(ti, G - 1)
    xs = _stride(XS, s_t) // 2
    cs = _stride(CS, H * DB)
    xw = tl.load(xp + (ti.to(tl.int64) * xs)[:, None, :, None])           # [TL, HB, TA, DC2]
    BF16: tl.constexpr = x_ptr.dtype.element_ty == tl.bfloat16
    if BF16:
        mn2, mx2 = tl.reduce(tl.reduce((xw, xw), 2, _bf16x2_minmax), 0, _bf16x2_minmax)  # [HB, DC2]
    else:
        mn2, mx2 = tl.reduce(tl.reduce((xw, xw), 2, _f16x2_minmax), 0, _f16x2_minmax)
    # The packed min / max propagate NaN and include Inf. Every program takes the fast path, as if
    # all its groups were plain (_not_plain: finite values, a range that fits float32; bf16's can
    # reach 2 x 3.39e38); one that holds a group that is not (rare) then does the group work
    # again after a block barrier, from a fresh load of x: the finite halves' min / max (the
    # others made NaN by packed integer ops, NaN-ignoring packed min / max) and saturated codes,
    # over the fast path's stores. The second pass holds nothing of the first live (only
    # pointers and the flag), so the kernel keeps the fast path's register count.
    mn_lo = _half_lo(mn2, BF16)
    mx_lo = _half_lo(mx2, BF16)
    mn_hi = _half_hi(mn2, BF16)
    mx_hi = _half_hi(mx2, BF16)
    bad = tl.max(tl.max(_not_plain(mn_lo, mx_lo) | _not_plain(mn_hi, mx_hi), 1), 0) > 0
    sc_lo, inv_lo = _int_params_plain(mn_lo, mx_lo, QMAX)
    sc_hi, inv_hi = _int_params_plain(mn_hi, mx_hi, QMAX)
    _x2_scales(sc_lo, mn_lo, sc_hi, mn_hi, scale_ptr, zero_ptr, l, NGT, tg, H, h, dc, hmask, D, HB, DC, VX)
    _x2_codes(xw, 1.0, mn_lo[None, :, None, :], inv_lo[None, :, None, :], 1.0, mn_hi[None, :, None, :],
              inv_hi[None, :, None, :], cp, cs, ti, hmask, TA, TL, HB, DC, BITS, BF16, False)
    if bad:
        tl.debug_barrier()   # the fast path's stores (by any thread of the block) come first
        _x2_general(x_ptr, codes_ptr, scale_ptr, zero_ptr, T, H, s_l, s_t, s_h, tg, D, DC, G, TA, TL, HB, BITS,
                    VX, XS, CS)


@triton.jit(noinline=True)
def _x2_general(x_ptr, codes_ptr, scale_ptr, zero_ptr, T, H, s_l, s_t, s_h, tg,
                D: tl.constexpr, DC: tl.constexpr, G: tl.constexpr, TA: tl.constexpr,
                TL: tl.constexpr, HB: tl.constexpr, BITS: tl.constexpr,
                VX: tl.constexpr, XS: tl.constexpr, CS: tl.constexpr):
    """_q_token_group_x2's general path for a program holding a group that is not plain: from
    a fresh load of x, the finite halves' min / max (the others made NaN by packed integer ops,
    NaN-ignoring packed min / max), _int_params and saturated codes, over the fast path's
    stores. A call (noinline), so that nothing of the fast path is shared with it (common
    subexpressions kept live through the fast path cost 58-84 registers when inlined)."""
    QMAX: tl.constexpr = (1 << BITS) - 1
    K: tl.constexpr = 8 // BITS
    DB: tl.constexpr = D // K
    DCB: tl.constexpr = DC // K
    DC2: tl.constexpr = DC // 2
    NGT = tl.cdiv(T, G)
    l, dc, h, hmask = _token_program(H, D, DC, HB)
    d2 = dc * DC2 + tl.arange(0, DC2)
    db = dc * DCB + tl.arange(0, DCB)
    t0 = tg * G
    xp = x_ptr.to(tl.pointer_type(tl.int32)) + (l * (s_l // 2) + t0.to(tl.int64) * (s_t // 2))
    xp = xp + tl.max_contiguous((h.to(tl.int64)[:, None] * (s_h // 2) + d2[None, :])[None, :, None, :],
                                [1, 1, 1, VX // 2])
    cp = codes_ptr + (l * T + t0) * H * DB
    cp = cp + tl.max_contiguous((h[:, None] * DB + db[None, :])[None, :, None, :], [1, 1, 1, VX // K])
    xs = _stride(XS, s_t) // 2
    BF16: tl.constexpr = x_ptr.dtype.element_ty == tl.bfloat16
    # in NS token chunks of TA / NS a thread (the whole block at once: 248 registers)
    NS: tl.constexpr = 4 if TA % 4 == 0 else 1
    TAC: tl.constexpr = TA // NS
    for c in tl.static_range(NS):
        tc, xc = _x2_chunk(xp, xs, c, TAC, TL, TA, G)
        if BF16:
            m2, M2 = tl.reduce(tl.reduce((xc, xc), 2, _bf16x2_minmax_fin), 0, _bf16x2_minmax_fin)
        else:
            m2, M2 = tl.reduce(tl.reduce((xc, xc), 2, _f16x2_minmax_fin), 0, _f16x2_minmax_fin)
        if c == 0:
            mn2, mx2 = m2, M2
        elif BF16:
            mn2, mx2 = _bf16x2_minmax_fin(mn2, mx2, m2, M2)
        else:
            mn2, mx2 = _f16x2_minmax_fin(mn2, mx2, m2, M2)
    # (a reduction over an axis of length 1 applies no combine: filter the result once more)
    mn2 = _x2_nan_nonfinite(mn2, BF16)
    mx2 = _x2_nan_nonfinite(mx2, BF16)
    mn_lo, p_lo, mnp_lo, sc_lo, inv_lo = _int_params(_half_lo(mn2, BF16), _half_lo(mx2, BF16), QMAX)
    mn_hi, p_hi, mnp_hi, sc_hi, inv_hi = _int_params(_half_hi(mn2, BF16), _half_hi(mx2, BF16), QMAX)
    _x2_scales(sc_lo, mn_lo, sc_hi, mn_hi, scale_ptr, zero_ptr, l, NGT, tg, H, h, dc, hmask, D, HB, DC, VX)
    for c in tl.static_range(NS):
        tc, xc = _x2_chunk(xp, xs, c, TAC, TL, TA, G)
        _x2_codes(xc, p_lo[None, :, None, :], mnp_lo[None, :, None, :], inv_lo[None, :, None, :],
                  p_hi[None, :, None, :], mnp_hi[None, :, None, :], inv_hi[None, :, None, :],
                  cp, _stride(CS, H * DB), tc, hmask, TAC, TL, HB, DC, BITS, BF16, True)


@triton.jit
def _x2_chunk(xp, xs, c: tl.constexpr, TAC: tl.constexpr, TL: tl.constexpr, TA: tl.constexpr, G: tl.constexpr):
    """Token chunk c of _x2_general: its tokens [TL, TAC] (clamped onto the group) and words
    [TL, HB, TAC, DC2]."""
    tc = ((c * TAC + tl.arange(0, TAC)) * TL)[None, :] + tl.arange(0, TL)[:, None]
    if TA * TL > G:
        tc = tl.minimum(tc, G - 1)
    return tc, tl.load(xp + (tc.to(tl.int64) * xs)[:, None, :, None])


@triton.jit
def _x2_scales(sc_lo, zp_lo, sc_hi, zp_hi, scale_ptr, zero_ptr, l, NGT, tg, H, h, dc, hmask,
               D: tl.constexpr, HB: tl.constexpr, DC: tl.constexpr, VX: tl.constexpr):
    """_q_token_group_x2's scale / zero stores [HB, DC] (lo / hi halves [HB, DC2] interleaved)."""
    d = dc * DC + tl.arange(0, DC)
    sz = tl.max_contiguous(((l * NGT + tg) * H + h)[:, None] * D + d[None, :], [1, VX])   # [HB, DC]
    tl.store(scale_ptr + sz, tl.reshape(tl.join(sc_lo, sc_hi), (HB, DC)), mask=hmask[:, None])
    tl.store(zero_ptr + sz, tl.reshape(tl.join(zp_lo, zp_hi), (HB, DC)), mask=hmask[:, None])


@triton.jit
def _x2_codes(xw, p_lo, mnp_lo, inv_lo, p_hi, mnp_hi, inv_hi, cp, cs, ti, hmask, TA: tl.constexpr,
              TL: tl.constexpr, HB: tl.constexpr, DC: tl.constexpr, BITS: tl.constexpr, BF16: tl.constexpr,
              SAT: tl.constexpr):
    """_q_token_group_x2's codes of the words xw [TL, HB, TA, DC2] (tokens ti [TL, TA]; p / mnp /
    inv per half: [1, HB, 1, DC2] or a scalar), stored."""
    QMAX: tl.constexpr = (1 << BITS) - 1
    K: tl.constexpr = 8 // BITS
    DCB: tl.constexpr = DC // K
    q = _int_codes(_half_lo(xw, BF16), p_lo, mnp_lo, inv_lo, QMAX, SAT)
    q = q + (_int_codes(_half_hi(xw, BF16), p_hi, mnp_hi, inv_hi, QMAX, SAT) << BITS)
    if K == 4:
        q = tl.sum(tl.reshape(q, (TL, HB, TA, DCB, 2)) << (tl.arange(0, 2) * (2 * BITS))[None, None, None, None, :],
                   axis=4)
    # (tokens past a group shorter than the block are clamped onto its last one: they store
    # that token's codes again, the same bytes)
    tl.store(cp + (ti.to(tl.int64) * cs)[:, None, :, None], q.to(tl.uint8), mask=hmask[None, :, None, None])


@triton.jit
def _q_token_group(x_ptr, codes_ptr, scale_ptr, zero_ptr, T, H, s_l, s_t, s_h, tg,
                   D: tl.constexpr, DC: tl.constexpr, G: tl.constexpr, TA: tl.constexpr,
                   TL: tl.constexpr, HB: tl.constexpr, BITS: tl.constexpr, VX: tl.constexpr,
                   XS: tl.constexpr, CS: tl.constexpr, FULL: tl.constexpr, GEN: tl.constexpr = False):
    # GEN=False, the fast path: NaN-propagating min / max, _int_params_plain and codes without
    # saturation, as if every group were plain; a program holding a group that is not (rare:
    # _not_plain) then runs again with GEN=True after a block barrier (_q_token_group_gen): the
    # finite values' min / max, _int_params and saturated codes, over the fast path's stores.
    QMAX: tl.constexpr = (1 << BITS) - 1
    K: tl.constexpr = 8 // BITS
    DB: tl.constexpr = D // K
    DCB: tl.constexpr = DC // K
    CH: tl.constexpr = TA * TL                 # tokens per chunk
    NCH: tl.constexpr = (G + CH - 1) // CH
    NDC: tl.constexpr = (D + DC - 1) // DC
    NGT = tl.cdiv(T, G)                        # token groups
    l, dc, h, hmask = _token_program(H, D, DC, HB)
    d = dc * DC + tl.arange(0, DC)
    db = dc * DCB + tl.arange(0, DCB)
    if D % DC == 0:
        hd_mask = hmask[:, None]
        cmask = hmask[:, None, None]
    else:  # padded channels load 0; each is reduced on its own and never stored
        hd_mask = hmask[:, None] & (d < D)[None, :]
        cmask = hmask[:, None, None] & (db < DB)[None, None, :]
    t0 = tg * G
    # per-thread pointers at the group's first token [1, HB, 1, DC]; + token offsets below
    xp = x_ptr + (l * s_l + t0.to(tl.int64) * s_t)
    xp = xp + tl.max_contiguous((h.to(tl.int64)[:, None] * s_h + d[None, :])[None, :, None, :], [1, 1, 1, VX])
    cp = codes_ptr + (l * T + t0) * H * DB
    cp = cp + tl.max_contiguous((h[:, None] * DB + db[None, :])[None, :, None, :], [1, 1, 1, VX // K])
    sz = ((l * NGT + tg) * H + h)[:, None] * D + d[None, :]                 # [HB, DC]
    i = (tl.arange(0, TA) * TL)[None, :] + tl.arange(0, TL)[:, None]      # [TL, TA]
    n = tl.minimum(T - t0, G)
    xs = _stride(XS, s_t)
    cs = _stride(CS, H * DB)
    shifts = (tl.arange(0, K) * BITS)[None, None, None, None, :]
    if NCH == 1:
        ti, tmask = _token_rows(i, 0, CH, G, n, FULL)
        x = _load_d(xp + (ti.to(tl.int64) * xs)[:, None, :, None], d, D, DC * NDC).to(tl.float32)
        if GEN:
            mn, mx = _minmax_fin(x, 2)
            mn, mx = tl.reduce((mn, mx), 0, _minmax_fin_fn)                 # [HB, DC]
        else:
            mn = _rmin(_rmin(x, 2), 0)                                      # [HB, DC]
            mx = _rmax(_rmax(x, 2), 0)
    else:
        if GEN:
            mn = tl.full((HB, DC), float("nan"), tl.float32)
            mx = tl.full((HB, DC), float("nan"), tl.float32)
        else:
            mn = tl.full((HB, DC), float("inf"), tl.float32)
            mx = tl.full((HB, DC), float("-inf"), tl.float32)
        for c in range(NCH):
            ti, tmask = _token_rows(i, c, CH, G, n, FULL)
            x = _load_d(xp + (ti.to(tl.int64) * xs)[:, None, :, None], d, D, DC * NDC).to(tl.float32)
            if GEN:
                m, M = _minmax_fin(x, 2)
                m, M = tl.reduce((m, M), 0, _minmax_fin_fn)
                mn, mx = _minmax_fin_fn(mn, mx, m, M)
            else:
                mn = _min_nan_fn(mn, _rmin(_rmin(x, 2), 0))
                mx = _max_nan_fn(mx, _rmax(_rmax(x, 2), 0))
    if GEN:
        mn, p, mnp, scale, inv = _int_params(mn, mx, QMAX)
    else:
        bad = tl.max(tl.max(_not_plain(mn, mx), 1), 0) > 0
        scale, inv = _int_params_plain(mn, mx, QMAX)
    tl.store(scale_ptr + sz, scale, mask=hd_mask)
    tl.store(zero_ptr + sz, mn, mask=hd_mask)
    for c in range(NCH):
        ti, tmask = _token_rows(i, c, CH, G, n, FULL)
        if NCH > 1:
            x = _load_d(xp + (ti.to(tl.int64) * xs)[:, None, :, None], d, D, DC * NDC).to(tl.float32)
        if GEN:
            q = _int_codes(x, p[None, :, None, :], mnp[None, :, None, :], inv[None, :, None, :], QMAX, True)
        else:
            q = _int_codes(x, 1.0, mn[None, :, None, :], inv[None, :, None, :], QMAX, False)
        if K > 1:
            q = tl.sum(tl.reshape(q, (TL, HB, TA, DCB, K)) << shifts, axis=4)   # [TL, HB, TA, DCB]
        cpt = cp + (ti.to(tl.int64) * cs)[:, None, :, None]
        if _token_rows_exact(CH, G, FULL):
            tl.store(cpt, q.to(tl.uint8), mask=cmask[None])
        else:
            tl.store(cpt, q.to(tl.uint8), mask=tmask[:, None, :, None] & cmask[None])
    if not GEN:
        if bad:
            tl.debug_barrier()   # the fast path's stores (by any thread of the block) come first
            _q_token_group_gen(x_ptr, codes_ptr, scale_ptr, zero_ptr, T, H, s_l, s_t, s_h, tg,
                               D, DC, G, TA, TL, HB, BITS, VX, XS, CS, FULL)


@triton.jit(noinline=True)
def _q_token_group_gen(x_ptr, codes_ptr, scale_ptr, zero_ptr, T, H, s_l, s_t, s_h, tg,
                       D: tl.constexpr, DC: tl.constexpr, G: tl.constexpr, TA: tl.constexpr,
                       TL: tl.constexpr, HB: tl.constexpr, BITS: tl.constexpr, VX: tl.constexpr,
                       XS: tl.constexpr, CS: tl.constexpr, FULL: tl.constexpr):
    """_q_token_group's general pass, a call (noinline): nothing of the fast path is shared
    with it (common subexpressions kept live through the fast path cost registers inlined)."""
    _q_token_group(x_ptr, codes_ptr, scale_ptr, zero_ptr, T, H, s_l, s_t, s_h, tg,
                   D, DC, G, TA, TL, HB, BITS, VX, XS, CS, FULL, True)


@triton.jit
def _dq_int_token(codes_ptr, scale_ptr, zero_ptr, out_ptr, T, H, s_l, s_t, s_h, tg0,
                  D: tl.constexpr, DP: tl.constexpr, G: tl.constexpr, TB: tl.constexpr,
                  HB: tl.constexpr, BITS: tl.constexpr, CV: tl.constexpr,
                  OS: tl.constexpr, CS: tl.constexpr, PART: tl.constexpr):
    # Program: token group pid0, heads [pid1*HB, +HB), layer pid2; chunks of [TB, HB, DP]
    # with the group's scale/zero [HB, DP] in registers. Codes are loaded CV bytes per thread
    # (the layout of the output's 16-byte vectors after unpacking). Full groups skip the token
    # clamps and masks; OS / CS: constexpr token strides of out / codes (0: run-time), as in
    # _q_int_token; PART as there.
    tg = tl.program_id(0) + tg0
    _dq_token_group(codes_ptr, scale_ptr, zero_ptr, out_ptr, T, H, s_l, s_t, s_h, tg,
                    D, DP, G, TB, HB, BITS, CV, OS, CS, not PART)


@triton.jit
def _dq_token_group(codes_ptr, scale_ptr, zero_ptr, out_ptr, T, H, s_l, s_t, s_h, tg,
                    D: tl.constexpr, DP: tl.constexpr, G: tl.constexpr, TB: tl.constexpr,
                    HB: tl.constexpr, BITS: tl.constexpr, CV: tl.constexpr,
                    OS: tl.constexpr, CS: tl.constexpr, FULL: tl.constexpr):
    K: tl.constexpr = 8 // BITS
    DB: tl.constexpr = D // K
    DPB: tl.constexpr = DP // K
    NCH: tl.constexpr = (G + TB - 1) // TB
    NGT = tl.cdiv(T, G)
    l = tl.program_id(2).to(tl.int64)
    h = tl.program_id(1) * HB + tl.arange(0, HB)
    hmask = h < H
    h = tl.minimum(h, H - 1)
    d = tl.arange(0, DP)
    db = tl.arange(0, DPB)
    if D == DP:
        hd_mask = hmask[:, None]
    else:
        hd_mask = hmask[:, None] & (d < D)[None, :]
    t0 = tg * G
    sz = ((l * NGT + tg) * H + h)[:, None] * D + d[None, :]
    op = out_ptr + (l * s_l + t0.to(tl.int64) * s_t)
    op = op + (h.to(tl.int64)[:, None] * s_h + d[None, :])[None, :, :]
    cp = codes_ptr + (l * T + t0) * H * DB
    cp = cp + tl.max_contiguous((h[:, None] * DB + db[None, :])[None, :, :], [1, 1, CV])
    i = tl.arange(0, TB)
    n = tl.minimum(T - t0, G)
    os = _stride(OS, s_t)
    cs = _stride(CS, H * DB)
    for c in tl.static_range(NCH):
        ti, tmask = _token_rows(i, c, TB, G, n, FULL)
        cb = _load_d(cp + (ti.to(tl.int64) * cs)[:, None, None], db, DB, DPB).to(tl.int32)
        if c == 0:
            # scale and zero as one [HB, DP, 2] load, after the first codes: their change of
            # layout (through shared memory, behind a barrier) then waits for all loads at once
            sc = tl.join(scale_ptr + sz, zero_ptr + sz)
            if D == DP:
                sc = tl.load(sc)
            else:
                sc = tl.load(sc, mask=(d < D)[:, None], other=0.0)
            scale, zero = tl.split(sc)
            scale = scale[None]
            zero = zero[None]
        y = tl.fma(_code_to_float(_unpack(cb, BITS, (TB, HB, DP))), scale, zero).to(out_ptr.dtype.element_ty)
        opt = op + (ti.to(tl.int64) * os)[:, None, None]
        if _token_rows_exact(TB, G, FULL):
            tl.store(opt, y, mask=hd_mask[None])
        else:
            tl.store(opt, y, mask=tmask[:, None, None] & hd_mask[None])


def _channel_launch(T: int, H: int, L: int, D: int, G: int, bits: int, esize: int, cfg):
    """Channel-group rows kernels (_q_int_channel, _dq_int_channel): (grid, launch kwargs)."""
    NG, GP, NGP = _channel_dims(D, G)
    grid, TB, HB, GC, nw = _rows_launch(T, H, L, NGP, GP, esize, cfg)
    return grid, dict(G=G, NG=NG, GP=GP, NGP=NGP, BITS=bits, TB=TB, HB=HB, GC=GC,
                      CV=max(1, min(GC, 16 // esize) // (8 // bits)), num_warps=nw, **_LAUNCH)


def _q_token_launch(T: int, H: int, D: int, L: int, G: int, K: int, esize: int, cfg):
    """int token quantize: (grid, DC, TA, TL, HB, VX, warps); see _q_int_token."""
    # channels per load: 2 code bytes, >= 4 bytes; at most the (padded) head_dim, which is at least
    # one code byte (K channels): head_dim of one code byte (int8 D=1, int4 D=2, int2 D=4) loads D
    VX = min(max(2 * K, 4 // esize), _p2(D))
    GT = _p2(G)
    TA = min(GT, max(1, cfg["thread_elems"] // VX))
    TL = min(GT // TA, 4)                         # longer groups: two passes over TA*TL chunks
    DC = min(_p2(D), (32 // TL) * VX)
    # lanes left after the channels x TL tokens (small head_dim) and the warps go to the heads,
    # never to the TA tokens (that would make the min/max a cross-warp reduction)
    rest = max(1, 32 // ((DC // VX) * TL))
    HB = min(_p2(H), cfg["warps"] * rest)
    grid = (triton.cdiv(T, G), triton.cdiv(H, HB) * triton.cdiv(D, DC), L)
    return grid, DC, TA, TL, HB, VX, max(1, HB // rest)


def _token_parts(T: int, G: int):
    """Token-group launches: (first group, groups, partial?) for the full groups, then the
    partial last group if any."""
    parts = [(0, T // G, False)] if T >= G else []
    if T % G:
        parts.append((T // G, 1, True))
    return parts


def _pairs_ok(x: torch.Tensor, K: int, D: int, DC: int, one_chunk: bool) -> bool:
    """Whether the token quantize can read bf16/fp16 x as int32 pairs (_q_token_group_x2)."""
    return (not _INTERPRET and x.dtype in (torch.bfloat16, torch.float16) and K >= 2 and D % DC == 0 and one_chunk
            and x.data_ptr() % 4 == 0 and all(s % 2 == 0 for s in x.stride()[:3])
            and _capability(x.device.index) >= (8, 0))   # min/max.NaN.{bf16,f16}x2: sm_80+


def _token_strides(s_t: int, esize: int, G: int, H: int, D: int, K: int):
    """(x/out token stride, codes token stride) as constexprs for the token-group kernels when a
    group spans less than 1 MiB (immediate load/store offsets), else 0 (run-time strides)."""
    small = lambda s, es: s if 0 < s * es * G < (1 << 20) else 0  # noqa: E731
    return small(s_t, esize), small(H * D // K, 1)

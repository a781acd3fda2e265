"""Triton paged scatter / gather (the torch reference ``kvkernels/reference/paged.py`` is the spec).

Same functions and conventions as the reference: ``scatter_into(layout, kv, scale, zero, fmt,
slots, cache_scale, oob_count, max_sms=0)``, ``gather_into(layout, slots, out, codes, scale,
zero, fmt, cache_scale, oob_count, max_sms=0)``, plus ``supports_scatter`` /
``supports_gather`` (why a case cannot run, None if it can).

One launch for all layers: the grid is (token blocks, num_kv * L); program (i, r) handles ``TB``
tokens of cache r = kv * L + layer, all heads and channels (a ``[TB, HP, DP]`` tile, heads and
head_dim padded to powers of two and masked). The cache's base address is ``ptrs[r]`` (an int64
device tensor, cast to a pointer in the kernel); every stride is a run-time int (never a
constexpr), so every :class:`~kvkernels.layouts.PagedLayout` runs the same compiled kernel, and
the addressing is the layout's formula ``b*s_block + t*s_token + h*s_head + (d//x)*s_dim_outer +
(d%x)*s_dim_inner`` (the x-split only compiled in for vLLM's legacy K cache). Out-of-range slots
(``>= NB*BS``) and negative ones are masked off (never written) and counted on request.

Fused (de)quantization: scatter dequantizes every format of the foundation on the fly (element
wise: ``code * scale + zero`` / ``e4m3 * scale``, the scale found by a generic index
``row*a_row + (t // TG)*a_t + h*a_h + (d // DG)*a_d``); fp8 caches get ``e4m3(x * RN(1/s))``.
Gather quantizes into int ``channel`` groups (power-of-two group sizes) and fp8 ``token_head``;
the public API gathers then quantizes for the other formats (their groups span tokens or whole
layers). Compiled with ``enable_fp_fusion=False`` (no FMA: bit-identical to the reference).
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

from ..formats import QuantFormat
from ..layouts import PagedLayout

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_LAUNCH = {} if _INTERPRET else {"enable_fp_fusion": False}
_MAX_D = 4096
_TILE_ELEMS = 4096
_DQ_ROWS = 64
_SCOPE = {"tensor": 0, "head": 1, "token_head": 2}
FLT_MAX: tl.constexpr = tl.constexpr(3.4028234663852886e38)
_DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def _p2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


@triton.jit
def _base_ptr(ptrs_ptr, r, TY: tl.constexpr, ALIGN: tl.constexpr):
    """Cache r's base address (``ptrs[r]``) as a pointer to TY (16-byte aligned when ALIGN)."""
    p = tl.load(ptrs_ptr + r).to(tl.pointer_type(TY))
    if ALIGN:
        p = tl.multiple_of(p, 16)
    return p


@triton.jit
def _cache_ptr(ptrs_ptr, r, CDT: tl.constexpr, ALIGN: tl.constexpr):
    if CDT == 0:
        p = _base_ptr(ptrs_ptr, r, tl.float32, ALIGN)
    elif CDT == 1:
        p = _base_ptr(ptrs_ptr, r, tl.float16, ALIGN)
    elif CDT == 2:
        p = _base_ptr(ptrs_ptr, r, tl.bfloat16, ALIGN)
    else:
        p = _base_ptr(ptrs_ptr, r, tl.uint8, ALIGN)
    return p


@triton.jit
def _strides(kv, kB, kT, kH, kDX, kDI, vB, vT, vH, vDX, vDI, SAME_KV: tl.constexpr):
    """(block, token, head, dim_inner, dim_outer) strides of cache kv. SAME_KV: K and V have the
    same strides (all layouts but vLLM's legacy one): the K strides are used as they are, so that
    Triton sees their run-time specializations (a dense inner dim)."""
    if SAME_KV:
        sB, sT, sH, sDI, sDX = kB, kT, kH, kDI, kDX
    else:  # K or V strides (kv is 0 or 1): select without a branch
        sB = kB + (vB - kB) * kv
        sT = kT + (vT - kT) * kv
        sH = kH + (vH - kH) * kv
        sDI = kDI + (vDI - kDI) * kv
        sDX = kDX + (vDX - kDX) * kv
    return sB, sT, sH, sDI, sDX


@triton.jit
def _tile(pid_t, r, slots_ptr, T, L, NSLOTS, BS, kB, kT, kH, kDX, kDI, vB, vT, vH, vDX, vDI, X,
          HP: tl.constexpr, DP: tl.constexpr, TB: tl.constexpr, SPLIT: tl.constexpr, SAME_KV: tl.constexpr):
    """Tokens, heads, channels of this program and their cache offsets (int64) and validity."""
    kv = r // L
    t = pid_t * TB + tl.arange(0, TB)
    tin = t < T
    slot = tl.load(slots_ptr + t, mask=tin, other=-1).to(tl.int64)
    ok = tin & (slot >= 0) & (slot < NSLOTS)
    slot = tl.where(ok, slot, 0)
    blk = slot // BS
    off = slot - blk * BS
    sB, sT, sH, sDI, sDX = _strides(kv, kB, kT, kH, kDX, kDI, vB, vT, vH, vDX, vDI, SAME_KV)
    h = tl.arange(0, HP).to(tl.int64)
    d = tl.arange(0, DP)
    if SPLIT:
        doff = (d // X).to(tl.int64) * sDX + (d % X).to(tl.int64) * sDI
    else:
        doff = d.to(tl.int64) * sDI
    coff = ((blk * sB + off * sT)[:, None, None] + (h * sH)[None, :, None] + doff[None, None, :])
    return kv, t, tin, slot, ok, h, d, coff


@triton.jit
def _mask(ok, h, d, H, D: tl.constexpr, DP: tl.constexpr, FULL_H: tl.constexpr):
    """[TB, HP, DP] validity; the head / channel terms only where padded (constant masks along
    the channel dim keep the accesses vectorized)."""
    m = ok[:, None, None] & (d >= 0)[None, None, :]
    if not FULL_H:
        m = m & (h < H)[None, :, None]
    if D != DP:
        m = m & (d < D)[None, None, :]
    return m


@triton.jit
def _count(cnt_ptr, slots_ptr, t, tin, NSLOTS, r):
    s = tl.load(slots_ptr + t, mask=tin, other=-1).to(tl.int64)
    n = tl.sum((tin & (s >= NSLOTS)).to(tl.int32), axis=0)
    if r == 0:
        tl.atomic_add(cnt_ptr, n.to(cnt_ptr.dtype.element_ty))


@triton.jit
def _cache_scale(ks_ptr, ks_l, ks_h, vs_ptr, vs_l, vs_h, kv, l, h, H):
    hm = h < H
    if kv == 0:
        s = tl.load(ks_ptr + l * ks_l + h * ks_h, mask=hm, other=1.0)
    else:
        s = tl.load(vs_ptr + l * vs_l + h * vs_h, mask=hm, other=1.0)
    return s


@triton.jit
def _fp8_cache_codes(x, cs, CLAMP: tl.constexpr):
    """e4m3 bytes of x * min(1 / cs, FLT_MAX) (cs broadcast by the caller's shape)."""
    inv = tl.minimum(tl.math.div_rn(tl.full(cs.shape, 1.0, tl.float32), cs), FLT_MAX)
    y = x.to(tl.float32) * inv
    if CLAMP:  # the GPU conversion saturates (satfinite); the interpreter's does not
        y = tl.minimum(tl.maximum(y, -448.0), 448.0)
    return y.to(tl.float8e4nv).to(tl.uint8, bitcast=True)


@triton.jit
def _scatter_kernel(src_ptr, s_kv, s_l, s_t, s_h, scale_ptr, zero_ptr, a_row, a_t, a_h, a_d,
                    ptrs_ptr, slots_ptr, T, L, H, NSLOTS, BS,
                    kB, kT, kH, kDX, kDI, vB, vT, vH, vDX, vDI, X,
                    ks_ptr, ks_l, ks_h, vs_ptr, vs_l, vs_h, cnt_ptr,
                    D: tl.constexpr, DP: tl.constexpr, HP: tl.constexpr, TB: tl.constexpr,
                    SRC: tl.constexpr, BITS: tl.constexpr, TG: tl.constexpr, DG: tl.constexpr,
                    CDT: tl.constexpr, SPLIT: tl.constexpr, COUNT: tl.constexpr, CLAMP: tl.constexpr,
                    ALIGN: tl.constexpr, SAME_KV: tl.constexpr, FULL_H: tl.constexpr):
    # SRC: 0 flat values, 1 int codes (BITS), 2 fp8 codes. CDT: cache 0 fp32, 1 fp16, 2 bf16, 3 fp8.
    pid_t = tl.program_id(0)
    r = tl.program_id(1)
    kv, t, tin, slot, ok, h, d, coff = _tile(pid_t, r, slots_ptr, T, L, NSLOTS, BS, kB, kT, kH, kDX, kDI,
                                            vB, vT, vH, vDX, vDI, X, HP, DP, TB, SPLIT, SAME_KV)
    l = r - kv * L
    if COUNT:
        _count(cnt_ptr, slots_ptr, t, tin, NSLOTS, r)
    m = _mask(ok, h, d, H, D, DP, FULL_H)
    t64 = t.to(tl.int64)
    rowoff = kv.to(tl.int64) * s_kv + l.to(tl.int64) * s_l
    if SRC == 0:
        soff = rowoff + (t64 * s_t)[:, None, None] + (h * s_h)[None, :, None] + d[None, None, :]
        x = tl.load(src_ptr + soff, mask=m)
    else:
        K: tl.constexpr = 8 // BITS
        soff = rowoff + (t64 * s_t)[:, None, None] + (h * s_h)[None, :, None] + (d // K)[None, None, :]
        c = tl.load(src_ptr + soff, mask=m, other=0).to(tl.int32)
        sidx = ((r.to(tl.int64) * a_row + (t64 // TG) * a_t)[:, None, None] + (h * a_h)[None, :, None]
                + ((d // DG).to(tl.int64) * a_d)[None, None, :])
        sc = tl.load(scale_ptr + sidx, mask=m, other=0.0)
        if SRC == 1:
            q = (c >> ((d % K) * BITS)[None, None, :]) & ((1 << BITS) - 1)
            zp = tl.load(zero_ptr + sidx, mask=m, other=0.0)
            x = tl.fma(q.to(tl.float32), sc, zp)  # one FMA, as the quant spec (docs/quant-spec.md)
        else:
            x = c.to(tl.uint8).to(tl.float8e4nv, bitcast=True).to(tl.float32) * sc
    base = _cache_ptr(ptrs_ptr, r, CDT, ALIGN)
    if CDT == 3:
        cs = _cache_scale(ks_ptr, ks_l, ks_h, vs_ptr, vs_l, vs_h, kv, l, h, H)
        tl.store(base + coff, _fp8_cache_codes(x, cs[None, :, None], CLAMP), mask=m)
    else:
        tl.store(base + coff, x.to(base.dtype.element_ty), mask=m)


@triton.jit
def _word_ptr(ptrs_ptr, r, PW: tl.constexpr, ALIGN: tl.constexpr):
    """Cache r's base as a pointer to PW-byte words (PW = 2, 4, 8)."""
    if PW == 2:
        p = _base_ptr(ptrs_ptr, r, tl.int16, ALIGN)
    elif PW == 4:
        p = _base_ptr(ptrs_ptr, r, tl.int32, ALIGN)
    else:
        p = _base_ptr(ptrs_ptr, r, tl.int64, ALIGN)
    return p


@triton.jit
def _elem_bits(v, CDT: tl.constexpr, PW: tl.constexpr):
    """The bits of cache elements v (fp8 bytes, fp16 / bf16, fp32) widened to a PW-byte word."""
    if CDT == 3:
        b = v.to(tl.uint8)
    elif CDT == 0:
        b = v.to(tl.uint32, bitcast=True)
    else:
        b = v.to(tl.uint16, bitcast=True)
    if PW == 2:
        w = b.to(tl.uint16)
    elif PW == 4:
        w = b.to(tl.uint32)
    else:
        w = b.to(tl.uint64)
    return w


@triton.jit
def _dq_plane(ci, k: tl.constexpr, BITS: tl.constexpr, sc, zp, cs, CDT: tl.constexpr, CLAMP: tl.constexpr,
              PW: tl.constexpr):
    """Plane k (the k-th code of every byte) of the code bytes ci, dequantized, converted to the
    cache's element type and widened to a PW-byte word."""
    QM: tl.constexpr = (1 << BITS) - 1
    q = (ci >> (k * BITS)) & QM
    x = tl.fma(q.to(tl.float32), sc, zp)  # one FMA, as the quant spec (docs/quant-spec.md)
    if CDT == 3:
        v = _fp8_cache_codes(x, cs, CLAMP)
    elif CDT == 0:
        v = x
    elif CDT == 1:
        v = x.to(tl.float16)
    else:
        v = x.to(tl.bfloat16)
    return _elem_bits(v, CDT, PW)


@triton.jit
def _dequant_scatter_kernel(src_ptr, s_kv, s_l, s_t, s_h, scale_ptr, zero_ptr, a_row, a_t, a_h, a_d,
                            ptrs_ptr, slots_ptr, T, L, H, NSLOTS, BS,
                            kB, kT, kH, kDX, kDI, vB, vT, vH, vDX, vDI, X,
                            ks_ptr, ks_l, ks_h, vs_ptr, vs_l, vs_h, cnt_ptr,
                            HP: tl.constexpr, TB: tl.constexpr, NG: tl.constexpr, NGP: tl.constexpr,
                            G: tl.constexpr, GBP: tl.constexpr, SRC: tl.constexpr, BITS: tl.constexpr,
                            TG: tl.constexpr, CV: tl.constexpr, CDT: tl.constexpr, SPLIT: tl.constexpr,
                            COUNT: tl.constexpr, CLAMP: tl.constexpr, ALIGN: tl.constexpr, SAME_KV: tl.constexpr,
                            PACK: tl.constexpr):
    """Scatter with dequantization, one scale (and zero point) per group of G channels (int
    ``channel`` groups; fp8 scales: one group of G = head_dim). The tile is [TB * HP * NGP rows
    of (token, head, group), GBP code bytes]: the packed codes are read once as bytes (CV
    contiguous bytes per access: those of 16 bytes of cache elements, so that loads and stores
    get the same per-thread layout), each group's scale / zero once per row and broadcast along
    it; int4 / int2 bytes are split into K = 8 / BITS code planes (one shift + AND per byte) and
    interleaved back into channel order with ``tl.join`` (a byte's codes stay in its thread): no
    per-element shifts of duplicated loads, no per-element scale loads.

    PACK (int4 / int2 codes, a dense inner dim, strides and bases multiples of the word): the K
    channels of a code byte are computed per plane in the bytes' own layout and written as one
    word of K cache elements (PW = K * element size bytes; the block / token / head strides
    arrive divided by K, in words), so nothing is re-laid out at all."""
    pid_t = tl.program_id(0)
    r = tl.program_id(1)
    kv = r // L
    l = r - kv * L
    K: tl.constexpr = 8 // BITS
    GB: tl.constexpr = G // K          # code bytes of a group
    GP: tl.constexpr = GBP * K         # channels of a (padded) group
    ROWS: tl.constexpr = TB * HP * NGP
    q = tl.arange(0, ROWS)
    g = q % NGP
    th = q // NGP
    h = (th % HP).to(tl.int64)
    t = pid_t * TB + th // HP
    tin = t < T
    if COUNT:
        tt = pid_t * TB + tl.arange(0, TB)
        _count(cnt_ptr, slots_ptr, tt, tt < T, NSLOTS, r)
    slot = tl.load(slots_ptr + t, mask=tin, other=-1).to(tl.int64)
    ok = tin & (slot >= 0) & (slot < NSLOTS) & (h < H) & (g < NG)
    slot = tl.where(ok, slot, 0)
    blk = slot // BS
    off = slot - blk * BS
    t64 = tl.where(tin, t, 0).to(tl.int64)
    # codes [ROWS, GBP] (byte j of group g) and the group's scale / zero [ROWS]
    j = tl.arange(0, GBP)
    jc = (j // CV) * CV + j % CV       # = j, written so that Triton sees CV-byte contiguity only
    srow = kv.to(tl.int64) * s_kv + l.to(tl.int64) * s_l + t64 * s_t + h * s_h + g * GB
    if GBP == GB:
        cm = ok[:, None] & (j >= 0)[None, :]
    else:
        cm = ok[:, None] & (j < GB)[None, :]
    c = tl.load(src_ptr + srow[:, None] + jc[None, :], mask=cm, other=0)
    sidx = r.to(tl.int64) * a_row + (t64 // TG) * a_t + h * a_h + g * a_d
    sc = tl.load(scale_ptr + sidx, mask=ok, other=0.0)
    if PACK:
        PW: tl.constexpr = K * (1 if CDT == 3 else 4 if CDT == 0 else 2)
        zw = tl.load(zero_ptr + sidx, mask=ok, other=0.0)[:, None]
        if CDT == 3:
            cw = _cache_scale(ks_ptr, ks_l, ks_h, vs_ptr, vs_l, vs_h, kv, l, h, H)[:, None]
        else:
            cw = sc[:, None]
        cb = c.to(tl.int32)
        sc2 = sc[:, None]
        wv = _dq_plane(cb, 0, BITS, sc2, zw, cw, CDT, CLAMP, PW)
        for k in tl.static_range(1, K):
            wv = wv | (_dq_plane(cb, k, BITS, sc2, zw, cw, CDT, CLAMP, PW) << (k * 8 * PW // K))
        wB, wT, wH, wDI, wDX = _strides(kv, kB, kT, kH, kDX, kDI, vB, vT, vH, vDX, vDI, SAME_KV)
        woff = (blk * wB + off * wT + h * wH + g * GB)[:, None] + jc[None, :]
        wbase = _word_ptr(ptrs_ptr, r, PW, ALIGN)
        tl.store(wbase + woff, wv.to(wbase.dtype.element_ty, bitcast=True), mask=cm)
    else:
        if SRC == 1:
            zp = tl.load(zero_ptr + sidx, mask=ok, other=0.0)
            ci = c.to(tl.int32)
            QM: tl.constexpr = (1 << BITS) - 1
            if K == 1:
                qv = ci
            elif K == 2:
                qv = tl.reshape(tl.join(ci & QM, ci >> 4), (ROWS, GP))
            else:
                qv = tl.reshape(tl.join(tl.join(ci & QM, (ci >> 4) & QM), tl.join((ci >> 2) & QM, ci >> 6)), (ROWS, GP))
            x = tl.fma(qv.to(tl.float32), sc[:, None], zp[:, None])  # one FMA, as the quant spec
        else:
            x = c.to(tl.float8e4nv, bitcast=True).to(tl.float32) * sc[:, None]
        # the cache: channel g*G + jj of head h of the token's row
        jj = tl.arange(0, GP)
        sB, sT, sH, sDI, sDX = _strides(kv, kB, kT, kH, kDX, kDI, vB, vT, vH, vDX, vDI, SAME_KV)
        ch = (g * G)[:, None] + jj[None, :]
        if SPLIT:
            doff = (ch // X).to(tl.int64) * sDX + (ch % X).to(tl.int64) * sDI
        else:
            doff = ch.to(tl.int64) * sDI
        coff = (blk * sB + off * sT + h * sH)[:, None] + doff
        if GP == G:
            m = ok[:, None] & (jj >= 0)[None, :]
        else:
            m = ok[:, None] & (jj < G)[None, :]
        base = _cache_ptr(ptrs_ptr, r, CDT, ALIGN)
        if CDT == 3:
            cs = _cache_scale(ks_ptr, ks_l, ks_h, vs_ptr, vs_l, vs_h, kv, l, h, H)
            tl.store(base + coff, _fp8_cache_codes(x, cs[:, None], CLAMP), mask=m)
        else:
            tl.store(base + coff, x.to(base.dtype.element_ty), mask=m)


@triton.jit
def _gather_kernel(out_ptr, o_kv, o_l, o_t, o_h, codes_ptr, scale_ptr, zero_ptr,
                   ptrs_ptr, slots_ptr, T, L, H, NSLOTS, BS,
                   kB, kT, kH, kDX, kDI, vB, vT, vH, vDX, vDI, X,
                   ks_ptr, ks_l, ks_h, vs_ptr, vs_l, vs_h, cnt_ptr,
                   D: tl.constexpr, DP: tl.constexpr, HP: tl.constexpr, TB: tl.constexpr,
                   DST: tl.constexpr, BITS: tl.constexpr, G: tl.constexpr,
                   CDT: tl.constexpr, SPLIT: tl.constexpr, COUNT: tl.constexpr, CLAMP: tl.constexpr,
                   ALIGN: tl.constexpr, SAME_KV: tl.constexpr, FULL_H: tl.constexpr):
    # DST: 0 flat values, 1 int channel groups of G (BITS), 2 fp8 token_head.
    pid_t = tl.program_id(0)
    r = tl.program_id(1)
    kv, t, tin, slot, ok, h, d, coff = _tile(pid_t, r, slots_ptr, T, L, NSLOTS, BS, kB, kT, kH, kDX, kDI,
                                            vB, vT, vH, vDX, vDI, X, HP, DP, TB, SPLIT, SAME_KV)
    l = r - kv * L
    if COUNT:
        _count(cnt_ptr, slots_ptr, t, tin, NSLOTS, r)
    hm = (h < H)[None, :, None]
    dm = (d < D)[None, None, :]
    m = _mask(ok, h, d, H, D, DP, FULL_H)
    base = _cache_ptr(ptrs_ptr, r, CDT, ALIGN)
    c = tl.load(base + coff, mask=m, other=0)
    if CDT == 3:
        cs = _cache_scale(ks_ptr, ks_l, ks_h, vs_ptr, vs_l, vs_h, kv, l, h, H)
        x = c.to(tl.float8e4nv, bitcast=True).to(tl.float32) * cs[None, :, None]
    else:
        x = c
    t64 = t.to(tl.int64)
    if DST == 0:
        ooff = (kv.to(tl.int64) * o_kv + l.to(tl.int64) * o_l + (t64 * o_t)[:, None, None]
                + (h * o_h)[None, :, None] + d[None, None, :])
        tl.store(out_ptr + ooff, x.to(out_ptr.dtype.element_ty), mask=m)
    else:
        xf = x.to(tl.float32)
        sm = tin[:, None, None] & hm                        # skipped tokens are quantized as zeros
        rows = (r.to(tl.int64) * T + t64)[:, None, None] * H + h[None, :, None]   # [TB, HP, 1]
        if DST == 1:
            K: tl.constexpr = 8 // BITS
            QMAX: tl.constexpr = (1 << BITS) - 1
            NG: tl.constexpr = DP // G
            xg = tl.reshape(xf, (TB, HP, NG, G))
            mn = tl.min(xg, axis=3)
            mx = tl.max(xg, axis=3)
            rng = mx - mn
            sc = tl.math.div_rn(rng, tl.full(rng.shape, QMAX, tl.float32))
            inv = tl.minimum(tl.math.div_rn(tl.full(rng.shape, QMAX, tl.float32), rng), FLT_MAX)
            inv = tl.where(sc > 0, inv, 0.0)
            v = (xg - mn[:, :, :, None]) * inv[:, :, :, None] + 0.5   # >= 0.5: truncation is floor
            q = tl.minimum(v.to(tl.int32), QMAX)
            q = tl.reshape(q, (TB, HP, DP // K, K))
            sh = tl.arange(0, K) * BITS
            packed = tl.sum(q << sh[None, None, None, :], axis=3).to(tl.uint8)
            j = tl.arange(0, DP // K)
            tl.store(codes_ptr + rows * (D // K) + j[None, None, :], packed, mask=sm & (j < D // K)[None, None, :])
            g = tl.arange(0, NG)
            gm = sm & (g < D // G)[None, None, :]
            tl.store(scale_ptr + rows * (D // G) + g[None, None, :], sc, mask=gm)
            tl.store(zero_ptr + rows * (D // G) + g[None, None, :], mn, mask=gm)
        else:
            amax = tl.max(tl.abs(xf), axis=2)                               # [TB, HP]
            s = tl.math.div_rn(amax, tl.full(amax.shape, 448.0, tl.float32))
            s = tl.where(s > 0, s, 1.0)
            inv = tl.minimum(tl.math.div_rn(tl.full(s.shape, 1.0, tl.float32), s), FLT_MAX)
            y = xf * inv[:, :, None]
            if CLAMP:
                y = tl.minimum(tl.maximum(y, -448.0), 448.0)
            tl.store(codes_ptr + rows * D + d[None, None, :], y.to(tl.float8e4nv).to(tl.uint8, bitcast=True),
                     mask=sm & dm)
            srow = (r.to(tl.int64) * T + t64)[:, None] * H + h[None, :]
            tl.store(scale_ptr + srow, s, mask=tin[:, None] & (h < H)[None, :])


# ---------------------------------------------------------------------------------------------
# launch helpers
# ---------------------------------------------------------------------------------------------
def _capability(dev: torch.device):
    return torch.cuda.get_device_capability(dev)


def _common_refusal(layout: PagedLayout, t: Optional[torch.Tensor], max_sms: int) -> Optional[str]:
    dev = layout.device.type
    if dev == "cpu":
        if not _INTERPRET:
            return "CPU tensors need the Triton interpreter (TRITON_INTERPRET=1)"
    elif dev != "cuda":
        return f"caches on {dev} are not supported"
    if t is not None and t.device != layout.device:
        return f"a flat side on {t.device} (pinned host memory) needs the CUDA kernel path"
    if max_sms:
        return "max_sms (an SM bound) is an option of the CUDA kernel path"
    if layout.head_dim > _MAX_D:
        return f"head_dim {layout.head_dim} > {_MAX_D}"
    if _p2(layout.num_heads) * _p2(layout.head_dim) > 65536:
        return f"{layout.num_heads} heads x head_dim {layout.head_dim} is too large a tile"
    if layout.num_kv * layout.num_layers > 65535:
        return "more than 65535 caches (num_kv x layers) in one launch"
    return None


def _fp8_refusal(layout: PagedLayout) -> Optional[str]:
    if layout.device.type == "cuda" and _capability(layout.device) < (8, 9):
        return "fp8 e4m3 (tl.float8e4nv) needs compute capability >= 8.9"
    return None


def supports_scatter(layout: PagedLayout, kv: torch.Tensor, fmt: Optional[QuantFormat], max_sms: int = 0):
    why = _common_refusal(layout, kv, max_sms)
    if why:
        return why
    if layout.fp8 or (fmt is not None and fmt.kind == "fp8"):
        return _fp8_refusal(layout)
    return None


def supports_gather(layout: PagedLayout, t: torch.Tensor, fmt: Optional[QuantFormat], max_sms: int = 0):
    why = _common_refusal(layout, t, max_sms)
    if why:
        return why
    if fmt is not None:
        if fmt.kind == "int":
            if fmt.axis != "channel":
                return f"{fmt}: groups along tokens are not fused into the gather"
            if fmt.group_size & (fmt.group_size - 1):
                return f"group_size {fmt.group_size} is not a power of two"
        elif fmt.scope != "token_head":
            return f"{fmt}: a scale per layer / head is not fused into the gather"
    if layout.fp8 or (fmt is not None and fmt.kind == "fp8"):
        return _fp8_refusal(layout)
    return None


def _layout_args(layout: PagedLayout):
    st = layout.strides
    k = st[0]
    v = st[-1]
    return (layout.num_slots, layout.block_size, k[0], k[1], k[2], k[3], k[4], v[0], v[1], v[2], v[3], v[4], layout.x)


_ALIGN_HINT = [not _INTERPRET and os.environ.get("KVK_PAGED_ALIGN_HINT", "1") != "0"]


def _aligned(layout: PagedLayout) -> bool:
    """Whether to tell Triton that every cache base is 16-byte aligned (``tl.multiple_of`` on
    the pointer cast from ``ptrs``): lets it vectorize cache accesses. ``KVK_PAGED_ALIGN_HINT=0``
    turns the hint off (also done automatically if a Triton version cannot compile it)."""
    return _ALIGN_HINT[0] and all(b.data_ptr() % 16 == 0 for b in layout.bases)


def _launch(kernel, grid, args, kw):
    try:
        kernel[grid](*args, **kw)
    except triton.CompilationError:
        if not kw.get("ALIGN"):
            raise
        _ALIGN_HINT[0] = False  # this Triton cannot take the hint on a pointer: run without it
        kernel[grid](*args, **{**kw, "ALIGN": False})


def _scale_args(layout: PagedLayout, cache_scale):
    if not layout.fp8:
        dummy = layout.ptrs
        return (dummy, 0, 0, dummy, 0, 0)
    ks, vs = cache_scale
    vs = ks if vs is None else vs
    return (ks, ks.stride(0), ks.stride(1), vs, vs.stride(0), vs.stride(1))


def _tiles(layout: PagedLayout, T: int):
    HP, DP = _p2(layout.num_heads), _p2(layout.head_dim)
    TB = max(1, min(_p2(T), _TILE_ELEMS // (HP * DP)))
    return HP, DP, TB


def _cdt(layout: PagedLayout) -> int:
    return 3 if layout.fp8 else _DTYPE_CODE[layout.dtype]


def _grouped(fmt: Optional[QuantFormat], D: int):
    """(channels per scale group G, groups per head) for formats whose scale is constant over
    groups of whole code bytes along head_dim (int ``channel`` groups, every fp8 scope), else
    None (token-axis int groups: a scale per channel; the element-wise kernel)."""
    if fmt is None:
        return None
    if fmt.kind == "fp8":
        return D, 1
    if fmt.axis == "channel" and fmt.group_size % (8 // fmt.bits) == 0:
        return fmt.group_size, D // fmt.group_size
    return None


def _packable(layout: PagedLayout, K: int) -> bool:
    """Whether K channels of a code byte can be stored as one word of K cache elements: a dense
    inner dim without an x split, block / token / head strides multiples of K, bases aligned to
    the word (``KVK_PAGED_PACK=0`` turns it off)."""
    if K == 1 or os.environ.get("KVK_PAGED_PACK", "1") == "0" or layout.x != layout.head_dim:
        return False
    pw = K * layout.element_size
    if pw not in (2, 4, 8):
        return False
    for st in layout.strides:
        if st[4] != 1 or any(v % K for v in st[:3]):
            return False
    return all(b.data_ptr() % pw == 0 for b in layout.bases)


def _ptxas_bad_pack(layout: PagedLayout, fmt: QuantFormat) -> bool:
    """Int4 / int2 codes into an fp8 cache on the packed path (words of K e4m3 codes).
    Routed to the element-wise ``_scatter_kernel`` (which passed on the H100 for int4 -> fp8).

    Failing case (H100, Triton 3.6, its bundled ptxas): ``test_scatter_dequantizes[int4:g32:channel-
    vllm_interleaved-float8_e4m3fn-triton]``, 2300 of 18432 cache bytes wrong, all 252 (0xFC). The
    PTX is right (``cvt.rn.satfinite.e4m3x2.f32`` -> ``shr.u16 8`` -> ``mov.b32 {lo, hi}`` ->
    ``and 0x00FF00FF``), but ptxas lowers the pair's upper byte as ``(R1 & 0xffff) >> 8`` (R1 is the
    stack pointer, ``LDC R1, c[0x0][0x28]``; 0xFC is its bits 8..15) into ``F2FP...PACK_AB_MERGE_C``:
    a miscompile. Checked by compiling for sm_90 with Triton 3.6 here and reading the SASS (nvdisasm):
    only this variant reads R1 as data; packed int4 -> bf16 / fp32, the unpacked byte-tile and the
    element-wise kernels do not (``tests/paged_sm90.py`` checks it). Int2 -> fp8 packed words (PW =
    4) passed on the H100 with Triton 3.6, but Triton 3.9's ptxas also reads R1 there (PRMTs merging
    R1 bytes), so every int code -> fp8 cache packed case takes the element-wise kernel (no bench
    row uses it). ``KVK_PAGED_FP8_PACK2=1`` re-enables the packed path (to retest a later ptxas)."""
    return (layout.fp8 and fmt.kind == "int" and fmt.bits < 8 and _packable(layout, 8 // fmt.bits)
            and os.environ.get("KVK_PAGED_FP8_PACK2", "0") != "1")


def scatter_into(layout: PagedLayout, kv, scale, zero, fmt: Optional[QuantFormat], slots, cache_scale, oob_count,
                 max_sms: int = 0) -> None:
    T = slots.shape[0]
    if T == 0:
        return
    L, H, D, R = layout.num_layers, layout.num_heads, layout.head_dim, layout.num_kv * layout.num_layers
    HP, DP, TB = _tiles(layout, T)
    if fmt is None:
        src = kv
        s_kv, s_l, s_t, s_h = kv.stride(0), kv.stride(1), kv.stride(2), kv.stride(3)
        sargs = (layout.ptrs, layout.ptrs, 0, 0, 0, 0)
        SRC, BITS, TG, DG = 0, 8, 1, 1
    else:
        src = kv.view(torch.uint8)
        _, T_in, _, Dp = src.shape
        s_h, s_t, s_l = Dp, H * Dp, T_in * H * Dp
        s_kv = L * s_l
        if fmt.kind == "int":
            G = fmt.group_size
            SRC, BITS = 1, fmt.bits
            if fmt.axis == "channel":
                a = (T_in * H * (D // G), H * (D // G), D // G, 1)
                TG, DG = 1, G
            else:
                ntg = -(-T_in // G)
                a = (ntg * H * D, H * D, D, 1)
                TG, DG = G, 1
        else:
            SRC, BITS, TG, DG = 2, 8, 1, 1
            a = {"tensor": (1, 0, 0, 0), "head": (H, 0, 1, 0), "token_head": (T_in * H, H, 1, 0)}[fmt.scope]
        sargs = (scale, zero if zero is not None else scale, *a)
    cnt = oob_count if oob_count is not None else layout.ptrs
    grouped = _grouped(fmt, D)
    if grouped is not None and _ptxas_bad_pack(layout, fmt):
        grouped = None
    if grouped is not None:  # one scale per group of channels: the byte-tile kernel
        G, NG = grouped
        K = 8 // fmt.bits if fmt.kind == "int" else 1
        GBP = _p2(G // K)
        NGP = _p2(NG)
        # at most 64 (token, head, group) rows a program: with more (4 warps), Triton moves the
        # rows' slots / scales / offsets between layouts through shared memory (sm_90 PTX)
        TBg = max(1, min(_p2(T), _TILE_ELEMS // (HP * NGP * GBP * K), _DQ_ROWS // (HP * NGP)))
        pack = _packable(layout, K)
        largs = list(_layout_args(layout))
        if pack:  # block / token / head strides in words of K elements
            for i in (2, 3, 4, 7, 8, 9):
                largs[i] //= K
        _launch(_dequant_scatter_kernel, (triton.cdiv(T, TBg), R),
                (src, s_kv, s_l, s_t, s_h, *sargs, layout.ptrs, slots, T, L, H, *largs,
                 *_scale_args(layout, cache_scale), cnt),
                dict(HP=HP, TB=TBg, NG=NG, NGP=NGP, G=G, GBP=GBP, SRC=SRC, BITS=BITS, TG=TG, CDT=_cdt(layout),
                     CV=max(1, min(GBP, 16 // layout.element_size // K)),
                     SPLIT=layout.x != D, COUNT=oob_count is not None, CLAMP=_INTERPRET, ALIGN=_aligned(layout),
                     SAME_KV=layout.strides[0] == layout.strides[-1], PACK=pack, num_warps=4, **_LAUNCH))
        return
    grid = (triton.cdiv(T, TB), R)
    _launch(_scatter_kernel, grid,
            (src, s_kv, s_l, s_t, s_h, *sargs, layout.ptrs, slots, T, L, H, *_layout_args(layout),
             *_scale_args(layout, cache_scale), cnt),
            dict(D=D, DP=DP, HP=HP, TB=TB, SRC=SRC, BITS=BITS, TG=TG, DG=DG, CDT=_cdt(layout), SPLIT=layout.x != D,
                 COUNT=oob_count is not None, CLAMP=_INTERPRET, ALIGN=_aligned(layout), num_warps=4,
                 SAME_KV=layout.strides[0] == layout.strides[-1], FULL_H=_p2(H) == H, **_LAUNCH))


def gather_into(layout: PagedLayout, slots, out, codes, scale, zero, fmt: Optional[QuantFormat], cache_scale,
                oob_count, max_sms: int = 0) -> None:
    T = slots.shape[0]
    if T == 0:
        return
    L, H, D, R = layout.num_layers, layout.num_heads, layout.head_dim, layout.num_kv * layout.num_layers
    HP, DP, TB = _tiles(layout, T)
    if fmt is None:
        oargs = (out, out.stride(0), out.stride(1), out.stride(2), out.stride(3), layout.ptrs, layout.ptrs, layout.ptrs)
        DST, BITS, G = 0, 8, 1
    else:
        c = codes.view(torch.uint8)
        oargs = (c, 0, 0, 0, 0, c, scale, zero if zero is not None else scale)
        if fmt.kind == "int":
            DST, BITS, G = 1, fmt.bits, fmt.group_size
        else:
            DST, BITS, G = 2, 8, 1
    cnt = oob_count if oob_count is not None else layout.ptrs
    grid = (triton.cdiv(T, TB), R)
    _launch(_gather_kernel, grid,
            (*oargs, layout.ptrs, slots, T, L, H, *_layout_args(layout), *_scale_args(layout, cache_scale), cnt),
            dict(D=D, DP=DP, HP=HP, TB=TB, DST=DST, BITS=BITS, G=G, CDT=_cdt(layout), SPLIT=layout.x != D,
                 COUNT=oob_count is not None, CLAMP=_INTERPRET, ALIGN=_aligned(layout), num_warps=4,
                 SAME_KV=layout.strides[0] == layout.strides[-1], FULL_H=_p2(H) == H, **_LAUNCH))

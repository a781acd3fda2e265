"""Triton kernels of the blend ops (same functions and conventions as kvkernels/reference/blend.py).

* ``rerotate_keys_into(key, old_pos, new_pos, cos_sin_cache, is_neox, k_scale)``: one program
  per (layer, token), all heads and rotary pairs as one ``[BLOCK_H, BLOCK_R]`` tile; cos/sin of
  both positions read once per token, the rotation by (new - old) composed in float32;
  tokens with a position outside the cache are skipped. Only the rotary channels are touched.
  Compiled without FMA contraction: bit-identical to the reference on the GPU.
* ``rerotate_keys_paged_into(layout, slots, ...)``: the same program per (layer, token) over a
  :class:`~kvkernels.layouts.PagedLayout`'s K caches (base address from ``ptrs``, the slot's
  block / offset, the layout's channel addressing with the legacy x-split compiled in only
  where it exists).
* ``gather_tokens_into`` / ``scatter_tokens_into``: a pure row move of ``[tokens, R, C]`` views
  by an index, two (source, destination) pairs per launch (K and V; hidden states and positions).
* ``select_tokens_into(...)``: the per-token deviation (squared difference over heads and
  head_dim, float32) as one program per block of tokens, then the reference's top-k.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

from ..reference.blend import topk_mask_into

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# no FMA contraction: the rotation is the spec's separate roundings, bit-identical to the reference
_LAUNCH = {} if _INTERPRET else {"enable_fp_fusion": False}
_DT = (torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn)


def supports(key: torch.Tensor, cos_sin_cache: torch.Tensor, is_neox: bool, k_scale) -> Optional[str]:
    if key.dtype not in _DT:
        return f"dtype {key.dtype} is not supported"
    if key.dim() != 4 or key.stride(-1) != 1:
        return "expects [L, T, H, D] with a dense head_dim"
    if cos_sin_cache.dtype != torch.float32 and cos_sin_cache.dtype not in (torch.float16, torch.bfloat16):
        return f"cos_sin_cache dtype {cos_sin_cache.dtype} is not float32/16"
    if key.dtype == torch.float8_e4m3fn and key.device.type != "cuda":
        return "fp8 keys need a GPU (the interpreter has no e4m3 conversion)"
    if triton.next_power_of_2(key.shape[2]) * triton.next_power_of_2(max(cos_sin_cache.shape[1] // 2, 1)) > 16384:
        return "heads x rotary pairs too large for one tile"
    return None


@triton.jit
def _delta_cos_sin(cs_ptr, po, pn, cs_stride, r, rm, HALF: tl.constexpr):
    """cos / sin of the rotation by pn - po ([BLOCK_R] float32), from the cache rows of both
    positions: always from the stored position, never a chained shift."""
    co = tl.load(cs_ptr + po * cs_stride + r, mask=rm, other=1.0).to(tl.float32)
    so = tl.load(cs_ptr + po * cs_stride + HALF + r, mask=rm, other=0.0).to(tl.float32)
    cn = tl.load(cs_ptr + pn * cs_stride + r, mask=rm, other=1.0).to(tl.float32)
    sn = tl.load(cs_ptr + pn * cs_stride + HALF + r, mask=rm, other=0.0).to(tl.float32)
    return cn * co + sn * so, sn * co - cn * so


@triton.jit
def _rotate(x1, x2, cd, sd, sc, FP8: tl.constexpr):
    """The pairs (x1, x2) [BLOCK_H, BLOCK_R] rotated by (cd, sd); fp8: scaled by sc first, divided
    by it after (correctly rounded reciprocal) and clamped to +-448."""
    if FP8:
        x1 = x1 * sc
        x2 = x2 * sc
    y1 = x1 * cd[None, :] - x2 * sd[None, :]
    y2 = x2 * cd[None, :] + x1 * sd[None, :]
    if FP8:
        inv = tl.math.div_rn(tl.full(sc.shape, 1.0, tl.float32), sc)
        y1 = tl.minimum(tl.maximum(y1 * inv, -448.0), 448.0)
        y2 = tl.minimum(tl.maximum(y2 * inv, -448.0), 448.0)
    return y1, y2


@triton.jit
def _rerotate_kernel(key_ptr, sc_ptr, old_ptr, new_ptr, cs_ptr, T, H, max_pos,
                     s_l, s_t, s_h, ss_l, ss_t, ss_h, cs_stride,
                     HALF: tl.constexpr, NEOX: tl.constexpr, FP8: tl.constexpr,
                     BLOCK_H: tl.constexpr, BLOCK_R: tl.constexpr):
    pid = tl.program_id(0)
    l = pid // T
    t = pid % T
    po = tl.load(old_ptr + t)
    pn = tl.load(new_ptr + t)
    ok = (po >= 0) & (po < max_pos) & (pn >= 0) & (pn < max_pos)
    if ok:
        r = tl.arange(0, BLOCK_R)
        rm = r < HALF
        cd, sd = _delta_cos_sin(cs_ptr, po, pn, cs_stride, r, rm, HALF)
        h = tl.arange(0, BLOCK_H)
        m = (h[:, None] < H) & rm[None, :]
        base = key_ptr + l.to(tl.int64) * s_l + t.to(tl.int64) * s_t + h[:, None].to(tl.int64) * s_h
        if NEOX:
            o1 = r[None, :]
            o2 = r[None, :] + HALF
        else:
            o1 = 2 * r[None, :]
            o2 = 2 * r[None, :] + 1
        x1 = tl.load(base + o1, mask=m, other=0.0).to(tl.float32)
        x2 = tl.load(base + o2, mask=m, other=0.0).to(tl.float32)
        sc = 1.0
        if FP8:
            sc = tl.load(sc_ptr + l.to(tl.int64) * ss_l + t.to(tl.int64) * ss_t + h.to(tl.int64) * ss_h,
                         mask=h < H, other=1.0)[:, None]
        y1, y2 = _rotate(x1, x2, cd, sd, sc, FP8)
        tl.store(base + o1, y1.to(key_ptr.dtype.element_ty), mask=m)
        tl.store(base + o2, y2.to(key_ptr.dtype.element_ty), mask=m)


def rerotate_keys_into(key, old_pos, new_pos, cos_sin_cache, is_neox: bool, k_scale) -> None:
    L, T, H, D = key.shape
    half = cos_sin_cache.shape[1] // 2
    cs = cos_sin_cache.contiguous()
    fp8 = key.dtype == torch.float8_e4m3fn
    sc = k_scale if fp8 else cs  # a dummy pointer when unused
    ss = k_scale.stride() if fp8 else (0, 0, 0)
    _rerotate_kernel[(L * T,)](key, sc, old_pos, new_pos, cs, T, H, cs.shape[0],
                               key.stride(0), key.stride(1), key.stride(2), ss[0], ss[1], ss[2], cs.stride(0),
                               HALF=half, NEOX=bool(is_neox), FP8=fp8,
                               BLOCK_H=triton.next_power_of_2(H), BLOCK_R=triton.next_power_of_2(half), **_LAUNCH)


# ---- selection ------------------------------------------------------------------------------
def supports_select(fresh_k, cached_k, fresh_v, cached_v) -> Optional[str]:
    for t in (fresh_k, cached_k, fresh_v, cached_v):
        if t is not None and (t.dim() != 3 or t.stride(-1) != 1):
            return "expects [T, H, D] inputs with a dense head_dim"
    return None


@triton.jit
def _deviation_kernel(a_ptr, b_ptr, out_ptr, T, H, D, sa_t, sa_h, sb_t, sb_h, ACCUM: tl.constexpr,
                      BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    t = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    tm = t < T
    acc = tl.zeros([BLOCK_T], dtype=tl.float32)
    for h in range(0, H):
        for d0 in range(0, D, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            m = tm[:, None] & (d[None, :] < D)
            a = tl.load(a_ptr + t[:, None].to(tl.int64) * sa_t + h * sa_h + d[None, :], mask=m, other=0.0).to(tl.float32)
            b = tl.load(b_ptr + t[:, None].to(tl.int64) * sb_t + h * sb_h + d[None, :], mask=m, other=0.0).to(tl.float32)
            e = a - b
            acc += tl.sum(e * e, axis=1)
    if ACCUM:
        acc += tl.load(out_ptr + t, mask=tm, other=0.0)
    tl.store(out_ptr + t, acc, mask=tm)


def token_deviation_into(fresh_k, cached_k, fresh_v, cached_v, deviation) -> None:
    first = True
    for f, c in ((fresh_k, cached_k), (fresh_v, cached_v)):
        if f is None:
            continue
        T, H, D = f.shape
        BT = 16
        _deviation_kernel[(triton.cdiv(T, BT),)](f, c, deviation, T, H, D, f.stride(0), f.stride(1), c.stride(0),
                                                 c.stride(1), ACCUM=not first, BLOCK_T=BT,
                                                 BLOCK_D=min(128, triton.next_power_of_2(D)))
        first = False


def select_tokens_into(fresh_k, cached_k, fresh_v, cached_v, count, forced, candidates, mask, deviation) -> None:
    token_deviation_into(fresh_k, cached_k, fresh_v, cached_v, deviation)
    topk_mask_into(deviation, count, forced, candidates, mask)


# ---- paged keys -----------------------------------------------------------------------------
_PAGED_CDT = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float8_e4m3fn: 3, torch.uint8: 3}


def supports_paged(layout, slots: torch.Tensor, cos_sin_cache: torch.Tensor, is_neox: bool) -> Optional[str]:
    if layout.dtype not in _PAGED_CDT:
        return f"cache dtype {layout.dtype} is not supported"
    if cos_sin_cache.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"cos_sin_cache dtype {cos_sin_cache.dtype} is not float32/16"
    if layout.fp8 and layout.device.type != "cuda":
        return "fp8 keys need a GPU (the interpreter has no e4m3 conversion)"
    if triton.next_power_of_2(layout.num_heads) * triton.next_power_of_2(max(cos_sin_cache.shape[1] // 2, 1)) > 16384:
        return "heads x rotary pairs too large for one tile"
    if layout.num_layers * slots.shape[0] >= 2**31:
        return "more than 2^31 - 1 (layer, token) programs"
    return None


@triton.jit
def _key_base(ptrs_ptr, l, CDT: tl.constexpr):
    a = tl.load(ptrs_ptr + l)
    if CDT == 0:
        p = a.to(tl.pointer_type(tl.float32))
    elif CDT == 1:
        p = a.to(tl.pointer_type(tl.float16))
    elif CDT == 2:
        p = a.to(tl.pointer_type(tl.bfloat16))
    else:
        p = a.to(tl.pointer_type(tl.float8e4nv))
    return p


@triton.jit
def _chan(o, X, sDX, sDI, SPLIT: tl.constexpr):
    if SPLIT:
        c = (o // X).to(tl.int64) * sDX + (o % X).to(tl.int64) * sDI
    else:
        c = o.to(tl.int64) * sDI
    return c


@triton.jit
def _rerotate_paged_kernel(ptrs_ptr, sc_ptr, slots_ptr, old_ptr, new_ptr, cs_ptr, T, H, max_pos, NSLOTS, BS,
                           s_b, s_t, s_h, s_dx, s_di, X, ss_l, ss_h, cs_stride,
                           HALF: tl.constexpr, NEOX: tl.constexpr, FP8: tl.constexpr, SPLIT: tl.constexpr,
                           CDT: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_R: tl.constexpr):
    pid = tl.program_id(0)
    l = pid // T
    t = pid % T
    slot = tl.load(slots_ptr + t).to(tl.int64)
    po = tl.load(old_ptr + t)
    pn = tl.load(new_ptr + t)
    ok = (po >= 0) & (po < max_pos) & (pn >= 0) & (pn < max_pos) & (slot >= 0) & (slot < NSLOTS)
    if ok:
        blk = slot // BS
        r = tl.arange(0, BLOCK_R)
        rm = r < HALF
        cd, sd = _delta_cos_sin(cs_ptr, po, pn, cs_stride, r, rm, HALF)
        h = tl.arange(0, BLOCK_H)
        m = (h[:, None] < H) & rm[None, :]
        base = _key_base(ptrs_ptr, l, CDT) + blk * s_b + (slot - blk * BS) * s_t
        rows = base + h[:, None].to(tl.int64) * s_h
        if NEOX:
            o1 = _chan(r, X, s_dx, s_di, SPLIT)
            o2 = _chan(r + HALF, X, s_dx, s_di, SPLIT)
        else:
            o1 = _chan(2 * r, X, s_dx, s_di, SPLIT)
            o2 = _chan(2 * r + 1, X, s_dx, s_di, SPLIT)
        x1 = tl.load(rows + o1[None, :], mask=m, other=0.0).to(tl.float32)
        x2 = tl.load(rows + o2[None, :], mask=m, other=0.0).to(tl.float32)
        sc = 1.0
        if FP8:
            sc = tl.load(sc_ptr + l.to(tl.int64) * ss_l + h.to(tl.int64) * ss_h, mask=h < H, other=1.0)[:, None]
        y1, y2 = _rotate(x1, x2, cd, sd, sc, FP8)
        tl.store(rows + o1[None, :], y1.to(base.dtype.element_ty), mask=m)
        tl.store(rows + o2[None, :], y2.to(base.dtype.element_ty), mask=m)


def rerotate_keys_paged_into(layout, slots, old_pos, new_pos, cos_sin_cache, is_neox: bool, k_scale) -> None:
    L, T = layout.num_layers, slots.shape[0]
    half = cos_sin_cache.shape[1] // 2
    cs = cos_sin_cache.contiguous()
    sB, sT, sH, sDX, sDI = layout.strides[0]
    fp8 = layout.fp8
    sc = k_scale if fp8 else cs
    ss = k_scale.stride() if fp8 else (0, 0)
    _rerotate_paged_kernel[(L * T,)](layout.ptrs, sc, slots, old_pos, new_pos, cs, T, layout.num_heads, cs.shape[0],
                                     layout.num_slots, layout.block_size, sB, sT, sH, sDX, sDI, layout.x, ss[0], ss[1],
                                     cs.stride(0), HALF=half, NEOX=bool(is_neox), FP8=fp8,
                                     SPLIT=layout.x != layout.head_dim, CDT=_PAGED_CDT[layout.dtype],
                                     BLOCK_H=triton.next_power_of_2(layout.num_heads),
                                     BLOCK_R=triton.next_power_of_2(half), **_LAUNCH)


# ---- gather / scatter of selected tokens ------------------------------------------------------
# A pure data move: program (i, j, p) copies BM rows x BC channels of pair p (0 or 1: up to two
# (source, destination) pairs per launch, e.g. K and V), rows being the flattened (selected token
# s, middle index r) of the [S, R, C] side; one index load and one division per row, the channel
# dim dense so that the accesses are 16-byte vectors when the strides allow (Triton specialises
# strides divisible by 16). A row whose index is outside [0, T) is skipped.
_ROW_DT = (torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.int64, torch.int32,
           torch.int16, torch.uint8, torch.int8, torch.bool)
_TILE_BYTES = 16384


def supports_rows(xs, ys) -> Optional[str]:
    for t in list(xs) + list(ys):
        if t.dtype not in _ROW_DT:
            return f"dtype {t.dtype} is not supported"
        if t.dtype == torch.float8_e4m3fn and t.device.type != "cuda":
            return "fp8 tensors need a GPU (the interpreter has no e4m3 type)"
        if t.dim() != 3 or (t.stride(-1) != 1 and t.shape[-1] > 1):
            return "expects [tokens, R, C] views with a dense last dim"
        if t.shape[0] * t.shape[1] >= 2**31:
            return "more than 2^31 - 1 rows (tokens x R)"
    for x, y in zip(xs, ys):
        if (x.dtype == torch.bool) != (y.dtype == torch.bool):
            return "bool tensors pair with bool tensors only"
    return None


@triton.jit
def _rows_body(src_ptr, dst_ptr, idx_ptr, S, T, R, C, s_t, s_r, d_t, d_r, pid_m, pid_c,
               SCATTER: tl.constexpr, BM: tl.constexpr, BC: tl.constexpr):
    m = pid_m * BM + tl.arange(0, BM)
    mm = m < S * R
    s = m // R
    r = m - s * R
    j = tl.load(idx_ptr + s, mask=mm, other=-1).to(tl.int64)
    ok = mm & (j >= 0) & (j < T)
    c = pid_c * BC + tl.arange(0, BC)
    msk = ok[:, None] & (c < C)[None, :]
    s64 = s.to(tl.int64)
    r64 = r.to(tl.int64)
    if SCATTER:
        so = s64 * s_t + r64 * s_r
        do = j * d_t + r64 * d_r
    else:
        so = j * s_t + r64 * s_r
        do = s64 * d_t + r64 * d_r
    v = tl.load(src_ptr + so[:, None] + c[None, :], mask=msk)
    tl.store(dst_ptr + do[:, None] + c[None, :], v.to(dst_ptr.dtype.element_ty), mask=msk)


@triton.jit
def _rows_kernel(a_src, a_dst, a_S, a_T, a_R, a_C, a_st, a_sr, a_dt, a_dr,
                 b_src, b_dst, b_S, b_T, b_R, b_C, b_st, b_sr, b_dt, b_dr, idx_ptr,
                 SCATTER: tl.constexpr, A_BM: tl.constexpr, A_BC: tl.constexpr, B_BM: tl.constexpr,
                 B_BC: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_c = tl.program_id(1)
    if tl.program_id(2) == 0:
        if (pid_m * A_BM < a_S * a_R) & (pid_c * A_BC < a_C):
            _rows_body(a_src, a_dst, idx_ptr, a_S, a_T, a_R, a_C, a_st, a_sr, a_dt, a_dr, pid_m, pid_c,
                       SCATTER, A_BM, A_BC)
    else:
        if (pid_m * B_BM < b_S * b_R) & (pid_c * B_BC < b_C):
            _rows_body(b_src, b_dst, idx_ptr, b_S, b_T, b_R, b_C, b_st, b_sr, b_dt, b_dr, pid_m, pid_c,
                       SCATTER, B_BM, B_BC)


def _bv(t):
    return t.view(torch.uint8) if t.dtype == torch.bool else t


def _tile(S, R, C, esize):
    BC = min(triton.next_power_of_2(max(C, 1)), max(1, _TILE_BYTES // esize))
    BM = max(1, min(_TILE_BYTES // esize // BC, triton.next_power_of_2(max(S * R, 1))))
    return BM, BC


def _rows(srcs, dsts, index, scatter: bool) -> None:
    """(source, destination) [.., R, C] pairs; the [S, R, C] side is the destination for gather,
    the source for scatter; index int64 [S]."""
    pairs = list(zip(srcs, dsts))
    for k in range(0, len(pairs), 2):
        args, tiles, grid_m, grid_c = [], [], 0, 0
        chunk = pairs[k:k + 2]
        for src, dst in chunk:
            small = src if scatter else dst
            big = dst if scatter else src
            S, R, C = small.shape
            BM, BC = _tile(S, R, C, max(src.element_size(), dst.element_size()))
            tiles += [BM, BC]
            grid_m = max(grid_m, triton.cdiv(S * R, BM))
            grid_c = max(grid_c, triton.cdiv(C, BC))
            args += [_bv(src), _bv(dst), S, big.shape[0], R, C, src.stride(0), src.stride(1), dst.stride(0),
                     dst.stride(1)]
        if len(chunk) == 1:
            args += args[:10]
            tiles += tiles[:2]
        if grid_m == 0:
            continue
        _rows_kernel[(grid_m, grid_c, len(chunk))](*args, index, SCATTER=scatter, A_BM=tiles[0], A_BC=tiles[1],
                                                   B_BM=tiles[2], B_BC=tiles[3])


def gather_tokens_into(xs, index, outs) -> None:
    _rows(xs, outs, index, False)


def scatter_tokens_into(caches, index, srcs) -> None:
    _rows(srcs, caches, index, True)

"""Triton quantize / dequantize (docs/quant-spec.md; the torch reference is the spec).

Same functions and conventions as ``kvkernels/reference/quant.py``:

* ``quantize_into(x, fmt, codes, scale, zero, compute_scale)``: ``x`` ``[L, T, H, D]``
  bf16/fp16/fp32 with ``stride(-1) == 1`` (other strides arbitrary); ``codes`` contiguous uint8
  ``[L, T, H, D*bits/8]``; ``scale``/``zero`` contiguous float32 of ``fmt.scale_shape``.
* ``dequantize_into(codes, scale, zero, fmt, out)``: ``out`` ``[L, T, H, D]``, ``stride(-1) == 1``.
* ``supports(t, fmt)``: why this backend cannot run a case (None if it can).

Kernels. All are memory bound, but at full bandwidth the budget is only ~20 thread-instructions
per element, and the loads a thread has in flight must cover the memory latency, so the tiles
are shaped for few instructions per element, few shuffles/shared-memory layout changes and
enough bytes per thread:

* Tiles, not flat rows: a program owns a ``[TB tokens, HB heads]`` tile of one layer (grid =
  token blocks x head blocks x layers), so a row's (layer, token, head) come from the program
  ids and power-of-two constexpr shifts, never from run-time integer divisions. Offsets are
  ``l*s_l + t*s_t + h*s_h + d`` in int64 (any strides, > 2 GiB tensors). Rows past ``T``/``H``
  are clamped onto the last real one, so loads need no mask (only stores do): a duplicated row
  or token never changes a min/max.
* Layouts: Triton picks them (order of dims by contiguity; Triton 3.6 puts dims of equal
  contiguity in ascending order). The blocks below are laid out so that this gives the layout
  wanted; the code-byte offsets get a ``tl.max_contiguous`` cap (bytes per thread) so that codes
  are stored/loaded in the layout they are computed/used in (no shared-memory round trip).
* rows kernels (int ``channel`` quantize/dequantize, fp8 quantize/dequantize): the tile's rows
  (token, head, group) are flattened (group fastest) into ``[RB, NC, GC]`` (channel
  ``c*GC + jj``, GP = group or head_dim padded to a power of two = NC*GC). A thread holds
  ``row_elems`` elements of a row as whole 16-byte vectors (GC = lanes per row x vector):
  int quantize uses 32 (int4/int2 g32: a whole group per thread, so the min/max needs no
  shuffle and one thread does its divisions), fp8 quantize 16, dequantize 8 (whole rows per
  warp-load, coalesced stores). Sub-byte codes: the block is reshaped to ``[..., GC/K, K]`` (the split stays inside
  a thread) and packed as a sum of shifted codes; unpacking joins ``K`` codes on a new minor
  axis. Exception: int4/int2 ``channel`` dequantize keeps the previous version's kernel
  (``_dq_int_channel_flat``: flat rows, a group's codes per thread), measured faster there.
* int ``token`` quantize: a program owns one token group of ``HB`` heads (over the warps, and
  the spare lanes when head_dim is small) and ``DC`` channels, loaded once as ``[TL, HB, TA, DC]`` with ``2K`` channels (two code bytes) per
  thread: the TA tokens of a thread stay in its registers (min/max over them in-thread, plus
  log2(TL) shuffles when TL lanes share a channel). Full groups take a path without token
  clamps or masks, where the token strides of x and codes are constexprs when small
  (immediate load/store offsets); bf16/fp16 full groups read x as int32 words of two channels
  and take the min/max with packed ``min.NaN.bf16x2``-style instructions (_q_token_group_x2).
  Groups longer than one block take two passes (min/max, then quantize; the re-read hits
  L1/L2). int ``token`` dequantize (tl kernel: the interpreter, ``KVK_GLUON=0``, codes not
  aligned to their words): ``[TB, HB, DP]`` chunks of a group with the group's
  scale/zero loaded once (one joined load) and kept in registers. Both token kernels launch
  the full groups and a partial last group separately, so the fast path's register count is
  its own (a kernel is allocated the registers of its hungriest branch).
* fp8 ``tensor``/``head`` scopes with computed scales: an amax kernel (``atomic_max`` on the
  float bits as int32 into a zeroed buffer; |x| >= 0 so int order is float order) runs first,
  except where the Gluon one-pass kernel applies (below).
* Gluon kernels (``triton.experimental.gluon``: explicit layouts and shared memory; GPUs only,
  no interpreter; ``KVK_GLUON=0`` turns them off): int ``token`` dequantize
  (``_dq_int_token_gl``: a thread owns one 16-byte output vector, the group's scale / zero are
  loaded in that layout, no shared memory) and fp8 ``tensor``/``head`` quantize with computed
  scales in one pass over x (``_q_fp8_resident_gl``, sm_90+, cooperative launch: the CUDA
  one-pass design, layers or heads of up to 8 MiB held in shared memory while their programs
  exchange amax slots). CI compiles them for sm_90 (``tests/gluon_sm90.py``).

Quantize math is float32 as in docs/quant-spec.md: IEEE divisions (``div_rn``) once per group /
scale for ``scale`` and the clamped reciprocal ``inv``, then sub/mul/add per element; kernels are
compiled with ``enable_fp_fusion=False`` so that nothing is contracted into an FMA (dequantize
is then bit-identical to the reference too). Codes are floored by a round-down add of 2^23
(``_int_codes``; a full-rate FADD.RM instead of a float-to-int conversion, which runs at 1/8 of
the FP32 rate). Where ``scale == 0`` the kernels zero ``inv`` per
group, which yields code 0 (``(x - mn) * 0 + 0.5``) without a per-element select, and no clamp
to qmax is needed (see ``_int_codes``). fp8: the GPU's float-to-e4m3 conversion saturates
(``satfinite``), so the explicit clamp to +-448 is kept for the interpreter only. Dequantize
turns a code ``q`` into float32 exactly as ``bits(0x4B000000 | q) - 2^23`` (two full-rate
instructions instead of a slow int-to-float conversion). Codes: first channel in the low bits.
Tile sizes and warps are in ``CONFIG`` (tuned with ``scripts/triton_tune.py``).
"""
from __future__ import annotations

import functools
import os
from typing import Optional

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

try:  # Gluon: Triton's explicit-layout dialect (triton >= 3.5); GPU only, no interpreter
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import async_copy
    # cp.async into shared memory: async_load since Triton 3.7, async_copy_global_to_shared before
    _gl_async_load = getattr(async_copy, "async_load", None) or async_copy.async_copy_global_to_shared
    # the block barrier: thread_barrier in Triton 3.6, barrier in 3.9
    _gl_barrier = getattr(gl, "thread_barrier", None) or gl.barrier
except ImportError:  # pragma: no cover - older Triton: the tl kernel runs instead
    gluon = gl = None

from ..formats import QuantFormat

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# floor of the code by a round-down add (GPU); the interpreter has no directed rounding
_RD_FLOOR: tl.constexpr = tl.constexpr(not _INTERPRET)
_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_SCOPE = {"tensor": 0, "head": 1, "token_head": 2}
_MAX_D = 4096
_MAX_GRID_Z = 65535   # CUDA's limit on grid dims 1 and 2 (the layer is dim 2)
FLT_MAX: tl.constexpr = tl.constexpr(3.4028234663852886e38)
TWO23: tl.constexpr = tl.constexpr(8388608.0)          # 2^23
TWO23_BITS: tl.constexpr = tl.constexpr(0x4B000000)    # float bits of 2^23

# Launch configuration: ``elems`` = elements per program (a power of two; the tile is sized to
# it), ``warps`` = num_warps (capped so that warps split rows only). Chosen with
# scripts/triton_tune.py on an H200 (bf16 [32, T, 8, 128], T = 4096 and 32768, Triton 3.6).
CONFIG = {
    # rows kernels: elements per program, warps, elements per thread of a row (the lanes
    # sharing a row = row length / row_elems; row_elems = 8 bf16: whole rows per warp-load)
    "q_channel": dict(elems=2048, warps=2, row_elems=32),
    "dq_channel": dict(elems=16384, warps=16, row_elems=8),   # int8 codes (sub-byte: _flat)
    "q_fp8": dict(elems=8192, warps=8, row_elems=16),
    "dq_fp8": dict(elems=16384, warps=4, row_elems=8),
    "amax_fp8": dict(elems=8192, warps=8),
    # token groups: x elements per thread, warps (= heads per program)
    "q_token": dict(thread_elems=128, warps=2, pairs=1),
    "dq_token": dict(elems=16384, warps=4),
}


def _p2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


def _pow2_floor(n: int) -> int:
    return 1 << (max(int(n), 1).bit_length() - 1)


# ---------------------------------------------------------------------------------------------
# kernels
# ---------------------------------------------------------------------------------------------
@triton.jit
def _max_nan_fn(a, b):
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _min_nan_fn(a, b):
    return tl.minimum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _rmax(x, axis: tl.constexpr):
    """max along axis with NaN propagating, as torch.amax in the reference (tl.max drops NaN)."""
    return tl.reduce(x, axis, _max_nan_fn)


@triton.jit
def _rmin(x, axis: tl.constexpr):
    return tl.reduce(x, axis, _min_nan_fn)


@triton.jit
def _int_params(mn, mx, QMAX: tl.constexpr):
    """Per group: scale = (mx - mn) / qmax and inv = min(qmax / (mx - mn), FLT_MAX), both IEEE;
    inv is zeroed where scale == 0 (every code of such a group is then 0)."""
    rng = mx - mn
    scale = tl.math.div_rn(rng, tl.full(rng.shape, QMAX, tl.float32))
    inv = tl.minimum(tl.math.div_rn(tl.full(rng.shape, QMAX, tl.float32), rng), FLT_MAX)
    return scale, tl.where(scale > 0, inv, 0.0)


@triton.jit
def _int_codes(x, mn, inv):
    """floor((x - mn) * inv + 0.5) in the low bits of an int32 (sub, mul, add: three roundings,
    no FMA); only the low 8 bits may be used (packed codes are cut to uint8). x >= mn, so the
    value v is >= 0.5 and < 2^23 and the floor is taken by one round-down add of 2^23 (the low
    23 bits of fl_rd(v + 2^23) are floor(v); full rate, unlike a float-to-int conversion), or by
    truncation under the interpreter. inv == 0 gives 0. No clamp to qmax is needed for finite x:
    fl(x - mn) <= fl(mx - mn) = rng and inv <= fl(qmax / rng) (or inv = FLT_MAX < qmax / rng),
    so the product is at most qmax * (1 + 2^-24)^2 and, after the rounded + 0.5, below qmax + 1.
    (Lanes masked off a group may give any code; never stored.)"""
    v = (x - mn) * inv + 0.5
    if _RD_FLOOR:
        return libdevice.add_rd(v, TWO23).to(tl.int32, bitcast=True)
    else:
        return v.to(tl.int32)


@triton.jit
def _code_to_float(q):
    """int32 code (0 <= q < 2^23) -> float32, exactly: the float with bits 0x4B000000 | q is 2^23 + q."""
    return (q | TWO23_BITS).to(tl.float32, bitcast=True) - TWO23


@triton.jit
def _unpack(c, BITS: tl.constexpr, SHAPE: tl.constexpr):
    """int32 code bytes [..., n] -> codes [..., n * 8 / BITS] (first code in the low bits). The
    codes of a byte are joined along a new minor axis, which stays inside the thread."""
    if BITS == 8:
        return c
    elif BITS == 4:
        return tl.reshape(tl.join(c & 15, c >> 4), SHAPE)
    else:
        q = tl.join(tl.join(c & 3, (c >> 4) & 3), tl.join((c >> 2) & 3, c >> 6))
        return tl.reshape(q, SHAPE)


@triton.jit
def _load_d(ptrs, d, D: tl.constexpr, DP: tl.constexpr):
    """Load a block whose last axis ``d`` (arange(DP)) is padded past D: masked (0) only if DP > D."""
    if D == DP:
        return tl.load(ptrs)
    else:
        return tl.load(ptrs, mask=d < D, other=0)


@triton.jit
def _tile_rows(tb, hb, T, H, NG: tl.constexpr, TB: tl.constexpr, HB: tl.constexpr, NGP: tl.constexpr):
    """The rows of tile (token block tb, head block hb): (token, head, group) flattened with the
    group fastest. Returns t, h, g (clamped onto valid rows: a load through them stays in
    bounds) and the mask of the real rows."""
    r = tl.arange(0, TB * HB * NGP)
    t = tb * TB + r // (HB * NGP)
    h = hb * HB + (r // NGP) % HB
    g = r % NGP
    mask = (t < T) & (h < H)
    if NG != NGP:
        mask = mask & (g < NG)
        g = tl.minimum(g, NG - 1)
    return tl.minimum(t, T - 1), tl.minimum(h, H - 1), g, mask


@triton.jit
def _row_chunks(NC: tl.constexpr, GC: tl.constexpr):
    """[1, NC, GC] offsets of a row's elements taken as NC chunks of GC."""
    return (tl.arange(0, NC) * GC)[None, :, None] + tl.arange(0, GC)[None, None, :]


@triton.jit
def _rows_program(T, H, s_l, s_t, s_h, G: tl.constexpr, NG: tl.constexpr, TB: tl.constexpr,
                  HB: tl.constexpr, NGP: tl.constexpr):
    """Rows (token, head, group of G channels; fp8: NG = NGP = 1) of this program's tile:
    (layer as int64, token, head, element offset of each row's group in x / out, int64 row /
    group index, mask of the real rows); layer = program id 2."""
    t, h, g, rmask = _tile_rows(tl.program_id(0), tl.program_id(1), T, H, NG, TB, HB, NGP)
    l = tl.program_id(2).to(tl.int64)
    off = l * s_l + t.to(tl.int64) * s_t + h.to(tl.int64) * s_h + g * G
    return l, t, h, off, ((l * T + t) * H + h) * NG + g, rmask


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
    QMAX: tl.constexpr = (1 << BITS) - 1
    K: tl.constexpr = 8 // BITS
    GB: tl.constexpr = G // K          # code bytes per group
    NC: tl.constexpr = GP // GC
    GCB: tl.constexpr = GC // K
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
    scale, inv = _int_params(mn, mx, QMAX)
    tl.store(scale_ptr + grp, scale, mask=rmask)
    tl.store(zero_ptr + grp, mn, mask=rmask)
    q = _int_codes(x, mn[:, None, None], inv[:, None, None])
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
    y = (_code_to_float(q) * scale + zero).to(out_ptr.dtype.element_ty)
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
    y = q.to(tl.float32) * scale[:, :, None] + zero[:, :, None]
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


@triton.jit
def _x2_minmax(mn_a, mx_a, mn_b, mx_b, TY: tl.constexpr):
    """(min(mn_a, mn_b), max(mx_a, mx_b)) per 16-bit half of int32 words, TY = bf16x2 / f16x2."""
    return tl.inline_asm_elementwise(
        "min.NaN." + TY + " $0, $2, $4;\n\tmax.NaN." + TY + " $1, $3, $5;", "=r,=r,r,r,r,r",
        [mn_a, mx_a, mn_b, mx_b], dtype=(tl.int32, tl.int32), is_pure=True, pack=1)


@triton.jit
def _bf16x2_minmax(mn_a, mx_a, mn_b, mx_b):
    return _x2_minmax(mn_a, mx_a, mn_b, mx_b, "bf16x2")


@triton.jit
def _f16x2_minmax(mn_a, mx_a, mn_b, mx_b):
    return _x2_minmax(mn_a, mx_a, mn_b, mx_b, "f16x2")


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
    mn_lo = _half_lo(mn2, BF16)
    mn_hi = _half_hi(mn2, BF16)
    sc_lo, inv_lo = _int_params(mn_lo, _half_lo(mx2, BF16), QMAX)
    sc_hi, inv_hi = _int_params(mn_hi, _half_hi(mx2, BF16), QMAX)
    d = dc * DC + tl.arange(0, DC)
    sz = tl.max_contiguous(((l * NGT + tg) * H + h)[:, None] * D + d[None, :], [1, VX])   # [HB, DC]
    tl.store(scale_ptr + sz, tl.reshape(tl.join(sc_lo, sc_hi), (HB, DC)), mask=hmask[:, None])
    tl.store(zero_ptr + sz, tl.reshape(tl.join(mn_lo, mn_hi), (HB, DC)), mask=hmask[:, None])
    q = _int_codes(_half_lo(xw, BF16), mn_lo[None, :, None, :], inv_lo[None, :, None, :])
    q = q + (_int_codes(_half_hi(xw, BF16), mn_hi[None, :, None, :], inv_hi[None, :, None, :]) << BITS)
    if K == 4:
        q = tl.sum(tl.reshape(q, (TL, HB, TA, DCB, 2)) << (tl.arange(0, 2) * (2 * BITS))[None, None, None, None, :], axis=4)
    cpt = cp + (ti.to(tl.int64) * cs)[:, None, :, None]
    if TA * TL > G:
        tl.store(cpt, q.to(tl.uint8), mask=(ti < G)[:, None, :, None] & hmask[None, :, None, None])
    else:
        tl.store(cpt, q.to(tl.uint8), mask=hmask[None, :, None, None])


@triton.jit
def _q_token_group(x_ptr, codes_ptr, scale_ptr, zero_ptr, T, H, s_l, s_t, s_h, tg,
                   D: tl.constexpr, DC: tl.constexpr, G: tl.constexpr, TA: tl.constexpr,
                   TL: tl.constexpr, HB: tl.constexpr, BITS: tl.constexpr, VX: tl.constexpr,
                   XS: tl.constexpr, CS: tl.constexpr, FULL: tl.constexpr):
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
        mn = _rmin(_rmin(x, 2), 0)                                          # [HB, DC]
        mx = _rmax(_rmax(x, 2), 0)
    else:
        mn = tl.full((HB, DC), float("inf"), tl.float32)
        mx = tl.full((HB, DC), float("-inf"), tl.float32)
        for c in range(NCH):
            ti, tmask = _token_rows(i, c, CH, G, n, FULL)
            x = _load_d(xp + (ti.to(tl.int64) * xs)[:, None, :, None], d, D, DC * NDC).to(tl.float32)
            mn = _min_nan_fn(mn, _rmin(_rmin(x, 2), 0))
            mx = _max_nan_fn(mx, _rmax(_rmax(x, 2), 0))
    scale, inv = _int_params(mn, mx, QMAX)
    tl.store(scale_ptr + sz, scale, mask=hd_mask)
    tl.store(zero_ptr + sz, mn, mask=hd_mask)
    for c in range(NCH):
        ti, tmask = _token_rows(i, c, CH, G, n, FULL)
        if NCH > 1:
            x = _load_d(xp + (ti.to(tl.int64) * xs)[:, None, :, None], d, D, DC * NDC).to(tl.float32)
        q = _int_codes(x, mn[None, :, None, :], inv[None, :, None, :])
        if K > 1:
            q = tl.sum(tl.reshape(q, (TL, HB, TA, DCB, K)) << shifts, axis=4)   # [TL, HB, TA, DCB]
        cpt = cp + (ti.to(tl.int64) * cs)[:, None, :, None]
        if _token_rows_exact(CH, G, FULL):
            tl.store(cpt, q.to(tl.uint8), mask=cmask[None])
        else:
            tl.store(cpt, q.to(tl.uint8), mask=tmask[:, None, :, None] & cmask[None])


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
        y = (_code_to_float(_unpack(cb, BITS, (TB, HB, DP))) * scale + zero).to(out_ptr.dtype.element_ty)
        opt = op + (ti.to(tl.int64) * os)[:, None, None]
        if _token_rows_exact(TB, G, FULL):
            tl.store(opt, y, mask=hd_mask[None])
        else:
            tl.store(opt, y, mask=tmask[:, None, None] & hd_mask[None])


if gluon is not None:
    @gluon.jit
    def _dq_int_token_gl(codes_ptr, scale_ptr, zero_ptr, out_ptr, T, H, s_l, s_t, s_h, tg0,
                         D: gl.constexpr, DV: gl.constexpr, V: gl.constexpr, G: gl.constexpr,
                         TB: gl.constexpr, HB: gl.constexpr, BITS: gl.constexpr, OS: gl.constexpr,
                         CS: gl.constexpr, MASKED: gl.constexpr, HDMASK: gl.constexpr, L4: gl.constexpr):
        # int token dequantize, Gluon (see _dq_token_gluon_params): program pid0 = heads
        # [hb*HB, +HB) of token group tg (+ tg0), hb fastest (the programs running together write
        # whole token rows: heads slowest made 2 KiB-strided 256-byte pieces, int2 84.5% of copy
        # at Llama-3-8B T=32768 against 93.3%), layer pid1; chunks [TB tokens, HB heads, DV vectors, V
        # channels] in layout L4, where a thread owns whole V-channel output vectors (16 bytes).
        # codes_ptr points to words of V codes (V * BITS bits: [L, T, H, D / V]), so a thread's
        # codes are one load; the group's scale / zero [HB, DV, V] are loaded once straight in
        # the output's layout (slice 0 of L4): no layout change, no shared memory. MASKED: a
        # partial group or G % TB != 0 (token masks); HDMASK: padded heads or channels (H % HB,
        # D < DV * V); OS / CS: out / codes token strides (elements / bytes; 0: run time).
        S0: gl.constexpr = gl.SliceLayout(0, L4)                      # [HB, DV, V]
        S3: gl.constexpr = gl.SliceLayout(3, L4)                      # [TB, HB, DV] code words
        LT: gl.constexpr = gl.SliceLayout(1, gl.SliceLayout(2, S3))   # [TB]
        S0h: gl.constexpr = gl.SliceLayout(1, gl.SliceLayout(2, S0))
        S0d: gl.constexpr = gl.SliceLayout(0, gl.SliceLayout(2, S0))
        S0j: gl.constexpr = gl.SliceLayout(0, gl.SliceLayout(1, S0))
        S3h: gl.constexpr = gl.SliceLayout(1, gl.SliceLayout(0, S3))
        S3d: gl.constexpr = gl.SliceLayout(0, gl.SliceLayout(0, S3))
        DW: gl.constexpr = D // V
        NCH: gl.constexpr = (G + TB - 1) // TB
        NGT = (T + G - 1) // G
        NHB = (H + HB - 1) // HB
        pid = gl.program_id(0)
        tg = pid // NHB
        h0 = (pid - tg * NHB) * HB
        tg += tg0
        l = gl.program_id(1).to(gl.int64)
        h = h0 + gl.arange(0, HB, layout=S0h)
        h3 = gl.expand_dims(gl.expand_dims(gl.minimum(h, H - 1), 1), 2)
        ch = (gl.expand_dims(gl.expand_dims(gl.arange(0, DV, layout=S0d), 0), 2) * V
              + gl.expand_dims(gl.expand_dims(gl.arange(0, V, layout=S0j), 0), 1))   # [1, DV, V]
        sz = ((l * NGT + tg) * H + h3) * D + ch
        if DV * V == D:
            scale = gl.load(scale_ptr + sz)
            zero = gl.load(zero_ptr + sz)
        else:
            scale = gl.load(scale_ptr + sz, mask=ch < D, other=0.0)
            zero = gl.load(zero_ptr + sz, mask=ch < D, other=0.0)
        scale = gl.expand_dims(scale, 0)
        zero = gl.expand_dims(zero, 0)
        ohd = gl.expand_dims(h3.to(gl.int64) * s_h + ch, 0)                         # [1, HB, DV, V]
        hd_mask = gl.expand_dims(gl.expand_dims(gl.expand_dims(h < H, 1), 2) & (ch < D), 0)
        hw = gl.minimum(h0 + gl.arange(0, HB, layout=S3h), H - 1)
        dw = gl.minimum(gl.arange(0, DV, layout=S3d), DW - 1)
        cw = gl.expand_dims(gl.expand_dims(hw, 1) * DW + gl.expand_dims(dw, 0), 0)  # [1, HB, DV]
        shift = gl.expand_dims(gl.expand_dims(gl.expand_dims(gl.arange(0, V, layout=S0j), 0), 1), 0) * BITS
        if OS == 0:
            os = s_t
        else:
            os = OS
        if CS == 0:
            cs = H * DW
        else:
            cs = CS // (V * BITS // 8)
        t0 = tg * G
        n = gl.minimum(T - t0, G)
        ob = out_ptr + (l * s_l + t0.to(gl.int64) * s_t)
        cb = codes_ptr + (l * T + t0) * H * DW
        for c in gl.static_range(NCH):
            ti = c * TB + gl.arange(0, TB, layout=LT)
            if MASKED:
                tc = gl.minimum(ti, n - 1)
            else:
                tc = ti
            w = gl.load(cb + (gl.expand_dims(gl.expand_dims(tc * cs, 1), 2) + cw))
            if V * BITS > 32:   # int8 into 16-bit outputs: 8 codes, a 64-bit word
                q = ((gl.expand_dims(w, 3) >> shift.to(gl.int64)) & 255).to(gl.int32)
            else:
                q = (gl.expand_dims(w.to(gl.int32), 3) >> shift) & ((1 << BITS) - 1)
            y = (_code_to_float_gl(q) * scale + zero).to(out_ptr.dtype.element_ty)
            to = gl.expand_dims(gl.expand_dims(gl.expand_dims(tc.to(gl.int64) * os, 1), 2), 3)
            if MASKED:
                tm = gl.expand_dims(gl.expand_dims(gl.expand_dims(ti < n, 1), 2), 3)
                gl.store(ob + (to + ohd), y, mask=tm & hd_mask)
            elif HDMASK:
                gl.store(ob + (to + ohd), y, mask=hd_mask)
            else:
                gl.store(ob + (to + ohd), y)

    @gluon.jit
    def _res_bases(p, s_lv, Nlv, VE: gl.constexpr, HS: gl.constexpr, D: gl.constexpr):
        """Where (pseudo-)layer p starts in x and in codes (elements, int64): layer p, or with
        HS > 1 head p % HS of layer p // HS. Layer strides in 16-byte vectors (s_lv, Nlv), so
        that the compiler knows the bases are 16-byte aligned (16-byte cp.async)."""
        if HS > 1:
            l = (p // HS).to(gl.int64)
            h = (p % HS).to(gl.int64)
            return (l * s_lv + h * (D // VE)) * VE, (l * Nlv + h * (D // VE)) * VE
        else:
            return p.to(gl.int64) * s_lv * VE, p.to(gl.int64) * Nlv * VE

    @gluon.jit
    def _q_fp8_resident_gl(x_ptr, codes_ptr, scale_ptr, slots_ptr, s_lv, Nlv, Nv, nL, nsteps, NG, gpb,
                           VE: gl.constexpr, K: gl.constexpr, HS: gl.constexpr, D: gl.constexpr,
                           NW: gl.constexpr, GP2: gl.constexpr, tr_ptr=None, TRACE: gl.constexpr = False):
        # fp8 tensor scope with computed scales over nL (pseudo-)layers of Nv 16-byte vectors, in
        # one pass over x: the Gluon form of the CUDA quant_fp8_resident_kernel's block groups
        # (csrc/quant.cu). The grid (co-resident: a cooperative launch, 32 / NW programs of NW
        # warps an SM) is NG groups of gpb programs; at step s group grp holds (pseudo-)layer
        # s * NG + grp, each program K vectors a thread. A step's vectors are copied into shared
        # memory (cp.async, 3 stages: steps s+1 and s+2 load while step s - 1 is quantized), its
        # amax goes to the program's slot (bit 31 set: full; one relaxed store, the value is the
        # message), and the group's programs wait for all gpb slots of the layer (polled by warp
        # 0) before quantizing it from shared memory. With HS > 1, a pseudo-layer is one head
        # [T, D] of a layer (rows of C = D / VE vectors, HS * C apart): the head scope.
        # Four block barriers a step (twelfth session, bench/results/fp8-onepass-12th-h200-
        # 2026-11-27.txt; eight before: 83 -> 87% of copy on Llama-3-8B fp8:tensor T=4096):
        # Triton's before the stage is read (a thread reads only the vectors it copied, but
        # Triton cannot know), the per-warp maxima's, the hand-on's, and one before the next
        # step's loads into the stage just quantized. MERGE (the tensor scope, HS == 1): the
        # maxima and the hand-on share one, so the program's publish of step s waits for warp
        # 0's poll of step s - 1: three a step, +2 points on the tensor rows (Llama-3-8B 86-87
        # -> 89%, SmolLM2 88-90 -> 90-93%) but -3 to -8 on the heads' (so not for HS > 1).
        # slots: [nL, gpb] int32, zeroed by the caller. GP2: gpb padded to a power of two.
        NT: gl.constexpr = NW * 32
        R: gl.constexpr = K * NT
        C: gl.constexpr = D // VE
        FULL: gl.constexpr = -2147483648
        MERGE: gl.constexpr = HS == 1
        L2: gl.constexpr = gl.BlockedLayout([1, VE], [32, 1], [NW, 1], [1, 0])
        # the slots of a layer, [RS, 32]: all in each warp (the warps hold copies), slot
        # 32 r + lane in register r, so that each poll load of a warp reads 32 consecutive slots
        # (thirteenth session: RS consecutive slots a lane, 4 lines a load at 128 programs, was
        # up to 2 points slower on SmolLM2 fp8:tensor, equal elsewhere)
        RS: gl.constexpr = max(1, GP2 // 32)
        LS: gl.constexpr = gl.BlockedLayout([RS, 1], [1, 32], [1, NW], [1, 0])
        SH: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [1, 0])
        # the amax of a step: a stage viewed as [K, NW, 32, VE] (row r = k NT + 32 w + lane), so
        # that a warp reduces its own rows without the other warps; one value a warp [NW] (LW)
        # then goes through shared memory (one barrier), read by every warp whole, a value a lane
        # (LR), and reduced in the warp
        L4: gl.constexpr = gl.BlockedLayout([1, 1, 1, VE], [1, 1, 32, 1], [1, NW, 1, 1], [3, 2, 1, 0])
        L3: gl.constexpr = gl.SliceLayout(3, L4)
        LKW: gl.constexpr = gl.SliceLayout(2, L3)
        LW: gl.constexpr = gl.SliceLayout(0, LKW)
        LR: gl.constexpr = gl.BlockedLayout([1], [32], [NW], [0])
        SH1: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [0])
        pid = gl.program_id(0)
        grp = pid // gpb
        bl = pid - grp * gpb
        r = gl.arange(0, R, layout=gl.SliceLayout(1, L2))
        vec = (r // NT) * (gpb * NT) + bl * NT + (r % NT)   # thread i's vectors: i + NT k of this program
        if HS > 1:
            row = vec // C
            off = row * (HS * C) + (vec - row * C)
        else:
            off = vec
        offe = gl.expand_dims(off * VE, 1) + gl.expand_dims(gl.arange(0, VE, layout=gl.SliceLayout(0, L2)), 0)
        valid = gl.expand_dims(vec < Nv, 1) & (offe >= 0)     # [R, VE]
        k3 = gl.expand_dims(gl.expand_dims(gl.arange(0, K, layout=gl.SliceLayout(1, LKW)), 1), 2)
        w3 = gl.expand_dims(gl.expand_dims(gl.arange(0, NW, layout=LW), 0), 2)
        l3 = gl.expand_dims(gl.expand_dims(gl.arange(0, 32, layout=gl.SliceLayout(0, gl.SliceLayout(1, L3))), 0), 1)
        valid3 = (k3 * (gpb * NT) + bl * NT + w3 * 32 + l3) < Nv   # [K, NW, 32]: rows of the layer
        stages = gl.allocate_shared_memory(x_ptr.dtype.element_ty, [3, R, VE], SH)
        red = gl.allocate_shared_memory(gl.int32, [2, NW], SH1)    # per-warp maxima, by step parity
        hand = gl.allocate_shared_memory(gl.int32, [2, NW], SH1)   # warp 0's polled amax, by parity
        si = (gl.expand_dims(gl.arange(0, RS, layout=gl.SliceLayout(1, LS)), 1) * 32
              + gl.expand_dims(gl.arange(0, 32, layout=gl.SliceLayout(0, LS)), 0))
        # warp 0 polls: thread ids by inline asm (the slots' layout gives every warp all of them)
        poller = _tid_gl(si) < 32
        # TRACE (developer, scripts/exp/gluon_trace_exp.py): %globaltimer of each program at its
        # start and at four points of each of the first 64 steps, as the CUDA kernel's trace
        if TRACE:
            _trace_gl(tr_ptr, pid, 64, 0, NW, True)
        for s in range(-2, nsteps + 1):
            pq = (s - 1) * NG + grp   # the layer quantized this iteration (step s - 1)
            qa = (s >= 1) & (pq < nL)
            # its slots' first poll, early: the load overlaps the step's amax (masked off if none)
            sp = slots_ptr + pq * gpb + si
            pm = (si < gpb) & poller & qa
            v = gl.load(sp, mask=pm, other=FULL, volatile=True)
            p = s * NG + grp          # the layer published this iteration (step s)
            pa = (s >= 0) & (s < nsteps) & (p < nL)
            if s >= 0:
                # step s has landed (this thread's copies; a thread reads only its own vectors)
                _cp_async_wait1_gl(pid)
                if TRACE:
                    _trace_gl(tr_ptr, pid, s, 0, NW)
            if pa:  # |x| bits (ordered as |x|; NaN above inf): this program's max of step s
                a = stages.index(s % 3).reshape([K, NW, 32, VE]).load(L4)
                a = a.to(gl.float32).to(gl.int32, bitcast=True) & 0x7FFFFFFF
                mw = gl.reduce(gl.reduce(gl.where(valid3, gl.reduce(a, 3, _imax_gl), 0), 2, _imax_gl), 0, _imax_gl)
                red.index(s % 2).store(mw)
                if not MERGE:
                    m = gl.reduce(red.index(s % 2).load(LR), 0, _imax_gl)
                    gl.atomic_xchg(slots_ptr + p * gpb + bl, m | FULL, sem="relaxed", scope="gpu")
                    if TRACE:
                        _trace_gl(tr_ptr, pid, s, 1, NW)
            if qa:  # step s - 1: warp 0 waits for the group's slots (a warp-local reduction;
                # the other warps' loads are masked off, so they pass) and hands the layer's amax
                # to every warp through shared memory
                while gl.reduce(gl.reduce(v, 1, _imax_gl), 0, _imax_gl) >= 0:
                    v = gl.load(sp, mask=pm, other=FULL, volatile=True)
                am = gl.reduce(gl.reduce(v & 0x7FFFFFFF, 1, _imax_gl), 0, _imax_gl)   # warp 0: the layer's amax; others 0
                hand.index(s % 2).store(gl.full([NW], 0, gl.int32, LW) + am)
            if MERGE:  # one barrier for the step's amax and the hand-on; the publish waits for it
                _gl_barrier()
                if pa:
                    m = gl.reduce(red.index(s % 2).load(LR), 0, _imax_gl)
                    gl.atomic_xchg(slots_ptr + p * gpb + bl, m | FULL, sem="relaxed", scope="gpu")
                    if TRACE:
                        _trace_gl(tr_ptr, pid, s, 1, NW)
            if qa:  # scale, quantize from shared memory
                mb = gl.reduce(hand.index(s % 2).load(LR), 0, _imax_gl)
                if TRACE:
                    _trace_gl(tr_ptr, pid, s - 1, 2, NW)
                sc = gl.div_rn(mb.to(gl.float32, bitcast=True), 448.0)
                sc = gl.where(sc > 0, sc, 1.0)
                inv = gl.minimum(gl.div_rn(1.0, sc), 3.4028234663852886e38)
                if bl == 0:
                    gl.store(scale_ptr + pq, sc)
                xb, cb = _res_bases(pq, s_lv, Nlv, VE, HS, D)
                y = stages.index((s - 1) % 3).load(L2).to(gl.float32) * inv
                c = y.to(gl.float8e4nv).to(gl.uint8, bitcast=True)
                gl.store(codes_ptr + cb + offe, c, mask=valid)
                if TRACE:
                    _trace_gl(tr_ptr, pid, s - 1, 3, NW)
            # step s + 2: its loads start, into the stage that step s - 1 held. The barrier (a
            # thread reads only the vectors it copied, but Triton cannot know) is on every path
            # through the loop, so that Triton adds none before the next step's hand-on store
            _gl_barrier()
            pn = (s + 2) * NG + grp
            if (s + 2 < nsteps) & (pn < nL):
                xb, cb = _res_bases(pn, s_lv, Nlv, VE, HS, D)
                _gl_async_load(stages.index((s + 2) % 3), x_ptr + xb + offe, mask=valid)
            async_copy.commit_group()

    @gluon.jit
    def _cp_async_wait1_gl(like):
        """cp.async.wait_group 1: this thread's copies but the newest group have landed. Unlike
        async_copy.wait_group it adds no block barrier; Triton puts one before the first read
        of the stage, which makes the copies visible to the block."""
        return gl.inline_asm_elementwise("cp.async.wait_group 1;\n\tmov.u32 $0, 0;", "=r,r", [like], dtype=gl.int32,
                                         is_pure=False, pack=1)

    @gluon.jit
    def _trace_gl(tr_ptr, pid, s, phase: gl.constexpr, NW: gl.constexpr, START: gl.constexpr = False):
        """%globaltimer -> tr_ptr[(pid * 65 + s) * 4 + phase] (int64) for steps s < 64; with
        START the program's start, at row 64."""
        LT: gl.constexpr = gl.BlockedLayout([1], [32], [NW], [0])
        if START or s < 64:
            z = gl.full([1], 0, gl.int32, LT)
            t = gl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l,r", [z], dtype=gl.int64, is_pure=False,
                                          pack=1)
            gl.store(tr_ptr + ((pid * 65 + s) * 4 + phase) + gl.arange(0, 1, layout=LT), t)

    @gluon.jit
    def _tid_gl(like):
        """threadIdx.x, shaped and laid out like ``like`` (int32)."""
        return gl.inline_asm_elementwise("mov.u32 $0, %tid.x;", "=r,r", [like], dtype=gl.int32, is_pure=True,
                                         pack=1)

    @gluon.jit
    def _imax_gl(a, b):  # (gl.max is a tl.jit function: under TRITON_INTERPRET=1 Gluon cannot compile it)
        return gl.maximum(a, b)

    @gluon.jit
    def _code_to_float_gl(q):
        return (q | 0x4B000000).to(gl.float32, bitcast=True) - 8388608.0


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
    a = tl.abs(x.to(tl.float32))
    a = _rmax(_rmax(a, 2), 0)                                              # [HB]
    if SCOPE == 0:
        v = _rmax(a, 0)
        tl.atomic_max(amax_ptr + l, v.to(tl.int32, bitcast=True))
    else:
        tl.atomic_max(amax_ptr + (l * H + h), a.to(tl.int32, bitcast=True), mask=hmask)


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
           GC: tl.constexpr, CV: tl.constexpr, SCOPE: tl.constexpr, COMPUTE: tl.constexpr,
           CLAMP: tl.constexpr):
    # Rows (token, head) as a [NC chunks, RB rows, GC] block, as in _q_int_channel.
    FMAX: tl.constexpr = 448.0
    NC: tl.constexpr = DP // GC
    l, t, h, xrow, row, rmask = _rows_program(T, H, s_l, s_t, s_h, DP, 1, TB, HB, 1)
    d = _row_chunks(NC, GC)
    x = _load_d(x_ptr + (xrow[:, None, None] + d), d, D, DP).to(tl.float32)
    sidx = _fp8_scale_index(l, t, h, T, H, SCOPE)
    if COMPUTE:
        if SCOPE == 2:
            amax = _rmax(_rmax(tl.abs(x), 2), 1)
        else:
            amax = tl.load(amax_ptr + sidx).to(tl.float32, bitcast=True)
        s = tl.math.div_rn(amax, tl.full(amax.shape, FMAX, tl.float32))
        s = tl.where(s > 0, s, 1.0)
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
    if CLAMP:  # the GPU conversion saturates to +-448 itself (cvt.rn.satfinite); the interpreter doesn't
        y = tl.minimum(tl.maximum(y, -FMAX), FMAX)
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


# ---------------------------------------------------------------------------------------------
# launch helpers
# ---------------------------------------------------------------------------------------------
_LAUNCH = {} if _INTERPRET else {"enable_fp_fusion": False}


def _row_tile(T: int, H: int, per_head: int, elems: int):
    """(TB, HB) for a [TB tokens, HB heads] tile of ``per_head`` (padded) elements per (token,
    head) with about ``elems`` elements; all heads first, then tokens; powers of two."""
    HB = min(_p2(H), _pow2_floor(max(1, elems // per_head)))
    TB = min(_p2(T), _pow2_floor(max(1, elems // (HB * per_head))))
    return TB, HB


def _rows_launch(T: int, H: int, L: int, NGP: int, GP: int, esize: int, cfg):
    """Rows kernels: (grid, TB, HB, GC, warps). A thread holds ``row_elems`` elements of a row
    (whole 16-byte vectors), so GP / row_elems lanes share a row and GC = lanes x vector; the
    warps are capped so that they split rows only."""
    vec = 16 // esize
    lanes = max(1, GP // max(cfg["row_elems"], vec))
    GC = min(GP, lanes * vec)
    lanes = GC // vec if GC >= vec else 1
    TB, HB = _row_tile(T, H, NGP * GP, cfg["elems"])
    warps = max(1, min(cfg["warps"], (TB * HB * NGP * lanes) // 32))
    return (triton.cdiv(T, TB), triton.cdiv(H, HB), L), TB, HB, GC, warps


def _channel_launch(T: int, H: int, L: int, D: int, G: int, bits: int, esize: int, cfg):
    """Channel-group rows kernels (_q_int_channel, _dq_int_channel): (grid, launch kwargs)."""
    NG, GP, NGP = _channel_dims(D, G)
    grid, TB, HB, GC, nw = _rows_launch(T, H, L, NGP, GP, esize, cfg)
    return grid, dict(G=G, NG=NG, GP=GP, NGP=NGP, BITS=bits, TB=TB, HB=HB, GC=GC,
                      CV=max(1, min(GC, 16 // esize) // (8 // bits)), num_warps=nw, **_LAUNCH)


def _geometry(t: torch.Tensor):
    """x / out [L, T, H, D] -> (L, T, H, D, s_l, s_t, s_h, element size, D padded to 2^k)."""
    L, T, H, D = t.shape
    return L, T, H, D, int(t.stride(0)), int(t.stride(1)), int(t.stride(2)), t.element_size(), _p2(D)


def _channel_dims(D: int, G: int):
    """Channel groups: (groups per row NG, G padded to 2^k, NG padded to 2^k)."""
    NG = D // G
    return NG, _p2(G), _p2(NG)


def _q_token_launch(T: int, H: int, D: int, L: int, G: int, K: int, esize: int, cfg):
    """int token quantize: (grid, DC, TA, TL, HB, VX, warps); see _q_int_token."""
    VX = max(2 * K, 4 // esize)                   # channels per load: 2 code bytes, >= 4 bytes
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


@functools.lru_cache(maxsize=None)
def _capability(index):
    return torch.cuda.get_device_capability(index)


def _token_strides(s_t: int, esize: int, G: int, H: int, D: int, K: int):
    """(x/out token stride, codes token stride) as constexprs for the token-group kernels when a
    group spans less than 1 MiB (immediate load/store offsets), else 0 (run-time strides)."""
    small = lambda s, es: s if 0 < s * es * G < (1 << 20) else 0  # noqa: E731
    return small(s_t, esize), small(H * D // K, 1)


def _gluon_on(t: torch.Tensor) -> bool:
    """Whether the Gluon kernels may run for tensors like t: Gluon importable, a CUDA tensor (no
    interpreter) and not turned off by KVK_GLUON=0 (then the tl kernels run)."""
    return gluon is not None and not _INTERPRET and t.device.type == "cuda" and os.environ.get("KVK_GLUON") != "0"


# int token dequantize in Gluon (_dq_int_token_gl); the tl kernel _dq_int_token elsewhere.
_CODE_WORD = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _dq_token_gluon_ok(codes, out, fmt: QuantFormat) -> bool:
    """Whether dequantize_into runs the Gluon token kernel: a GPU, Gluon importable, whole
    16-byte output vectors per thread (head_dim a multiple of them) and codes that can be read as
    words of one vector's codes (the word size divides the codes' byte offset)."""
    if not _gluon_on(out):
        return False
    V = 16 // out.element_size()
    D = int(out.shape[-1])
    cw = V * fmt.bits // 8
    return fmt.kind == "int" and fmt.axis == "token" and D % V == 0 and codes.data_ptr() % cw == 0


def _dq_token_gluon_params(H: int, D: int, esize: int, G: int, bits: int):
    """The tile of _dq_int_token_gl: (HB, constexprs, warps). One token group of HB heads,
    TB = min(G, 32) tokens a chunk; a thread owns V = 16 / element size channels (one 16-byte
    output vector; V codes: one load). Lanes go to the vectors of a row first, then heads, then
    tokens; warps to heads, then tokens. HB (H200, bench/results/gluon-dq-token-h200-2026-11-27.txt):
    1 for a power-of-two head count (Llama-3-8B int2 g32: 91.6-93.3% of copy; 2 heads:
    90.6-92.0%, 4: 89.5-90.2%); otherwise all heads padded to a power of two up to 4 (SmolLM2's
    3, int8/4/2: 91-96% at HB = 4, 86-92% at HB = 1, 82-94% at HB = 2); more heads when
    TB x (D / V) vectors would leave lanes of 4 warps idle."""
    V = 16 // esize
    DV = _p2(D // V)
    TB = min(_p2(G), 32)
    HB = 1 if H & (H - 1) == 0 or _p2(H) > 4 else _p2(H)
    HB = min(_p2(H), max(HB, 128 // (TB * DV)))
    W = max(1, min(4, TB * HB * DV // 32))
    tpd = min(DV, 32)
    tph = min(HB, 32 // tpd)
    tpt = 32 // (tpd * tph)
    wh = min(max(1, HB // tph), W)
    L4 = gl.BlockedLayout([1, 1, 1, V], [tpt, tph, tpd, 1], [W // wh, wh, 1, 1], [3, 2, 1, 0])
    consts = dict(D=D, DV=DV, V=V, G=G, TB=TB, HB=HB, BITS=bits, HDMASK=H % HB != 0 or DV * V != D, L4=L4)
    return HB, consts, W


def _dq_token_gluon_launch(codes, scale, zero, fmt: QuantFormat, out) -> None:
    L, T, H, D, s_l, s_t, s_h, es, _ = _geometry(out)
    G = fmt.group_size
    HB, consts, W = _dq_token_gluon_params(H, D, es, G, fmt.bits)
    words = codes.view(_CODE_WORD[consts["V"] * fmt.bits // 8])
    OS, CS = _token_strides(s_t, es, G, H, D, fmt.per_byte)
    for tg0, n, part in _token_parts(T, G):
        _dq_int_token_gl[(n * triton.cdiv(H, HB), L)](
            words, scale, zero, out, T, H, s_l, s_t, s_h, tg0, OS=OS, CS=CS,
            MASKED=part or G % consts["TB"] != 0, **consts, num_warps=W, **_LAUNCH)


# fp8 tensor / head scopes with computed scales in one pass (_q_fp8_resident_gl); the amax +
# quantize kernels elsewhere.
_RES_STEP_BYTES = 8 << 20       # input bytes a step (as the CUDA kernel)
_RES_MIN_VECTORS = 4 * 1024     # (pseudo-)layers of fewer vectors leave a group's threads idle


@functools.lru_cache(maxsize=None)
def _sm_count(index) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _fp8_resident_groups(nL: int, Nv: int, sms: int, warps: int):
    """Block groups with programs of ``warps`` warps (1024 / (32 warps) an SM): as many
    (pseudo-)layers a step as 8 MiB of input holds, evened over the steps, with the fewest
    vectors a thread (K) that lets that many groups of gpb = ceil(Nv / (32 warps K)) programs
    fit. (NG, gpb, K, steps), or None if a layer does not fit with K = 4."""
    nt = warps * 32
    slots = sms * (1024 // nt)
    gpb = lambda k: -(-Nv // (nt * k))  # noqa: E731
    if gpb(4) > slots:
        return None
    want = min(max(1, _RES_STEP_BYTES // (Nv * 16)), nL)
    ng = -(-nL // -(-nL // want))
    K = next((k for k in (1, 2, 4) if slots // gpb(k) >= ng), 4)
    ng = min(ng, slots // gpb(K))
    return ng, gpb(K), K, -(-nL // ng)


def _fp8_resident_plan(x, codes, fmt: QuantFormat):
    """Launch parameters of _q_fp8_resident_gl for x, or None where it does not apply: the
    layout is not dense per layer, a (pseudo-)layer has fewer than _RES_MIN_VECTORS 16-byte
    vectors or more than the chip holds (SMs x 1024 threads x 4 vectors), the GPU is not a
    Hopper (sm_90), or Gluon is off. The head scope runs as the tensor scope over L * H heads
    [T, D].
    Warps a program (H200, bench/results/gluon-fp8-onepass-h200-2026-11-27.txt, measured with
    the eleventh session's kernel, eight block barriers a step): fewer warps
    (more programs an SM) overlap one program's barriers with another's work, but warp 0 of
    every program polls its group's gpb slots, which costs more than that gains from about
    128 slots on (Llama-3-8B fp8:tensor T=4096, gpb = 512 / 256 / 128 at 8 / 16 / 32 warps:
    10 / 54 / 83% of copy). So: 8 warps if gpb <= 64 (Llama-3-8B fp8:head T=4096: 97%, 94%
    at 16 warps), else 16 if gpb <= 128 (SmolLM2 fp8:head T=32768: 90%, 85% at 32), else 32."""
    if not _gluon_on(x) or _capability(x.device.index)[0] != 9:  # Hopper: measured there; the
        return None                          # programs' shared memory assumes 227 KiB an SM
    L, T, H, D, s_l, s_t, s_h, es, _ = _geometry(x)
    VE = 16 // es
    dense = (T == 1 or s_t == H * D) and (H == 1 or s_h == D)
    if not dense or D % VE or x.data_ptr() % 16 or s_l % VE or codes.data_ptr() % 16 or T * H * D >= 2**31:
        return None  # (offsets within a layer are int32)
    HS = H if fmt.scope == "head" and H > 1 else 1
    nL, Nv = L * HS, T * H * D // VE // HS
    sms = _sm_count(x.device.index)
    if Nv < _RES_MIN_VECTORS or nL >= 2**31 // (4 * sms):
        return None
    g = None
    for warps, most in ((8, 64), (16, 128), (32, None)):
        g = _fp8_resident_groups(nL, Nv, sms, warps)
        if g is not None and (most is None or g[1] <= most):
            break
    if g is None:
        return None
    ng, gpb, K, nsteps = g
    return dict(nL=nL, Nv=Nv, nsteps=nsteps, NG=ng, gpb=gpb, K=K, HS=HS, VE=VE, D=D, s_lv=s_l // VE,
                Nlv=T * H * D // VE, warps=warps)


def _q_fp8_resident_launch(x, codes, scale, plan) -> None:
    gpb, ng, nw = plan["gpb"], plan["NG"], plan["warps"]
    slots = torch.zeros(plan["nL"] * gpb, dtype=torch.int32, device=x.device)
    _q_fp8_resident_gl[(ng * gpb,)](
        x, codes, scale, slots, plan["s_lv"], plan["Nlv"], plan["Nv"], plan["nL"], plan["nsteps"], ng, gpb,
        VE=plan["VE"], K=plan["K"], HS=plan["HS"], D=plan["D"], NW=nw, GP2=_p2(gpb),
        num_warps=nw, maxnreg=64, launch_cooperative_grid=True, **_LAUNCH)


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
            cap = _capability(t.device.index)
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


def _merge_heads(t: torch.Tensor, fmt: QuantFormat, quantize: bool) -> bool:
    """Whether to run a rows kernel on ``[L, T*H, 1, D]`` views: when H is not a power of two
    (a ``[tokens, heads]`` tile padded to 2^k heads spends its padding lanes on clamped duplicate
    rows, e.g. a quarter of them for SmolLM2's 3 KV heads) and the token and head dims of x /
    out merge. Only formats whose scales are per row or per layer (not per head, not token
    groups), and only kernels that tile rows (int4/int2 channel dequantize is already flat)."""
    H = int(t.shape[2])
    if H & (H - 1) == 0 or t.stride(1) != H * t.stride(2):
        return False
    if fmt.kind == "fp8":
        return fmt.scope != "head"
    return fmt.axis == "channel" and (quantize or fmt.bits == 8)


def _rows_view(t, L: int, rows: int):
    """[L, T, H, ...] -> [L, T*H, 1, ...] (a view; None and per-layer [L] scales stay)."""
    if t is None or t.dim() < 3:
        return t
    return t.view(L, rows, 1, *t.shape[3:])


def _layer_chunks(L: int, *tensors):
    """The tensors (None stays None) cut into layer ranges of at most 65535 (the grid's last
    dim is the layer), one tuple per range."""
    for l0 in range(0, L, _MAX_GRID_Z):
        sl = slice(l0, min(L, l0 + _MAX_GRID_Z))
        yield tuple(None if t is None else t[sl] for t in tensors)


def quantize_into(x, fmt: QuantFormat, codes, scale, zero, compute_scale: bool = True) -> None:
    L, T, H, D, s_l, s_t, s_h, es, DP = _geometry(x)
    if L * T * H == 0:
        return
    if L > _MAX_GRID_Z:
        for xc, cc, sc, zc in _layer_chunks(L, x, codes, scale, zero):
            quantize_into(xc, fmt, cc, sc, zc, compute_scale)
        return
    if _merge_heads(x, fmt, quantize=True):
        xm, cm, sm, zm = (_rows_view(t, L, T * H) for t in (x, codes, scale, zero))
        quantize_into(xm, fmt, cm, sm, zm, compute_scale)
        return
    if fmt.kind == "fp8":
        scope = _SCOPE[fmt.scope]
        amax = scale  # placeholder pointer when unused
        if compute_scale and scope != 2:
            plan = _fp8_resident_plan(x, codes, fmt)
            if plan is not None:
                _q_fp8_resident_launch(x, codes, scale, plan)
                return
            cfg = CONFIG["amax_fp8"]
            amax = torch.zeros(scale.shape, dtype=torch.int32, device=x.device)
            TB, HB = _row_tile(T, H, DP, cfg["elems"])
            _fp8_amax[(triton.cdiv(T, TB), triton.cdiv(H, HB), L)](
                x, amax, T, H, s_l, s_t, s_h, D=D, DP=DP, TB=TB, HB=HB, SCOPE=scope,
                num_warps=cfg["warps"], **_LAUNCH)
        grid, TB, HB, GC, nw = _rows_launch(T, H, L, 1, DP, es, CONFIG["q_fp8"])
        _q_fp8[grid](
            x, codes, scale, amax, T, H, s_l, s_t, s_h, D=D, DP=DP, TB=TB, HB=HB, GC=GC,
            CV=min(GC, 16 // es), SCOPE=scope, COMPUTE=bool(compute_scale), CLAMP=_INTERPRET,
            num_warps=nw, **_LAUNCH)
        return
    G, K = fmt.group_size, fmt.per_byte
    if fmt.axis == "channel":
        grid, kw = _channel_launch(T, H, L, D, G, fmt.bits, es, CONFIG["q_channel"])
        _q_int_channel[grid](x, codes, scale, zero, T, H, s_l, s_t, s_h, **kw)
    else:
        grid, DC, TA, TL, HB, VX, nw = _q_token_launch(T, H, D, L, G, K, es, CONFIG["q_token"])
        XS, CS = _token_strides(s_t, es, G, H, D, K)
        cfg = CONFIG["q_token"]
        pairs = bool(cfg.get("pairs", 0)) and _pairs_ok(x, K, D, DC, TA * TL >= G)
        for tg0, n, part in _token_parts(T, G):
            _q_int_token[(n,) + grid[1:]](
                x, codes, scale, zero, T, H, s_l, s_t, s_h, tg0, D=D, DC=DC, G=G, TA=TA, TL=TL,
                HB=HB, BITS=fmt.bits, VX=VX, XS=XS, CS=CS, PAIRS=pairs and not part, PART=part, num_warps=nw, **_LAUNCH)


def dequantize_into(codes, scale, zero, fmt: QuantFormat, out) -> None:
    L, T, H, D, s_l, s_t, s_h, es, DP = _geometry(out)
    if L * T * H == 0:
        return
    if L > _MAX_GRID_Z:
        for cc, sc, zc, oc in _layer_chunks(L, codes, scale, zero, out):
            dequantize_into(cc, sc, zc, fmt, oc)
        return
    if _merge_heads(out, fmt, quantize=False):
        cm, sm, zm, om = (_rows_view(t, L, T * H) for t in (codes, scale, zero, out))
        dequantize_into(cm, sm, zm, fmt, om)
        return
    if fmt.kind == "fp8":
        grid, TB, HB, GC, nw = _rows_launch(T, H, L, 1, DP, es, CONFIG["dq_fp8"])
        _dq_fp8[grid](
            codes, scale, out, T, H, s_l, s_t, s_h, D=D, DP=DP, TB=TB, HB=HB, GC=GC,
            SCOPE=_SCOPE[fmt.scope], CV=min(GC, 16 // es), num_warps=nw, **_LAUNCH)
        return
    G, K = fmt.group_size, fmt.per_byte
    if fmt.axis == "channel" and fmt.bits < 8:
        NG, GP, NGP = _channel_dims(D, G)
        width = GP * NGP   # rows of ~16 KiB of output per program, as in the previous version
        ROWS = max(1, min(1024, (16384 // es) // width)) if width <= 16384 // es else 1
        R = L * T * H
        _dq_int_channel_flat[(triton.cdiv(R, ROWS),)](
            codes, scale, zero, out, R, T, H, s_l, s_t, s_h, G=G, NG=NG, GP=GP, NGP=NGP,
            BITS=fmt.bits, ROWS=ROWS, num_warps=8 if ROWS * width >= 4096 else 4, **_LAUNCH)
    elif fmt.axis == "channel":
        grid, kw = _channel_launch(T, H, L, D, G, fmt.bits, es, CONFIG["dq_channel"])
        _dq_int_channel[grid](codes, scale, zero, out, T, H, s_l, s_t, s_h, **kw)
    elif _dq_token_gluon_ok(codes, out, fmt):
        _dq_token_gluon_launch(codes, scale, zero, fmt, out)
    else:
        cfg = CONFIG["dq_token"]
        TB = min(_p2(G), _pow2_floor(max(1, cfg["elems"] // DP)))
        HB = min(_p2(H), _pow2_floor(max(1, cfg["elems"] // (TB * DP))))
        OS, CS = _token_strides(s_t, es, G, H, D, K)
        for tg0, n, part in _token_parts(T, G):
            _dq_int_token[(n, triton.cdiv(H, HB), L)](
                codes, scale, zero, out, T, H, s_l, s_t, s_h, tg0, D=D, DP=DP, G=G, TB=TB,
                HB=HB, BITS=fmt.bits, CV=max(1, (16 // es) // K), OS=OS, CS=CS, PART=part,
                num_warps=cfg["warps"], **_LAUNCH)

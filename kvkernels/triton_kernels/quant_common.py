"""Shared pieces of the Triton quantize / dequantize kernels (see quant.py): constants, the
per-group int math and fp8 helpers, row tiles and launch helpers."""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice


_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# floor of the code by a round-down add (GPU); the interpreter has no directed rounding
_RD_FLOOR: tl.constexpr = tl.constexpr(not _INTERPRET)
_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_SCOPE = {"tensor": 0, "head": 1, "token_head": 2}
_MAX_D = 4096
_MAX_GRID_Z = 65535   # CUDA's limit on grid dims 1 and 2 (the layer is dim 2)
FLT_MAX: tl.constexpr = tl.constexpr(3.4028234663852886e38)
FLT_MIN: tl.constexpr = tl.constexpr(1.1754943508222875e-38)   # 2^-126
INV_MAX: tl.constexpr = tl.constexpr(8.507059173023462e37)      # 2^126 = 1 / FLT_MIN
TWO23: tl.constexpr = tl.constexpr(8388608.0)          # 2^23
TWO23_BITS: tl.constexpr = tl.constexpr(0x4B000000)    # float bits of 2^23


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
def _minmax_fin_fn(mn_a, mx_a, mn_b, mx_b):
    return (tl.minimum(_finite_or_nan(mn_a), _finite_or_nan(mn_b)),
            tl.maximum(_finite_or_nan(mx_a), _finite_or_nan(mx_b)))


@triton.jit
def _minmax_fin(x, axis: tl.constexpr):
    """(min, max) along axis of the finite values (NaN if none), in one reduction with the
    filter in the combine: no filtered copy of x is held beside x (registers). The results are
    filtered once more: a reduction over an axis of length 1 applies no combine."""
    mn, mx = tl.reduce((x, x), axis, _minmax_fin_fn)
    return _finite_or_nan(mn), _finite_or_nan(mx)


@triton.jit
def _finite_or_nan(x):
    """x where finite, else NaN: the NaN-ignoring min / max then see the finite values only."""
    return tl.where(tl.abs(x) <= FLT_MAX, x, float("nan"))


@triton.jit
def _not_plain(mn, mx):
    """1 (int32) where a group is not plain, else 0. From its NaN-propagating min / max, a group
    is plain if mx - mn is finite: it holds no NaN and no Inf, and its range fits float32 (p =
    1). The kernels reduce this to one flag a program: programs of plain groups only (the common
    case) take the fast path, ``_int_params_plain`` and ``_int_codes`` without saturation
    (SAT=False), bit-identical there to the general path and costing nothing per element for
    the non-finite policy; the others re-reduce the finite values, ``_int_params`` and saturate."""
    return (~(tl.abs(mx - mn) <= FLT_MAX)).to(tl.int32)


@triton.jit
def _int_params_plain(mn, mx, QMAX: tl.constexpr):
    """``_int_params`` for plain groups (``_not_plain`` 0: min / max finite, p = 1, mn p = mn):
    (scale, inv)."""
    rng = mx - mn
    scale = tl.math.div_rn(rng, tl.full(rng.shape, QMAX, tl.float32))
    scale = tl.where((scale > 0) & (scale < FLT_MIN), FLT_MIN, scale)
    inv = tl.minimum(tl.math.div_rn(tl.full(rng.shape, QMAX, tl.float32), rng), INV_MAX)
    return scale, tl.where(scale > 0, inv, 0.0)


@triton.jit
def _int_params(mn, mx, QMAX: tl.constexpr):
    """Per group (docs/quant-spec.md, "Integer formats"), from the finite values' min / max (NaN
    or mn > mx: no finite value): (zero, p, mn * p, scale, inv). p = 0.5 where mx - mn overflows
    (else 1); scale = (mx p - mn p) / qmax / p (IEEE), raised to FLT_MIN if below it; inv = min(qmax /
    (mx p - mn p), 2^126), zeroed where scale == 0 (every code of such a group is then 0)."""
    none = ~(mn <= mx)
    mn = tl.where(none, 0.0, mn)
    mx = tl.where(none, 0.0, mx)
    fits = tl.abs(mx - mn) <= FLT_MAX
    p = tl.where(fits, 1.0, 0.5)
    mnp = mn * p
    rng = mx * p - mnp
    # / p as * (1 / p): exact (p = 1 or 1/2; no overflow, rng / qmax <= FLT_MAX / 3), one division less
    scale = tl.math.div_rn(rng, tl.full(rng.shape, QMAX, tl.float32)) * tl.where(fits, 1.0, 2.0)
    scale = tl.where((scale > 0) & (scale < FLT_MIN), FLT_MIN, scale)
    inv = tl.minimum(tl.math.div_rn(tl.full(rng.shape, QMAX, tl.float32), rng), INV_MAX)
    return mn, p, mnp, scale, tl.where(scale > 0, inv, 0.0)


@triton.jit
def _int_codes(x, p, mnp, inv, QMAX: tl.constexpr, SAT: tl.constexpr):
    """floor(sat((x p - mn p) * inv + 0.5)) in the low bits of an int32, where sat clamps to
    [0, qmax] and takes NaN to 0 (+Inf -> qmax, -Inf and NaN -> 0); x p - mn p is one FMA (one
    rounding; equal to the reference's two, see the spec), then mul and add (no FMA). Only the
    low 8 bits may be used (packed codes are cut to uint8). The saturated value v is in [0,
    qmax + 1) and the floor is taken by one round-down add of 2^23 (the low 23 bits of fl_rd(v +
    2^23) are floor(v); full rate, unlike a float-to-int conversion), or by truncation under the
    interpreter. inv == 0 gives 0 (or a non-finite x: NaN -> 0). For a group of finite values
    the clamp changes nothing (x >= mn, so fl(x p - mn p) is in [0, rng], and inv <= qmax / rng
    rounded, so v is in [0.5, qmax + 1)): SAT=False (two instructions an element fewer) is
    exact there, and only programs holding a non-finite value need SAT=True (``_not_plain``).
    (Lanes masked off a group may give any code; never stored.)"""
    v = tl.fma(x, p, -mnp) * inv + 0.5
    if SAT:
        v = tl.minimum(tl.maximum(v, 0.0), QMAX)   # NaN-ignoring max: NaN -> 0
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


def _geometry(t: torch.Tensor):
    """x / out [L, T, H, D] -> (L, T, H, D, s_l, s_t, s_h, element size, D padded to 2^k)."""
    L, T, H, D = t.shape
    return L, T, H, D, int(t.stride(0)), int(t.stride(1)), int(t.stride(2)), t.element_size(), _p2(D)


def _channel_dims(D: int, G: int):
    """Channel groups: (groups per row NG, G padded to 2^k, NG padded to 2^k)."""
    NG = D // G
    return NG, _p2(G), _p2(NG)


@functools.lru_cache(maxsize=None)
def _capability(index):
    return torch.cuda.get_device_capability(index)

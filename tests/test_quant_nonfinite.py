"""The non-finite and extreme-value policy of docs/quant-spec.md ("Non-finite and extreme
values"), on every backend: the reference (CPU), Triton (the interpreter here, the GPU there) and
CUDA (GPU only; skipped without one).

* scales / zero points come from the finite values only (one Inf or NaN costs no other value);
* +-Inf saturates: fp8 to +-448 (decodes to +-448 * scale), int to the group's max / min code;
* NaN: fp8 keeps NaN (e4m3 NaN code); int has no NaN code: code 0 (decodes to the zero point);
* a group with no finite value: int scale 0, zero 0; fp8 scale 1;
* ranges beyond FLT_MAX (a group spanning +-2e38) are computed without overflow and decode finite;
* tiny normal values (1e-37) keep the normal error bound (scale >= FLT_MIN, no reciprocal clamp).

Every backend must give the reference's codes, scales and zero points bit for bit. Under the
Triton interpreter its float -> e4m3 cast is wrong (rounding carry, NaN), so fp8 codes there are
compared through ``interpreter_fp8_cast`` (one named exclusion, see below), never by looser
tolerances on the policy itself.
"""
import math
import os

import pytest
import torch

from kvkernels import dispatch
from kvkernels.formats import QuantFormat
from kvkernels.quant import dequantize_op, quantize_op
from kvkernels.reference import quant as ref

from conftest import DEVICE

INTERP = os.environ.get("TRITON_INTERPRET") == "1"
INF, NAN = float("inf"), float("nan")
FLT_MAX = torch.finfo(torch.float32).max
FLT_MIN = torch.finfo(torch.float32).tiny
BACKENDS = ["torch", "triton", "cuda"]
INT_FORMATS = ["int8:g8:channel", "int4:g8:channel", "int2:g8:channel", "int8:g4:token", "int4:g4:token",
               "int2:g4:token", "int4:g2:channel"]
FP8_FORMATS = ["fp8:token_head", "fp8:head", "fp8:tensor"]


def interpreter_fp8_cast(backend: str, fmt: QuantFormat) -> bool:
    """True where the codes come from the Triton interpreter's float -> e4m3 cast, which rounds
    wrongly across binades and maps NaN to a finite code (the GPU's cvt is exact): there the fp8
    codes are checked by value within one e4m3 step, and NaN codes are not checked."""
    return backend == "triton" and INTERP and fmt.kind == "fp8"


def _skip_unless(backend, x, fmt):
    why = dispatch.refusal("quantize", backend, x, fmt) or dispatch.refusal("dequantize", backend, x, fmt)
    if why:
        pytest.skip(f"{backend}: {why}")


def quantize(x, fmt, backend):
    L, T, H, D = x.shape
    codes = torch.full(fmt.codes_shape(L, T, H, D), 0xAB, dtype=torch.uint8, device=x.device)
    scale = torch.full(fmt.scale_shape(L, T, H, D), NAN, device=x.device)
    zero = torch.full_like(scale, NAN) if fmt.has_zero else None
    quantize_op(x, str(fmt), codes, scale, zero, True, backend)
    return codes, scale, zero


def dequantize(codes, scale, zero, fmt, shape, backend, dtype=torch.float32):
    out = torch.full(shape, NAN, dtype=dtype, device=codes.device)
    dequantize_op(codes, scale, zero, str(fmt), out, backend)
    return out


def special_input(fmt: QuantFormat, device=DEVICE, dtype=torch.float32):
    """[2, 8, 2, 8]: random values, with in each layer Inf / -Inf / NaN at known places, a row
    / group of all-non-finite values, a group spanning +-3e38 and a group of tiny normals."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 8, 2, 8, generator=g) * 3
    x[0, 1, 0, 2] = INF
    x[0, 1, 0, 5] = -INF
    x[0, 2, 1, 3] = NAN
    x[1, 3, 0, :] = torch.tensor([NAN, INF, -INF, NAN, INF, INF, NAN, -INF])
    if dtype == torch.float32:   # bf16 / fp16 have no 3e38 / 1e-37: those rows only in fp32
        x[1, 5, 1, :] = torch.tensor([3e38, -3e38, 1e38, -2e38, 0.0, 2.5e38, -1e37, 5.0])
        x[1, 6, 0, :] = torch.tensor([1e-37, 2e-37, 3e-37, 1.5e-37, 1.2e-37, 1.1e-37, 2.5e-37, 1.7e-37])
    if fmt.kind == "int" and fmt.axis == "token":  # the same patterns along tokens: groups of 4 tokens
        x = x.transpose(1, 3).contiguous()
    return x.to(device=device, dtype=dtype)


def assert_same_as_reference(got, want, fmt, backend, shape):
    codes, scale, zero = got
    rcodes, rscale, rzero = want
    assert torch.equal(scale, rscale), "scales differ from the reference"
    if zero is not None:
        assert torch.equal(zero, rzero), "zero points differ from the reference"
    if interpreter_fp8_cast(backend, fmt):
        y = ref.dequantize_float64(codes, rscale, None, fmt, shape)
        yr = ref.dequantize_float64(rcodes, rscale, None, fmt, shape)
        s = ref._fp8_broadcast(rscale.double(), fmt.scope).expand_as(y)
        ok = ((y - yr).abs() <= torch.maximum(yr.abs() * 0.125, s * 2.0 ** -8)) | (y == yr / 2) | yr.isnan()
        assert ok.all()
    else:
        assert torch.equal(codes, rcodes), f"{int((codes != rcodes).sum())} codes differ from the reference"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("spec", INT_FORMATS + FP8_FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_special_values_match_reference(backend, spec, dtype):
    fmt = QuantFormat.parse(spec)
    x = special_input(fmt, dtype=dtype)
    _skip_unless(backend, x, fmt)
    got = quantize(x, fmt, backend)
    want = quantize(x.cpu(), fmt, "torch")
    want = tuple(None if t is None else t.to(x.device) for t in want)
    assert_same_as_reference(got, want, fmt, backend, x.shape)
    y = dequantize(*want, fmt, x.shape, backend)
    yr = dequantize(*(None if t is None else t.cpu() for t in want), fmt, x.shape, "torch")
    if backend == "torch" or fmt.kind == "int":  # int: one FMA everywhere (the reference's fma32)
        assert torch.equal(y.cpu().nan_to_num(), yr.nan_to_num()) and torch.equal(y.cpu().isnan(), yr.isnan())
    elif interpreter_fp8_cast(backend, fmt):  # its e4m3 -> float cast of the NaN code is finite
        keep = ~yr.isnan()
        assert torch.equal(y.cpu()[keep], yr[keep])
    else:  # fp8: float(e4m3) * scale, one rounding everywhere
        assert torch.equal(y.cpu().nan_to_num(), yr.nan_to_num()) and torch.equal(y.cpu().isnan(), yr.isnan())


def _policy_checks(x, codes, scale, zero, fmt):
    """The policy itself, on the reference's results (float64 decode)."""
    y = ref.dequantize_float64(codes, scale, zero, fmt, x.shape)
    xd = x.double()
    fin = torch.isfinite(xd)
    if fmt.kind == "fp8":
        s = ref._fp8_broadcast(scale.double(), fmt.scope).expand_as(xd)
        assert torch.equal(y[xd == INF], (448 * s)[xd == INF])
        assert torch.equal(y[xd == -INF], (-448 * s)[xd == -INF])
        assert y[xd.isnan()].isnan().all()
        assert torch.isfinite(y[fin]).all()
        assert torch.isfinite(scale).all() and (scale >= FLT_MIN).all()
        # finite values keep e4m3's precision (relative 2^-4, or the subnormal step)
        err = (y - xd).abs()[fin]
        bound = torch.maximum(xd.abs() * 2.0 ** -4, s * 2.0 ** -9)[fin] * (1 + 2.0 ** -20)
        assert (err <= bound).all()
        return
    assert torch.isfinite(y).all(), "int formats decode to finite values only"
    assert torch.isfinite(scale).all() and torch.isfinite(zero).all()
    L, T, H, D = x.shape
    G = fmt.group_size
    if fmt.axis == "channel":
        xg = xd.reshape(L, T, H, D // G, G)
        yg = y.reshape(L, T, H, D // G, G)
        sc, zp = scale.double().unsqueeze(-1), zero.double().unsqueeze(-1)
    else:
        xg = xd.reshape(L, T // G, G, H, D).permute(0, 1, 3, 4, 2)
        yg = y.reshape(L, T // G, G, H, D).permute(0, 1, 3, 4, 2)
        sc, zp = scale.double().unsqueeze(-1), zero.double().unsqueeze(-1)
    fing = torch.isfinite(xg)
    has = fing.any(-1, keepdim=True)
    gmin = torch.where(fing, xg, torch.full_like(xg, INF)).amin(-1, keepdim=True)
    gmax = torch.where(fing, xg, torch.full_like(xg, -INF)).amax(-1, keepdim=True)
    gmin = torch.where(has, gmin, torch.zeros_like(gmin))
    gmax = torch.where(has, gmax, torch.zeros_like(gmax))
    assert torch.equal(zp, gmin.float().double()), "zero point: the finite values' min (0 if none)"
    top = zp + sc * fmt.qmax
    # +Inf -> the group's max code, -Inf and NaN -> code 0 (the zero point)
    assert torch.equal(yg[xg == INF], top.expand_as(xg)[xg == INF].float().double()) or \
        torch.allclose(yg[xg == INF], top.expand_as(xg)[xg == INF], rtol=1e-6)
    assert torch.equal(yg[xg == -INF], zp.expand_as(xg)[xg == -INF])
    assert torch.equal(yg[xg.isnan()], zp.expand_as(xg)[xg.isnan()])
    # finite values: within half a step (plus float32 rounding of the step and range)
    err = (yg - xg).abs()
    bound = sc / 2 + sc * fmt.qmax * 2.0 ** -20 + (gmax.abs() + gmin.abs()) * 2.0 ** -22
    assert (err[fing] <= bound.expand_as(xg)[fing]).all(), "finite values off by more than half a step"


@pytest.mark.parametrize("spec", INT_FORMATS + FP8_FORMATS)
def test_policy_on_reference(spec):
    """The documented policy, checked on the reference (the spec): fp32 input with every case."""
    fmt = QuantFormat.parse(spec)
    x = special_input(fmt, device="cpu")
    codes, scale, zero = quantize(x, fmt, "torch")
    _policy_checks(x, codes, scale, zero, fmt)


def test_one_inf_costs_no_other_value():
    """fp8:tensor with one +Inf in a layer: every finite value of that layer still decodes within
    e4m3 precision (it used to decode as NaN: the Inf set the scale); int: one +-Inf / NaN in a
    group leaves its other values within half a step."""
    x = torch.randn(1, 64, 4, 32)
    x[0, 10, 2, 7] = INF
    for spec in ("fp8:tensor", "fp8:head", "int4:g32:channel", "int4:g32:token"):
        fmt = QuantFormat.parse(spec)
        codes, scale, zero = quantize(x, fmt, "torch")
        _policy_checks(x, codes, scale, zero, fmt)  # finite values within e4m3 precision / half a step
        if fmt.kind == "fp8":  # and the scale is that of the finite values
            assert torch.equal(scale, quantize(torch.where(torch.isfinite(x), x, torch.zeros_like(x)), fmt, "torch")[1])


@pytest.mark.parametrize("spec", ["int8:g8:channel", "int4:g8:channel", "int2:g8:channel", "fp8:token_head"])
def test_tiny_normals_keep_the_error_bound(spec):
    """Values around 1e-37: the scale is at least FLT_MIN and 1 / scale is finite, so no
    reciprocal clamp distorts the codes (it was up to 23% off)."""
    fmt = QuantFormat.parse(spec)
    x = (torch.rand(1, 4, 1, 8, generator=torch.Generator().manual_seed(3)) + 1) * 1e-37
    codes, scale, zero = quantize(x, fmt, "torch")
    _policy_checks(x, codes, scale, zero, fmt)
    y = ref.dequantize_float64(codes, scale, zero, fmt, x.shape)
    assert ((y - x.double()).abs() / x.double()).max() < (0.07 if fmt.kind == "fp8" else 0.5 / fmt.qmax + 0.1)


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_range_beyond_flt_max_decodes_finite(bits):
    """A group spanning +-3e38: its range overflows float32, yet scale and zero are finite and
    every value decodes within half a step, in float32 too (dequantize is one FMA)."""
    fmt = QuantFormat.parse(f"int{bits}:g8:channel")
    x = torch.tensor([3e38, -3e38, 1e38, -2e38, 0.0, 2.5e38, -1e37, 5.0]).view(1, 1, 1, 8)
    codes, scale, zero = quantize(x, fmt, "torch")
    assert torch.isfinite(scale).all() and torch.isfinite(zero).all()
    _policy_checks(x, codes, scale, zero, fmt)
    y = dequantize(codes, scale, zero, fmt, x.shape, "torch")
    assert torch.isfinite(y).all()
    assert ((y.double() - x.double()).abs() <= scale.double() / 2 * (1 + 1e-6) + 1e32).all()


def test_fma32_is_correctly_rounded():
    """The reference's float32 FMA (int dequantize) against exact rational arithmetic."""
    from fractions import Fraction
    g = torch.Generator().manual_seed(11)
    a = torch.randint(0, 256, (4000,), generator=g).float()
    b = torch.randn(4000, generator=g)
    c = torch.randn(4000, generator=g) * torch.exp(torch.randn(4000, generator=g) * 12)
    got = ref.fma32(a, b, c)
    for i in range(4000):
        exact = Fraction(float(a[i])) * Fraction(float(b[i])) + Fraction(float(c[i]))
        f = got[i].item()
        lo = torch.nextafter(got[i:i + 1], torch.tensor([-INF])).item()
        hi = torch.nextafter(got[i:i + 1], torch.tensor([INF])).item()
        d = abs(Fraction(f) - exact)
        assert d <= abs(Fraction(lo) - exact) and d <= abs(Fraction(hi) - exact), (i, f)
        if d == abs(Fraction(lo) - exact) or d == abs(Fraction(hi) - exact):  # a tie: even
            assert (got[i:i + 1].view(torch.int32).item() & 1) == 0


def test_triton_fp8_kernel_has_no_interpreter_only_clamp():
    """The Triton fp8 quantize kernel runs the same code on CPU and GPU: no CLAMP switch."""
    from kvkernels.triton_kernels import quant_fp8
    assert "CLAMP" not in quant_fp8._q_fp8.arg_names


@pytest.mark.skipif(DEVICE != "cuda", reason="needs a GPU (the CUDA fast paths and the one-pass fp8 kernels)")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("spec", ["int4:g32:channel", "int2:g32:channel", "int8:g64:channel", "int4:g32:token",
                                  "int2:g32:token", "int8:g32:token", "fp8:tensor", "fp8:head", "fp8:token_head"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(4, 4096, 8, 128), (3, 600, 3, 64)])
def test_gpu_sized_special_values(backend, spec, dtype, shape):
    """GPU-sized inputs (the dense fast paths, the packed min/max token kernels, the one-pass fp8
    kernels: cooperative, cluster and Gluon) with Inf / NaN sprinkled in: the reference's codes,
    scales and zero points bit for bit."""
    fmt = QuantFormat.parse(spec)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(*shape, generator=g)
    n = x.numel()
    idx = torch.randint(0, n, (64,), generator=g)
    x.view(-1)[idx[:20]] = INF
    x.view(-1)[idx[20:40]] = -INF
    x.view(-1)[idx[40:]] = NAN
    x = x.to(dtype).to(DEVICE)
    _skip_unless(backend, x, fmt)
    got = quantize(x, fmt, backend)
    want = quantize(x.cpu(), fmt, "torch")
    want = tuple(None if t is None else t.to(DEVICE) for t in want)
    assert_same_as_reference(got, want, fmt, backend, x.shape)
    y = dequantize(*want, fmt, x.shape, backend, dtype=torch.float32)
    yr = dequantize(*(None if t is None else t.cpu() for t in want), fmt, x.shape, "torch", dtype=torch.float32)
    assert torch.equal(y.cpu().nan_to_num(), yr.nan_to_num())
    assert math.isclose(float(y.isnan().sum()), float(yr.isnan().sum()))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("spec", FP8_FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fp8_nan_code_is_canonical(backend, spec, dtype):
    """Every NaN, positive or negative, encodes as the one code 0x7F on every backend (torch's CPU
    cast keeps the sign bit; the GPU's cvt does not), and decodes to NaN."""
    fmt = QuantFormat.parse(spec)
    x = torch.randn(1, 4, 2, 8, generator=torch.Generator().manual_seed(3))
    bits = x.view(torch.int32)
    bits[0, 0, 0, 1] = 0x7FC00000          # +NaN
    bits[0, 1, 1, 2] = -0x00400000          # 0xFFC00000: -NaN
    bits[0, 2, 0, 3] = -0x00000001          # 0xFFFFFFFF: -NaN, full payload
    x = x.to(dtype).to(DEVICE)
    _skip_unless(backend, x, fmt)
    if interpreter_fp8_cast(backend, fmt):
        pytest.skip("the Triton interpreter's e4m3 cast maps NaN to a finite code (see interpreter_fp8_cast)")
    codes, scale, _ = quantize(x, fmt, backend)
    nan = x.isnan()
    assert int(nan.sum()) == 3
    assert (codes[nan] == 0x7F).all(), codes[nan]
    y = dequantize(codes, scale, None, fmt, x.shape, backend)
    assert torch.equal(y.isnan(), nan)


def per_layer_patterns(L_shape, dtype, device=DEVICE):
    """[9, T, H, D]: one pattern a layer, so that some programs hold plain groups only (the
    kernels' fast path: finite values, a range that fits float32) and others one group that is
    not (their general path). Layers: 0 random; 1 tiny normals; 2 a range below qmax * 2^-126
    (normal values a few bf16 steps apart: the reciprocal clamp 2^126); 3 values near +-1.6e38
    (the widest range that fits); 4-6
    random with one +Inf / NaN / -Inf; 7 a range beyond FLT_MAX; 8 layer 2 with one +Inf."""
    T, H, D = L_shape
    g = torch.Generator().manual_seed(13)
    x = torch.randn(9, T, H, D, generator=g) * 3
    x[1] = (torch.rand(T, H, D, generator=g) + 1) * 1e-37
    x[2] = 1.2e-38 * (1 + torch.randint(0, 6, (T, H, D), generator=g).float() / 128)   # normals, in bf16 too
    x[3] = torch.where(torch.rand(T, H, D, generator=g) < 0.5, -1.6e38, 1.6e38) * (1 - torch.rand(T, H, D, generator=g) * 0.01)
    x[4, T // 2, H - 1, D // 3] = INF
    x[5, T // 3, 0, D - 1] = NAN
    x[6, T - 1, H // 2, 0] = -INF
    x[7] = torch.where(torch.rand(T, H, D, generator=g) < 0.5, -3e38, 3e38)
    x[8] = x[2]
    x[8, 1, 0, 1] = INF
    return x.to(device=device, dtype=dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("spec", INT_FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fast_and_general_paths_match_reference(backend, spec, dtype):
    """Programs of plain groups only take the kernels' fast path (no saturation, no finite
    re-reduction), the others the general one: both give the reference's codes, scales and
    zero points bit for bit, whichever extreme (but finite) values the plain groups hold."""
    fmt = QuantFormat.parse(spec)
    x = per_layer_patterns((8, 2, 8), dtype)
    _skip_unless(backend, x, fmt)
    got = quantize(x, fmt, backend)
    want = tuple(None if t is None else t.to(x.device) for t in quantize(x.cpu(), fmt, "torch"))
    assert_same_as_reference(got, want, fmt, backend, x.shape)


@pytest.mark.skipif(DEVICE != "cuda", reason="needs a GPU (the packed bf16x2 / f16x2 token kernel, GPU-sized rows)")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("spec", ["int4:g32:channel", "int8:g64:channel", "int2:g32:channel", "int4:g32:token",
                                  "int2:g32:token", "int8:g32:token"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(256, 8, 128), (96, 3, 64)])
def test_gpu_fast_and_general_paths(backend, spec, dtype, shape):
    """As test_fast_and_general_paths_match_reference at GPU sizes (the packed min / max token
    kernel and its general pass, the dense rows)."""
    fmt = QuantFormat.parse(spec)
    x = per_layer_patterns(shape, dtype)
    _skip_unless(backend, x, fmt)
    got = quantize(x, fmt, backend)
    want = tuple(None if t is None else t.to(DEVICE) for t in quantize(x.cpu(), fmt, "torch"))
    assert_same_as_reference(got, want, fmt, backend, x.shape)

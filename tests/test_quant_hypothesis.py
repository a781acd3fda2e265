"""Property tests (hypothesis) over the public API and the registered ops.

Random formats, dtypes, shapes (sizes 1 and odd), memory layouts (strided tokens, heads
outermost, slices, 3-D / 4-D) and special values (signed zeros, constant groups, huge and tiny
normal values, subnormals, ±Inf, NaN); each available backend against the torch reference run on a CPU
copy: codes, scales and zero points bit for bit, dequantized values within OUT_ULP (the
tolerance table's basis). The Triton interpreter's own casts are wrong on a few inputs; those
are excluded by :func:`interpreter_cast_defects` alone (no looser tolerances). Kept small for CI
(tiny shapes: the interpreter runs every program instance in Python).
"""
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kvkernels
from kvkernels import dispatch
from kvkernels.formats import FP8_MAX, QuantFormat
from kvkernels.quant import dequantize_op, quantize_op
from kvkernels.reference import quant as ref

from conftest import DEVICE
from tolerances import FP8_PRODUCT_REL, FP8_REL, FP8_SUBNORMAL_ABS, INT_STEP_SLACK, OUT_ULP

INTERP = os.environ.get("TRITON_INTERPRET") == "1"
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
SETTINGS = settings(max_examples=int(os.environ.get("KVK_HYPOTHESIS_EXAMPLES", "25")), deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _backends():
    out = ["torch"]
    for b in ("triton", "cuda"):
        if dispatch.availability(b) is None:
            out.append(b)
    return out


BACKENDS = _backends()


# ---- the one exclusion -----------------------------------------------------------------------
def interpreter_cast_defects(backend, stage, fmt, x=None, inv=None, codes=None, want=None):
    """Elements whose result the Triton *interpreter* gets wrong through its own casts (numpy
    emulation), not through the kernels: a boolean mask (over ``x`` for ``stage="quantize"``,
    over the decoded output for ``"dequantize"``); all False for every other backend.

    * fp8 quantize (``x * inv`` cast to e4m3): ties (it does not round half to even), rounding
      that carries into the next binade (it drops the carry), values in e4m3's subnormal range,
      and NaN inputs (their code);
    * bf16 inputs holding subnormals (its bf16 loads flush them): the whole case, since one
      element moves its group's / scope's min, max and scale;
    * fp8 dequantize: subnormal and NaN codes (its e4m3 -> float cast);
    * dequantize into bf16 (``want``: the reference's output): values in bf16's subnormal range
      (its fp32 -> bf16 cast of subnormals). Its truncation of normal fp32 -> bf16 outputs is
      within OUT_ULP (one ulp) and needs no exclusion. On a GPU, Triton compiles these casts to hardware conversions: exact."""
    if not (backend == "triton" and INTERP):
        ref_t = x if stage == "quantize" else codes
        return torch.zeros(ref_t.shape if stage == "quantize" else _decoded_shape(codes, fmt), dtype=torch.bool)
    if stage == "quantize":
        xf = x.float().cpu()
        if x.dtype == torch.bfloat16:
            sub = (xf != 0) & (xf.abs() < torch.finfo(torch.float32).tiny)
            if sub.any():
                return torch.ones(x.shape, dtype=torch.bool)
        if fmt.kind != "fp8":
            return torch.zeros(x.shape, dtype=torch.bool)
        v = (xf * inv.cpu()).clamp(-FP8_MAX, FP8_MAX)
        a = v.abs().double()
        r = v.to(torch.float8_e4m3fn).double().abs()
        e = torch.floor(torch.log2(a.clamp(min=2.0**-9)))
        step = torch.exp2(e - 3)
        tie = ((a / step) % 1 == 0.5) & (a >= 2.0**-6)
        carry = (r >= torch.exp2(e + 1)) & (a > 0)
        subn = (a < 2.0**-6) & (a > 0)
        return tie | carry | subn | v.isnan()
    # dequantize: bf16 subnormal outputs; fp8 subnormal / NaN codes
    mask = torch.zeros(_decoded_shape(codes, fmt), dtype=torch.bool)
    if want is not None and want.dtype == torch.bfloat16:
        w = want.float()
        mask |= (w != 0) & (w.abs() < torch.finfo(torch.float32).tiny)
    if fmt.kind == "fp8":
        b = codes.view(torch.uint8).cpu().to(torch.int32)
        exp, man = (b >> 3) & 0xF, b & 0x7
        mask |= ((exp == 0) & (man != 0)) | ((b & 0x7F) == 0x7F)
    return mask


def _decoded_shape(codes, fmt):
    return (*codes.shape[:-1], codes.shape[-1] * fmt.per_byte)


# ---- strategies ------------------------------------------------------------------------------
@st.composite
def cases(draw, max_t=9):
    kind = draw(st.sampled_from(["int_channel", "int_token", "fp8"]))
    L, T, H = draw(st.integers(1, 2)), draw(st.integers(1, max_t)), draw(st.integers(1, 3))
    if kind == "fp8":
        D = draw(st.sampled_from([1, 2, 3, 5, 8, 16, 24, 64]))
        fmt = QuantFormat.fp8(draw(st.sampled_from(["tensor", "head", "token_head"])))
    else:
        bits = draw(st.sampled_from([8, 4, 2]))
        k = 8 // bits
        D = k * draw(st.sampled_from([1, 2, 3, 4, 6, 8, 16]))
        if kind == "int_channel":
            G = draw(st.sampled_from([g for g in range(1, D + 1) if D % g == 0]))
            fmt = QuantFormat.int(bits, G, "channel")
        else:
            fmt = QuantFormat.int(bits, draw(st.integers(1, 12)), "token")
    dtype = draw(st.sampled_from(DTYPES))
    layout = draw(st.sampled_from(["contiguous", "token_strided", "hnd", "token_slice"]))
    seed = draw(st.integers(0, 2**31 - 1))
    mag = 10.0 ** draw(st.integers(-3, 3))
    specials = draw(st.lists(st.sampled_from(["zero", "negzero", "constant", "huge", "tiny", "subnormal",
                                                   "inf", "nan"]),
                             max_size=3))
    return dict(fmt=fmt, shape=(L, T, H, D), dtype=dtype, layout=layout, seed=seed, mag=mag, specials=specials)


def make_x(c, device=DEVICE):
    """The case's input, in its layout, on ``device`` (the same values on every device)."""
    L, T, H, D = c["shape"]
    dtype = c["dtype"]
    g = torch.Generator().manual_seed(c["seed"])
    base = torch.randn(L, T, H, D, generator=g) * c["mag"] + torch.randn(L, 1, H, 1, generator=g) * c["mag"]
    fi = torch.finfo(dtype)
    n = base.numel()
    flat = base.view(-1)
    for i, s in enumerate(c["specials"]):
        idx = torch.randint(0, n, (max(1, n // 4),), generator=g)
        if s == "zero":
            flat[idx] = 0.0
        elif s == "negzero":
            flat[idx] = -0.0
        elif s == "constant":
            base[:, : max(1, T // 2)] = 0.75 * c["mag"]
        elif s == "huge":
            flat[idx[:1]] = fi.max / 4 * (-1) ** i
        elif s == "tiny":
            flat[idx] = fi.tiny * (1 + torch.rand(len(idx), generator=g))
        elif s == "subnormal":
            flat[idx] = fi.tiny * torch.rand(len(idx), generator=g) / 2
        elif s == "inf":  # the non-finite policy (docs/quant-spec.md): the same on every backend
            flat[idx[:1]] = float("inf") * (-1) ** i
        elif s == "nan":
            flat[idx[:1]] = float("nan")
    base = base.to(dtype)
    if c["layout"] == "contiguous":
        return base.to(device)
    if c["layout"] == "token_strided":  # K|V packed per token
        buf = torch.full((L, T, 2, H, D), float("nan"), dtype=dtype, device=device)
        buf[:, :, 0] = base.to(device)
        return buf[:, :, 0]
    if c["layout"] == "hnd":
        return base.permute(0, 2, 1, 3).contiguous().to(device).permute(0, 2, 1, 3)
    buf = torch.full((L, T + 3, H, D), float("nan"), dtype=dtype, device=device)  # a window of tokens
    buf[:, 2:2 + T] = base.to(device)
    return buf[:, 2:2 + T]


def _outputs(fmt, shape, device):
    codes = torch.full(fmt.codes_shape(*shape), 0xAB, dtype=torch.uint8, device=device)
    scale = torch.full(fmt.scale_shape(*shape), float("nan"), device=device)
    zero = torch.full_like(scale, float("nan")) if fmt.has_zero else None
    return codes, scale, zero


def _ref_quantize(x, fmt):
    xc = x.detach().cpu().contiguous()
    codes, scale, zero = _outputs(fmt, xc.shape, "cpu")
    ref.quantize_into(xc, fmt, codes, scale, zero, True)
    return codes, scale, zero


def _same(a, b):
    """Bitwise equality of float tensors (NaN == NaN, -0 != +0)."""
    return torch.equal(a.cpu().contiguous().view(torch.int32), b.cpu().contiguous().view(torch.int32))


def _check_close(got, want, dtype, what):
    """Dequantized ``got`` vs the reference's ``want`` (float32 views of selected elements):
    none left poisoned, the same infinities (values beyond a narrower output dtype), finite
    values within OUT_ULP of the largest finite |want|."""
    nan = want.isnan()  # NaN decodes to NaN (docs/quant-spec.md); elsewhere NaN is the poison
    assert got[nan].isnan().all(), f"{what}: a NaN code did not decode to NaN"
    assert not got[~nan].isnan().any(), f"{what}: unwritten (poisoned) outputs remain"
    assert torch.equal(got.isinf(), want.isinf()) and torch.equal(got[got.isinf()], want[want.isinf()]), what
    fin = want.isfinite()
    if fin.any():
        tol = OUT_ULP[dtype] * want[fin].abs().max().item()
        diff = (got[fin] - want[fin]).abs().max().item()
        assert diff <= tol, f"{what}: max |diff| {diff} > {tol}"


def _same_values(a, b):
    """Equal as values (NaN == NaN, +0 == -0)."""
    a, b = a.cpu(), b.cpu()
    return bool(((a == b) | (a.isnan() & b.isnan())).all())


def _runnable(backend, x, fmt):
    return (dispatch.refusal("quantize", backend, x, fmt) is None
            and dispatch.refusal("dequantize", backend, x, fmt) is None)


def _check_half_step(x, codes, scale, zero, fmt):
    """Decoded (float64) values within half a quantization step of the finite input."""
    xd = x.detach().cpu().double()
    y = ref.dequantize_float64(codes, scale, zero, fmt, xd.shape)
    err = (y - xd).abs()
    if fmt.kind == "int":
        if fmt.axis == "channel":
            step = scale.double().repeat_interleave(fmt.group_size, dim=-1)
        else:
            step = scale.double()[:, torch.arange(xd.shape[1]) // fmt.group_size]
        bound = step / 2 + INT_STEP_SLACK * step * fmt.qmax + 1e-30
    else:
        s = ref._fp8_broadcast(scale.double(), fmt.scope).expand_as(xd)
        bound = torch.maximum(xd.abs() * FP8_REL, s * FP8_SUBNORMAL_ABS) + xd.abs() * FP8_PRODUCT_REL
    ok = ~torch.isfinite(xd) | (torch.isfinite(y) & (err <= bound))  # non-finite inputs: the policy's tests
    assert ok.all(), f"{int((~ok).sum())} decoded values beyond half a step (max excess {(err - bound).max()})"


# ---- properties ------------------------------------------------------------------------------
@SETTINGS
@given(cases())
def test_ops_match_reference(c):
    """torch.ops.kvkernels.quantize / dequantize on every available backend, on the case's
    layout and device, against the reference on a contiguous CPU copy."""
    fmt = c["fmt"]
    x = make_x(c)
    rcodes, rscale, rzero = _ref_quantize(x, fmt)
    _check_half_step(x, rcodes, rscale, rzero, fmt)
    inv = ref._fp8_broadcast(ref._recip(1.0, rscale), fmt.scope) if fmt.kind == "fp8" else None
    for backend in BACKENDS:
        if not _runnable(backend, x, fmt):
            continue
        codes, scale, zero = _outputs(fmt, x.shape, x.device)
        quantize_op(x, str(fmt), codes, scale, zero, True, backend)
        skip = interpreter_cast_defects(backend, "quantize", fmt, x=x, inv=inv)
        if not skip.all():
            assert _same(scale, rscale), f"{backend}: scales differ"
            if zero is not None:
                # as values: a group whose min is a zero may give +0 or -0 (min of {+0, -0} is
                # order-dependent; the spec does not fix the sign; it decodes to the same values)
                assert torch.equal(zero.cpu(), rzero) or _same_values(zero, rzero), f"{backend}: zero points differ"
            if fmt.kind == "fp8":
                diff = (codes.cpu() != rcodes) & ~skip
            else:
                diff = codes.cpu() != rcodes
            assert not diff.any(), f"{backend}: {int(diff.sum())} codes differ from the reference"
        # dequantize the reference's codes into a poisoned output of the case's layout
        out = make_x(c)
        out.fill_(float("nan"))
        dequantize_op(rcodes.to(x.device), rscale.to(x.device), None if rzero is None else rzero.to(x.device),
                      str(fmt), out, backend)
        want = torch.empty(x.shape, dtype=x.dtype)
        ref.dequantize_into(rcodes, rscale, rzero, fmt, want)
        keep = ~interpreter_cast_defects(backend, "dequantize", fmt, codes=rcodes, want=want)
        _check_close(out.cpu().float()[keep], want.float()[keep], x.dtype, f"{backend} dequantize")


@SETTINGS
@given(cases(), st.booleans(), st.sampled_from(DTYPES))
def test_public_api_matches_reference(c, three_d, out_dtype):
    """kvkernels.quantize / dequantize (default backend choice, 3-D or 4-D input, a strided
    out=) give the reference's codes and values, with the container's documented shapes."""
    fmt = c["fmt"]
    x4 = make_x(c)
    x = x4[0] if three_d else x4
    q = kvkernels.quantize(x, str(fmt))
    rcodes, rscale, rzero = _ref_quantize(x4[:1] if three_d else x4, fmt)
    L = 1 if three_d else x4.shape[0]
    assert q.shape == tuple(x.shape) and q.format == fmt and q.dtype == x.dtype and q.has_layers == (not three_d)
    pub = fmt.scale_shape(L, *x4.shape[1:])
    assert tuple(q.scale.shape) == (pub[1:] if three_d else pub)
    assert q.codes.is_contiguous() and q.codes.dtype == fmt.codes_dtype()
    name, _ = dispatch.resolve("quantize", kvkernels.quant._key(x4, fmt), (x4, fmt), None, x4.device.type)
    inv = ref._fp8_broadcast(ref._recip(1.0, rscale), fmt.scope) if fmt.kind == "fp8" else None
    skip = interpreter_cast_defects(name, "quantize", fmt, x=x4[:1] if three_d else x4, inv=inv)
    got = q.codes.view(torch.uint8).reshape(rcodes.shape).cpu()
    if not skip.all():
        assert _same(q.scale.reshape(rscale.shape), rscale)
        diff = (got != rcodes) & (~skip if fmt.kind == "fp8" else True)
        assert not diff.any()
    y = kvkernels.dequantize(q)
    assert y.dtype == x.dtype and tuple(y.shape) == tuple(x.shape)
    out = make_x(dict(c, dtype=out_dtype))
    out = out[0] if three_d else out
    out.fill_(float("nan"))
    assert kvkernels.dequantize(q, out=out) is out
    want = torch.empty(rcodes.shape[:-1] + (x.shape[-1],), dtype=out_dtype)
    ref.dequantize_into(got, q.scale.reshape(rscale.shape).cpu(), None if q.zero is None else q.zero.reshape(rscale.shape).cpu(),
                        fmt, want)
    keep = ~interpreter_cast_defects(name, "dequantize", fmt, codes=got, want=want)
    _check_close(out.reshape(want.shape).cpu().float()[keep], want.float()[keep], out_dtype, f"{name} dequantize(out=)")


@SETTINGS
@given(cases(max_t=5))
def test_bad_buffers_refused_property(c):
    """Any buffer one element off in any dim is refused naming it, on every backend."""
    fmt = c["fmt"]
    x = make_x(c)
    for backend in BACKENDS:
        codes, scale, zero = _outputs(fmt, x.shape, x.device)
        for name in ("codes", "scale", "zero"):
            t = {"codes": codes, "scale": scale, "zero": zero}[name]
            if t is None:
                continue
            for d in range(t.dim()):
                shape = list(t.shape)
                shape[d] += 1
                bad = torch.zeros(shape, dtype=t.dtype, device=t.device)
                args = {"codes": codes, "scale": scale, "zero": zero, name: bad}
                with pytest.raises(ValueError, match=f"^{name}: expected shape"):
                    quantize_op(x, str(fmt), args["codes"], args["scale"], args["zero"], True, backend)
                with pytest.raises(ValueError, match=f"^{name}: expected shape"):
                    dequantize_op(args["codes"], args["scale"], args["zero"], str(fmt), x.contiguous(), backend)

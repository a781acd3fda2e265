"""quantize / dequantize: every backend against the torch reference (the spec).

Codes, scales and zero points must be bit-identical to the reference; decoded values are checked
against the input in float64 (within half a quantization step) and against the reference's
dequantize (tolerances from tests/tolerances.py). Outputs are poisoned before each run.
"""
import itertools
import os
import re

import pytest
import torch

import kvkernels
from kvkernels import dispatch
from kvkernels.formats import QuantFormat
from kvkernels.quant import dequantize_op, quantize_op
from kvkernels.reference import quant as ref

from conftest import DEVICE
from tolerances import FP8_PRODUCT_REL, FP8_REL, FP8_SUBNORMAL_ABS, INT_STEP_SLACK, OUT_ULP

ON_GPU = DEVICE == "cuda"
INTERP = os.environ.get("TRITON_INTERPRET") == "1"

FORMATS = ["int8:g64:channel", "int8:g16:channel", "int4:g32:channel", "int4:g128:channel",
           "int2:g32:channel", "int2:g16:channel", "int8:g32:token", "int4:g32:token", "int2:g32:token",
           "int4:g16:token", "fp8:token_head", "fp8:head", "fp8:tensor"]
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
# (L, T, H, D): odd token counts, head_dim 64/80/96/128/256
SHAPES = [(1, 37, 2, 64), (2, 19, 3, 128), (1, 33, 1, 96), (2, 7, 2, 80), (1, 5, 1, 256)]
if ON_GPU:
    SHAPES += [(3, 1025, 8, 128), (2, 511, 3, 64), (2, 512, 3, 96)]
LAYOUTS = ["contiguous", "token_strided", "hnd"]
KERNEL_BACKENDS = ["cuda", "triton"]


def _runnable(backend, t, fmt):
    return dispatch.refusal("quantize", backend, t, fmt) or dispatch.refusal("dequantize", backend, t, fmt)


def make_x(shape, dtype, layout, device=DEVICE):
    """Random KV ``[L, T, H, D]`` in the requested memory layout (values spread over groups)."""
    L, T, H, D = shape
    scale = torch.rand(L, 1, H, 1, device=device) * 4 + 0.1
    shift = torch.randn(L, 1, H, 1, device=device)
    base = torch.randn(L, T, H, D, device=device) * scale + shift
    if layout == "contiguous":
        return base.to(dtype)
    if layout == "token_strided":  # tokens interleaved with another tensor (e.g. packed K|V)
        buf = torch.full((L, T, 2, H, D), float("nan"), device=device, dtype=dtype)
        buf[:, :, 1] = base.to(dtype)
        return buf[:, :, 1]
    if layout == "misaligned":  # dense, but 1 element past a 16-byte boundary: the general kernels
        flat = torch.full((base.numel() + 1,), float("nan"), device=device, dtype=dtype)
        view = flat[1:].view(L, T, H, D)
        view.copy_(base.to(dtype))
        return view
    if layout == "hnd":  # heads outermost: a permuted view, token stride = D
        buf = base.permute(0, 2, 1, 3).contiguous().to(dtype)
        return buf.permute(0, 2, 1, 3)
    raise AssertionError(layout)


def poisoned_outputs(x, fmt):
    L, T, H, D = x.shape
    codes = torch.full(fmt.codes_shape(L, T, H, D), 0xAB, dtype=torch.uint8, device=x.device)
    scale = torch.full(fmt.scale_shape(L, T, H, D), float("nan"), device=x.device)
    zero = torch.full_like(scale, float("nan")) if fmt.has_zero else None
    return codes, scale, zero


def run_quantize(x, fmt, backend, scale_in=None):
    codes, scale, zero = poisoned_outputs(x, fmt)
    if scale_in is not None:
        scale.copy_(scale_in)
    quantize_op(x, str(fmt), codes, scale, zero, scale_in is None, backend)
    return codes, scale, zero


def run_dequantize(codes, scale, zero, fmt, shape, dtype, backend, layout="contiguous"):
    out = make_x(shape, dtype, layout)
    out.fill_(float("nan"))
    dequantize_op(codes, scale, zero, str(fmt), out, backend)
    return out


def check_decoded_vs_input(x, codes, scale, zero, fmt):
    """Decoded values (float64) are within half a quantization step of the input."""
    xd = x.double()
    y = ref.dequantize_float64(codes, scale, zero, fmt, x.shape)
    assert torch.isfinite(y).all()
    err = (y - xd).abs()
    if fmt.kind == "int":
        if fmt.axis == "channel":
            step = scale.double().repeat_interleave(fmt.group_size, dim=-1)
        else:
            step = scale.double()[:, torch.arange(x.shape[1], device=x.device) // fmt.group_size]
        bound = step / 2 + INT_STEP_SLACK * step * fmt.qmax + 1e-30
    else:
        s = ref._fp8_broadcast(scale.double(), fmt.scope).expand_as(xd)
        bound = torch.maximum(xd.abs() * FP8_REL, s * FP8_SUBNORMAL_ABS) + xd.abs() * FP8_PRODUCT_REL
    bad = err > bound
    assert not bad.any(), f"{int(bad.sum())} values off by more than half a step; max excess {(err - bound).max()}"


def check_close(out, want, dtype):
    assert not torch.isnan(out).any(), "unwritten (NaN-poisoned) outputs remain"
    tol = OUT_ULP[dtype] * want.abs().max().item()
    diff = (out.float() - want.float()).abs().max().item()
    assert diff <= tol, f"max |diff| {diff} > {tol}"


def quantize_vs_reference(x, fmt, backend):
    """Quantize with ``backend`` and the reference; scales and zero points must be identical.
    Returns both (codes, scale, zero) triples."""
    got = run_quantize(x, fmt, backend)
    want = run_quantize(x, fmt, "torch")
    torch.testing.assert_close(got[1], want[1], rtol=0, atol=0)
    if got[2] is not None:
        torch.testing.assert_close(got[2], want[2], rtol=0, atol=0)
    return got, want


def dequantize_vs_reference(codes, scale, zero, fmt, shape, dtype, backend, layout):
    out = run_dequantize(codes, scale, zero, fmt, shape, dtype, backend, layout)
    want = run_dequantize(codes, scale, zero, fmt, shape, dtype, "torch")
    check_close(out, want, dtype)


def assert_codes_match(codes, rcodes, rscale, rzero, fmt, shape):
    """Codes identical to the reference's, except fp8 under the Triton interpreter, which rounds
    fp8 casts wrongly: there, codes within one e4m3 step (checked by decoding both), or exactly
    half the value (the interpreter drops the carry when rounding up across a binade); a NaN
    input's code is not checked there."""
    if fmt.kind == "fp8" and INTERP:
        y = ref.dequantize_float64(codes, rscale, rzero, fmt, shape)
        yr = ref.dequantize_float64(rcodes, rscale, rzero, fmt, shape)
        s = ref._fp8_broadcast(rscale.double(), fmt.scope).expand_as(y)
        near = (y - yr).abs() <= torch.maximum(yr.abs() * 2 * FP8_REL, s * 2 * FP8_SUBNORMAL_ABS)
        assert (near | (y == yr / 2) | yr.isnan()).all()  # its cast of NaN is wrong too (GPU: exact)
    else:
        assert torch.equal(codes, rcodes), f"{int((codes != rcodes).sum())} codes differ from the reference"


def _cases():
    # every format x every dtype; shapes and layouts rotate so each meets every format
    for i, (f, d) in enumerate(itertools.product(FORMATS, DTYPES)):
        shape = SHAPES[i % len(SHAPES)]
        try:
            QuantFormat.parse(f).check_shape(*shape[1:])
        except ValueError:  # e.g. group 64 on head_dim 80: use head_dim 128 for this format
            shape = (*shape[:3], 128)
        yield f, d, shape, LAYOUTS[i % len(LAYOUTS)]


CASES = list(_cases())


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("spec,dtype,shape,layout", CASES, ids=[f"{c[0]}-{str(c[1])[6:]}-{'x'.join(map(str, c[2]))}-{c[3]}" for c in CASES])
def test_quantize_matches_reference(backend, spec, dtype, shape, layout):
    fmt = QuantFormat.parse(spec)
    x = make_x(shape, dtype, layout)
    why = _runnable(backend, x, fmt)
    if why:
        pytest.skip(f"{backend}: {why}")
    (codes, scale, zero), (rcodes, rscale, rzero) = quantize_vs_reference(x, fmt, backend)
    assert_codes_match(codes, rcodes, rscale, rzero, fmt, x.shape)
    check_decoded_vs_input(x, rcodes, rscale, rzero, fmt)
    # dequantize: backend vs reference on the reference's codes, into a strided output
    dequantize_vs_reference(rcodes, rscale, rzero, fmt, shape, dtype, backend, layout)


PATH_FORMATS = ["int8:g64:channel", "int8:g8:channel", "int4:g32:channel", "int4:g128:channel", "int4:g16:channel",
                "int2:g32:channel", "int2:g8:channel", "int8:g32:token", "int4:g32:token", "int2:g32:token",
                "fp8:token_head", "fp8:head", "fp8:tensor"]


@pytest.mark.skipif(not ON_GPU, reason="GPU-sized shapes: the kernels' dense fast paths and their fallbacks")
@pytest.mark.parametrize("layout", ["contiguous", "token_strided", "misaligned"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("spec", PATH_FORMATS)
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_kernel_paths_exact(backend, spec, dtype, layout):
    """Each kernel path (dense 16-byte-aligned rows, strided tokens, misaligned fallback) matches
    the reference bit for bit, incl. constant groups (scale 0) and subnormal-range groups (the
    clamped reciprocal), and a partial last token group."""
    fmt = QuantFormat.parse(spec)
    shape = (3, 67, 8, 128)
    x = make_x(shape, dtype, layout)
    x[0, :40, 1] = 0.75                                                   # constant groups
    x[1, 32:64, 2] = (torch.rand(32, 128, device=DEVICE) * 1e-38).to(dtype)  # tiny ranges
    x[2, 5, 3, 7] = -3e4 if dtype != torch.float16 else -6e4             # a wide group
    why = _runnable(backend, x, fmt)
    if why:
        pytest.skip(f"{backend}: {why}")
    (codes, _, _), (rcodes, rscale, rzero) = quantize_vs_reference(x, fmt, backend)
    assert torch.equal(codes, rcodes), f"{int((codes != rcodes).sum())} codes differ from the reference"
    dequantize_vs_reference(rcodes, rscale, rzero, fmt, shape, dtype, backend, layout)


DENSE_SHAPES = [(3, 64, 8, 128), (2, 512, 3, 96), (1, 32, 1, 64), (2, 96, 5, 80)]


@pytest.mark.skipif(not ON_GPU, reason="the CUDA dense token dequantize kernel")
@pytest.mark.parametrize("layout", ["contiguous", "misaligned"])
@pytest.mark.parametrize("shape", DENSE_SHAPES, ids=["x".join(map(str, s)) for s in DENSE_SHAPES])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("spec", ["int4:g32:token", "int2:g32:token", "int8:g32:token"])
def test_token_dequantize_dense(spec, dtype, shape, layout):
    """Token counts that are multiples of 32 into a contiguous 16-byte-aligned output take the
    dense g32 kernel (16-byte output vectors; int8 only into float32), a misaligned output the
    general one: both against the reference, outputs poisoned."""
    fmt = QuantFormat.parse(spec)
    x = make_x(shape, dtype, "contiguous")
    x[0, :32, 0] = 0.5  # a constant group (scale 0)
    why = _runnable("cuda", x, fmt)
    if why:
        pytest.skip(f"cuda: {why}")
    codes, scale, zero = run_quantize(x, fmt, "torch")
    dequantize_vs_reference(codes, scale, zero, fmt, shape, dtype, "cuda", layout)


@pytest.mark.parametrize("spec", FORMATS)
def test_reference_within_half_step(spec):
    """The reference itself honours the error bound, on all dtypes, odd shapes, L=1 and L>1."""
    fmt = QuantFormat.parse(spec)
    for dtype, shape in zip(DTYPES, [(1, 41, 3, 128), (2, 17, 2, 256), (1, 9, 4, 128)]):
        x = make_x(shape, dtype, "contiguous")
        codes, scale, zero = run_quantize(x, fmt, "torch")
        check_decoded_vs_input(x, codes, scale, zero, fmt)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS + ["torch"])
@pytest.mark.parametrize("spec", ["fp8:token_head", "fp8:head", "fp8:tensor"])
def test_fp8_given_scale_saturates(backend, spec):
    """Given scales are read, not overwritten; values beyond 448*scale saturate to +-448."""
    fmt = QuantFormat.parse(spec)
    shape = (2, 13, 2, 64)
    x = make_x(shape, torch.float32, "contiguous")
    why = _runnable(backend, x, fmt)
    if why:
        pytest.skip(f"{backend}: {why}")
    given = torch.rand(fmt.scale_shape(*shape), device=DEVICE) * 0.004 + 0.001  # small: forces saturation
    codes, scale, _ = run_quantize(x, fmt, backend, scale_in=given)
    assert torch.equal(scale, given)
    y = codes.view(torch.float8_e4m3fn).float()
    assert torch.isfinite(y).all() and y.abs().max().item() == 448.0
    rcodes, _, _ = run_quantize(x, fmt, "torch", scale_in=given)
    if not INTERP or backend == "torch":
        assert torch.equal(codes, rcodes)


def test_packing_bit_order():
    """int4: channel 2j in the low nibble of byte j; int2: channel 4j+i at bits 2i."""
    q = torch.tensor([[1, 2, 3, 0, 15, 7, 0, 9]], dtype=torch.uint8)
    assert ref._pack(q, 4).tolist() == [[0x21, 0x03, 0x7F, 0x90]]
    q2 = torch.tensor([[1, 2, 3, 0, 3, 3, 0, 1]], dtype=torch.uint8)
    assert ref._pack(q2, 2).tolist() == [[0b00111001, 0b01001111]]
    for bits in (2, 4, 8):
        r = torch.randint(0, 1 << bits, (5, 64), dtype=torch.uint8)
        assert torch.equal(ref._unpack(ref._pack(r, bits), bits).to(torch.uint8), r)


@pytest.mark.parametrize("spec", ["int4:g32:channel", "int2:g32:token", "fp8:token_head", "fp8:tensor"])
@pytest.mark.parametrize("layers", [False, True])
def test_public_api_roundtrip(spec, layers):
    shape = (2, 21, 3, 64) if layers else (21, 3, 64)
    x = torch.randn(shape, device=DEVICE, dtype=torch.bfloat16)
    q = kvkernels.quantize(x, spec)
    fmt = QuantFormat.parse(spec)
    L = shape[0] if layers else 1
    assert q.shape == shape and q.has_layers == layers and q.format == fmt
    assert tuple(q.scale.shape) == (fmt.scale_shape(L, *shape[-3:]) if layers else fmt.scale_shape(1, *shape)[1:])
    y = kvkernels.dequantize(q)
    assert y.dtype == torch.bfloat16 and y.shape == x.shape
    y32 = kvkernels.dequantize(q, torch.float32)
    check_close(y, y32, torch.bfloat16)
    x4 = x if layers else x.unsqueeze(0)
    sc4 = q.scale.reshape(fmt.scale_shape(L, *x4.shape[1:]))
    z4 = q.zero.reshape(sc4.shape) if q.zero is not None else None
    check_decoded_vs_input(x4, q.codes.reshape(L, *q.codes.shape[-3:]).view(torch.uint8), sc4, z4, fmt)


def test_given_scale_public_api():
    x = torch.randn(9, 2, 64, device=DEVICE)
    s = torch.tensor(0.01, device=DEVICE)
    q = kvkernels.quantize(x, "fp8:tensor", scale=s)
    assert q.scale.shape == () and q.scale.item() == pytest.approx(0.01)
    q2 = kvkernels.quantize(x, "fp8:head", scale=torch.full((2,), 0.02, device=DEVICE))
    assert torch.equal(q2.scale, torch.full((2,), 0.02, device=DEVICE))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS + ["torch"])
def test_opcheck(backend):
    fmt = QuantFormat.parse("int4:g32:channel")
    x = make_x((1, 9, 2, 64), torch.float16, "contiguous")
    why = _runnable(backend, x, fmt)
    if why:
        pytest.skip(f"{backend}: {why}")
    codes, scale, zero = poisoned_outputs(x, fmt)
    torch.library.opcheck(quantize_op, (x, str(fmt), codes, scale, zero, True, backend))
    quantize_op(x, str(fmt), codes, scale, zero, True, backend)
    out = torch.empty_like(x)
    torch.library.opcheck(dequantize_op, (codes, scale, zero, str(fmt), out, backend))
    f8 = QuantFormat.parse("fp8:head")
    c8, s8, _ = poisoned_outputs(x, f8)
    torch.library.opcheck(quantize_op, (x, str(f8), c8, s8, None, True, backend))


def test_torch_compile_fullgraph():
    def roundtrip(x):
        q = kvkernels.quantize(x, "int4:g32:channel", backend="torch")
        return kvkernels.dequantize(q, backend="torch")

    x = torch.randn(11, 2, 64, device=DEVICE)
    got = torch.compile(roundtrip, fullgraph=True)(x)
    assert torch.equal(got, roundtrip(x))


@pytest.mark.skipif(not ON_GPU, reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("spec", ["int4:g32:channel", "fp8:head", "fp8:tensor", "int2:g32:token"])
def test_cuda_graph_capture(backend, spec):
    fmt = QuantFormat.parse(spec)
    x = make_x((2, 64, 4, 128), torch.bfloat16, "contiguous")
    why = _runnable(backend, x, fmt)
    if why:
        pytest.skip(f"{backend}: {why}")
    codes, scale, zero = poisoned_outputs(x, fmt)
    out = torch.empty_like(x)
    # warm up (compiles, caches dispatch) on a side stream, then capture
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        quantize_op(x, str(fmt), codes, scale, zero, True, backend)
        dequantize_op(codes, scale, zero, str(fmt), out, backend)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        quantize_op(x, str(fmt), codes, scale, zero, True, backend)
        dequantize_op(codes, scale, zero, str(fmt), out, backend)
    for _ in range(2):  # twice, with new data: nothing may carry over from the capture or a replay
        x.copy_(make_x(x.shape, x.dtype, "contiguous"))  # new data, same buffers
        out.fill_(float("nan"))
        g.replay()
        torch.cuda.synchronize()
        rc, rs, rz = run_quantize(x, fmt, "torch")
        assert torch.equal(codes, rc) and torch.equal(scale, rs)
        check_close(out, run_dequantize(rc, rs, rz, fmt, x.shape, x.dtype, "torch"), x.dtype)


# fp8 tensor/head scales computed on the GPU over shapes from one step of several layers to
# layers of 8 and 16 MiB (bf16), all dtypes: an all-zero layer (scale 1), a NaN in one layer
# (scale 1 there, as the reference), the largest |x| in the last element, a small layer. On the
# GPU the CUDA backend runs its one-pass kernel (steps of several layers, a partial last step,
# one 8 MiB layer per step) where layers fit on chip and the two kernels elsewhere (checked).
# (300, 33, 3, 64): 792 (bf16) or 1584 (fp32) 16-byte vectors per layer, so warps straddle layer
# boundaries (lanes of one warp reduce different keys), in 2-4 steps of up to 256 keys.
# Layers (tensor) or heads (head scope, as pseudo-layers [T, D]) of >= 4096 16-byte vectors run
# in block groups, a (pseudo-)layer per group a step, UNI variant: many small groups
# ((5, 300, 8, 128) heads), partial last steps ((37, 257, 8, 128): 296 heads in 5 steps of 66,
# 37 layers in steps of 13), one 4-8 MiB layer a step with a partial last block
# ((3, 2113, 8, 128)), heads of head_dim 64 / 256 ((2, 8500, 4, 64), (2, 2120, 4, 256)), one
# 4.2 MiB head a step ((2, 17000, 2, 128)); fp32 layers beyond the on-chip capacity take the
# heads or two kernels. Smaller layers / heads ((300, 33, 3, 64)) take steps of several layers
# in the generic (tensor) or HEAD variant. The Triton backend's Gluon one-pass kernel
# (_q_fp8_resident_gl) takes the block-group cases (>= 4096 vectors a (pseudo-)layer, at most
# 4096 a program, one program an SM), the amax + quantize kernels the others.
COMPUTED_SHAPES = ([(5, 300, 8, 128), (37, 257, 8, 128), (300, 33, 3, 64), (3, 4096, 8, 128), (2, 8192, 8, 128),
                    (3, 2113, 8, 128), (2, 8500, 4, 64), (2, 2120, 4, 256), (2, 17000, 2, 128)]
                   if ON_GPU else [(5, 21, 3, 64)])


@pytest.mark.parametrize("shape", COMPUTED_SHAPES, ids=["x".join(map(str, s)) for s in COMPUTED_SHAPES])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("spec", ["fp8:tensor", "fp8:head"])
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_fp8_computed_scale_special_values(backend, spec, dtype, shape):
    fmt = QuantFormat.parse(spec)
    x = make_x(shape, dtype, "contiguous")
    L = shape[0]
    x[L // 2] = 0
    x[-1, -1, -1, -1] = -3e3
    x[0] *= 1e-3
    if L > 2:
        x[1, 7, 0, 3] = float("nan")
    why = _runnable(backend, x, fmt)
    if why:
        pytest.skip(f"{backend}: {why}")
    (codes, scale, _), (rcodes, rscale, rzero) = quantize_vs_reference(x, fmt, backend)
    assert_codes_match(codes, rcodes, rscale, rzero, fmt, x.shape)
    if backend == "cuda" and ON_GPU:  # the one-pass kernel runs exactly where the layers fit on chip
        L, T, H, D = x.shape
        layer = x[0].numel() * x.element_size()
        # the head scope as pseudo-layers of one head, the tensor-scope kernel: always with block
        # groups (the default); without them only for layers beyond the chip
        groups = not os.environ.get("KVK_FP8_GROUPS", "").startswith("0")
        ve = 16 // x.element_size()  # block groups for layers of >= 4096 16-byte vectors
        split = spec == "fp8:head" and H > 1 and ((groups and T * D // ve >= 4096) or layer > (8 << 20))
        size = T * D * x.element_size() if split else layer
        sms = torch.cuda.get_device_properties(x.device).multi_processor_count
        if size <= (4 << 20) or sms >= 132:  # 8 MiB layers fit 132-SM GPUs (H100 SXM, H200)
            names = _kernel_names(lambda: run_quantize(x, fmt, backend))
            res = [n for n in names if "quant_fp8_resident_kernel" in n]
            fits = size <= (8 << 20)
            assert bool(res) == fits, f"one-pass kernel ran: {bool(res)}, expected {fits}; kernels: {sorted(names)}"
            if res:
                head, uni, cl = _template_flags(res[0])
                assert head == (spec == "fp8:head" and not split), f"HEAD flag {head}, split {split}: {res[0]}"
                if sms == 132:  # which variant: the launcher's rule, restated for 132 SMs
                    assert uni == _expect_uni(x, head, split, groups), f"UNI variant: {uni}; kernel: {res[0]}"
                # the cluster variant: block groups of <= 16 blocks (<= 65536 16-byte vectors a
                # (pseudo-)layer) on sm_90, where the GPU runs 7/8 of the groups' clusters at once
                nv = T * D // ve if split else T * H * D // ve
                assert not cl or (uni and groups and nv <= 16 * 4096), f"cluster variant for {nv} vectors: {res[0]}"
                hopper = torch.cuda.get_device_capability()[0] == 9
                cl_on = not os.environ.get("KVK_FP8_CLUSTER", "").startswith("0")
                if sms == 132 and hopper and cl_on and groups and x.element_size() == 2 and split:
                    # heads of 2 / 3 blocks (K = 4 / 2) in 66 / 40 groups; the rule needs 58 / 35
                    # clusters at once, the H100s measured run 66 / 39 (experiments/cluster_occ.cu)
                    if shape in ((37, 257, 8, 128), (5, 300, 8, 128)):
                        assert cl, f"expected the cluster variant: {res[0]}"
    if backend == "triton" and ON_GPU:  # the Gluon one-pass kernel: where the launcher's rule says
        from kvkernels.triton_kernels import quant as tq

        if tq.gluon is not None and torch.cuda.get_device_capability()[0] == 9 and os.environ.get("KVK_GLUON") != "0":
            L, T, H, D = x.shape
            hs = H if spec == "fp8:head" else 1  # the head scope: pseudo-layers [T, D]
            nv = T * H * D // (16 // x.element_size()) // hs
            sms = torch.cuda.get_device_properties(x.device).multi_processor_count
            names = _kernel_names(lambda: run_quantize(x, fmt, backend))
            ran = any("_q_fp8_resident_gl" in n for n in names)
            assert ran == (4096 <= nv <= sms * 4096), f"Gluon one-pass kernel ran: {ran}; {nv} vectors a layer"


def _template_flags(name):
    """The HEAD, UNI and CL template flags (third to fifth of <Tr, K, HEAD, UNI, CL>) of a
    one-pass kernel's name, demangled or not."""
    m = re.search(r"quant_fp8_resident_kernel<([^<>]*)>", name)
    if m:
        flags = [f.strip() == "true" for f in m.group(1).split(",")[2:5]]
        assert len(flags) == 3, f"cannot read the template flags of {name}"
        return tuple(flags)
    m = re.search(r"quant_fp8_resident_kernel.*?Li\d+ELb([01])ELb([01])ELb([01])E", name)
    assert m, f"cannot read the template flags of {name}"
    return m.group(1) == "1", m.group(2) == "1", m.group(3) == "1"


def _expect_uni(x, head, split, groups):
    """Whether the launcher picks the UNI variant (tensor scope, one key per block): with block
    groups (layers of >= 4096 16-byte vectors), or one layer per step (a layer > half the 8 MiB
    step); never for the HEAD variant. split: the head scope as the tensor scope over L * H
    pseudo-layers [T, D]."""
    if head:
        return False
    L, T, H, D = x.shape
    if split:
        L, H = L * H, 1
    nv = T * H * D // (16 // x.element_size())
    return (groups and nv >= 4096) or min(L, max(1, (8 << 20) // (nv * 16))) == 1


def _kernel_names(fn):
    """Names of the GPU kernels that fn() launches (torch profiler)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return {e.name for e in prof.events() if e.device_type.name == "CUDA"}


@pytest.mark.skipif(not ON_GPU, reason="needs a GPU")
def test_large_offsets_cuda_triton():
    """More than 2**31 bytes of input: int64 offsets in every kernel."""
    fmt = QuantFormat.parse("int8:g128:channel")
    T = (2**31 // (8 * 128 * 2)) + 17
    x = torch.randn(1, T, 8, 128, device=DEVICE, dtype=torch.bfloat16)
    rc, rs, rz = run_quantize(x, fmt, "torch")
    for backend in KERNEL_BACKENDS:
        if _runnable(backend, x, fmt):
            continue
        c, s, z = run_quantize(x, fmt, backend)
        assert torch.equal(c[:, -64:], rc[:, -64:]) and torch.equal(s, rs)
        del c, s, z


@pytest.mark.parametrize("layout", ["contiguous", "token_strided", "misaligned"])
@pytest.mark.parametrize("spec", ["fp8:tensor", "fp8:head"])
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_fp8_computed_scale_paths(backend, spec, layout):
    """fp8 tensor/head scales computed by the amax pass: bit-identical to the reference over
    several layers and many blocks per layer, with the largest |x| placed in different layers
    and heads and one layer a thousand times smaller than the rest."""
    fmt = QuantFormat.parse(spec)
    shape = (5, 300, 8, 128) if ON_GPU else (3, 21, 3, 64)
    x = make_x(shape, torch.bfloat16, layout)
    x[1, -1, 2, 5] = 900.0
    x[-2, 0, 0, 0] = -1e3
    x[-1] *= 1e-3
    why = _runnable(backend, x, fmt)
    if why:
        pytest.skip(f"{backend}: {why}")
    (codes, _, _), (rcodes, rscale, rzero) = quantize_vs_reference(x, fmt, backend)
    assert_codes_match(codes, rcodes, rscale, rzero, fmt, x.shape)


@pytest.mark.parametrize("spec", ["int4:g32:channel", "int2:g32:token", "fp8:tensor"])
def test_triton_layer_chunks(spec, monkeypatch):
    """More layers than one Triton grid dimension holds (65535) are launched in layer ranges:
    with the limit lowered to 2, five layers (ranges 2 + 2 + 1) give the reference's codes,
    scales, zero points and dequantized values."""
    from kvkernels.triton_kernels import quant as tq

    fmt = QuantFormat.parse(spec)
    x = make_x((5, 37, 2, 64), torch.bfloat16, "token_strided")
    if _runnable("triton", x, fmt):
        pytest.skip(f"triton: {_runnable('triton', x, fmt)}")
    monkeypatch.setattr(tq, "_MAX_GRID_Z", 2)
    (codes, _, _), (rcodes, rscale, rzero) = quantize_vs_reference(x, fmt, "triton")
    assert_codes_match(codes, rcodes, rscale, rzero, fmt, x.shape)
    dequantize_vs_reference(rcodes, rscale, rzero, fmt, x.shape, torch.bfloat16, "triton", "token_strided")


@pytest.mark.parametrize("spec,layout,merged_q,merged_dq", [
    ("int8:g64:channel", "contiguous", True, True),
    ("int4:g32:channel", "contiguous", True, False),      # int4/int2 channel dequantize is flat already
    ("fp8:token_head", "contiguous", True, True),
    ("fp8:tensor", "contiguous", True, True),
    ("fp8:head", "contiguous", False, False),             # per-head scales: heads must stay
    ("int4:g32:token", "contiguous", False, False),       # token groups run along T
    ("int8:g64:channel", "token_strided", False, False),  # tokens and heads do not merge
])
def test_triton_merge_heads(spec, layout, merged_q, merged_dq, monkeypatch):
    """With 3 heads (not a power of two) the Triton rows kernels run on [L, T*H, 1, D] views
    exactly where that is valid, and give the reference's results either way."""
    from kvkernels.triton_kernels import quant as tq

    fmt = QuantFormat.parse(spec)
    x = make_x((2, 37, 3, 64), torch.bfloat16, layout)
    if _runnable("triton", x, fmt):
        pytest.skip(f"triton: {_runnable('triton', x, fmt)}")
    views = []
    real = tq._rows_view
    monkeypatch.setattr(tq, "_rows_view", lambda t, L, rows: views.append(rows) or real(t, L, rows))
    (codes, _, _), (rcodes, rscale, rzero) = quantize_vs_reference(x, fmt, "triton")
    assert bool(views) == merged_q
    assert_codes_match(codes, rcodes, rscale, rzero, fmt, x.shape)
    views.clear()
    dequantize_vs_reference(rcodes, rscale, rzero, fmt, x.shape, torch.bfloat16, "triton", layout)
    assert bool(views) == merged_dq
    assert all(rows == 37 * 3 for rows in views)


def test_triton_token_parts():
    """Token-group launches: the full groups, then the partial last group alone."""
    from kvkernels.triton_kernels import quant as tq

    assert tq._token_parts(64, 32) == [(0, 2, False)]
    assert tq._token_parts(67, 32) == [(0, 2, False), (2, 1, True)]
    assert tq._token_parts(5, 32) == [(0, 1, True)]


GLUON_CASES = [  # (spec, shape, layout): odd head counts, head_dim 64/80/96/256, partial groups
    ("int2:g32:token", (2, 67, 8, 128), "contiguous"),
    ("int4:g32:token", (2, 67, 3, 80), "token_strided"),
    ("int8:g32:token", (1, 96, 5, 96), "hnd"),
    ("int2:g16:token", (2, 40, 3, 64), "contiguous"),
    ("int4:g48:token", (1, 100, 2, 256), "token_strided"),  # G % 32 != 0: masked chunks
    ("int2:g4:token", (1, 9, 3, 64), "contiguous"),          # several heads a program
    ("int4:g128:token", (1, 300, 2, 128), "contiguous"),    # a group of 4 chunks
]


@pytest.mark.skipif(not ON_GPU, reason="Gluon kernels run on the GPU only (no interpreter)")
@pytest.mark.parametrize("gluon_on", [True, False], ids=["gluon", "tl"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("spec,shape,layout", GLUON_CASES, ids=[f"{c[0]}-{'x'.join(map(str, c[1]))}-{c[2]}" for c in GLUON_CASES])
def test_triton_token_dequantize_gluon(spec, shape, layout, dtype, gluon_on, monkeypatch):
    """int token dequantize on the GPU: the Gluon kernel (default) and, with KVK_GLUON=0, the tl
    kernel both give the reference's values into poisoned, strided outputs; codes whose byte
    offset is not a multiple of the code word take the tl kernel."""
    from kvkernels.triton_kernels import quant as tq

    if tq.gluon is None:
        pytest.skip("this Triton has no Gluon")
    monkeypatch.setenv("KVK_GLUON", "1" if gluon_on else "0")
    fmt = QuantFormat.parse(spec)
    x = make_x(shape, dtype, "contiguous")
    x[0, :4, 0] = 0.5  # a constant group (scale 0)
    codes, scale, zero = run_quantize(x, fmt, "torch")
    out = make_x(shape, dtype, layout)
    assert tq._dq_token_gluon_ok(codes, out, fmt) == gluon_on
    dequantize_vs_reference(codes, scale, zero, fmt, shape, dtype, "triton", layout)
    if gluon_on and fmt.bits * 16 // out.element_size() > 8:  # code words of >= 2 bytes
        buf = torch.empty(codes.numel() + 1, dtype=torch.uint8, device=DEVICE)
        odd = buf[1:].view(codes.shape)
        odd.copy_(codes)
        assert not tq._dq_token_gluon_ok(odd, out, fmt)
        dequantize_vs_reference(odd, scale, zero, fmt, shape, dtype, "triton", layout)


@pytest.mark.skipif(ON_GPU, reason="the GPU runs these kernels (test_triton_token_dequantize_gluon, the fp8 tests)")
def test_gluon_kernels_compile_sm90():
    """Without a GPU (CI, the newest Triton), the Gluon kernels compile for sm_90 through ptxas
    (tests/gluon_sm90.py, in a process without TRITON_INTERPRET: the interpreter patches
    triton.language, which Gluon compiles against), and keep their designs: the token dequantize
    uses no shared memory (scale / zero are loaded in the output's layout, so nothing changes
    layout); the one-pass fp8 kernel holds three stages of K x 32 NW 16-byte vectors within the
    share of an SM's 227 KiB that each of its 32 / NW programs gets."""
    import json
    import subprocess
    import sys

    from kvkernels.triton_kernels import quant as tq

    if tq.gluon is None:
        pytest.skip("this Triton has no Gluon")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    here = os.path.dirname(os.path.abspath(__file__))
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(here), env.get("PYTHONPATH", "")])
    res = subprocess.run([sys.executable, os.path.join(here, "gluon_sm90.py")], env=env, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    rows = json.loads(res.stdout.strip().splitlines()[-1])
    assert len(rows) == 8
    for r in rows:
        assert r["cubin"] > 0, r
        if r["kernel"] == "dq_token":
            assert r["shared"] == 0, r
        else:
            nw, k = r["NW"], r["K"]
            assert 3 * k * nw * 32 * 16 <= r["shared"] <= 227 * 1024 * nw // 32, r


# Shapes at the edge of the launchers (issue 26, section 2): head_dim of one code byte for token
# groups (int8 D=1, int4 D=2, int2 D=4: the Triton token launcher divided by zero) and
# one-element inputs, every format that accepts them.
TINY_CASES = [("int8:g4:token", (1, 5, 1, 1)), ("int4:g4:token", (1, 5, 2, 2)), ("int2:g4:token", (2, 6, 1, 4)),
              ("int8:g32:token", (1, 1, 1, 1)), ("int8:g1:channel", (1, 1, 1, 1)), ("fp8:token_head", (1, 1, 1, 1)),
              ("fp8:head", (1, 1, 1, 1)), ("fp8:tensor", (1, 1, 1, 1)), ("int4:g2:channel", (1, 3, 1, 2)),
              ("int2:g4:channel", (1, 3, 2, 4)), ("int8:g1:token", (1, 3, 1, 1))]


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("spec,shape", TINY_CASES, ids=[f"{s}-{'x'.join(map(str, sh))}" for s, sh in TINY_CASES])
def test_tiny_shapes_match_reference(backend, dtype, spec, shape):
    """Every backend runs (or refuses with a reason) the smallest shapes, and matches the reference."""
    fmt = QuantFormat.parse(spec)
    x = make_x(shape, dtype, "contiguous")
    why = _runnable(backend, x, fmt)
    if why:
        pytest.skip(f"{backend}: {why}")
    (codes, scale, zero), (rcodes, rscale, rzero) = quantize_vs_reference(x, fmt, backend)
    assert_codes_match(codes, rcodes, rscale, rzero, fmt, x.shape)
    dequantize_vs_reference(rcodes, rscale, rzero, fmt, shape, dtype, backend, "contiguous")


@pytest.mark.parametrize("backend", ["torch"] + KERNEL_BACKENDS)
@pytest.mark.parametrize("bits", [8, 4, 2])
def test_token_group_longer_than_input(backend, bits):
    """A token group far beyond the token count (section 3) is the one group of all T tokens:
    the same codes, scales and zeros as a group of exactly T, with work and memory that follow
    the input (the reference used to pad to G tokens, the Triton kernel to unroll G / chunk
    loops)."""
    big = QuantFormat.parse(f"int{bits}:g65536:token")
    exact = QuantFormat.parse(f"int{bits}:g5:token")
    x = make_x((2, 5, 3, 64), torch.bfloat16, "token_strided")
    why = _runnable(backend, x, big)
    if why:
        pytest.skip(f"{backend}: {why}")
    got = run_quantize(x, big, backend)
    want = run_quantize(x, exact, "torch")
    for g, w in zip(got, want):
        assert torch.equal(g, w)
    out = run_dequantize(*got, big, x.shape, torch.bfloat16, backend)
    ref_out = run_dequantize(*want, exact, x.shape, torch.bfloat16, "torch")
    check_close(out, ref_out, torch.bfloat16)  # (the interpreter's bf16 casts truncate: not bit-exact)

"""Paged scatter / gather: every layout x dtype x head_dim x block size x backend vs the reference.

Caches are allocated as raw bytes filled with 0xFF (NaN for every float dtype, e4m3 included),
so a whole-buffer bit comparison proves that nothing outside the addressed slots changed; the
reference itself is checked to touch only addressed slots. Slots are random pages in permuted
order with padding (-1) entries, a slot_mapping shorter than the flat input, inputs
non-contiguous. On a CPU the Triton interpreter runs a rotating subset; on a GPU the full matrix.
"""
import itertools
import math
import os

import pytest
import torch

import kvkernels
from kvkernels import PagedLayout, PageTable, dispatch
from kvkernels.formats import QuantFormat
from kvkernels.layouts import page_table_slots
from kvkernels.paged import gather_op, scatter_op
from kvkernels.reference import paged as pref
from kvkernels.reference import quant as qref

from conftest import DEVICE
from tolerances import FP8_REL, FP8_SUBNORMAL_ABS, INT_STEP_SLACK, OUT_ULP

ON_GPU = DEVICE == "cuda"
INTERP = os.environ.get("TRITON_INTERPRET") == "1"
KERNEL_BACKENDS = ["triton", "cuda"]
LAYOUTS = ["flash_nhd", "flash_hnd", "flash_stacked", "flashinfer_nhd", "flashinfer_hnd", "hnd_as_nhd_view",
           "vllm_interleaved", "legacy", "cross_layer", "sglang", "mla", "sglang_mla"]
MLA_LAYOUTS = ("mla", "sglang_mla")
DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.float8_e4m3fn]
HEAD_DIMS = [64, 80, 128, 256]
BLOCK_SIZES = [1, 16, 32]


# ---- building caches -------------------------------------------------------------------------
class Caches:
    """Raw 0xFF-filled byte buffers, the tensors (views) handed to a constructor, and the layout."""

    def __init__(self):
        self.raws = []

    def alloc(self, shape, dtype, device=DEVICE):
        esize = torch.empty((), dtype=dtype).element_size()
        raw = torch.full((math.prod(shape) * esize,), 0xFF, dtype=torch.uint8, device=device)
        self.raws.append(raw)
        return raw.view(dtype).view(shape)

    def snapshot(self):
        return [r.clone() for r in self.raws]


def build(kind, L, NB, BS, H, D, dtype, device=DEVICE, seed=0):
    """(layout, Caches) for one of LAYOUTS; MLA kinds use one head of head_dim D."""
    c = Caches()
    g = torch.Generator().manual_seed(seed)
    if kind == "flash_nhd":
        lay = PagedLayout.vllm_flash([c.alloc((NB, BS, H, D), dtype, device) for _ in range(L)],
                                     [c.alloc((NB, BS, H, D), dtype, device) for _ in range(L)])
    elif kind == "flash_hnd":
        lay = PagedLayout.vllm_flash([c.alloc((NB, H, BS, D), dtype, device) for _ in range(L)],
                                     [c.alloc((NB, H, BS, D), dtype, device) for _ in range(L)], order="HND")
    elif kind == "flash_stacked":
        lay = PagedLayout.vllm_flash([c.alloc((2, NB, BS, H, D), dtype, device) for _ in range(L)], kv_dim=0)
    elif kind == "flashinfer_nhd":
        lay = PagedLayout.flashinfer([c.alloc((NB, 2, BS, H, D), dtype, device) for _ in range(L)], "NHD")
    elif kind == "flashinfer_hnd":
        lay = PagedLayout.flashinfer([c.alloc((NB, 2, H, BS, D), dtype, device) for _ in range(L)], "HND")
    elif kind == "hnd_as_nhd_view":  # HND memory handed over as a permuted NHD-shaped view
        lay = PagedLayout.from_tensors([c.alloc((NB, H, BS, D), dtype, device).transpose(1, 2) for _ in range(L)],
                                       [c.alloc((NB, H, BS, D), dtype, device).transpose(1, 2) for _ in range(L)])
    elif kind == "vllm_interleaved":  # [NB, H, BS, 2D] logical, a random physical order of NB, H, BS
        perm = [int(i) for i in torch.randperm(3, generator=g)]
        logical = (NB, H, BS)
        phys_shape = tuple(logical[i] for i in perm) + (2 * D,)
        inv = [perm.index(i) for i in range(3)] + [3]
        lay = PagedLayout.vllm_kv_interleaved([c.alloc(phys_shape, dtype, device).permute(*inv) for _ in range(L)])
    elif kind == "legacy":
        x = 16 // torch.empty((), dtype=dtype).element_size()
        lay = PagedLayout.vllm_legacy([c.alloc((NB, H, D // x, BS, x), dtype, device) for _ in range(L)],
                                      [c.alloc((NB, H, D, BS), dtype, device) for _ in range(L)])
    elif kind == "cross_layer":
        lay = PagedLayout.cross_layer(c.alloc((NB, L, 2, BS, H, D), dtype, device))
    elif kind == "sglang":
        lay = PagedLayout.sglang([c.alloc((NB * BS, H, D), dtype, device) for _ in range(L)],
                                 [c.alloc((NB * BS, H, D), dtype, device) for _ in range(L)], page_size=BS)
    elif kind == "mla":
        lay = PagedLayout.mla([c.alloc((NB, BS, D), dtype, device) for _ in range(L)])
    elif kind == "sglang_mla":
        lay = PagedLayout.sglang_mla([c.alloc((NB * BS, 1, D), dtype, device) for _ in range(L)], page_size=BS)
    else:
        raise AssertionError(kind)
    return lay, c


def make_slots(T, NB, BS, *, pad=3, device=DEVICE, dtype=torch.int64):
    """T slots: random distinct pages in permuted order, some -1 padding entries."""
    n = NB * BS
    s = torch.randperm(n)[:T].to(dtype)
    if pad:
        s[torch.randperm(T)[:min(pad, T - 1)]] = -1
    return s.to(device)


def make_flat(nkv, L, T, H, D, dtype, device=DEVICE):
    """Non-contiguous flat KV [nkv, L, T, H, D] (tokens interleaved with another tensor)."""
    buf = torch.randn(nkv, L, T, 2, H, D, device=device) * 2
    return buf.to(dtype)[:, :, :, 1]


def scales_for(lay, device=DEVICE):
    if not lay.fp8:
        return {}
    ks = torch.rand(lay.num_heads, device=device) * 0.02 + 0.005
    if lay.num_kv == 1:
        return {"k_scale": ks}
    return {"k_scale": ks, "v_scale": torch.tensor(0.013, device=device)}


def _refusal(op, backend, lay, t, fmt=None):
    return dispatch.refusal(op, backend, lay, t, fmt, 0)


def _fp8_near(a_bytes, b_bytes):
    """e4m3 bytes within one e4m3 step (the interpreter rounds fp8 casts wrongly), or half."""
    a = a_bytes.view(torch.float8_e4m3fn).double()
    b = b_bytes.view(torch.float8_e4m3fn).double()
    ok = ((a - b).abs() <= torch.maximum(b.abs() * 2 * FP8_REL, torch.full_like(b, 2 * FP8_SUBNORMAL_ABS))) | (a == b / 2)
    return bool((ok | (a.isnan() & b.isnan())).all())


def assert_same_caches(got, want, lay):
    for g, w in zip(got, want):
        if torch.equal(g, w):
            continue
        if lay.fp8 and INTERP:
            assert _fp8_near(g, w), "fp8 cache bytes differ beyond one e4m3 step"
        else:
            raise AssertionError(f"{int((g != w).sum())} cache bytes differ from the reference")


def run_scatter(kind, shape, dtype, backend, slots_dtype=torch.int64, kv=None, seed=0, **kw):
    L, NB, BS, H, D, T = shape
    lay, c = build(kind, L, NB, BS, H, D, dtype, seed=seed)
    nkv = lay.num_kv
    if kv is None:
        kv = make_flat(nkv, L, T + 3, lay.num_heads, D, torch.bfloat16 if lay.fp8 else dtype)
    slots = make_slots(T, NB, BS, dtype=slots_dtype)
    sc = scales_for(lay)
    kvkernels.scatter(kv, lay, slots, backend=backend, **sc, **kw)
    return lay, c, kv, slots, sc


def cases():
    if ON_GPU:  # the full matrix
        for kind, dt, D, BS in itertools.product(LAYOUTS, DTYPES, HEAD_DIMS, BLOCK_SIZES):
            if kind in MLA_LAYOUTS and D != HEAD_DIMS[0]:
                continue
            yield kind, dt, (576 if kind in MLA_LAYOUTS else D), BS
        return
    # CPU (Triton interpreter): each layout meets every dtype; head dims and block sizes rotate
    for i, (kind, dt) in enumerate(itertools.product(LAYOUTS, DTYPES)):
        D = 576 if kind in MLA_LAYOUTS else HEAD_DIMS[i % len(HEAD_DIMS)]
        yield kind, dt, D, BLOCK_SIZES[i % len(BLOCK_SIZES)]


CASES = list(cases())


def _shape(kind, D, BS):
    H = 1 if kind in MLA_LAYOUTS else 2
    L = 2
    NB = max(2, 40 // BS + 1)  # ~40+ slots
    T = min(NB * BS - 1, 13 if INTERP else 37)
    return (L, NB, BS, H, D, T)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("kind,dtype,D,BS", CASES, ids=[f"{k}-{str(d)[6:]}-d{D}-bs{b}" for k, d, D, b in CASES])
def test_scatter_gather_match_reference(backend, kind, dtype, D, BS):
    shape = _shape(kind, D, BS)
    L, NB, _, H, _, T = shape
    lay0, c0 = build(kind, L, NB, BS, H, D, dtype)
    kvd = torch.bfloat16 if lay0.fp8 else dtype
    why = _refusal("scatter", backend, lay0, make_flat(lay0.num_kv, L, 1, lay0.num_heads, D, kvd))
    if why:
        pytest.skip(f"{backend}: {why}")
    kv = make_flat(lay0.num_kv, L, T + 3, lay0.num_heads, D, kvd)
    slots = make_slots(T, NB, BS, dtype=torch.int32 if BS == 16 else torch.int64)
    sc = scales_for(lay0)
    poison = c0.snapshot()
    # reference
    kvkernels.scatter(kv, lay0, slots, backend="torch", **sc)
    want = c0.snapshot()
    # the reference writes the addressed slots only: restore them and the buffers are the poison again
    idx = torch.nonzero(slots >= 0).flatten()
    blk, off = slots[idx].long() // BS, slots[idx].long() % BS
    ones = torch.full((lay0.element_size,), 0xFF, dtype=torch.uint8, device=DEVICE)
    ones = ones.view(lay0.views()[0].dtype)  # all bits set: the poison's NaN
    for v in lay0.views():
        v[blk, off] = ones
    assert all(torch.equal(a, b) for a, b in zip(c0.raws, poison))
    # the backend, on identically poisoned caches
    lay1, c1 = build(kind, L, NB, BS, H, D, dtype)
    kvkernels.scatter(kv, lay1, slots, backend=backend, **sc)
    assert_same_caches(c1.snapshot(), want, lay1)
    # gather back: flat (skipped tokens keep out's poison), bit-exact vs the reference
    outs = []
    for b in ("torch", backend):
        out = torch.full((lay1.num_kv, L, T, lay1.num_heads, D), float("nan"), dtype=kvd, device=DEVICE)
        kvkernels.gather(lay1, slots, out=out, backend=b, **sc)
        outs.append(out)
    if lay1.fp8 and INTERP:  # the decoded fp32 rounded to bf16: the interpreter truncates
        torch.testing.assert_close(outs[1], outs[0], rtol=OUT_ULP[kvd], atol=0, equal_nan=True)
    else:
        assert torch.equal(outs[1].isnan(), outs[0].isnan())
        assert torch.equal(torch.nan_to_num(outs[1]), torch.nan_to_num(outs[0]))
    # lossless round trip: gather(scatter(x)) == x on the addressed tokens
    if not lay1.fp8:
        assert torch.equal(outs[1][:, :, idx], kv[:, :, idx])
        assert outs[1][:, :, slots < 0].isnan().all()


# ---- fused (de)quantization ------------------------------------------------------------------
SCATTER_FORMATS = ["int8:g64:channel", "int4:g32:channel", "int2:g16:channel", "int4:g16:token",
                   "int2:g32:token", "fp8:token_head", "fp8:head", "fp8:tensor"]
FQ_CASES = [(f, kind, dt) for i, f in enumerate(SCATTER_FORMATS)
            for kind, dt in ([("flash_nhd", torch.float32), ("legacy", torch.bfloat16), ("vllm_interleaved", torch.float8_e4m3fn)]
                             if ON_GPU else [[("flash_nhd", torch.float32), ("hnd_as_nhd_view", torch.float32),
                                              ("legacy", torch.float8_e4m3fn)][i % 3]])]


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("spec,kind,dtype", FQ_CASES, ids=[f"{f}-{k}-{str(d)[6:]}" for f, k, d in FQ_CASES])
def test_scatter_dequantizes(backend, spec, kind, dtype):
    L, NB, BS, H, D, T = 2, 6, 16, 2, 128, 21
    fmt = QuantFormat.parse(spec)
    lay0, c0 = build(kind, L, NB, BS, H, D, dtype)
    kv = make_flat(2, L, T + 5, H, D, torch.bfloat16)
    q = kvkernels.quantize(kv.flatten(0, 1), fmt)
    why = _refusal("scatter", backend, lay0, q.codes, fmt)
    if why:
        pytest.skip(f"{backend}: {why}")
    slots = make_slots(T, NB, BS)
    sc = scales_for(lay0)
    kvkernels.scatter(q, lay0, slots, backend="torch", **sc)
    lay1, c1 = build(kind, L, NB, BS, H, D, dtype)
    kvkernels.scatter(q, lay1, slots, backend=backend, **sc)
    if dtype == torch.bfloat16 and INTERP:  # the interpreter truncates fp32 -> bf16
        for a, b in zip(lay1.views(), lay0.views()):
            torch.testing.assert_close(a, b, rtol=OUT_ULP[dtype], atol=0, equal_nan=True)
    else:
        assert_same_caches(c1.snapshot(), c0.snapshot(), lay1)
    if not lay0.fp8:  # the cache holds exactly dequantize(q) (float32 cache: bit-exact)
        deq = kvkernels.dequantize(q, torch.float32, backend="torch").view(2, L, T + 5, H, D)
        g = kvkernels.gather(lay0, slots, dtype=torch.float32, backend="torch")
        idx = torch.nonzero(slots >= 0).flatten()
        if dtype == torch.float32:
            assert torch.equal(g[:, :, idx], deq[:, :, idx])
        else:
            torch.testing.assert_close(g[:, :, idx], deq[:, :, idx], rtol=OUT_ULP[dtype], atol=0)


ODD_DQ_CASES = [("flash_nhd", torch.float32, 80, 3, "int4:g16:channel"), ("legacy", torch.float32, 64, 2, "int2:g8:channel"),
                ("flash_hnd", torch.float32, 80, 3, "fp8:token_head"), ("flash_nhd", torch.float16, 128, 2, "int4:g32:channel"),
                ("sglang", torch.float16, 64, 3, "int4:g64:channel"), ("cross_layer", torch.float32, 48, 2, "int8:g48:channel"),
                ("flash_nhd", torch.float32, 64, 2, "int4:g2:channel"), ("flash_nhd", torch.float8_e4m3fn, 64, 2, "int2:g16:channel"),
                ("vllm_interleaved", torch.float16, 64, 2, "int2:g16:channel"),
                # int4 -> fp8 cache: Triton routes it to the element-wise kernel (_ptxas_bad_pack)
                ("vllm_interleaved", torch.float8_e4m3fn, 64, 2, "int4:g16:channel")]


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("kind,dtype,D,H,spec", ODD_DQ_CASES, ids=[f"{k}-{str(d)[6:]}-d{D}-h{H}-{f}" for k, d, D, H, f in ODD_DQ_CASES])
def test_scatter_dequantizes_odd_shapes(backend, kind, dtype, D, H, spec):
    """Fused dequantize-scatter with head counts and group counts that are not powers of two,
    tiny and odd groups, every packing path (Triton: code bytes stored as words of K elements
    where the layout allows, interleaved planes elsewhere; CUDA: one scale per chunk or per
    element), out-of-range slots counted."""
    L, NB, BS, T = 2, 4, 8, 19
    fmt = QuantFormat.parse(spec)
    lay0, c0 = build(kind, L, NB, BS, H, D, dtype)
    kv = make_flat(2, L, T + 2, H, D, torch.bfloat16)
    q = kvkernels.quantize(kv.flatten(0, 1), fmt)
    why = _refusal("scatter", backend, lay0, q.codes, fmt)
    if why:
        pytest.skip(f"{backend}: {why}")
    slots = make_slots(T, NB, BS)
    slots[3] = NB * BS + 5  # out of range: skipped and counted
    sc = scales_for(lay0)
    counts = [torch.zeros(1, dtype=torch.int64, device=DEVICE) for _ in range(2)]
    kvkernels.scatter(q, lay0, slots, backend="torch", oob_count=counts[0], validate=False, **sc)
    lay1, c1 = build(kind, L, NB, BS, H, D, dtype)
    kvkernels.scatter(q, lay1, slots, backend=backend, oob_count=counts[1], validate=False, **sc)
    assert_same_caches(c1.snapshot(), c0.snapshot(), lay1)
    assert int(counts[0]) == int(counts[1]) == 1


GATHER_FORMATS = ["int8:g64:channel", "int4:g32:channel", "int2:g16:channel", "fp8:token_head",
                  "int4:g32:token", "fp8:head", "fp8:tensor"]


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("spec", GATHER_FORMATS)
@pytest.mark.parametrize("kind,dtype", [("flashinfer_hnd", torch.bfloat16), ("cross_layer", torch.float32)])
def test_gather_quantizes(backend, spec, kind, dtype):
    L, NB, BS, H, D, T = 2, 5, 16, 2, 64, 19
    fmt = QuantFormat.parse(spec)
    lay, c = build(kind, L, NB, BS, H, D, dtype)
    kv = make_flat(2, L, T, H, D, dtype)
    slots = make_slots(T, NB, BS)
    kvkernels.scatter(kv, lay, slots, backend="torch")
    if kvkernels.paged.fused_gather_format(fmt):
        why = _refusal("gather", backend, lay, torch.empty(1, device=DEVICE), fmt)
    else:
        why = _refusal("gather", backend, lay, kv)
    if why:
        pytest.skip(f"{backend}: {why}")
    got = kvkernels.gather(lay, slots, format=fmt, backend=backend)
    want = kvkernels.gather(lay, slots, format=fmt, backend="torch")
    # and the spec: quantize of the gathered values (skipped tokens as zeros)
    flat = kvkernels.gather(lay, slots, backend="torch")
    spec_q = kvkernels.quantize(flat.flatten(0, 1), fmt, backend="torch")
    for q in (want, got):
        if fmt.kind == "fp8" and INTERP and q is got:
            assert _fp8_near(q.codes.view(torch.uint8), spec_q.codes.view(torch.uint8))
        else:
            assert torch.equal(q.codes.view(torch.uint8), spec_q.codes.view(torch.uint8))
        assert torch.equal(q.scale, spec_q.scale)
        if fmt.has_zero:
            assert torch.equal(q.zero, spec_q.zero)
    # lossy round trip within the format's bound on the addressed tokens
    idx = torch.nonzero(slots >= 0).flatten()
    y = qref.dequantize_float64(spec_q.codes.view(torch.uint8), spec_q.scale, spec_q.zero, fmt,
                                (2 * L, T, H, D)).view(2, L, T, H, D)[:, :, idx]
    x = kv[:, :, idx].double()
    if fmt.kind == "int":
        s = spec_q.scale.double()
        if fmt.axis == "channel":
            s = s.view(2, L, T, H, D // fmt.group_size)[:, :, idx].repeat_interleave(fmt.group_size, -1)
        else:
            s = s.view(2, L, -1, H, D).repeat_interleave(fmt.group_size, 2)[:, :, :T][:, :, idx]
        assert ((y - x).abs() <= s / 2 + INT_STEP_SLACK * s * fmt.qmax + 1e-30).all()
    else:
        assert ((y - x).abs() <= x.abs() * FP8_REL + x.abs().amax() * FP8_SUBNORMAL_ABS).all()


# ---- addressing ------------------------------------------------------------------------------
def _random_table(B, NB, BS, device=DEVICE):
    pages = torch.randperm(NB)
    counts = torch.randint(0, 4, (B,))
    counts[0] = max(int(counts[0]), 1)
    if int(counts.sum()) > NB:
        counts = torch.ones(B, dtype=torch.int64)
    indptr = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])
    last = torch.randint(1, BS + 1, (B,))
    table = PageTable(indptr.to(torch.int32).to(device), pages[:int(indptr[-1])].to(torch.int32).to(device),
                      last.to(torch.int32).to(device))
    slots = []
    for b in range(B):
        n = int(counts[b])
        for p in range(n):
            pid = int(pages[int(indptr[b]) + p])
            k = BS if p < n - 1 else int(last[b])
            slots += [pid * BS + o for o in range(k)]
    return table, torch.tensor(slots, dtype=torch.int64, device=device)


@pytest.mark.parametrize("backend", ["torch"] + KERNEL_BACKENDS)
def test_page_table_equals_slot_mapping(backend):
    L, NB, BS, H, D = 2, 9, 4, 2, 64
    table, slots = _random_table(4, NB, BS)
    T = slots.shape[0]
    assert torch.equal(page_table_slots(table, BS, T), slots)
    assert torch.equal(page_table_slots(table, BS, T + 2)[T:], torch.full((2,), -1, device=DEVICE))
    lay_a, ca = build("flashinfer_nhd", L, NB, BS, H, D, torch.float16)
    if _refusal("scatter", backend, lay_a, torch.empty(1, device=DEVICE)):
        pytest.skip(f"{backend} refuses")
    lay_b, cb = build("flashinfer_nhd", L, NB, BS, H, D, torch.float16)
    kv = make_flat(2, L, T, H, D, torch.float16)
    kvkernels.scatter(kv, lay_a, page_table=table, backend=backend)
    kvkernels.scatter(kv, lay_b, slots, backend="torch")
    assert all(torch.equal(a, b) for a, b in zip(ca.raws, cb.raws))
    g = kvkernels.gather(lay_a, page_table=table, num_tokens=T, backend=backend)
    assert torch.equal(g, kv)


@pytest.mark.parametrize("backend", ["torch"] + KERNEL_BACKENDS)
def test_out_of_range_skipped_and_counted(backend):
    L, NB, BS, H, D = 2, 3, 4, 2, 64
    lay, c = build("flash_nhd", L, NB, BS, H, D, torch.float32)
    if _refusal("scatter", backend, lay, torch.empty(1, device=DEVICE)):
        pytest.skip(f"{backend} refuses")
    poison = c.snapshot()
    slots = torch.tensor([NB * BS, 10**9, -1, -5, 2**40], dtype=torch.int64, device=DEVICE)
    cnt = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    kv = make_flat(2, L, 5, H, D, torch.float32)
    kvkernels.scatter(kv, lay, slots, oob_count=cnt, validate=False, backend=backend)
    assert int(cnt) == 3
    assert all(torch.equal(a, b) for a, b in zip(c.raws, poison))
    out = torch.full((2, L, 5, H, D), 3.0, device=DEVICE)
    kvkernels.gather(lay, slots, out=out, oob_count=cnt, validate=False, backend=backend)
    assert int(cnt) == 6 and (out == 3.0).all()


def test_validate_rejects_out_of_range_slot():
    lay, c = build("flash_nhd", 1, 3, 4, 2, 64, torch.float32)
    poison = c.snapshot()
    kv = make_flat(2, 1, 3, 2, 64, torch.float32)
    with pytest.raises(ValueError, match="slot_mapping: slot 12 at index 1"):
        kvkernels.scatter(kv, lay, torch.tensor([0, 12, 1], device=DEVICE), validate=True)
    assert all(torch.equal(a, b) for a, b in zip(c.raws, poison))


def test_token_count_is_slot_mapping_length():
    """vLLM pads inputs for CUDA graphs: tokens past slot_mapping.size(0) are never written."""
    L, NB, BS, H, D = 1, 4, 4, 2, 64
    lay, c = build("flash_nhd", L, NB, BS, H, D, torch.float32)
    kv = make_flat(2, L, 10, H, D, torch.float32)
    kvkernels.scatter(kv, lay, torch.tensor([5, 6], device=DEVICE))
    v = lay.views()[0]
    assert torch.equal(v[1, 1].reshape(H, D), kv[0, 0, 0]) and torch.equal(v[1, 2].reshape(H, D), kv[0, 0, 1])
    written = (~v.isnan()).reshape(NB * BS, -1).any(-1)
    assert int(written.sum()) == 2


# ---- a real-engine check: attention over the paged cache -------------------------------------
def _sdpa(q, k, v):
    # q [B, Hq, 1, D], k/v [B, Hkv, S, D] -> GQA by repeating heads
    rep = q.shape[1] // k.shape[1]
    return torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1),
                                                            v.repeat_interleave(rep, 1))


@pytest.mark.parametrize("kind", ["flashinfer_nhd", "flashinfer_hnd", "vllm_interleaved"])
def test_attention_over_paged_cache(kind):
    L, NB, BS, H, D, Hq = 2, 12, 16, 2, 64, 4
    dt = torch.float32
    table, slots = _random_table(3, NB, BS)
    T = slots.shape[0]
    lay, c = build(kind, L, NB, BS, H, D, dt)
    kv = make_flat(2, L, T, H, D, dt)
    kvkernels.scatter(kv, lay, page_table=table)
    indptr = table.kv_indptr.tolist()
    last = table.kv_last_page_len.tolist()
    for l in range(L):
        kview, vview = lay.views()[l], lay.views()[L + l]
        tok0 = 0
        for b in range(len(last)):
            pages = table.kv_indices[indptr[b]:indptr[b + 1]].long()
            if not pages.numel():
                continue
            n = (pages.numel() - 1) * BS + last[b]
            q = torch.randn(1, Hq, 1, D, device=DEVICE, dtype=dt)
            # the engine's read path: the sequence's pages straight from the cache, by block table
            kp = kview[pages].reshape(-1, H, D)[:n].transpose(0, 1)[None]
            vp = vview[pages].reshape(-1, H, D)[:n].transpose(0, 1)[None]
            kf = kv[0, l, tok0:tok0 + n].transpose(0, 1)[None]
            vf = kv[1, l, tok0:tok0 + n].transpose(0, 1)[None]
            torch.testing.assert_close(_sdpa(q, kp, vp), _sdpa(q, kf, vf), rtol=0, atol=0)
            # and over the gathered pages
            g = kvkernels.gather(lay, page_table=table, num_tokens=T)
            kg = g[0, l, tok0:tok0 + n].transpose(0, 1)[None]
            vg = g[1, l, tok0:tok0 + n].transpose(0, 1)[None]
            torch.testing.assert_close(_sdpa(q, kg, vg), _sdpa(q, kf, vf), rtol=0, atol=0)
            tok0 += n


@pytest.mark.skipif(not ON_GPU, reason="FlashInfer's paged decode runs on the GPU")
def test_flashinfer_paged_decode():
    flashinfer = pytest.importorskip("flashinfer")
    L, NB, BS, H, D, Hq = 1, 64, 16, 8, 128, 32
    dt = torch.float16
    table, slots = _random_table(4, NB, BS)
    T = slots.shape[0]
    lay, c = build("flashinfer_nhd", L, NB, BS, H, D, dt)
    kv = make_flat(2, L, T, H, D, dt)
    kvkernels.scatter(kv, lay, page_table=table)
    cache = c.raws[0].view(dt).view(NB, 2, BS, H, D)
    B = table.kv_last_page_len.shape[0]
    q = torch.randn(B, Hq, D, device=DEVICE, dtype=dt)
    ws = torch.empty(128 << 20, dtype=torch.uint8, device=DEVICE)
    w = flashinfer.BatchDecodeWithPagedKVCacheWrapper(ws, "NHD")
    if hasattr(w, "plan"):
        w.plan(table.kv_indptr, table.kv_indices, table.kv_last_page_len, Hq, H, D, BS, q_data_type=dt,
               kv_data_type=dt)
        o = w.run(q, cache)
    else:
        w.begin_forward(table.kv_indptr, table.kv_indices, table.kv_last_page_len, Hq, H, D, BS, data_type=dt)
        o = w.forward(q, cache)
    indptr = table.kv_indptr.tolist()
    last = table.kv_last_page_len.tolist()
    tok0 = 0
    for b in range(B):
        npg = indptr[b + 1] - indptr[b]
        n = (npg - 1) * BS + last[b] if npg else 0
        if not n:
            continue
        kf = kv[0, 0, tok0:tok0 + n].transpose(0, 1)[None].float()
        vf = kv[1, 0, tok0:tok0 + n].transpose(0, 1)[None].float()
        want = _sdpa(q[b:b + 1, :, None].float(), kf, vf)[0, :, 0]
        torch.testing.assert_close(o[b].float(), want, rtol=2e-3, atol=2e-3)
        tok0 += n


# ---- registration: opcheck, CUDA graphs, host memory ----------------------------------------
@pytest.mark.parametrize("backend", ["torch"] + KERNEL_BACKENDS)
def test_opcheck(backend):
    L, NB, BS, H, D, T = 2, 4, 4, 2, 64, 6
    lay, c = build("flash_stacked", L, NB, BS, H, D, torch.float32)
    if _refusal("scatter", backend, lay, torch.empty(1, device=DEVICE)):
        pytest.skip(f"{backend} refuses")
    kv = make_flat(2, L, T, H, D, torch.float32)
    slots = make_slots(T, NB, BS)
    torch.library.opcheck(scatter_op, (kv, None, None, "", lay.owners(), lay.ptrs, lay.spec(), slots, None, None,
                                       None, 0, backend))
    out = torch.zeros(2, L, T, H, D, device=DEVICE)
    torch.library.opcheck(gather_op, (lay.owners(), lay.ptrs, lay.spec(), slots, out, None, None, None, "", None,
                                      None, None, 0, backend))


@pytest.mark.skipif(not ON_GPU, reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float8_e4m3fn])
def test_cuda_graph_capture_replay(backend, dtype):
    L, NB, BS, H, D, T = 32, 64, 16, 8, 128, 16
    lay, c = build("flash_nhd", L, NB, BS, H, D, dtype)
    if _refusal("scatter", backend, lay, torch.empty(1, device=DEVICE)):
        pytest.skip(f"{backend} refuses")
    kv = make_flat(2, L, T, H, D, torch.bfloat16)
    slots = make_slots(T, NB, BS)
    sc = scales_for(lay)
    cnt = torch.zeros(1, dtype=torch.int64, device=DEVICE)
    out = torch.zeros(2, L, T, H, D, dtype=torch.bfloat16, device=DEVICE)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm-up (compilation) outside the capture
        kvkernels.scatter(kv, lay, slots, oob_count=cnt, backend=backend, **sc)
        kvkernels.gather(lay, slots, out=out, backend=backend, **sc)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        kvkernels.scatter(kv, lay, slots, oob_count=cnt, backend=backend, **sc)
        kvkernels.gather(lay, slots, out=out, backend=backend, **sc)
    new_kv = make_flat(2, L, T, H, D, torch.bfloat16)
    kv.copy_(new_kv)
    slots.copy_(make_slots(T, NB, BS))
    out.zero_()
    g.replay()
    torch.cuda.synchronize()
    ref_lay, rc = build("flash_nhd", L, NB, BS, H, D, dtype)
    kvkernels.scatter(kv, ref_lay, slots, backend="torch", **sc)
    ref_out = torch.zeros_like(out)
    kvkernels.gather(ref_lay, slots, out=ref_out, backend="torch", **sc)
    idx = torch.nonzero(slots >= 0).flatten()
    for a, b in zip(lay.views(), ref_lay.views()):
        sel = slots[idx]
        assert torch.equal(a[sel // BS, sel % BS].view(torch.uint8), b[sel // BS, sel % BS].view(torch.uint8))
    assert torch.equal(out, ref_out)


@pytest.mark.skipif(not ON_GPU, reason="pinned host memory needs a GPU")
@pytest.mark.parametrize("host_path,backend", [("copy", None), ("copy", "triton"), ("kernel", "cuda")])
def test_pinned_host_flat(host_path, backend):
    L, NB, BS, H, D, T = 4, 32, 16, 8, 128, 300
    lay, c = build("flash_hnd", L, NB, BS, H, D, torch.bfloat16)
    if backend and _refusal("scatter", backend, lay, torch.empty(1, device=DEVICE)):
        pytest.skip(f"{backend} refuses")
    kv = make_flat(2, L, T, H, D, torch.bfloat16).cpu().contiguous().pin_memory()
    slots = make_slots(T, NB, BS, pad=0)
    kvkernels.scatter(kv, lay, slots, host_path=host_path, max_sms=8 if host_path == "kernel" else 0, backend=backend)
    out = torch.zeros(kv.shape, dtype=kv.dtype).pin_memory()
    kvkernels.gather(lay, slots, out=out, host_path=host_path, max_sms=4 if host_path == "kernel" else 0,
                     backend=backend)
    torch.cuda.synchronize()
    assert torch.equal(out, kv)


# ---- bad input -------------------------------------------------------------------------------
def _ok():
    lay, c = build("flash_nhd", 2, 4, 4, 2, 64, torch.bfloat16)
    return lay, c, make_flat(2, 2, 5, 2, 64, torch.bfloat16), torch.tensor([0, 3, -1, 7, 2], device=DEVICE)


@pytest.mark.parametrize("mutate,exc,word", [
    (lambda a: a.update(kv=a["kv"][:, :, :, :1]), ValueError, r"kv: expected shape"),
    (lambda a: a.update(kv=a["kv"][..., :32]), ValueError, r"kv: expected shape"),
    (lambda a: a.update(kv=a["kv"].to(torch.int32)), TypeError, r"kv: expected dtype"),
    (lambda a: a.update(kv=[1.0]), TypeError, r"kv: expected a torch.Tensor"),
    (lambda a: a.update(kv=a["kv"].transpose(3, 4).contiguous().transpose(3, 4)), ValueError, "dense"),
    (lambda a: a.update(kv=a["kv"][:, :, :2]), ValueError, "fewer than slot_mapping"),
    (lambda a: a.update(slot_mapping=a["slot_mapping"].float()), TypeError, "slot_mapping: expected dtype"),
    (lambda a: a.update(slot_mapping=a["slot_mapping"][None]), ValueError, "slot_mapping: expected a 1-D"),
    (lambda a: a.update(slot_mapping=None), ValueError, "slot_mapping: pass exactly one"),
    (lambda a: a.update(layout="vllm"), TypeError, "layout: expected"),
    (lambda a: a.update(k_scale=torch.ones(1, device=DEVICE)), ValueError, "k_scale: only fp8"),
    (lambda a: a.update(oob_count=torch.zeros(2, dtype=torch.int32, device=DEVICE)), ValueError, "oob_count"),
    (lambda a: a.update(oob_count=torch.zeros(1, device=DEVICE)), TypeError, "oob_count: expected dtype"),
    (lambda a: a.update(host_path="dma"), ValueError, "host_path"),
    (lambda a: a.update(backend="cuDNN"), ValueError, "backend"),
])
def test_bad_scatter_input(mutate, exc, word):
    lay, c, kv, slots = _ok()
    poison = c.snapshot()
    args = dict(kv=kv, layout=lay, slot_mapping=slots)
    mutate(args)
    with pytest.raises(exc, match=word):
        kvkernels.scatter(**args)
    assert all(torch.equal(a, b) for a, b in zip(c.raws, poison))


@pytest.mark.skipif(not ON_GPU, reason="needs caches on a GPU and a flat side on the host")
def test_caches_on_another_device():
    lay, c = build("flash_nhd", 1, 4, 4, 2, 64, torch.bfloat16)
    kv = make_flat(2, 1, 3, 2, 64, torch.bfloat16, device="cpu")  # not pinned
    with pytest.raises(ValueError, match="kv: a host-side flat tensor must be in pinned memory"):
        kvkernels.scatter(kv, lay, torch.tensor([0, 1, 2], device=DEVICE))
    with pytest.raises(ValueError, match="slot_mapping: expected a tensor on"):
        kvkernels.scatter(kv.to(DEVICE), lay, torch.tensor([0, 1, 2]))


def test_fp8_scales_required_and_shaped():
    lay, c = build("flash_nhd", 2, 4, 4, 2, 64, torch.float8_e4m3fn)
    kv = make_flat(2, 2, 3, 2, 64, torch.bfloat16)
    s = torch.tensor([0, 1, 2], device=DEVICE)
    with pytest.raises(ValueError, match="k_scale: fp8 caches need"):
        kvkernels.scatter(kv, lay, s)
    with pytest.raises(ValueError, match=r"v_scale: expected shape"):
        kvkernels.scatter(kv, lay, s, k_scale=torch.ones((), device=DEVICE), v_scale=torch.ones(3, device=DEVICE))
    with pytest.raises(TypeError, match="k_scale: expected dtype"):
        kvkernels.scatter(kv, lay, s, k_scale=torch.ones((), device=DEVICE, dtype=torch.float16),
                          v_scale=torch.ones((), device=DEVICE))
    # per layer x head scales are accepted and used per layer
    ks = torch.rand(2, 2, device=DEVICE) + 0.01
    kvkernels.scatter(kv, lay, s, k_scale=ks, v_scale=torch.ones((2, 1), device=DEVICE))
    want = pref.fp8_encode(kv[0, 1, :1].float(), ks[1])
    assert torch.equal(lay.views()[1][0, 0].reshape(2, 64), want[0])


def test_layout_rejects_bad_tensors():
    with pytest.raises(ValueError, match="k_caches\\[1\\]: every layer"):
        PagedLayout.from_tensors([torch.zeros(4, 4, 2, 64), torch.zeros(4, 4, 2, 32)])
    with pytest.raises(ValueError, match="v_caches: expected shape"):
        PagedLayout.from_tensors([torch.zeros(4, 4, 2, 64)], [torch.zeros(4, 4, 3, 64)])
    with pytest.raises(ValueError, match="kv_dim: cannot tell"):
        PagedLayout.vllm_flash([torch.zeros(2, 2, 4, 2, 64)])
    with pytest.raises(TypeError, match="caches: expected dtype"):
        PagedLayout.from_tensors([torch.zeros(4, 4, 2, 64, dtype=torch.int32)])
    with pytest.raises(TypeError, match="uint8 caches hold fp8"):
        PagedLayout.from_tensors([torch.zeros(4, 4, 2, 64, dtype=torch.uint8)], fp8=False)
    with pytest.raises(ValueError, match="value_caches: expected shape"):
        PagedLayout.vllm_legacy([torch.zeros(4, 2, 8, 16, 8)], [torch.zeros(4, 2, 64, 8)])
    big = torch.zeros(100)
    with pytest.raises(ValueError, match="smaller than its layout addresses"):
        PagedLayout.from_strided("x", [big], 1, 1, 10, 4, 1, 8, [(32, 8, 0, 0, 1)])


def test_layouts_compare_by_value():
    k = [torch.zeros(4, 16, 2, 64) for _ in range(2)]
    v = [torch.zeros(4, 16, 2, 64) for _ in range(2)]
    a = PagedLayout.vllm_flash(k, v)
    b = PagedLayout.vllm_flash([t.clone() for t in k], [t.clone() for t in v])
    assert a == b and hash(a) == hash(b)
    hnd = PagedLayout.from_tensors([t.transpose(1, 2).contiguous().transpose(1, 2) for t in k],
                                   [t.transpose(1, 2).contiguous().transpose(1, 2) for t in v])
    assert hnd != a and hnd.strides[0][:3] == (2048, 64, 1024)


def test_triton_kernels_compile_sm90():
    """The Triton kernels compile for sm_90 (no GPU needed) and plain copies use 16-byte vectors."""
    import json
    import pathlib
    import subprocess
    import sys

    pytest.importorskip("triton")
    root = pathlib.Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(root)
    p = subprocess.run([sys.executable, str(root / "tests" / "paged_sm90.py")], env=env, capture_output=True,
                       text=True, timeout=600, cwd=root)
    if p.returncode and "ptxas" in p.stderr and "not found" in p.stderr:
        pytest.skip("no ptxas for an sm_90 compile")
    assert p.returncode == 0, p.stderr[-3000:]
    rows = json.loads(p.stdout.strip().splitlines()[-1])
    assert len(rows) == 16
    # no SASS reads the stack pointer R1 as data (Triton 3.6's ptxas did for int4 -> fp8 packed words)
    assert all(r["r1"] in (0, None) for r in rows), [r for r in rows if r["r1"]]
    plain = [r for r in rows if r.get("SRC", r.get("DST")) == 0 and r["kernel"] != "dequant_scatter"]
    assert all(r["v4"] > 0 for r in plain), plain
    # fused dequantize: 16-byte cache stores, one scale (+ zero) load per group row, not per element
    dq = [r for r in rows if r["kernel"] == "dequant_scatter"]
    assert all(r["st"] <= 4 and r["v4"] >= 2 and r["ld"] <= 20 for r in dq), dq
    assert all(r["shared"] == 0 for r in dq), dq  # loads, math and stores in one layout


def test_flat_side_on_another_device():
    lay, c = build("flash_nhd", 1, 4, 4, 2, 64, torch.float32)
    kv = torch.empty(2, 1, 3, 2, 64, device="meta")
    with pytest.raises(ValueError, match="kv: expected a tensor on"):
        kvkernels.scatter(kv, lay, torch.tensor([0, 1, 2], device=DEVICE))


@pytest.mark.parametrize("kw,exc,word", [
    (dict(out=torch.empty(2, 2, 4, 2, 64)), ValueError, r"out: expected shape"),
    (dict(out=torch.empty(2, 2, 5, 2, 64, dtype=torch.float16), dtype=torch.bfloat16), TypeError, "out: dtype"),
    (dict(format="int4:g32:channel", out=torch.empty(2, 2, 5, 2, 64)), ValueError, "out: gather with a format"),
    (dict(format="int3:g32:channel"), ValueError, "bits"),
    (dict(dtype=torch.int8), TypeError, "dtype: expected"),
    (dict(slot_mapping=None, page_table=PageTable(torch.zeros(2, dtype=torch.int32), torch.zeros(1, dtype=torch.int32),
                                                  torch.ones(1, dtype=torch.int32))), ValueError, "num_tokens"),
    (dict(slot_mapping=None, page_table=PageTable(torch.zeros(3, dtype=torch.int32), torch.zeros(1, dtype=torch.int32),
                                                  torch.ones(1, dtype=torch.int32)), num_tokens=4), ValueError,
     "page_table.kv_indptr: expected 2"),
    (dict(slot_mapping=None, page_table=PageTable(torch.tensor([0, 1], dtype=torch.int32),
                                                  torch.tensor([9], dtype=torch.int32),
                                                  torch.ones(1, dtype=torch.int32)), num_tokens=1, validate=True),
     ValueError, "page_table.kv_indices"),
])
def test_bad_gather_input(kw, exc, word):
    lay, c, kv, slots = _ok()
    kw = {k: (v.to(DEVICE) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    if "page_table" in kw:
        pt = kw["page_table"]
        kw["page_table"] = PageTable(pt.kv_indptr.to(DEVICE), pt.kv_indices.to(DEVICE), pt.kv_last_page_len.to(DEVICE))
    args = {"slot_mapping": slots, **kw}
    with pytest.raises(exc, match=word):
        kvkernels.gather(lay, **args)


def test_bad_quantized_input():
    lay, c, kv, slots = _ok()
    q = kvkernels.quantize(kv[0].contiguous(), "int4:g32:channel")  # K only: [L, T, H, D], not [2L, ...]
    with pytest.raises(ValueError, match=r"kv: expected a QuantizedKV of \[num_kv \* L"):
        kvkernels.scatter(q, lay, slots)
    q = kvkernels.quantize(kv.flatten(0, 1).contiguous(), "int4:g32:channel")
    q.scale = q.scale[..., :1].contiguous()
    with pytest.raises(ValueError, match="kv.scale: expected a contiguous tensor of shape"):
        kvkernels.scatter(q, lay, slots)

"""Decode into pages (kvkernels/codec/paged.py): rANS decode -> dequantize -> paged write.

CPU: the reference path equals decode-then-scatter (the container's decode at float32, then
``kvkernels.scatter``) on every layout constructor, byte for byte on poisoned caches; layer /
chunk ranges; the coder-level call with per-table and per-segment level rows; bad arguments
(named, nothing written); corrupt streams and descriptors. GPU: the CUDA kernel equals the
reference byte for byte on vLLM NHD / HND / FlashInfer / the 2026 K|V side-by-side view /
SGLang's token pool / legacy / cross-layer caches, bf16, fp16, fp32 and fp8 (per-head scales),
padding and out-of-range slots, CUDA-graph capture, corrupt inputs.
"""
import pytest
import torch

import kvkernels
from kvkernels import PagedLayout, codec
from kvkernels.codec import paged as cpaged
from kvkernels.codec.coders import CoderError, rans_encode
from kvkernels.reference import codec as R

GPU = torch.cuda.is_available()
needs_gpu = pytest.mark.skipif(not GPU, reason="needs a CUDA GPU")
LAYOUTS = ("nhd", "hnd", "flashinfer", "kv_interleaved", "sglang", "legacy", "cross_layer")


def make_layout(kind, L, NB, BS, H, D, dtype, device):
    """(layout, the tensors it writes), every byte poisoned 0xFF (NaN for float caches)."""
    def new(*shape):
        t = torch.empty(*shape, dtype=dtype, device=device)
        t.view(torch.uint8).fill_(0xFF)
        return t
    if kind == "nhd":
        ts = [new(2, NB, BS, H, D) for _ in range(L)]
        return PagedLayout.vllm_flash(ts, kv_dim=0), ts
    if kind == "hnd":
        ks, vs = [new(NB, H, BS, D) for _ in range(L)], [new(NB, H, BS, D) for _ in range(L)]
        return PagedLayout.vllm_flash(ks, vs, order="HND"), ks + vs
    if kind == "flashinfer":
        ts = [new(NB, 2, BS, H, D) for _ in range(L)]
        return PagedLayout.flashinfer(ts), ts
    if kind == "kv_interleaved":
        ts = [new(NB, H, BS, 2 * D) for _ in range(L)]
        return PagedLayout.vllm_kv_interleaved(ts), ts
    if kind == "sglang":
        ks, vs = [new(NB * BS, H, D) for _ in range(L)], [new(NB * BS, H, D) for _ in range(L)]
        return PagedLayout.sglang(ks, vs, fp8=dtype in (torch.uint8, torch.float8_e4m3fn)), ks + vs
    if kind == "legacy":
        x = 16 // torch.empty((), dtype=dtype).element_size()
        ks, vs = [new(NB, H, D // x, BS, x) for _ in range(L)], [new(NB, H, D, BS) for _ in range(L)]
        return PagedLayout.vllm_legacy(ks, vs), ks + vs
    if kind == "cross_layer":
        t = new(NB, L, 2, BS, H, D)
        return PagedLayout.cross_layer(t), [t]
    raise ValueError(kind)


def raw(ts):
    return [t.view(torch.uint8).cpu() for t in ts]


def container(L=3, T=70, H=2, D=64, preset="cachegen", ct=32, seed=0, coder="rans"):
    g = torch.Generator().manual_seed(seed)
    kv = torch.randn(2, L, T, H, D, generator=g) * torch.linspace(0.5, 2, D)
    return codec.encode(kv.to(torch.bfloat16), preset, chunk_tokens=ct, coder=coder)


def scales(L, H, device, seed=1):
    g = torch.Generator().manual_seed(seed)
    return ((torch.rand(L, H, generator=g) + 0.05).to(device), (torch.rand(H, generator=g) + 0.05).to(device))


def slots_for(T, NB, BS, device, pad=True, seed=2):
    g = torch.Generator().manual_seed(seed)
    s = torch.randperm(NB * BS, generator=g)[:T].to(torch.int64)
    if pad and T > 6:
        s[1] = -1                  # padding: skipped
        s[4] = NB * BS + 7         # out of range: skipped, counted
        s[5] = 1 << 40
    return s.to(device)


def decode_then_scatter(data, layout, slots, layers=None, chunks=None, cache_scale=(None, None)):
    kv = codec.decode(data, dtype=torch.float32, layers=layers, chunks=chunks).to(layout.device)
    kvkernels.scatter(kv, layout, slots[:kv.shape[2]], k_scale=cache_scale[0], v_scale=cache_scale[1],
                      validate=False, backend="torch")


# ---- CPU: the reference path == decode then scatter ------------------------------------------
@pytest.mark.parametrize("kind", LAYOUTS)
@pytest.mark.parametrize("preset", ["cachegen", "default"])
def test_reference_equals_decode_then_scatter(kind, preset):
    L, T, H, D, NB, BS = 3, 70, 2, 64, 10, 8
    data = container(L, T, H, D, preset)
    slots = slots_for(T, NB, BS, "cpu")
    a, ta = make_layout(kind, L, NB, BS, H, D, torch.bfloat16, "cpu")
    b, tb = make_layout(kind, L, NB, BS, H, D, torch.bfloat16, "cpu")
    cnt = torch.zeros(1, dtype=torch.int64)
    codec.decode_into_pages(data, a, slots, oob_count=cnt, backend="torch")
    decode_then_scatter(data, b, slots)
    for x, y in zip(raw(ta), raw(tb)):
        assert torch.equal(x, y)
    assert int(cnt) == 2


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float8_e4m3fn])
def test_reference_dtypes(dtype):
    L, T, H, D, NB, BS = 2, 40, 2, 32, 8, 8
    data = container(L, T, H, D, "default", ct=16)
    slots = slots_for(T, NB, BS, "cpu")
    cs = scales(L, H, "cpu") if dtype == torch.float8_e4m3fn else (None, None)
    a, ta = make_layout("nhd", L, NB, BS, H, D, dtype, "cpu")
    b, tb = make_layout("nhd", L, NB, BS, H, D, dtype, "cpu")
    codec.decode_into_pages(data, a, slots, k_scale=cs[0], v_scale=cs[1], backend="torch")
    decode_then_scatter(data, b, slots, cache_scale=cs)
    for x, y in zip(raw(ta), raw(tb)):
        assert torch.equal(x, y)


def test_only_addressed_slots_change():
    L, T, H, D, NB, BS = 2, 37, 1, 32, 9, 8
    data = container(L, T, H, D, ct=16)
    slots = slots_for(T, NB, BS, "cpu")
    lay, ts = make_layout("nhd", L, NB, BS, H, D, torch.bfloat16, "cpu")
    codec.decode_into_pages(data, lay, slots)
    valid = slots[(slots >= 0) & (slots < NB * BS)]
    hit = torch.zeros(NB * BS, dtype=torch.bool)
    hit[valid] = True
    for t in ts:
        b = t.view(torch.uint8).reshape(2, NB * BS, -1)
        assert bool((b[:, ~hit] == 0xFF).all())          # untouched: still poison
        assert not bool((b[:, hit] == 0xFF).all(-1).any())  # every addressed row written


@pytest.mark.parametrize("layers,chunks,cache_layers", [(range(1, 3), None, "all"), (range(0, 2), range(1, 3), "all"),
                                                        (range(1, 3), range(2, 3), "decoded")])
def test_ranges(layers, chunks, cache_layers):
    L, T, H, D, NB, BS = 3, 70, 2, 32, 12, 8
    data = container(L, T, H, D, ct=32)
    Lc = L if cache_layers == "all" else len(layers)
    slots = slots_for(T, NB, BS, "cpu", pad=False)
    a, ta = make_layout("hnd", Lc, NB, BS, H, D, torch.bfloat16, "cpu")
    b, tb = make_layout("hnd", Lc, NB, BS, H, D, torch.bfloat16, "cpu")
    codec.decode_into_pages(data, a, slots, layers=layers, chunks=chunks)
    kv = codec.decode(data, dtype=torch.float32, layers=layers, chunks=chunks)
    if cache_layers == "all":  # the decoded layers at their own index, the rest untouched
        kvkernels.scatter(kv, cpaged._sub_layout(b, layers, 0), slots[:kv.shape[2]], validate=False)
    else:
        kvkernels.scatter(kv, b, slots[:kv.shape[2]], validate=False)
    for x, y in zip(raw(ta), raw(tb)):
        assert torch.equal(x, y)


def test_ac_container_decodes_then_scatters():
    L, T, H, D, NB, BS = 2, 20, 1, 32, 4, 8
    data = container(L, T, H, D, ct=16, coder="ac")
    slots = slots_for(T, NB, BS, "cpu")
    a, ta = make_layout("nhd", L, NB, BS, H, D, torch.bfloat16, "cpu")
    b, tb = make_layout("nhd", L, NB, BS, H, D, torch.bfloat16, "cpu")
    codec.decode_into_pages(data, a, slots)
    decode_then_scatter(data, b, slots)
    for x, y in zip(raw(ta), raw(tb)):
        assert torch.equal(x, y)


# ---- the coder-level call ----------------------------------------------------------------------
def coder_case(S, N, C, bins=16, K=5, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    f = torch.full((K, bins), (1 << 12) // bins, dtype=torch.int32)
    f[:, 0] += (1 << 12) - f.sum(1).to(torch.int32)
    tid = torch.randint(0, K, (S, C), generator=g, dtype=torch.int32)
    ns = torch.randint(0, N + 1, (S,), generator=g)
    ns[0] = N
    blocks, segs_p = [], []
    pays, lens = [], []
    for s in range(S):  # each segment its own token count: encode one by one
        sym = torch.randint(0, bins, (1, int(ns[s]) or 1, C), generator=g, dtype=torch.uint8)
        if int(ns[s]) == 0:
            states = (1 << 16) * torch.ones(R.n_groups(C) * 32, dtype=torch.int64)
            for gi in range(R.n_groups(C)):
                na = min(32, C - 32 * gi)
                b = torch.tensor([1 << 16] * na, dtype=torch.int32).numpy().astype("<u4").tobytes()
                pays.append(b)
                lens.append(len(b))
            del states
            continue
        pl, off = rans_encode(sym, f, tid[s:s + 1].contiguous(), 12)
        raw_b = pl.numpy().tobytes()
        for gi in range(R.n_groups(C)):
            pays.append(raw_b[int(off[gi]):int(off[gi + 1])])
            lens.append(int(off[gi + 1] - off[gi]))
    offsets = torch.zeros(len(lens) + 1, dtype=torch.int64)
    offsets[1:] = torch.tensor(lens).cumsum(0)
    payload = torch.frombuffer(bytearray(b"".join(pays)), dtype=torch.uint8).clone()
    lut = torch.randn(K, bins, generator=g)
    lut_s = torch.randn(S, bins, generator=g)
    s_tok = torch.rand(S, N, generator=g) + 0.5
    s_ch, z_ch = torch.rand(S, C, generator=g) + 0.5, torch.randn(S, C, generator=g)
    d = lambda t: t.to(device)  # noqa: E731
    return dict(payload=d(payload), offsets=d(offsets), freq=d(f), table_id=d(tid), lut=d(lut), lut_s=d(lut_s),
                s_tok=d(s_tok), s_ch=d(s_ch), z_ch=d(z_ch), ns=ns, N=N, S=S, C=C)


def coder_segments(c, L, T, device):
    """Segments spread over the caches, disjoint token ranges per cache (no slot written twice:
    which write lands would be unspecified); needs T >= ceil(S / 2L) * N."""
    rows = []
    for s in range(c["S"]):
        r, i = s % (2 * L), s // (2 * L)
        assert (i + 1) * c["N"] <= T
        rows.append((r, i * c["N"] + (i % 3), int(c["ns"][s])))
    return torch.tensor(rows, dtype=torch.int64, device=device)


def slots32(slots):
    """int32 slots of ``slots_for``'s: ``.int()`` would wrap 1 << 40 to slot 0 (a second write of
    an addressed slot, whose winner is unspecified); clamp it to 2**31 - 1 (still out of range)."""
    return slots.clamp(max=(1 << 31) - 1).to(torch.int32)


def assert_no_slot_twice(segs, slots, num_slots):
    """No cache gets one slot from two tokens (else which write lands is unspecified)."""
    sl = slots.cpu().to(torch.int64)
    seen = {}
    for r, t0, ns in segs.cpu().tolist():
        ss = sl[t0:t0 + ns]
        ss = ss[(ss >= 0) & (ss < num_slots)].tolist()
        mine = seen.setdefault(r, [])
        mine += ss
        assert len(set(mine)) == len(mine), f"cache {r}: a slot addressed twice"


def run_coder(c, layout, slots, segs, per_segment, backend, status=None, **kw):
    lut = c["lut_s"] if per_segment else c["lut"]
    cpaged.rans_decode_pages(c["payload"], c["offsets"], c["freq"], c["table_id"], c["N"], 12, lut, layout, slots,
                             segs, c["s_tok"], c["s_ch"], c["z_ch"], lut_per_segment=per_segment, status=status,
                             backend=backend, **kw)


@pytest.mark.parametrize("per_segment", [False, True])
def test_coder_level_reference(per_segment):
    """The reference against the dense fused decode of each segment + scatter by hand."""
    L, H, D, NB, BS, T = 2, 2, 48, 6, 8, 40
    c = coder_case(S=5, N=9, C=H * D)
    segs = coder_segments(c, L, T, "cpu")
    slots = slots_for(T, NB, BS, "cpu")
    lay, ts = make_layout("nhd", L, NB, BS, H, D, torch.float32, "cpu")
    run_coder(c, lay, slots, segs, per_segment, "torch")
    want, wts = make_layout("nhd", L, NB, BS, H, D, torch.float32, "cpu")
    G = R.n_groups(c["C"])
    views = want.views()
    for s in range(c["S"]):
        r, t0, ns = (int(v) for v in segs[s])
        if ns == 0:
            continue
        pl = c["payload"][int(c["offsets"][s * G]):int(c["offsets"][(s + 1) * G])]
        off = c["offsets"][s * G:(s + 1) * G + 1] - c["offsets"][s * G]
        sym = codec.coders.rans_decode(pl, off, c["freq"], c["table_id"][s:s + 1].contiguous(), ns, 12)
        lut = c["lut_s"][s:s + 1].expand(c["C"], -1) if per_segment else c["lut"]
        tid = torch.arange(c["C"], dtype=torch.int32).view(1, -1) if per_segment else c["table_id"][s:s + 1]
        v = R.dequant_spec(sym, tid, lut, c["s_tok"][s:s + 1, :ns], c["s_ch"][s:s + 1], c["z_ch"][s:s + 1])[0]
        ss = slots[t0:t0 + ns]
        keep = (ss >= 0) & (ss < NB * BS)
        views[r][ss[keep] // BS, ss[keep] % BS] = v[keep].reshape(-1, H, 1, D)
    for x, y in zip(raw(ts), raw(wts)):
        assert torch.equal(x, y)


def test_coder_level_int32_slots():
    """int32 slot_mapping (incl. 2**31 - 1: out of range) equals the int64 one; and the case of
    the GPU test (S=7, N=13, bins 24, H=2) addresses no slot twice: ``.int()`` of slots_for's
    ``1 << 40`` entry wraps to slot 0, which token 8 also maps to (the cause of the GPU test's
    mismatches at slot 0: two writes of one slot, winner unspecified)."""
    L, H, D, NB, BS, T = 2, 2, 64, 8, 8, 50
    c = coder_case(S=7, N=13, C=H * D, bins=24)
    segs = coder_segments(c, L, T, "cpu")
    slots = slots_for(T, NB, BS, "cpu")
    with pytest.raises(AssertionError):
        assert_no_slot_twice(segs, slots.int(), NB * BS)
    assert_no_slot_twice(segs, slots32(slots), NB * BS)
    a, ta = make_layout("legacy", L, NB, BS, H, D, torch.bfloat16, "cpu")
    b, tb = make_layout("legacy", L, NB, BS, H, D, torch.bfloat16, "cpu")
    run_coder(c, a, slots32(slots), segs, False, "torch")
    run_coder(c, b, slots, segs, False, "torch")
    for x, y in zip(raw(ta), raw(tb)):
        assert torch.equal(x, y)


def test_corrupt_streams_and_descriptors():
    L, H, D, NB, BS, T = 1, 1, 64, 4, 8, 30
    c = coder_case(S=2, N=8, C=64)
    segs = torch.tensor([[0, 0, 8], [1, 10, int(c["ns"][1])]])
    slots = torch.arange(T)
    # a bit flip in block 0's words: that block's channels are zeros at their slots, status set
    bad = dict(c, payload=c["payload"].clone())
    bad["payload"][10] ^= 0x5A
    lay, ts = make_layout("nhd", L, NB, BS, H, D, torch.bfloat16, "cpu")
    st = torch.zeros(1, dtype=torch.int32)
    run_coder(bad, lay, slots, segs, False, "torch", status=st)
    if int(st):
        assert int(st) & (R.ERR_TRUNCATED | R.ERR_TRAILING)
        k = ts[0][0].reshape(NB * BS, D)
        assert bool((k[:8, :32] == 0).all())
    with pytest.raises(CoderError):
        lay2, _ = make_layout("nhd", L, NB, BS, H, D, torch.bfloat16, "cpu")
        bad2 = dict(c, payload=c["payload"][:-3].clone(), offsets=c["offsets"].clone())
        run_coder(bad2, lay2, slots, segs, False, "torch")
    # descriptors outside the caches / slot_mapping: nothing written, ERR_SEGMENT
    for row in ([2, 0, 8], [-1, 0, 8], [0, T - 3, 8], [0, -1, 8], [0, 0, 9]):
        lay3, ts3 = make_layout("nhd", L, NB, BS, H, D, torch.bfloat16, "cpu")
        st = torch.zeros(1, dtype=torch.int32)
        run_coder(c, lay3, slots, torch.tensor([row, [1, 10, int(c["ns"][1])]]), False, "torch", status=st)
        assert int(st) & R.ERR_SEGMENT, row
        assert bool((ts3[0][0].view(torch.uint8) == 0xFF).all()), row  # K (cache 0) untouched


def test_bad_arguments_named():
    L, H, D, NB, BS, T = 1, 2, 32, 4, 8, 16
    c = coder_case(S=2, N=8, C=64)
    segs = torch.tensor([[0, 0, 8], [1, 0, int(c["ns"][1])]])
    slots = torch.arange(T)
    lay, ts = make_layout("nhd", L, NB, BS, H, D, torch.bfloat16, "cpu")
    cases = [
        (dict(segments=segs.int()), TypeError, "segments"),
        (dict(segments=segs[:1]), ValueError, "segments"),
        (dict(slot_mapping=slots.float()), TypeError, "slot_mapping"),
        (dict(lut=c["lut"][:, :3]), ValueError, "lut"),
        (dict(table_id=c["table_id"][:, :32].contiguous()), ValueError, "table_id"),
        (dict(s_tok=c["s_tok"][:, :3]), ValueError, "s_tok"),
        (dict(N=0), ValueError, "N"),
        (dict(layout="x"), TypeError, "layout"),
        (dict(k_scale=torch.ones(1)), ValueError, "k_scale"),
    ]
    base = dict(payload=c["payload"], offsets=c["offsets"], freq=c["freq"], table_id=c["table_id"], N=8,
                prob_bits=12, lut=c["lut"], layout=lay, slot_mapping=slots, segments=segs)
    for over, exc, name in cases:
        with pytest.raises(exc, match=name):
            cpaged.rans_decode_pages(**{**base, **over})
    assert all(bool((t.view(torch.uint8) == 0xFF).all()) for t in ts)  # nothing written
    data = container(1, 16, 2, 32, ct=8)
    with pytest.raises(ValueError, match="layout"):
        codec.decode_into_pages(data, make_layout("nhd", 1, NB, BS, 1, 32, torch.bfloat16, "cpu")[0], slots)
    with pytest.raises(ValueError, match="layout"):
        codec.decode_into_pages(data, make_layout("nhd", 3, NB, BS, 2, 32, torch.bfloat16, "cpu")[0], slots)
    with pytest.raises(ValueError, match="slot_mapping"):
        codec.decode_into_pages(data, lay, slots[:5])
    with pytest.raises(ValueError, match="k_scale"):
        codec.decode_into_pages(data, make_layout("nhd", 1, NB, BS, 2, 32, torch.float8_e4m3fn, "cpu")[0], slots)
    with pytest.raises(codec.CodecError):
        codec.decode_into_pages(data[:-1], lay, slots)
    assert all(bool((t.view(torch.uint8) == 0xFF).all()) for t in ts)


def test_op_fake_and_schema():
    """The op declares its mutations (caches, status) and has a fake (torch.compile / graphs)."""
    op = torch.ops.kvkernels.rans_decode_pages.default
    muts = [a.name for a in op._schema.arguments if a.alias_info is not None and a.alias_info.is_write]
    assert muts == ["caches", "status"]
    from torch._subclasses.fake_tensor import FakeTensorMode
    L, H, D, NB, BS, T = 1, 1, 32, 4, 8, 16
    c = coder_case(S=2, N=8, C=32)
    lay, _ = make_layout("nhd", L, NB, BS, H, D, torch.bfloat16, "cpu")
    with FakeTensorMode(allow_non_fake_inputs=True):
        cpaged.rans_decode_pages_op(c["payload"], c["offsets"], c["freq"], c["table_id"], 12, 8, c["lut"], False,
                                    None, None, None, torch.zeros(2, 3, dtype=torch.int64), lay.owners(), lay.ptrs,
                                    lay.spec(), torch.arange(T), None, None, torch.zeros(1, dtype=torch.int32), None)


# ---- GPU: the CUDA kernel == the reference, byte for byte ----------------------------------------
def gpu_pair(kind, L, NB, BS, H, D, dtype):
    return make_layout(kind, L, NB, BS, H, D, dtype, "cuda"), make_layout(kind, L, NB, BS, H, D, dtype, "cuda")


@needs_gpu
@pytest.mark.parametrize("kind", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float8_e4m3fn])
@pytest.mark.parametrize("D", [64, 48])
def test_gpu_container_equals_reference(kind, dtype, D):
    if kind == "sglang" and dtype == torch.float8_e4m3fn:
        dtype = torch.uint8  # SGLang stores fp8 codes as uint8
    L, T, H, NB, BS = 3, 70, 2, 10, 16
    data = container(L, T, H, D, "default" if D == 64 else "cachegen")
    (a, ta), (b, tb) = gpu_pair(kind, L, NB, BS, H, D, dtype)
    cs = scales(L, H, "cuda") if a.fp8 else (None, None)
    slots = slots_for(T, NB, BS, "cuda")
    ca, cb = torch.zeros(1, dtype=torch.int32, device="cuda"), torch.zeros(1, dtype=torch.int32, device="cuda")
    codec.decode_into_pages(data, a, slots, k_scale=cs[0], v_scale=cs[1], oob_count=ca, backend="cuda")
    codec.decode_into_pages(data, b, slots, k_scale=cs[0], v_scale=cs[1], oob_count=cb, backend="torch")
    torch.cuda.synchronize()
    for x, y in zip(raw(ta), raw(tb)):
        assert torch.equal(x, y)
    assert int(ca) == int(cb) == 2


@needs_gpu
@pytest.mark.parametrize("per_segment", [False, True])
@pytest.mark.parametrize("kind,D", [("nhd", 64), ("legacy", 64), ("hnd", 40), ("sglang", 96)])
def test_gpu_coder_level_equals_reference(per_segment, kind, D):
    L, H, NB, BS, T = 2, 2, 8, 8, 50
    c = coder_case(S=7, N=13, C=H * D, bins=24, device="cuda")
    segs = coder_segments(c, L, T, "cuda")
    slots = slots_for(T, NB, BS, "cuda")
    (a, ta), (b, tb) = gpu_pair(kind, L, NB, BS, H, D, torch.bfloat16)
    sa, sb = (torch.zeros(1, dtype=torch.int32, device="cuda") for _ in range(2))
    s32 = slots32(slots)
    assert_no_slot_twice(segs, s32, NB * BS)
    run_coder(c, a, s32, segs, per_segment, "cuda", status=sa)
    run_coder(c, b, s32, segs, per_segment, "torch", status=sb)
    assert int(sa) == int(sb) == 0
    for x, y in zip(raw(ta), raw(tb)):
        assert torch.equal(x, y)


@needs_gpu
def test_gpu_corrupt_equals_reference():
    L, H, D, NB, BS, T = 1, 1, 64, 4, 8, 30
    c = coder_case(S=2, N=8, C=64, device="cuda")
    segs = torch.tensor([[0, 0, 8], [1, 10, int(c["ns"][1])]], device="cuda")
    slots = torch.arange(T, device="cuda")
    for pos in (5, 10, 40, int(c["payload"].numel()) - 1):
        bad = dict(c, payload=c["payload"].clone())
        bad["payload"][pos] ^= 0x5A
        (a, ta), (b, tb) = gpu_pair("nhd", L, NB, BS, H, D, torch.bfloat16)
        sa, sb = (torch.zeros(1, dtype=torch.int32, device="cuda") for _ in range(2))
        run_coder(bad, a, slots, segs, False, "cuda", status=sa)
        run_coder(bad, b, slots, segs, False, "torch", status=sb)
        assert (int(sa) == 0) == (int(sb) == 0), pos
        for x, y in zip(raw(ta), raw(tb)):
            assert torch.equal(x, y), pos
    for row in ([2, 0, 8], [0, T - 3, 8], [0, 0, 9]):  # malformed descriptors: nothing written
        (a, ta), _ = gpu_pair("nhd", L, NB, BS, H, D, torch.bfloat16)
        sa = torch.zeros(1, dtype=torch.int32, device="cuda")
        run_coder(c, a, slots, torch.tensor([row, [1, 10, int(c["ns"][1])]], device="cuda"), False, "cuda",
                  status=sa)
        assert int(sa) & R.ERR_SEGMENT
        assert bool((ta[0][0].view(torch.uint8) == 0xFF).all())


@needs_gpu
def test_gpu_cuda_graph_capture():
    L, T, H, D, NB, BS = 2, 64, 2, 64, 8, 16
    data = container(L, T, H, D, ct=32)
    args = cpaged._rans_arrays(*_parsed(data), range(L), range(2), 0, L)
    N = args.pop("N")
    to = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in args.items()}
    (a, ta), (b, tb) = gpu_pair("nhd", L, NB, BS, H, D, torch.bfloat16)
    slots = torch.zeros(T, dtype=torch.int64, device="cuda")
    st = torch.zeros(1, dtype=torch.int32, device="cuda")

    def step():
        cpaged.rans_decode_pages(to["payload"], to["offsets"], to["freq"], to["table_id"], N, 12, to["lut"], a,
                                 slots, to["segments"], to["s_tok"], to["s_ch"], to["z_ch"], lut_per_segment=True,
                                 status=st, backend="cuda")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()  # warm-up outside the graph
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        step()
    slots.copy_(slots_for(T, NB, BS, "cuda"))  # the replay reads the new slots
    for t in ta:
        t.view(torch.uint8).fill_(0xFF)
    g.replay()
    torch.cuda.synchronize()
    assert int(st) == 0
    codec.decode_into_pages(data, b, slots, backend="torch")
    for x, y in zip(raw(ta), raw(tb)):
        assert torch.equal(x, y)


def _parsed(data):
    from kvkernels.codec import container as ct
    mv = ct._as_bytes(data)
    return mv, ct._parse_header(mv)


@needs_gpu
def test_gpu_direct_op_checks_extents():
    """Engines may call the op directly with their own buffers: extents are checked before the
    launch (a short offsets / segments / lut tensor raises, nothing is written)."""
    L, H, D, NB, BS, T = 1, 1, 64, 4, 8, 30
    c = coder_case(S=2, N=8, C=64, device="cuda")
    segs = torch.tensor([[0, 0, 8], [1, 10, int(c["ns"][1])]], device="cuda")
    (a, ta), _ = gpu_pair("nhd", L, NB, BS, H, D, torch.bfloat16)
    st = torch.zeros(1, dtype=torch.int32, device="cuda")
    op = torch.ops.kvkernels.rans_decode_pages
    base = [c["payload"], c["offsets"], c["freq"], c["table_id"], 12, 8, c["lut"], False, None, None, None, segs,
            a.owners(), a.ptrs, a.spec(), torch.arange(T, device="cuda"), None, None, st, "cuda"]
    for i, bad in ((1, c["offsets"][:-1]), (11, segs[:1].contiguous()), (6, c["lut"][:, :3].contiguous())):
        args = list(base)
        args[i] = bad
        with pytest.raises(ValueError):
            op(*args)
    torch.cuda.synchronize()
    assert all(bool((t.view(torch.uint8) == 0xFF).all()) for t in ta)


def test_page_table_equals_slot_mapping():
    """A FlashInfer CSR page table addresses the same slots as its slot_mapping."""
    from kvkernels import PageTable
    from kvkernels.layouts import page_table_slots
    L, T, H, D, NB, BS = 2, 37, 1, 32, 8, 8
    data = container(L, T, H, D, ct=16)
    pages = torch.tensor([5, 2, 7, 0, 3], dtype=torch.int32)  # 5 pages: 4 full + 5 tokens
    table = PageTable(kv_indptr=torch.tensor([0, 5], dtype=torch.int32), kv_indices=pages,
                      kv_last_page_len=torch.tensor([T - 4 * BS], dtype=torch.int32))
    a, ta = make_layout("nhd", L, NB, BS, H, D, torch.bfloat16, "cpu")
    b, tb = make_layout("nhd", L, NB, BS, H, D, torch.bfloat16, "cpu")
    codec.decode_into_pages(data, a, page_table=table)
    codec.decode_into_pages(data, b, page_table_slots(table, BS, T))
    for x, y in zip(raw(ta), raw(tb)):
        assert torch.equal(x, y)
    assert not bool((ta[0].view(torch.uint8) == 0xFF).all())


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_gpu)])
def test_shared_table_bank(device):
    """A container with a shared (profiled) table bank: rows per (kind, layer, channel) shared by
    the chunks; decode_into_pages equals decode-then-scatter."""
    from kvkernels.codec import presets as P, tables as TB
    L, T, H, D, NB, BS = 2, 70, 2, 32, 10, 8
    Pr = P.default(L)
    g = torch.Generator().manual_seed(4)
    counts = torch.randint(0, 1000, (2, L, H * D, Pr.bins_max()), generator=g)
    bank = TB.register_bank(TB.bank_to_bytes("unit-test-pages", counts))
    try:
        kv = torch.randn(2, L, T, H, D, generator=g)
        data = codec.encode(kv, Pr, chunk_tokens=32, model="unit-test-pages")
        assert codec.inspect(data).table_mode == "shared"
        slots = slots_for(T, NB, BS, device)
        a, ta = make_layout("hnd", L, NB, BS, H, D, torch.bfloat16, device)
        b, tb = make_layout("hnd", L, NB, BS, H, D, torch.bfloat16, device)
        codec.decode_into_pages(data, a, slots, backend="cuda" if device == "cuda" else "torch")
        decode_then_scatter(data, b, slots)
        for x, y in zip(raw(ta), raw(tb)):
            assert torch.equal(x, y)
    finally:
        del TB._REGISTRY[bank.hash]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_gpu)])
def test_mixed_modes_and_bins(device):
    """K token_sym with 32/8 bins, V channel_affine with 64 bins (a table wider than 32 symbols:
    the generic search): one launch for both, absent factors as identities, equal to
    decode-then-scatter."""
    from kvkernels.codec import presets as P
    L, T, H, D, NB, BS = 2, 50, 2, 32, 8, 8
    Pr = P.Preset("mixed", P.KindSpec("token_sym", (32, 8)), P.KindSpec("channel_affine", (64, 64), (0.3, 0.5)))
    g = torch.Generator().manual_seed(5)
    kv = torch.randn(2, L, T, H, D, generator=g)
    data = codec.encode(kv, Pr, chunk_tokens=16)
    slots = slots_for(T, NB, BS, device)
    a, ta = make_layout("nhd", L, NB, BS, H, D, torch.float16, device)
    b, tb = make_layout("nhd", L, NB, BS, H, D, torch.float16, device)
    codec.decode_into_pages(data, a, slots, backend="cuda" if device == "cuda" else "torch")
    decode_then_scatter(data, b, slots)
    for x, y in zip(raw(ta), raw(tb)):
        assert torch.equal(x, y)


# ---- exact tokens (the default preset's sink rows, stored raw) ---------------------------------
def exact_container(L=3, T=45, H=2, D=32, ct=8, k_exact=11, v_exact=3, seed=7):
    """channel_delta K and V (the default preset's mode) with K's first ``k_exact`` and V's first
    ``v_exact`` tokens exact (K's spanning two chunks), the sink tokens large (as in a model):
    their quantized values differ from the raw rows."""
    import dataclasses
    from kvkernels.codec import presets as P
    base = P.fisher(L)
    pr = dataclasses.replace(base, k=dataclasses.replace(base.k, exact=k_exact),
                             v=dataclasses.replace(base.v, exact=v_exact))
    g = torch.Generator().manual_seed(seed)
    kv = torch.randn(2, L, T, H, D, generator=g)
    kv[:, :, :2] *= 30
    return codec.encode(kv.to(torch.bfloat16), pr, chunk_tokens=ct)


def _check_exact(device, kind, dtype, layers=None, chunks=None, cache_layers="all", data=None, L=3, T=45,
                 backend="torch", monkeypatch=None):
    H, D, NB, BS = 2, 32, 8, 8
    data = exact_container(L, T, H, D) if data is None else data
    Lc = L if cache_layers == "all" else len(layers)
    slots = slots_for(T, NB, BS, device)
    a, ta = make_layout(kind, Lc, NB, BS, H, D, dtype, device)
    b, tb = make_layout(kind, Lc, NB, BS, H, D, dtype, device)
    cs = scales(Lc, H, device) if a.fp8 else (None, None)
    cnt = torch.zeros(1, dtype=torch.int64, device=device)
    codec.decode_into_pages(data, a, slots, layers=layers, chunks=chunks, k_scale=cs[0], v_scale=cs[1],
                            oob_count=cnt, backend=backend)
    kv = codec.decode(data, dtype=torch.float32, layers=layers, chunks=chunks).to(device)
    lr = range(L) if layers is None else layers
    sub = cpaged._sub_layout(b, lr, 0) if cache_layers == "all" else b
    ks = cs[0][lr.start:lr.stop] if (a.fp8 and cache_layers == "all") else cs[0]
    kvkernels.scatter(kv, sub, slots[:kv.shape[2]], k_scale=ks, v_scale=cs[1], validate=False, backend="torch")
    if device == "cuda":
        torch.cuda.synchronize()
    for x, y in zip(raw(ta), raw(tb)):
        assert torch.equal(x, y)
    n = kv.shape[2]
    s = slots[:n].cpu()
    assert int(cnt) == int((s >= NB * BS).sum())  # counted once (not again by the exact pass)
    return data, slots


@pytest.mark.parametrize("kind", ["nhd", "legacy", "kv_interleaved", "cross_layer"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float8_e4m3fn])
def test_exact_tokens_equal_decode_then_scatter(kind, dtype):
    _check_exact("cpu", kind, dtype)


@pytest.mark.parametrize("layers,chunks,cache_layers", [(range(1, 3), None, "all"), (range(0, 2), range(1, 4), "all"),
                                                        (range(1, 3), range(0, 2), "decoded"),
                                                        (range(2, 3), range(2, 6), "decoded")])
def test_exact_tokens_ranges(layers, chunks, cache_layers):
    _check_exact("cpu", "hnd", torch.bfloat16, layers, chunks, cache_layers)


def test_exact_tokens_default_preset_and_discriminating(monkeypatch):
    """The default preset (exact = 1) equals decode-then-scatter; without the exact pass the
    caches differ (the test sees the exact rows)."""
    L, T, H, D, NB, BS = 2, 40, 2, 32, 8, 8
    g = torch.Generator().manual_seed(3)
    kv = torch.randn(2, L, T, H, D, generator=g)
    kv[:, :, 0] *= 40
    data = codec.encode(kv, "default", chunk_tokens=16)
    assert codec.inspect(data).preset == "default"
    _check_exact("cpu", "nhd", torch.bfloat16, data=data, L=L, T=T)
    for d in (data, exact_container()):
        monkeypatch.setattr(cpaged, "_write_exact", lambda *a, **k: None)
        with pytest.raises(AssertionError):
            _check_exact("cpu", "nhd", torch.bfloat16, data=d, L=3 if d is not data else L, T=45 if d is not data else T)
        monkeypatch.undo()


@needs_gpu
@pytest.mark.parametrize("kind", ["nhd", "hnd", "legacy", "sglang"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float8_e4m3fn])
def test_gpu_exact_tokens_equal_decode_then_scatter(kind, dtype):
    if kind == "sglang" and dtype == torch.float8_e4m3fn:
        dtype = torch.uint8
    _check_exact("cuda", kind, dtype, backend="cuda")
    _check_exact("cuda", kind, dtype, range(1, 3), range(1, 4), "decoded", backend="cuda")

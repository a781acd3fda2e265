"""rerotate_keys (flat and paged) / select_tokens / gather_tokens / scatter_tokens: every backend vs
a float64 ground truth and the torch reference (bit-exact on the GPU), rotation composition
against HF's RoPE, paged layouts with poisoned caches, opcheck, bad input."""
import dataclasses
import math
import os

import pytest
import torch

import kvkernels
from kvkernels import dispatch
from kvkernels.blend import (cos_sin_cache_from_inv_freq, gather_tokens, rerotate_keys, rerotate_keys_paged,
                             scatter_tokens, select_tokens)
from kvkernels.blend.ops import (gather_tokens_op, rerotate_keys_op, rerotate_keys_paged_op, scatter_tokens_op,
                                 select_tokens_op)
from kvkernels.layouts import PagedLayout
from kvkernels.reference import blend as ref

from conftest import DEVICE
from tolerances import DEV_REL, FP8_REL, FP8_SUBNORMAL_ABS, OUT_ULP, ROT_F32_REL

BACKENDS = ["torch", "triton", "cuda"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _cache(rot, max_pos=4096, base=10000.0, device=DEVICE, dtype=torch.float32):
    inv = 1.0 / (base ** (torch.arange(0, rot, 2, dtype=torch.float64) / rot))
    return cos_sin_cache_from_inv_freq(inv.to(device), max_pos, dtype)


def _truth(key64, old, new, cs, is_neox):
    """float64 rotation of the float64 key by the float64-composed (new - old) angle."""
    cd, sd, ok = ref.delta_cos_sin(old, new, cs, dtype=torch.float64)
    y = ref.rotate_pairs(key64, cd, sd, cs.shape[1], is_neox)
    return torch.where(ok[None, :, None, None], y, key64)


def _skip(backend, op, *case):
    why = dispatch.refusal(op, backend, *case)
    if backend == "triton" and DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        why = "no interpreter"
    if why:
        pytest.skip(f"{backend}: {why}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("is_neox", [True, False])
@pytest.mark.parametrize("shape,rot", [((1, 7, 2, 64), 64), ((2, 5, 3, 80), 32), ((1, 9, 1, 128), 128)])
@pytest.mark.parametrize("layout", ["contiguous", "hnd"])
def test_rerotate_vs_float64(backend, dtype, is_neox, shape, rot, layout):
    L, T, H, D = shape
    cs = _cache(rot)
    k64 = torch.randn(L, T, H, D, dtype=torch.float64, device=DEVICE) * 3
    if layout == "hnd":  # a [L, H, T, D] cache seen as [L, T, H, D]
        key = k64.to(dtype).transpose(1, 2).contiguous().transpose(1, 2)
    else:
        key = k64.to(dtype).clone()
    _skip(backend, "rerotate_keys", key, cs, is_neox, None)
    old = torch.randint(0, 4096, (T,), device=DEVICE)
    new = torch.randint(0, 4096, (T,), device=DEVICE)
    want = _truth(key.double(), old, new, cs.double(), is_neox)
    rerotate_keys(key, old, new, cs, is_neox=is_neox, backend=backend)
    tol = (OUT_ULP[dtype] + ROT_F32_REL * 4) * want.abs().max().item()
    assert (key.double() - want).abs().max().item() <= tol
    # the non-rotary channels are untouched bit for bit
    assert torch.equal(key[..., rot:], k64.to(dtype)[..., rot:])
    if backend != "torch":
        k2 = k64.to(dtype).clone()
        rerotate_keys(k2, old, new, cs, is_neox=is_neox, backend="torch")
        assert (key.double() - k2.double()).abs().max().item() <= tol


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scale_shape", ["tensor", "head", "token_head"])
def test_rerotate_fp8(backend, scale_shape):
    L, T, H, D = 2, 6, 2, 64
    cs = _cache(D)
    x = torch.randn(L, T, H, D, device=DEVICE)
    # scales with headroom (x 1.5 over amax): a rotated pair never exceeds |pair| <= sqrt(2) amax
    a = x.abs()
    sc = {"tensor": a.max() * 1.5 / 448, "head": a.amax(dim=(1, 3))[:, None, :] * 1.5 / 448,
          "token_head": a.amax(dim=3) * 1.5 / 448}[scale_shape]
    scb = torch.broadcast_to(sc, (L, T, H))
    codes = (x / scb[..., None]).clamp(-448, 448).to(torch.float8_e4m3fn)
    _skip(backend, "rerotate_keys", codes, cs, True, scb)
    old = torch.randint(0, 4096, (T,), device=DEVICE)
    new = torch.randint(0, 4096, (T,), device=DEVICE)
    want = _truth(codes.double() * scb[..., None].double(), old, new, cs.double(), True)
    rerotate_keys(codes, old, new, cs, k_scale=sc, backend=backend)
    got = codes.double() * scb[..., None].double()
    s = scb[..., None].double()
    tol = FP8_REL * want.abs() + FP8_SUBNORMAL_ABS * s + 1e-6 * want.abs().max()
    assert ((got - want).abs() <= tol).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_rerotate_skips_out_of_range(backend):
    """Kernels leave tokens whose positions lie outside the cache untouched (validate=False)."""
    cs = _cache(64, max_pos=100)
    key = torch.randn(1, 4, 2, 64, device=DEVICE)
    _skip(backend, "rerotate_keys", key, cs, True, None)
    k0 = key.clone()
    old = torch.tensor([0, 5, 200, -3], device=DEVICE)
    new = torch.tensor([7, 500, 9, 2], device=DEVICE)
    rerotate_keys(key, old, new, cs, validate=False, backend=backend)
    assert not torch.equal(key[:, 0], k0[:, 0])
    assert torch.equal(key[:, 1:], k0[:, 1:])


def test_rotation_composition_matches_hf_rope():
    """A key roped at p_old and re-rotated to p_new equals the key roped at p_new directly."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    D, T = 64, 11
    inv = 1.0 / (10000.0 ** (torch.arange(0, D, 2, dtype=torch.float64) / D))
    raw = torch.randn(1, 2, T, D, dtype=torch.float64)
    def rope(p):
        f = p[:, None].double() * inv[None]
        emb = torch.cat([f, f], -1)
        return apply_rotary_pos_emb(raw, raw, emb.cos()[None], emb.sin()[None])[1]
    old = torch.randint(0, 3000, (T,))
    new = torch.randint(0, 3000, (T,))
    want = rope(new)[0].transpose(0, 1)
    k64 = rope(old)[0].transpose(0, 1)[None]  # [1, T, H, D]
    cs64 = cos_sin_cache_from_inv_freq(inv, 4096, torch.float64)
    got64 = _truth(k64, old, new, cs64, True)[0]  # the spec's formula in float64
    assert (got64 - want).abs().max().item() <= 1e-11 * want.abs().max().item()
    cs = cos_sin_cache_from_inv_freq(inv, 4096, torch.float32)
    k = k64[0].float().contiguous()  # [T, H, D]
    rerotate_keys(k, old, new, cs)
    assert (k.double() - want).abs().max().item() <= 2e-6 * want.abs().max().item()
    # rotating back restores the key (one rotation each way, not a chain)
    k0 = k.clone()
    rerotate_keys(k, new, old, cs)
    rerotate_keys(k, old, new, cs)
    assert (k - k0).abs().max().item() <= 2e-6 * k0.abs().max().item()


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("on", ["k", "v", "kv"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_select_tokens(backend, on, dtype):
    T, H, D = 37, 3, 64
    fk, ck, fv, cv = (torch.randn(T, H, D, device=DEVICE).to(dtype) for _ in range(4))
    args = (fk if "k" in on else None, ck if "k" in on else None, fv if "v" in on else None, cv if "v" in on else None)
    _skip(backend, "select_tokens", *args)
    forced = torch.zeros(T, dtype=torch.bool, device=DEVICE)
    forced[-3:] = True
    cand = torch.ones(T, dtype=torch.bool, device=DEVICE)
    cand[:5] = False
    s = select_tokens(*args, count=6, forced=forced, candidates=cand, backend=backend)
    d64 = sum((a.double() - b.double()).square().sum((-2, -1)) for a, b in zip(args[::2], args[1::2]) if a is not None)
    assert (s.deviation.double() - d64).abs().max().item() <= DEV_REL * d64.max().item()
    elig = cand & ~forced
    order = sorted(range(T), key=lambda i: (-float(s.deviation[i]), i))
    top = [i for i in order if elig[i]][:6]
    want = sorted(set(top) | set(range(T - 3, T)))
    assert s.indices.tolist() == want
    assert s.mask.sum().item() == len(want)


def test_select_ties_and_ratio():
    T = 10
    z = torch.zeros(T, 1, 4)
    s = select_tokens(z, z, count=3)
    assert s.indices.tolist() == [0, 1, 2]  # ties: lower index first
    s = select_tokens(z, z, ratio=0.5, candidates=[1, 3, 5, 7], forced=[9])
    assert s.indices.tolist() == [1, 3, 9]
    s = select_tokens(torch.randn(T, 2, 4), z.expand(T, 2, 4), ratio=1.0)
    assert s.indices.tolist() == list(range(T))
    s = select_tokens(torch.randn(T, 2, 4), z.expand(T, 2, 4), count=100, candidates=[2, 4])
    assert s.indices.tolist() == [2, 4]


def test_opcheck():
    cs = _cache(32, max_pos=64, device="cpu")
    key = torch.randn(1, 5, 2, 32)
    pos = torch.arange(5)
    torch.library.opcheck(rerotate_keys_op, (key, pos, pos + 3, cs, True, None, "torch"))
    f = torch.randn(6, 2, 8)
    c = torch.randn(6, 2, 8)
    torch.library.opcheck(select_tokens_op, (f, c, None, None, 2, None, None, torch.empty(6, dtype=torch.bool),
                                             torch.empty(6), "torch"))


def test_bad_input():
    cs = _cache(64, max_pos=100, device="cpu")
    key = torch.randn(4, 2, 64)
    k0 = key.clone()
    p = torch.arange(4)
    with pytest.raises(ValueError, match="new_positions"):
        rerotate_keys(key, p, p + 97, cs)
    with pytest.raises(ValueError, match="old_positions"):
        rerotate_keys(key, p - 1, p, cs)
    assert torch.equal(key, k0)  # nothing written before the error
    with pytest.raises(ValueError, match="old_positions"):
        rerotate_keys(key, torch.arange(3), p, cs)
    with pytest.raises(TypeError, match="old_positions"):
        rerotate_keys(key, p.float(), p, cs)
    with pytest.raises(ValueError, match="rot_dim"):
        rerotate_keys(key, p, p, cs, rot_dim=32)
    with pytest.raises(ValueError, match="rot_dim"):
        rerotate_keys(torch.randn(4, 2, 32), p, p, cs)
    with pytest.raises(ValueError, match="num_kv_heads"):
        rerotate_keys(key, p, p, cs, num_kv_heads=8)
    with pytest.raises(ValueError, match="k_scale"):
        rerotate_keys(key.to(torch.float8_e4m3fn), p, p, cs)
    with pytest.raises(ValueError, match="k_scale"):
        rerotate_keys(key.to(torch.float8_e4m3fn), p, p, cs, k_scale=torch.ones(3))
    with pytest.raises(ValueError, match="k_scale"):
        rerotate_keys(key, p, p, cs, k_scale=torch.ones(()))
    with pytest.raises(TypeError, match="key"):
        rerotate_keys(key.long(), p, p, cs)
    with pytest.raises(ValueError, match="key"):
        rerotate_keys(torch.randn(4, 64, 2).transpose(1, 2), p, p, cs)
    f = torch.randn(5, 2, 8)
    for r in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="ratio"):
            select_tokens(f, f, ratio=r)
    with pytest.raises(ValueError, match="heads"):
        select_tokens(f, torch.randn(5, 3, 8), count=1)
    with pytest.raises(ValueError, match="cached_v"):
        select_tokens(fresh_v=f, count=1)
    with pytest.raises(ValueError, match="ratio/count"):
        select_tokens(f, f)
    with pytest.raises(ValueError, match="forced"):
        select_tokens(f, f, count=1, forced=[7])
    with pytest.raises(ValueError, match="count"):
        select_tokens(f, f, count=-1)


# ---- bit-exact vs the reference on the GPU (CUDA: 16-byte path, scalar fallback, layer chunks) --
GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (bit-exactness is a GPU property)")


def _exact_case(dtype, shape, rot, is_neox, layout, offset):
    L, T, H, D = shape
    cs = _cache(rot, max_pos=8192)
    base = torch.randn(L * T * H * D + offset, device="cuda").mul_(3)
    if dtype == torch.float8_e4m3fn:
        base = base.clamp(-400, 400)
    flat = base.to(dtype)[offset:]
    key = flat.view(L, T, H, D) if layout == "contiguous" else flat.view(L, H, T, D).transpose(1, 2)
    return key, cs


@GPU
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", DTYPES + [torch.float8_e4m3fn])
@pytest.mark.parametrize("is_neox", [True, False])
@pytest.mark.parametrize("shape,rot,layout,offset", [
    ((2, 37, 8, 128), 128, "contiguous", 0),   # 16-byte path
    ((3, 29, 9, 128), 128, "hnd", 0),          # 16-byte path, strided heads, a head batch tail
    ((2, 21, 3, 80), 32, "contiguous", 0),     # partial rotary
    ((2, 17, 2, 64), 24, "contiguous", 0),     # rot/2 = 12: not a multiple of a word -> scalar
    ((2, 19, 3, 64), 64, "contiguous", 1),     # misaligned base -> scalar
    ((33, 4096, 2, 128), 128, "contiguous", 0),  # several layers per thread, an odd tail
])
def test_rerotate_bitexact_gpu(backend, dtype, is_neox, shape, rot, layout, offset):
    key, cs = _exact_case(dtype, shape, rot, is_neox, layout, offset)
    L, T, H, D = shape
    sc = None
    if dtype == torch.float8_e4m3fn:
        sc = torch.rand(L, T, H, device="cuda") * 0.02 + 0.01
    _skip(backend, "rerotate_keys", key, cs, is_neox, None if sc is None else sc)
    old = torch.randint(0, 8192, (T,), device="cuda")
    new = torch.randint(0, 8192, (T,), device="cuda")
    old[0], new[-1] = -1, 8192  # skipped tokens
    want = key.clone()
    rerotate_keys(want, old, new, cs, is_neox=is_neox, k_scale=sc, validate=False, backend="torch")
    rerotate_keys(key, old, new, cs, is_neox=is_neox, k_scale=sc, validate=False, backend=backend)
    if dtype == torch.float8_e4m3fn:
        assert torch.equal(key.view(torch.uint8), want.view(torch.uint8))
    else:
        assert torch.equal(key, want)


# ---- paged keys --------------------------------------------------------------------------------
NB, BS = 6, 4


def _paged(kind, L, H, D, dtype, device=DEVICE):
    """(layout, kview, vs): kview(l) -> layer l's K cache by slot ``[NB * BS, H, D]`` (a copy);
    vs() -> the V caches. Every element starts random and finite (poison that any write or
    rotation changes bit for bit; NaN would survive a rotation as NaN)."""

    def fill(t):
        return t.copy_(torch.randn(t.shape, device=device).to(t.dtype))

    if kind == "vllm_nhd":  # per layer [2, NB, BS, H, D]
        ts = [fill(torch.empty(2, NB, BS, H, D, dtype=dtype, device=device)) for _ in range(L)]
        lay = PagedLayout.vllm_flash(ts)
        kview = lambda l: ts[l][0].reshape(NB * BS, H, D)
        vs = lambda: [t[1] for t in ts]
    elif kind == "vllm_hnd":  # per layer K, V [NB, H, BS, D]
        ks = [fill(torch.empty(NB, H, BS, D, dtype=dtype, device=device)) for _ in range(L)]
        vv = [fill(torch.empty(NB, H, BS, D, dtype=dtype, device=device)) for _ in range(L)]
        lay = PagedLayout.from_tensors(ks, vv, order="HND")
        kview = lambda l: ks[l].transpose(1, 2).reshape(NB * BS, H, D)
        vs = lambda: vv
    elif kind == "vllm_kv_interleaved":  # vLLM 2026: [NB, H, BS, 2*D], K | V side by side
        ts = [fill(torch.empty(NB, H, BS, 2 * D, dtype=dtype, device=device)) for _ in range(L)]
        lay = PagedLayout.vllm_kv_interleaved(ts)
        kview = lambda l: ts[l][..., :D].transpose(1, 2).reshape(NB * BS, H, D)
        vs = lambda: [t[..., D:] for t in ts]
    elif kind == "vllm_legacy":  # K [NB, H, D/x, BS, x], V [NB, H, D, BS]
        x = 16 // torch.empty((), dtype=dtype).element_size()
        ks = [fill(torch.empty(NB, H, D // x, BS, x, dtype=dtype, device=device)) for _ in range(L)]
        vv = [fill(torch.empty(NB, H, D, BS, dtype=dtype, device=device)) for _ in range(L)]
        lay = PagedLayout.vllm_legacy(ks, vv)
        kview = lambda l: ks[l].permute(0, 3, 1, 2, 4).reshape(NB * BS, H, D)
        vs = lambda: vv
    else:
        raise AssertionError(kind)
    return lay, kview, vs


def _bits(t):
    return t.contiguous().view(torch.uint8) if t.dtype != torch.uint8 else t.contiguous()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["vllm_nhd", "vllm_hnd", "vllm_kv_interleaved", "vllm_legacy"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("is_neox", [True, False])
def test_rerotate_paged(backend, kind, dtype, is_neox):
    """Poisoned caches (random keys everywhere): only the addressed tokens' K rows change, as the
    flat reference rotates them; V and every other slot stay bit-identical."""
    L, H, D, T, rot = 2, 3, 64, 9, 48
    lay, kview, vs = _paged(kind, L, H, D, dtype)
    cs = _cache(rot, max_pos=512)
    slots = torch.randperm(NB * BS, device=DEVICE)[:T]
    slots[3] = -1  # skipped
    live = slots >= 0
    k_live = [torch.randn(int(live.sum()), H, D, device=DEVICE).to(dtype) for _ in range(L)]
    # write the finite keys through the layout's own views
    for l, v in enumerate(lay.views()[:L]):
        s = slots[live]
        v[s // BS, s % BS] = k_live[l].reshape(-1, H, D // lay.x, lay.x)
    k_before = [_bits(kview(l)) for l in range(L)]
    v_before = [_bits(t) for t in vs()]
    kl = dataclasses.replace(lay, num_kv=1, strides=(lay.strides[0],), bases=tuple(lay.bases[:L]), ptrs=lay.ptrs[:L])
    why = dispatch.refusal("rerotate_keys_paged", backend, kl, slots, cs, is_neox)
    if backend == "triton" and DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        why = "no interpreter"
    if why:
        pytest.skip(f"{backend}: {why}")
    old = torch.randint(0, 512, (T,), device=DEVICE)
    new = torch.randint(0, 512, (T,), device=DEVICE)
    want = [k.clone()[None] for k in k_live]
    for l in range(L):
        rerotate_keys(want[l], old[live], new[live], cs, is_neox=is_neox, backend="torch")
    rerotate_keys_paged(lay, slots, old, new, cs, is_neox=is_neox, backend=backend)
    tol = {torch.bfloat16: OUT_ULP[torch.bfloat16], torch.float32: OUT_ULP[torch.float32] + ROT_F32_REL * 4}[dtype]
    for l in range(L):
        got = kview(l)
        s = slots[live]
        g = got[s]
        assert (g.double() - want[l][0].double()).abs().max().item() <= tol * want[l].double().abs().max().item()
        if DEVICE == "cuda" or backend == "torch":
            assert torch.equal(g, want[l][0])  # bit-exact (the interpreter truncates to bf16)
        other = torch.ones(NB * BS, dtype=torch.bool, device=DEVICE)
        other[s] = False
        assert torch.equal(_bits(got)[other], k_before[l][other])  # untouched slots, bit for bit
    for v0, v in zip(v_before, vs()):
        assert torch.equal(_bits(v), v0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rerotate_paged_fp8(backend):
    L, H, D, T = 2, 2, 64, 6
    if backend != "torch" and DEVICE != "cuda":
        pytest.skip("fp8 kernels need a GPU")
    ks = [torch.zeros(NB, BS, H, D, dtype=torch.float8_e4m3fn, device=DEVICE) for _ in range(L)]
    vv = [torch.zeros(NB, BS, H, D, dtype=torch.float8_e4m3fn, device=DEVICE) for _ in range(L)]
    lay = PagedLayout.vllm_flash(ks, vv)
    cs = _cache(D, max_pos=256)
    sc = torch.rand(L, H, device=DEVICE) * 0.01 + 0.005
    slots = torch.randperm(NB * BS, device=DEVICE)[:T]
    x = [torch.randn(T, H, D, device=DEVICE) for _ in range(L)]
    by_slot = lambda l: ks[l].view(torch.uint8).view(-1, H, D)  # index fp8 through uint8 views
    for l in range(L):
        by_slot(l)[slots] = (x[l] / sc[l][None, :, None]).clamp(-448, 448).to(torch.float8_e4m3fn).view(torch.uint8)
    flat = torch.stack([by_slot(l)[slots] for l in range(L)]).view(torch.float8_e4m3fn)  # [L, T, H, D] codes
    old = torch.randint(0, 256, (T,), device=DEVICE)
    new = torch.randint(0, 256, (T,), device=DEVICE)
    scf = sc[:, None, :].expand(L, T, H)
    want = flat.clone()
    rerotate_keys(want, old, new, cs, k_scale=scf, backend="torch")
    kl = dataclasses.replace(lay, num_kv=1, strides=(lay.strides[0],), bases=tuple(lay.bases[:L]), ptrs=lay.ptrs[:L])
    why = dispatch.refusal("rerotate_keys_paged", backend, kl, slots, cs, True)
    if why:
        pytest.skip(f"{backend}: {why}")
    rerotate_keys_paged(lay, slots, old, new, cs, k_scale=sc, backend=backend)
    got = torch.stack([by_slot(l)[slots] for l in range(L)])
    assert torch.equal(got, want.view(torch.uint8))
    assert all(torch.equal(v.view(torch.uint8), torch.zeros_like(v.view(torch.uint8))) for v in vv)


@GPU
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("kind", ["vllm_nhd", "vllm_hnd", "vllm_kv_interleaved", "vllm_legacy"])
def test_rerotate_paged_bitexact_gpu(backend, kind):
    """Larger than the CPU cases (16-byte path: D = 128), bf16, vs the reference on the GPU."""
    L, H, D, T = 3, 8, 128, NB * BS - 3
    lay, kview, vs = _paged(kind, L, H, D, torch.bfloat16, device="cuda")
    for b in lay.bases:
        b.copy_(torch.randn(b.shape, device="cuda").to(b.dtype))
    cs = _cache(D, max_pos=4096)
    slots = torch.randperm(NB * BS, device="cuda")[:T]
    old = torch.randint(0, 4096, (T,), device="cuda")
    new = torch.randint(0, 4096, (T,), device="cuda")
    snap = [b.clone() for b in lay.bases]
    rerotate_keys_paged(lay, slots, old, new, cs, backend="torch")
    want = [kview(l) for l in range(L)]
    for b, s0 in zip(lay.bases, snap):
        b.copy_(s0)
    kl = dataclasses.replace(lay, num_kv=1, strides=(lay.strides[0],), bases=tuple(lay.bases[:L]), ptrs=lay.ptrs[:L])
    why = dispatch.refusal("rerotate_keys_paged", backend, kl, slots, cs, True)
    if why:
        pytest.skip(f"{backend}: {why}")
    rerotate_keys_paged(lay, slots, old, new, cs, backend=backend)
    for l in range(L):
        assert torch.equal(kview(l), want[l])


def test_rerotate_paged_opcheck_and_bad_input():
    L, H, D = 2, 2, 32
    lay, kview, vs = _paged("vllm_nhd", L, H, D, torch.float32, device="cpu")
    for b in lay.bases:
        b.copy_(torch.randn(b.shape))
    cs = _cache(D, max_pos=64, device="cpu")
    slots = torch.tensor([3, 0, 17, 9])
    p = torch.arange(4)
    kl = dataclasses.replace(lay, num_kv=1, strides=(lay.strides[0],), bases=tuple(lay.bases[:L]), ptrs=lay.ptrs[:L])
    torch.library.opcheck(rerotate_keys_paged_op, (list(kl.bases), kl.ptrs, kl.spec(), slots, p, p + 3, cs, True,
                                                   None, "torch"))
    snap = [b.clone() for b in lay.bases]
    with pytest.raises(ValueError, match="slot_mapping"):
        rerotate_keys_paged(lay, torch.tensor([0, 1, 1, 2]), p, p, cs)  # duplicate slots
    with pytest.raises(ValueError, match="slot_mapping"):
        rerotate_keys_paged(lay, torch.tensor([0, 1, NB * BS, 2]), p, p, cs)
    with pytest.raises(TypeError, match="slot_mapping"):
        rerotate_keys_paged(lay, slots.float(), p, p, cs)
    with pytest.raises(ValueError, match="new_positions"):
        rerotate_keys_paged(lay, slots, p, p + 62, cs)
    with pytest.raises(ValueError, match="old_positions"):
        rerotate_keys_paged(lay, slots, torch.arange(3), p, cs)
    with pytest.raises(ValueError, match="rot_dim"):
        rerotate_keys_paged(lay, slots, p, p, _cache(64, max_pos=64, device="cpu"))
    with pytest.raises(ValueError, match="num_kv_heads"):
        rerotate_keys_paged(lay, slots, p, p, cs, num_kv_heads=8)
    with pytest.raises(ValueError, match="k_scale"):
        rerotate_keys_paged(lay, slots, p, p, cs, k_scale=torch.ones(()))
    with pytest.raises(TypeError, match="layout"):
        rerotate_keys_paged(kview(0), slots, p, p, cs)
    mla = PagedLayout.mla([torch.zeros(NB, BS, 48)])
    with pytest.raises(ValueError, match="layout"):
        rerotate_keys_paged(mla, slots, p, p, cs)
    f8 = PagedLayout.vllm_flash([torch.zeros(NB, BS, H, D, dtype=torch.float8_e4m3fn)] * L,
                                [torch.zeros(NB, BS, H, D, dtype=torch.float8_e4m3fn)] * L)
    with pytest.raises(ValueError, match="k_scale"):
        rerotate_keys_paged(f8, slots, p, p, cs)
    with pytest.raises(ValueError, match="k_scale"):
        rerotate_keys_paged(f8, slots, p, p, cs, k_scale=torch.ones(3))
    assert all(torch.equal(b, s0) for b, s0 in zip(lay.bases, snap))  # nothing written before an error


# ---- gather / scatter of selected tokens -------------------------------------------------------
ROW_BACKENDS = ["torch", "triton"]


def _skip_rows(backend, op, xs, ys):
    why = dispatch.refusal(op, backend, xs, ys)
    if backend == "triton" and DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        why = "no interpreter"
    if why:
        pytest.skip(f"{backend}: {why}")


@pytest.mark.parametrize("backend", ROW_BACKENDS)
@pytest.mark.parametrize("case", ["hidden", "hf_hidden", "positions", "hf_kv", "thd"])
def test_gather_tokens(backend, case):
    T, S = 41, 13
    if case == "hidden":
        x, dim = torch.randn(T, 72, device=DEVICE).to(torch.bfloat16), 0
    elif case == "hf_hidden":
        x, dim = torch.randn(1, T, 40, device=DEVICE), 1
    elif case == "positions":
        x, dim = torch.randperm(1000, device=DEVICE)[:T], 0
    elif case == "hf_kv":
        x, dim = torch.randn(3, T, 16, device=DEVICE).to(torch.float16), 1
    else:
        x, dim = torch.randn(T, 3, 16, device=DEVICE)[:, :, :].transpose(0, 0), 0
    idx = torch.randperm(T, device=DEVICE)[:S]
    xv = x.movedim(dim, 0)
    _skip_rows(backend, "gather_tokens", [xv.reshape(T, -1, xv.shape[-1]) if xv.dim() > 1 else xv.view(T, 1, 1)],
               [xv.reshape(T, -1, xv.shape[-1]) if xv.dim() > 1 else xv.view(T, 1, 1)])
    out = gather_tokens(x, idx, dim=dim, backend=backend)
    assert torch.equal(out, x.index_select(dim, idx))
    # two tensors at once, into poisoned outputs; an out-of-range index leaves its row alone
    y = x.clone()
    shp = list(x.shape)
    shp[dim] = S
    fill = float("nan") if x.dtype.is_floating_point else -7
    o1 = torch.full(shp, fill, dtype=x.dtype, device=DEVICE)
    o2 = torch.full(shp, fill, dtype=x.dtype, device=DEVICE)
    bad = idx.clone()
    bad[2] = T + 5
    gather_tokens([x, y], bad, dim=dim, out=[o1, o2], validate=False, backend=backend)
    keep = torch.ones(S, dtype=torch.bool, device=DEVICE)
    keep[2] = False
    for o in (o1, o2):
        om = o.movedim(dim, 0)
        assert torch.equal(om[keep], x.movedim(dim, 0)[bad[keep]])
        row = om[2]
        assert (row.isnan().all() if x.dtype.is_floating_point else (row == -7).all())


@pytest.mark.parametrize("backend", ROW_BACKENDS)
@pytest.mark.parametrize("src_dtype", [torch.bfloat16, torch.float32])
def test_scatter_tokens(backend, src_dtype):
    """HF's [H, T, D] layer caches, K and V in one call, into poisoned caches: the selected rows
    equal src rounded to bf16, every other row bit-identical."""
    H, T, D, S = 3, 45, 32, 11
    K = torch.full((H, T, D), float("nan"), dtype=torch.bfloat16, device=DEVICE)
    V = torch.full((H, T, D), float("nan"), dtype=torch.bfloat16, device=DEVICE)
    idx = torch.randperm(T, device=DEVICE)[:S]
    ks = torch.randn(H, S, D, device=DEVICE).to(src_dtype)
    vs = torch.randn(H, S, D, device=DEVICE).to(src_dtype)
    _skip_rows(backend, "scatter_tokens", [ks.transpose(0, 1)], [K.transpose(0, 1)])
    scatter_tokens([K, V], idx, [ks, vs], dim=1, backend=backend)
    other = torch.ones(T, dtype=torch.bool, device=DEVICE)
    other[idx] = False
    for c, s in ((K, ks), (V, vs)):
        got, want = c[:, idx], s.to(torch.bfloat16)
        if src_dtype == torch.bfloat16 or DEVICE == "cuda" or backend == "torch":
            assert torch.equal(got, want)
        else:  # the interpreter truncates float32 -> bf16 (tests/tolerances.py)
            assert (got.float() - want.float()).abs().max().item() <= OUT_ULP[torch.bfloat16] * want.float().abs().max().item()
        assert c[:, other].isnan().all()
    # [T, hidden] rows, an out-of-range index skipped (validate=False): nothing written for it
    C = torch.zeros(T, 24, device=DEVICE)
    src = torch.randn(3, 24, device=DEVICE)
    scatter_tokens(C, torch.tensor([4, T + 1, 0], device=DEVICE), src, validate=False, backend=backend)
    assert torch.equal(C[4], src[0]) and torch.equal(C[0], src[2])
    assert (C[1:4] == 0).all() and (C[5:] == 0).all()


@GPU
@pytest.mark.parametrize("T,H,D", [(32768, 8, 128), (4099, 3, 64)])
def test_scatter_gather_tokens_large_gpu(T, H, D):
    """The bench's shapes (15% of a long cache) on the GPU, Triton vs the reference, bit-exact."""
    S = int(0.15 * T)
    idx = torch.randperm(T, device="cuda")[:S].sort().values
    K = torch.randn(H, T, D, device="cuda", dtype=torch.bfloat16)
    V = torch.randn_like(K)
    ks, vs = torch.randn(H, S, D, device="cuda"), torch.randn(H, S, D, device="cuda")
    K2, V2 = K.clone(), V.clone()
    scatter_tokens([K, V], idx, [ks, vs], dim=1, backend="triton")
    scatter_tokens([K2, V2], idx, [ks, vs], dim=1, backend="torch")
    assert torch.equal(K, K2) and torch.equal(V, V2)
    hs = torch.randn(T, 4096, device="cuda", dtype=torch.bfloat16)
    pos = torch.arange(T, device="cuda") * 3
    g = gather_tokens([hs, pos], idx, backend="triton")
    assert torch.equal(g[0], hs[idx]) and torch.equal(g[1], pos[idx])


def test_gather_scatter_opcheck_and_bad_input():
    x = torch.randn(10, 2, 8)
    idx = torch.tensor([7, 1, 4])
    torch.library.opcheck(gather_tokens_op, ([x], idx, [torch.empty(3, 2, 8)], "torch"))
    torch.library.opcheck(scatter_tokens_op, ([x.clone()], idx, [torch.randn(3, 2, 8)], "torch"))
    c = torch.zeros(10, 2, 8)
    with pytest.raises(ValueError, match="index"):
        scatter_tokens(c, torch.tensor([1, 1, 2]), torch.randn(3, 2, 8))
    with pytest.raises(ValueError, match="index"):
        scatter_tokens(c, torch.tensor([1, 10, 2]), torch.randn(3, 2, 8))
    with pytest.raises(ValueError, match="index"):
        gather_tokens(x, torch.tensor([-1]))
    with pytest.raises(TypeError, match="index"):
        gather_tokens(x, idx.float())
    with pytest.raises(ValueError, match="src"):
        scatter_tokens(c, idx, torch.randn(3, 2, 7))
    with pytest.raises(ValueError, match="src"):
        scatter_tokens([c, c.clone()], idx, [torch.randn(3, 2, 8)])
    with pytest.raises(TypeError, match="src"):
        scatter_tokens(c, idx, torch.ones(3, 2, 8, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"x\[1\]"):
        gather_tokens([x, torch.randn(9, 2, 8)], idx)
    with pytest.raises(ValueError, match="dense"):
        gather_tokens(torch.randn(10, 8, 2).transpose(1, 2), idx)
    with pytest.raises(ValueError, match="viewed"):
        gather_tokens(torch.randn(10, 4, 3, 8).transpose(1, 2), idx)
    with pytest.raises(ValueError, match="out"):
        gather_tokens(x, idx, out=torch.empty(4, 2, 8))
    with pytest.raises(ValueError, match="dim"):
        gather_tokens(x, idx, dim=3)
    assert torch.equal(c, torch.zeros(10, 2, 8))

"""rerotate_keys / select_tokens: every backend vs a float64 ground truth and the torch reference,
rotation composition against HF's RoPE, opcheck, bad input."""
import math
import os

import pytest
import torch

import kvkernels
from kvkernels import dispatch
from kvkernels.blend import cos_sin_cache_from_inv_freq, rerotate_keys, select_tokens
from kvkernels.blend.ops import rerotate_keys_op, select_tokens_op
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

"""Entropy coders (kvkernels/codec/coders.py): ac (torchac-exact) and interleaved rANS.

Round trips on every coder and odd shapes; the pure-Python spec == the C++ CPU coder == the GPU
kernels, byte for byte; torchac identity (test-only oracle, skipped if it cannot import); bad
arguments; a seeded mutation loop over payloads in a subprocess (never a crash); the fused
decode against the float32 map."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from kvkernels.codec import coders
from kvkernels.codec.coders import (CoderError, ac_decode, ac_decode_op, ac_encode, ac_encode_op, rans_decode,
                                    rans_decode_dequant, rans_decode_dequant_op, rans_decode_op, rans_encode,
                                    rans_encode_op)
from kvkernels.reference import codec as R

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAS_CPU = R.cpu_coder_available()
GPU = torch.cuda.is_available()
needs_cpu = pytest.mark.skipif(not HAS_CPU, reason="kvkernels._codec_cpu is not built (scripts/build_codec_cpu.sh)")
needs_gpu = pytest.mark.skipif(not GPU, reason="needs a CUDA GPU")


sys.path.insert(0, os.path.join(ROOT, "fuzz"))
from mutate_codec import cdf_of, random_symbols, random_tables  # noqa: E402  (shared with the fuzzers)


def _case(seed, S, N, C, bins=16, pb=12, K=4, skew=0.5, padded=0):
    rng = np.random.default_rng(seed)
    f = random_tables(rng, K, bins, pb, skew)
    tid = rng.integers(0, K, (S, C))
    sym = random_symbols(rng, f, tid, N)
    f = np.concatenate([f, np.zeros((K, padded), np.int64)], 1)  # bank rows wider than the table
    return (torch.tensor(sym), torch.tensor(f, dtype=torch.int32), torch.tensor(cdf_of(f, pb), dtype=torch.int32),
            torch.tensor(tid, dtype=torch.int32), pb)


@pytest.fixture
def pure(monkeypatch):
    monkeypatch.setenv("KVK_CODEC_PURE", "1")


SMALL = [(1, 1, 1), (1, 1, 33), (2, 5, 32), (3, 17, 45), (1, 70, 7)]


# ---- the spec itself ---------------------------------------------------------------------------
@pytest.mark.parametrize("S,N,C", SMALL)
def test_spec_roundtrip(pure, S, N, C):
    sym, freq, cdf, tid, pb = _case(S * 100 + N + C, S, N, C)
    pl, off = ac_encode(sym, cdf, tid)
    assert off.shape == (S * C + 1,) and off[-1] == pl.numel()
    assert torch.equal(ac_decode(pl, off, cdf, tid, N), sym)
    pl, off = rans_encode(sym, freq, tid, pb)
    assert off.shape == (S * R.n_groups(C) + 1,) and off[-1] == pl.numel()
    assert torch.equal(rans_decode(pl, off, freq, tid, N, pb), sym)


def test_spec_rans_layout(pure):
    """Block bytes: n_act states, then words; the decoder ends at L = 2^16 in every lane."""
    sym, freq, cdf, tid, pb = _case(7, 1, 9, 5)
    pl, off = rans_encode(sym, freq, tid, pb)
    raw = pl.numpy().tobytes()
    states = np.frombuffer(raw[:20], "<u4")
    assert np.all(states >= R.RANS_L) and (len(raw) - 20) % 2 == 0


# ---- torchac oracle ----------------------------------------------------------------------------
def _torchac():
    try:
        import torchac  # test-only oracle (GPL): never imported by the package
        return torchac
    except Exception as e:  # noqa: BLE001  (JIT build may fail)
        pytest.skip(f"torchac cannot import: {e}")


@pytest.mark.parametrize("seed", range(6))
def test_ac_matches_torchac(seed):
    torchac = _torchac()
    bins = [2, 5, 16, 32, 100, 256][seed]
    sym, freq, cdf, tid, pb = _case(seed, 2, [1, 7, 256, 300, 64, 40][seed], 3, bins=bins, skew=[1, .2, .5, .3, 2, .5][seed])
    pl, off = ac_encode(sym, cdf, tid)
    S, N, C = sym.shape
    for s in range(S):
        for c in range(C):
            row = cdf[tid[s, c]].clone()
            row16 = torch.where(row > 32767, row - 65536, row).to(torch.int16)
            want = torchac.encode_int16_normalized_cdf(row16.unsqueeze(0).repeat(N, 1), sym[s, :, c].to(torch.int16))
            i = s * C + c
            assert pl[off[i]:off[i + 1]].numpy().tobytes() == want, (s, c)
            back = torchac.decode_int16_normalized_cdf(row16.unsqueeze(0).repeat(N, 1), want)
            assert torch.equal(back.to(torch.uint8), sym[s, :, c])


# ---- C++ CPU coder == spec -----------------------------------------------------------------------
@needs_cpu
@pytest.mark.parametrize("S,N,C,bins,padded", [(1, 1, 1, 2, 0), (2, 33, 45, 16, 0), (3, 64, 32, 32, 16),
                                               (1, 200, 70, 5, 0), (2, 3, 64, 256, 0)])
def test_cpu_equals_spec(monkeypatch, S, N, C, bins, padded):
    sym, freq, cdf, tid, pb = _case(S + N + C, S, N, C, bins=bins, pb=12 if bins > 8 else 8, padded=padded)
    monkeypatch.setenv("KVK_CODEC_PURE", "1")
    want_ac, want_rans = ac_encode(sym, cdf, tid), rans_encode(sym, freq, tid, pb)
    monkeypatch.setenv("KVK_CODEC_PURE", "0")
    got_ac, got_rans = ac_encode(sym, cdf, tid), rans_encode(sym, freq, tid, pb)
    for w, g in ((want_ac, got_ac), (want_rans, got_rans)):
        assert torch.equal(w[0], g[0]) and torch.equal(w[1], g[1])
    assert torch.equal(ac_decode(*got_ac, cdf, tid, N), sym)
    assert torch.equal(rans_decode(*got_rans, freq, tid, N, pb), sym)


@needs_cpu
@pytest.mark.parametrize("S,N,C", [(64, 1, 96), (2, 1000, 1), (5, 257, 129), (1, 4096, 32)])
def test_cpu_roundtrip_shapes(S, N, C):
    """Many segments, one token, one channel, tokens not a multiple of any block, C % 32 != 0."""
    sym, freq, cdf, tid, pb = _case(S * N + C, S, N, C, bins=32)
    assert torch.equal(ac_decode(*ac_encode(sym, cdf, tid), cdf, tid, N), sym)
    assert torch.equal(rans_decode(*rans_encode(sym, freq, tid, pb), freq, tid, N, pb), sym)


@needs_cpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("aux", ["all", "none", "tok"])
def test_rans_decode_dequant_cpu(dtype, aux):
    S, N, C = 3, 41, 70
    sym, freq, cdf, tid, pb = _case(11, S, N, C, bins=16)
    pl, off = rans_encode(sym, freq, tid, pb)
    lut = torch.randn(freq.shape) * 3
    s_tok = torch.rand(S, N) * 2 if aux != "none" else None
    s_ch = torch.rand(S, C) if aux == "all" else None
    z_ch = torch.randn(S, C) if aux == "all" else None
    want = R.dequant_spec(sym, tid, lut, s_tok, s_ch, z_ch).to(dtype)
    got = rans_decode_dequant(pl, off, freq, tid, N, pb, lut, s_tok, s_ch, z_ch, dtype=dtype)
    assert torch.equal(got, want)
    # strided output ([S, N, C] view of a wider buffer), poisoned: only the view changes
    big = torch.full((S, N + 3, C + 5), float("nan"), dtype=dtype)
    view = big[:, 1:N + 1, 2:C + 2]
    rans_decode_dequant(pl, off, freq, tid, N, pb, lut, s_tok, s_ch, z_ch, out=view)
    assert torch.equal(view, want)
    mask = torch.ones_like(big, dtype=torch.bool)
    mask[:, 1:N + 1, 2:C + 2] = False
    assert torch.isnan(big[mask].float()).all()


def test_rans_decode_dequant_pure(pure):
    S, N, C = 2, 9, 40
    sym, freq, cdf, tid, pb = _case(3, S, N, C)
    pl, off = rans_encode(sym, freq, tid, pb)
    lut = torch.randn(freq.shape)
    got = rans_decode_dequant(pl, off, freq, tid, N, pb, lut, None, torch.rand(S, C), None, dtype=torch.float32)
    assert got.shape == (S, N, C)


def _per_segment_want(sym, lut_s, s_tok, s_ch, z_ch, dtype):
    S, N, C = sym.shape
    tid = torch.arange(S * C, dtype=torch.int32).reshape(S, C)
    return R.dequant_spec(sym, tid, lut_s.repeat_interleave(C, 0), s_tok, s_ch, z_ch).to(dtype)


@pytest.mark.parametrize("impl", ["pure", "cpu"])
def test_rans_decode_dequant_lut_per_segment(monkeypatch, impl):
    if impl == "cpu" and not HAS_CPU:
        pytest.skip("kvkernels._codec_cpu is not built")
    monkeypatch.setenv("KVK_CODEC_PURE", "1" if impl == "pure" else "0")
    S, N, C = 3, 17, 64
    sym, freq, cdf, tid, pb = _case(12, S, N, C, bins=16)
    pl, off = rans_encode(sym, freq, tid, pb)
    lut_s, s_tok, s_ch, z_ch = torch.randn(S, 16), torch.rand(S, N), torch.rand(S, C), torch.randn(S, C)
    got = rans_decode_dequant(pl, off, freq, tid, N, pb, lut_s, s_tok, s_ch, z_ch, lut_per_segment=True)
    assert torch.equal(got, _per_segment_want(sym, lut_s, s_tok, s_ch, z_ch, torch.bfloat16))
    with pytest.raises(ValueError, match="lut"):
        rans_decode_dequant(pl, off, freq, tid, N, pb, lut_s[:2], lut_per_segment=True)
    # a corrupt block: its channels are zeros, the other blocks still decode
    bad = pl.clone()
    bad[int(off[1]) + 3] ^= 0x40  # block 1 = segment 0, channels 32..63
    st = torch.zeros(1, dtype=torch.int32)
    got = rans_decode_dequant(bad, off, freq, tid, N, pb, lut_s, s_tok, s_ch, z_ch, lut_per_segment=True, status=st)
    if int(st):
        assert bool((got[0, :, 32:] == 0).all())
        assert torch.equal(got[1:], _per_segment_want(sym, lut_s, s_tok, s_ch, z_ch, torch.bfloat16)[1:])


# ---- ops / bad input -----------------------------------------------------------------------------
def test_ops_direct_and_opcheck():
    S, N, C = 2, 6, 35
    sym, freq, cdf, tid, pb = _case(5, S, N, C)
    out = torch.empty(S * C * R.ac_stream_capacity(N), dtype=torch.uint8)
    off = torch.empty(S * C + 1, dtype=torch.int64)
    st = torch.zeros(1, dtype=torch.int32)
    ac_encode_op(sym, cdf, tid, out, off, st, None)
    assert int(st) == 0
    dec = torch.empty_like(sym)
    ac_decode_op(out[:int(off[-1])], off, cdf, tid, dec, st, None)
    assert torch.equal(dec, sym)
    G = R.n_groups(C)
    out = torch.empty(S * R.rans_block_capacity(N, C), dtype=torch.uint8)
    off = torch.empty(S * G + 1, dtype=torch.int64)
    rans_encode_op(sym, freq, tid, pb, out, off, st, None)
    rans_decode_op(out[:int(off[-1])], off, freq, tid, pb, dec, st, None)
    assert torch.equal(dec, sym) and int(st) == 0
    y = torch.empty(S, N, C)
    rans_decode_dequant_op(out[:int(off[-1])], off, freq, tid, pb, torch.ones(freq.shape), None, None, None, y, st,
                           None)
    assert int(st) == 0 and torch.equal(y, torch.ones(S, N, C))
    pl = out[:int(off[-1])].clone()
    torch.library.opcheck(rans_decode_op, (pl, off, freq, tid, pb, torch.empty_like(sym),
                                           torch.zeros(1, dtype=torch.int32), None),
                          test_utils=("test_schema", "test_faketensor"))


def test_triton_refuses():
    sym, freq, cdf, tid, pb = _case(1, 1, 4, 8)
    with pytest.raises(Exception, match="sequential per lane"):
        rans_encode(sym, freq, tid, pb, backend="triton")


def test_bad_arguments():
    sym, freq, cdf, tid, pb = _case(2, 2, 8, 40)
    with pytest.raises(TypeError, match="symbols"):
        rans_encode(sym.to(torch.int32), freq, tid, pb)
    with pytest.raises(ValueError, match="table_id"):
        rans_encode(sym, freq, tid[:, :3], pb)
    with pytest.raises(ValueError, match="prob_bits"):
        rans_encode(sym, freq, tid, 13)
    with pytest.raises(TypeError, match="cdf"):
        ac_encode(sym, cdf.to(torch.int64), tid)
    pl, off = rans_encode(sym, freq, tid, pb)
    with pytest.raises(ValueError, match="offsets"):
        rans_decode(pl, off[:-1], freq, tid, 8, pb)
    with pytest.raises(ValueError, match="N"):
        rans_decode(pl, off, freq, tid, 0, pb)
    with pytest.raises(ValueError, match="lut"):
        rans_decode_dequant(pl, off, freq, tid, 8, pb, torch.ones(3, 3))
    with pytest.raises(ValueError, match="out"):
        rans_decode_dequant(pl, off, freq, tid, 8, pb, torch.ones(freq.shape),
                            out=torch.empty(2, 8, 80)[:, :, ::2])


@pytest.mark.parametrize("impl", ["pure", "cpu"])
def test_corrupt_inputs_raise(monkeypatch, impl):
    if impl == "cpu" and not HAS_CPU:
        pytest.skip("kvkernels._codec_cpu is not built")
    monkeypatch.setenv("KVK_CODEC_PURE", "1" if impl == "pure" else "0")
    sym, freq, cdf, tid, pb = _case(4, 2, 20, 40)
    pl, off = rans_encode(sym, freq, tid, pb)
    with pytest.raises(CoderError, match="truncated|offsets"):
        rans_decode(pl[:-2], off, freq, tid, 20, pb)
    bad = off.clone(); bad[1] = 10**12
    with pytest.raises(CoderError, match="offsets"):
        rans_decode(pl, bad, freq, tid, 20, pb)
    f2 = freq.clone(); f2[0, 0] += 1
    with pytest.raises(CoderError, match="table"):
        rans_decode(pl, off, f2, tid, 20, pb)
    t2 = tid.clone(); t2[0, 0] = 99
    with pytest.raises(CoderError, match="table_id"):
        rans_decode(pl, off, freq, t2, 20, pb)
    flipped = pl.clone(); flipped[30] ^= 0x10
    with pytest.raises(CoderError):
        rans_decode(flipped, off, freq, tid, 20, pb)
    st = torch.zeros(1, dtype=torch.int32)
    rans_decode(flipped, off, freq, tid, 20, pb, status=st)  # no raise, status reported
    assert int(st) != 0
    with pytest.raises(CoderError, match="zero probability|outside"):
        f3 = freq.clone(); f3[:, 1] = 0; f3[:, 0] += freq[:, 1]
        s3 = sym.clone(); s3[0, 0, 0] = 1; t3 = tid.clone()
        rans_encode(s3, f3, t3, pb)
    apl, aoff = ac_encode(sym, cdf, tid)
    bad = aoff.clone(); bad[-1] = -5
    with pytest.raises(CoderError, match="offsets"):
        ac_decode(apl, bad, cdf, tid, 20)
    c2 = cdf.clone(); c2[0, 2] = c2[0, 1] - 1
    with pytest.raises(CoderError, match="table"):
        ac_decode(apl, aoff, c2, tid, 20)


def test_mutation_loop_subprocess():
    """Seeded mutation loop (fuzz/mutate_codec.py) in a subprocess: never a crash or hang."""
    r = subprocess.run([sys.executable, os.path.join(ROOT, "fuzz", "mutate_codec.py"), "--iters", "150",
                        "--seed", "3"], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "mutation loop:" in r.stdout


@needs_cpu
def test_pure_and_cpu_agree_on_corruption(monkeypatch):
    """Mutated rANS payloads: the spec and the C++ coder agree on failing or not, and on the symbols."""
    rng = np.random.default_rng(9)
    for it in range(25):
        sym, freq, cdf, tid, pb = _case(100 + it, 2, 12, 40)
        pl, off = rans_encode(sym, freq, tid, pb)
        pl = pl.clone()
        for _ in range(int(rng.integers(1, 4))):
            pl[int(rng.integers(0, pl.numel()))] ^= 1 << int(rng.integers(0, 8))
        res = []
        for pure_ in ("1", "0"):
            monkeypatch.setenv("KVK_CODEC_PURE", pure_)
            st = torch.zeros(1, dtype=torch.int32)
            res.append((rans_decode(pl, off, freq, tid, 12, pb, status=st), int(st)))
        assert (res[0][1] == 0) == (res[1][1] == 0)
        if res[0][1] == 0:
            assert torch.equal(res[0][0], res[1][0])


# ---- GPU == CPU ------------------------------------------------------------------------------------
@needs_gpu
@pytest.mark.parametrize("S,N,C,bins", [(1, 1, 1, 2), (3, 257, 45, 16), (64, 256, 1024, 32), (2, 1000, 33, 256),
                                        (4, 31, 96, 5)])
def test_gpu_bytes_equal_cpu(S, N, C, bins):
    sym, freq, cdf, tid, pb = _case(S + N + C, S, N, C, bins=bins, pb=12 if bins > 8 else 8)
    cpu_ac, cpu_rans = ac_encode(sym, cdf, tid), rans_encode(sym, freq, tid, pb)
    g = [t.cuda() for t in (sym, freq, cdf, tid)]
    gpu_ac = ac_encode(g[0], g[2], g[3], backend="cuda")
    gpu_rans = rans_encode(g[0], g[1], g[3], pb, backend="cuda")
    for c_, g_ in ((cpu_ac, gpu_ac), (cpu_rans, gpu_rans)):
        assert torch.equal(c_[0], g_[0].cpu()) and torch.equal(c_[1], g_[1].cpu())
    assert torch.equal(ac_decode(*gpu_ac, g[2], g[3], N, backend="cuda").cpu(), sym)
    assert torch.equal(rans_decode(*gpu_rans, g[1], g[3], N, pb, backend="cuda").cpu(), sym)


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gpu_decode_dequant_equals_cpu(dtype):
    S, N, C = 6, 300, 200
    sym, freq, cdf, tid, pb = _case(21, S, N, C, bins=32)
    pl, off = rans_encode(sym, freq, tid, pb)
    lut, s_tok, s_ch, z_ch = torch.randn(freq.shape), torch.rand(S, N), torch.rand(S, C), torch.randn(S, C)
    want = rans_decode_dequant(pl, off, freq, tid, N, pb, lut, s_tok, s_ch, z_ch, dtype=dtype)
    big = torch.full((S, N + 2, C + 8), float("nan"), dtype=dtype, device="cuda")
    view = big[:, 1:N + 1, 4:C + 4]
    args = [t.cuda() for t in (pl, off, freq, tid)]
    rans_decode_dequant(*args[:4], N, pb, lut.cuda(), s_tok.cuda(), s_ch.cuda(), z_ch.cuda(), out=view,
                        backend="cuda")
    assert torch.equal(view.cpu(), want)
    mask = torch.ones(big.shape, dtype=torch.bool)
    mask[:, 1:N + 1, 4:C + 4] = False
    assert torch.isnan(big.cpu()[mask].float()).all()


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("per_segment", [False, True])
@pytest.mark.parametrize("C,aligned", [(256, True), (256, False), (96, True), (70, True)])
def test_gpu_decode_dequant_tiles(dtype, per_segment, C, aligned):
    """The 16-byte tile stores (C % 32 == 0, aligned rows) and the per-lane fallback, both level
    modes, N not a multiple of the tile, a poisoned strided output, a corrupt block (zeros)."""
    S, N = 5, 77
    sym, freq, cdf, tid, pb = _case(C + N, S, N, C, bins=24)
    pl, off = rans_encode(sym, freq, tid, pb)
    lut = torch.randn(S, 24) if per_segment else torch.randn(freq.shape)
    s_tok, s_ch, z_ch = torch.rand(S, N), torch.rand(S, C), torch.randn(S, C)
    bad = pl.clone()
    bad[int(off[1]) + 5] ^= 0x21
    for payload in (pl, bad):
        st_c = torch.zeros(1, dtype=torch.int32)
        want = rans_decode_dequant(payload, off, freq, tid, N, pb, lut, s_tok, s_ch, z_ch, dtype=dtype,
                                   lut_per_segment=per_segment, status=st_c)
        pad = 0 if aligned else 1
        big = torch.full((S, N + 2, C + 16), float("nan"), dtype=dtype, device="cuda")
        view = big[:, 1:N + 1, 8 + pad:C + 8 + pad]
        st_g = torch.zeros(1, dtype=torch.int32, device="cuda")
        g = [t.cuda() for t in (payload, off, freq, tid, lut, s_tok, s_ch, z_ch)]
        rans_decode_dequant(*g[:4], N, pb, *g[4:], out=view, lut_per_segment=per_segment, status=st_g,
                            backend="cuda")
        assert (int(st_c) == 0) == (int(st_g) == 0)
        assert torch.equal(view.cpu().contiguous().view(torch.int16 if dtype != torch.float32 else torch.int32),
                           want.contiguous().view(torch.int16 if dtype != torch.float32 else torch.int32))
        mask = torch.ones(big.shape, dtype=torch.bool)
        mask[:, 1:N + 1, 8 + pad:C + 8 + pad] = False
        assert torch.isnan(big.cpu()[mask].float()).all()


@needs_gpu
@pytest.mark.parametrize("bins", [33, 100, 256])
@pytest.mark.parametrize("per_segment", [False, True])
def test_gpu_decode_dequant_wide_tables(bins, per_segment):
    """Tables of more than 32 symbols (the generic symbol search; 256 bins: one warp a block)."""
    S, N, C = 3, 45, 64
    sym, freq, cdf, tid, pb = _case(bins + 7, S, N, C, bins=bins)
    pl, off = rans_encode(sym, freq, tid, pb)
    lut = torch.randn(S, bins) if per_segment else torch.randn(freq.shape)
    s_tok, z_ch = torch.rand(S, N), torch.randn(S, C)
    want = rans_decode_dequant(pl, off, freq, tid, N, pb, lut, s_tok, None, z_ch, lut_per_segment=per_segment)
    g = [t.cuda() for t in (pl, off, freq, tid, lut, s_tok, z_ch)]
    got = rans_decode_dequant(*g[:4], N, pb, g[4], g[5], None, g[6], lut_per_segment=per_segment, backend="cuda")
    assert torch.equal(got.cpu().view(torch.int16), want.view(torch.int16))


@needs_gpu
def test_gpu_corrupt_inputs():
    sym, freq, cdf, tid, pb = _case(4, 2, 20, 40)
    pl, off = [t.cuda() for t in rans_encode(sym, freq, tid, pb)]
    f, t = freq.cuda(), tid.cuda()
    with pytest.raises(CoderError):
        rans_decode(pl[:-2], off, f, t, 20, pb, backend="cuda")
    bad = off.clone(); bad[1] = 10**12
    with pytest.raises(CoderError, match="offsets"):
        rans_decode(pl, bad, f, t, 20, pb, backend="cuda")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "fuzz", "mutate_codec.py"), "--iters", "150",
                        "--seed", "5", "--device", "cuda", "--backend", "cuda"],
                       capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr


def test_rans_decode_pages_dense_equivalent():
    """``rans_decode_pages`` into an SGLang-style token pool with identity slots writes exactly what
    ``rans_decode_dequant`` writes densely (the paged family's own tests: tests/test_codec_paged.py)."""
    from kvkernels import PagedLayout
    from kvkernels.codec.paged import rans_decode_pages
    S, N, H, D = 4, 19, 2, 32
    sym, freq, cdf, tid, pb = _case(31, S, N, H * D, bins=16)
    pl, off = rans_encode(sym, freq, tid, pb)
    lut, s_tok = torch.randn(freq.shape), torch.rand(S, N)
    want = rans_decode_dequant(pl, off, freq, tid, N, pb, lut, s_tok)     # [S, N, H*D], S = (kind, layer)
    ks = [torch.zeros(N, H, D, dtype=torch.bfloat16) for _ in range(2)]
    vs = [torch.zeros(N, H, D, dtype=torch.bfloat16) for _ in range(2)]
    lay = PagedLayout.sglang(ks, vs)
    segs = torch.tensor([[s, 0, N] for s in range(S)])
    rans_decode_pages(pl, off, freq, tid, N, pb, lut, lay, torch.arange(N), segs, s_tok)
    assert torch.equal(torch.stack(ks + vs).reshape(S, N, H * D), want)

"""The CPU coder's ISA-specific fast paths (csrc/codec_cpu.cpp: AVX-512 rANS block decode, chosen
at run time) against its generic path (``KVK_CODEC_CPU_ISA=generic``): the same symbols, the same
fused-decode values and the same status bits on valid and on corrupted input (truncated, bit
flips, offsets moved), over bin counts around the fast path's limits (8/16/24/32 padded bins,
> 32 falls back), zero-frequency bins, prob_bits 1..12, C not a multiple of 32, tiny N."""
import numpy as np
import pytest
import torch

from kvkernels.codec.coders import ac_decode, ac_encode, rans_decode, rans_decode_dequant, rans_encode
from kvkernels.reference import codec as R

pytestmark = pytest.mark.skipif(not R.cpu_coder_available(), reason="kvkernels._codec_cpu is not built")


def _has_avx512():
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return all(f in flags for f in ("avx512f", "avx512bw", "avx512vl", "avx512dq"))


def _case(rng, S, N, C, bins, pb, K=6, zero_frac=0.0):
    p = rng.dirichlet(np.ones(bins) * rng.choice([0.2, 0.7, 3.0]), size=K)
    if zero_frac:
        p = np.where(rng.random(p.shape) < zero_frac, 0.0, p)
        p[:, 0] += 1e-3
        p /= p.sum(1, keepdims=True)
    used = p > 0
    f = np.where(used, np.maximum(1, np.floor(p * ((1 << pb) - bins))), 0).astype(np.int64)
    f[np.arange(K), f.argmax(1)] += (1 << pb) - f.sum(1)
    tid = rng.integers(0, K, (S, C))
    if rng.random() < 0.5:  # chunks sharing the tables of their channels (the codec's layout)
        tid = np.broadcast_to(rng.integers(0, K, (1, C)), (S, C)).copy()
    sym = np.zeros((S, N, C), np.uint8)
    for s in range(S):
        for c in range(C):
            q = f[tid[s, c]] / f[tid[s, c]].sum()
            sym[s, :, c] = rng.choice(bins, N, p=q)
    return (torch.tensor(sym), torch.tensor(f, dtype=torch.int32), torch.tensor(tid, dtype=torch.int32))


def _both(monkeypatch, fn):
    out = []
    for isa in ("generic", "auto"):
        monkeypatch.setenv("KVK_CODEC_CPU_ISA", isa)
        st = torch.zeros(1, dtype=torch.int32)
        out.append((fn(st), int(st)))
    return out


CASES = [  # (S, N, C, bins, pb, zero_frac)
    (3, 40, 64, 16, 12, 0.0), (2, 256, 96, 32, 12, 0.0), (4, 33, 128, 24, 10, 0.3), (1, 1, 32, 2, 1, 0.0),
    (2, 7, 70, 8, 4, 0.0), (3, 300, 32, 33, 12, 0.0), (2, 64, 64, 5, 3, 0.5), (5, 17, 33, 31, 12, 0.2),
    (2, 500, 64, 12, 6, 0.0), (1, 129, 256, 64, 12, 0.9),
]


@pytest.mark.parametrize("i", range(len(CASES)))
def test_fast_equals_generic(monkeypatch, i):
    if not _has_avx512():
        pytest.skip("no AVX-512 on this CPU: only the generic path runs")
    S, N, C, bins, pb, zf = CASES[i]
    rng = np.random.default_rng(100 + i)
    sym, freq, tid = _case(rng, S, N, C, bins, pb, zero_frac=zf)
    pl, off = rans_encode(sym, freq, tid, pb)
    (a, sa), (b, sb) = _both(monkeypatch, lambda st: rans_decode(pl, off, freq, tid, N, pb, status=st))
    assert sa == sb == 0 and torch.equal(a, sym) and torch.equal(b, sym)
    lut = torch.randn(freq.shape)
    s_tok = torch.rand(S, N) + 0.5
    for dtype in (torch.bfloat16, torch.float32):
        (a, sa), (b, sb) = _both(monkeypatch, lambda st: rans_decode_dequant(pl, off, freq, tid, N, pb, lut, s_tok,
                                                                           dtype=dtype, status=st))
        assert sa == sb == 0 and torch.equal(a, b)
        assert torch.equal(a, R.dequant_spec(sym, tid, lut, s_tok, None, None).to(dtype))


@pytest.mark.parametrize("seed", range(4))
def test_fast_equals_generic_on_corruption(monkeypatch, seed):
    """Mutated payloads and offsets: identical status bits and identical output (zeros for the
    blocks that fail)."""
    if not _has_avx512():
        pytest.skip("no AVX-512 on this CPU: only the generic path runs")
    rng = np.random.default_rng(seed)
    for it in range(40):
        S, N, C = int(rng.integers(1, 4)), int(rng.integers(1, 90)), int(rng.choice([32, 64, 96, 40]))
        bins = int(rng.choice([2, 9, 16, 24, 32]))
        pb = int(rng.integers(max(1, int(np.ceil(np.log2(bins)))), 13))
        sym, freq, tid = _case(rng, S, N, C, bins, pb)
        pl, off = rans_encode(sym, freq, tid, pb)
        pl, off = pl.clone(), off.clone()
        op = it % 4
        if op == 0:
            pl = pl[:int(rng.integers(0, pl.numel()))].clone()
        elif op == 1:
            for _ in range(int(rng.integers(1, 6))):
                pl[int(rng.integers(0, pl.numel()))] ^= 1 << int(rng.integers(0, 8))
        elif op == 2:
            k = int(rng.integers(1, off.numel()))
            off[k] += int(rng.choice([-4, -2, -1, 1, 2, 64]))
        else:  # swap two blocks' bytes: valid headers, wrong streams
            pl = pl[torch.randperm(pl.numel(), generator=torch.Generator().manual_seed(it))[:pl.numel()]] \
                if rng.random() < 0.3 else pl
            pl[int(rng.integers(0, pl.numel()))] ^= 0x80
        (a, sa), (b, sb) = _both(monkeypatch, lambda st: rans_decode(pl, off, freq, tid, N, pb, status=st))
        assert sa == sb, (it, sa, sb)
        assert torch.equal(a, b), it
        lut = torch.randn(freq.shape)
        (a, sa), (b, sb) = _both(monkeypatch, lambda st: rans_decode_dequant(pl, off, freq, tid, N, pb, lut,
                                                                           dtype=torch.float32, status=st))
        assert sa == sb and torch.equal(a, b), it


@pytest.mark.parametrize("seed", range(3))
def test_ac_fast_equals_generic(monkeypatch, seed):
    """The ac decoder's count search (rows <= 64 bins) against ac_decode_stream's binary search, on
    valid and corrupted streams (bins 2..300: both sides of the 64-bin switch)."""
    rng = np.random.default_rng(50 + seed)
    for it in range(30):
        S, N, C = int(rng.integers(1, 3)), int(rng.integers(1, 120)), int(rng.integers(1, 40))
        bins = int(rng.choice([2, 3, 7, 8, 9, 16, 17, 31, 32, 33, 64, 65, 200]))
        pb = 12 if bins > 16 else int(rng.integers(max(1, int(np.ceil(np.log2(bins)))), 13))
        sym, freq, tid = _case(rng, S, N, C, bins, pb, zero_frac=0.3 if it % 3 == 0 else 0.0)
        cdf = torch.zeros(freq.shape[0], bins + 1, dtype=torch.int32)
        cdf[:, 1:] = (torch.cumsum(freq.long(), 1) << (16 - pb)).to(torch.int32)
        pl, off = ac_encode(sym, cdf, tid)
        if it % 2:
            pl = pl.clone()
            for _ in range(int(rng.integers(1, 5))):
                if pl.numel():
                    pl[int(rng.integers(0, pl.numel()))] ^= 1 << int(rng.integers(0, 8))
        (a, sa), (b, sb) = _both(monkeypatch, lambda st: ac_decode(pl, off, cdf, tid, N, status=st))
        assert sa == sb and torch.equal(a, b), (it, bins)
        if it % 2 == 0:
            assert sa == 0 and torch.equal(a, sym)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_dequant_fast_bits_special_values(monkeypatch, dtype):
    """The vectorised fused map (fp32 / bf16) against the scalar one bit for bit: NaN (with
    payloads), infinities, subnormals, bf16 rounding ties, overflow to infinity; strided output."""
    rng = np.random.default_rng(7)
    S, N, C, bins, pb = 2, 37, 96, 24, 12
    sym, freq, tid = _case(rng, S, N, C, bins, pb)
    pl, off = rans_encode(sym, freq, tid, pb)
    special = np.array([np.nan, -np.nan, np.inf, -np.inf, 1e-40, -1e-42, 3e38, 1.00390625, 1.01171875,
                        -2.00781250, 65520.0, 6e-8], np.float32)
    lut = rng.standard_normal(freq.shape).astype(np.float32) * 3
    lut.reshape(-1)[rng.integers(0, lut.size, 60)] = rng.choice(special, 60)
    lut.view(np.uint32).reshape(-1)[:5] = [0x7FC00001, 0xFF800123, 0x7F800001, 0x00000001, 0x80000003]
    lut = torch.tensor(lut)
    s_tok = torch.tensor(rng.choice([1.0, 0.5, 3.0, 1e30, 1e-30], (S, N)).astype(np.float32))
    s_ch = torch.rand(S, C) + 0.5
    z_ch = torch.randn(S, C)
    big = torch.zeros((S, N + 2, C + 4), dtype=dtype)
    view = big[:, 1:N + 1, 2:C + 2]
    res = []
    for isa in ("generic", "auto"):
        monkeypatch.setenv("KVK_CODEC_CPU_ISA", isa)
        for aux in ((s_tok, s_ch, z_ch), (s_tok, None, None), (None, None, None)):
            big.fill_(7)
            rans_decode_dequant(pl, off, freq, tid, N, pb, lut, *aux, out=view)
            res.append(big.view(torch.int16 if dtype != torch.float32 else torch.int32).clone())
    for a, b in zip(res[:3], res[3:]):
        assert torch.equal(a, b)

"""Seeded mutation loop over entropy-coder payloads (tests/test_codec.py runs it in a subprocess;
scripts/asan_codec.sh runs it against an AddressSanitizer build; on a GPU under compute-sanitizer).

Each iteration encodes random symbols with a random coder, mutates the payload / offsets /
tables / table_id (truncation, bit flips, byte runs, huge / negative / shuffled offsets, tables
that do not sum or are not monotone, table ids out of range) and decodes: the decoder must
return or raise ``CoderError`` (a ValueError) -- never crash, hang or touch memory outside its
buffers (ASan / compute-sanitizer check the last part). A decoder that returns must return the
right shape; an unmutated payload must round trip.

    python fuzz/mutate_codec.py [--iters 500] [--seed 0] [--device cpu|cuda] [--backend torch|cuda]
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from kvkernels.codec import coders  # noqa: E402


def random_tables(rng, K, bins, pb, skew=0.7):
    """freq int64 ``[K, bins]`` summing to 2**pb, every symbol >= 1 (Dirichlet(skew) shapes)."""
    p = rng.dirichlet(np.ones(bins) * skew, size=K)
    f = np.maximum(1, np.floor(p * ((1 << pb) - bins))).astype(np.int64)
    f[:, 0] += (1 << pb) - f.sum(1)
    return f


def random_symbols(rng, f, tid, N):
    """uint8 ``[S, N, C]``: channel (s, c) drawn from its row ``f[tid[s, c]]``."""
    S, C = tid.shape
    sym = np.zeros((S, N, C), np.uint8)
    for s in range(S):
        for c in range(C):
            sym[s, :, c] = rng.choice(f.shape[1], N, p=f[tid[s, c]] / f[tid[s, c]].sum())
    return sym


def cdf_of(f, pb):
    """torchac-style int CDF rows ``[K, bins + 1]`` of ``f`` (16-bit scale)."""
    cdf = np.zeros((f.shape[0], f.shape[1] + 1), np.int64)
    cdf[:, 1:] = np.cumsum(f, 1) << (16 - pb)
    return cdf


def random_case(rng, device):
    S = int(rng.integers(1, 4))
    N = int(rng.integers(1, 80))
    C = int(rng.integers(1, 70))
    bins = int(rng.integers(2, 33))
    pb = int(rng.integers(max(1, int(np.ceil(np.log2(bins)))), 13))
    K = int(rng.integers(1, 5))
    f = random_tables(rng, K, bins, pb)
    tid = rng.integers(0, K, (S, C))
    sym = random_symbols(rng, f, tid, N)
    t = lambda a, dt: torch.tensor(a, dtype=dt, device=device)  # noqa: E731
    return (t(sym, torch.uint8), t(f, torch.int32), t(cdf_of(f, pb), torch.int32), t(tid, torch.int32), pb, N)


def mutate(rng, payload, offsets, table, tid, kind):
    payload, offsets, table, tid = payload.clone(), offsets.clone(), table.clone(), tid.clone()
    B = payload.numel()
    op = int(rng.integers(0, 10))
    if op == 0 and B:      # truncate
        cut = int(rng.integers(0, B))
        payload = payload[:cut].clone()
    elif op == 1 and B:    # bit flips
        for _ in range(int(rng.integers(1, 9))):
            i = int(rng.integers(0, B))
            payload[i] ^= 1 << int(rng.integers(0, 8))
    elif op == 2 and B:    # a run of random bytes
        i = int(rng.integers(0, B))
        n = min(B - i, int(rng.integers(1, 64)))
        payload[i:i + n] = torch.tensor(rng.integers(0, 256, n), dtype=torch.uint8, device=payload.device)
    elif op == 3:          # huge / negative offsets
        i = int(rng.integers(0, offsets.numel()))
        offsets[i] = int(rng.choice([2**62, -2**62, -1, B + 1, 2**31, B * 1000 + 7]))
    elif op == 4 and offsets.numel() > 2:  # offsets swapped (not monotone)
        i = int(rng.integers(1, offsets.numel() - 1))
        offsets[i] = offsets[i + 1] + int(rng.integers(1, 5))
    elif op == 5:          # table row broken
        k = int(rng.integers(0, table.shape[0]))
        j = int(rng.integers(0, table.shape[1]))
        table[k, j] = int(rng.choice([-1, 0, 65537, 2**31 - 1, int(table[k, j]) + 1]))
    elif op == 6:          # table id out of range
        s, c = int(rng.integers(0, tid.shape[0])), int(rng.integers(0, tid.shape[1]))
        tid[s, c] = int(rng.choice([-1, table.shape[0], 2**31 - 1]))
    elif op == 7 and B:    # appended garbage
        extra = torch.tensor(rng.integers(0, 256, int(rng.integers(1, 100))), dtype=torch.uint8, device=payload.device)
        payload = torch.cat([payload, extra])
    elif op == 8 and B:    # everything zero / 0xFF
        payload.fill_(int(rng.choice([0, 255])))
    else:                  # all offsets scaled
        offsets = offsets * int(rng.integers(2, 5))
    return payload, offsets, table, tid, op


def decode_pages(rng, payload, offsets, freq, tid, N, pb, device, backend):
    """Decode into a small SGLang-style pool (one head of C channels, L = S layers, K only used)
    with random, sometimes malformed segment descriptors and slots (negative, out of range); the
    pool is guarded by poisoned margins that must stay untouched. Returns the pool's K values
    ``[S, slots, C]`` (or None when the call raised on its arguments: a descriptor is data, so
    only the status may complain)."""
    from kvkernels.codec import paged
    from kvkernels.layouts import PagedLayout

    S, C = tid.shape
    P = N + 8
    guard = 16
    mem = [torch.full((P + 2 * guard, 1, C), 7.0, device=device) for _ in range(2 * S)]
    ks = [m[guard:guard + P] for m in mem[:S]]
    vs = [m[guard:guard + P] for m in mem[S:]]
    lay = PagedLayout.sglang(ks, vs)
    segs = torch.tensor([[s, 0, N] for s in range(S)], dtype=torch.int64)
    if rng.random() < 0.3:  # a malformed descriptor
        i = int(rng.integers(0, S))
        segs[i, int(rng.integers(0, 3))] = int(rng.choice([-1, 2 * S, N + 1, P + 5, -(2**40), 2**40]))
    slots = torch.from_numpy(rng.permutation(P)).to(torch.int64)
    if rng.random() < 0.5:
        slots[int(rng.integers(0, P))] = int(rng.choice([-1, P, 2**40]))
    lut = torch.randn(freq.shape, device=device)
    st = torch.zeros(1, dtype=torch.int32, device=device)
    paged.rans_decode_pages(payload, offsets, freq, tid, N, pb, lut, lay, slots.to(device), segs.to(device),
                            status=st, backend=backend)
    for m in mem:  # never a write outside the pool
        assert bool((m[:guard] == 7.0).all()) and bool((m[guard + P:] == 7.0).all()), "write outside the caches"
    if int(st.item()):
        raise coders.CoderError(f"rans_decode_pages: status {int(st.item()):#x}")
    return torch.stack([k[:, 0] for k in ks])


def run(iters, seed, device, backend=None, verbose=False):
    rng = np.random.default_rng(seed)
    stats = {"ok": 0, "raised": 0, "clean_roundtrip": 0}
    for it in range(iters):
        sym, freq, cdf, tid, pb, N = random_case(rng, device)
        kind = ["ac", "rans", "rans_dq", "rans_pages"][it % 4]
        if kind == "ac":
            payload, offsets = coders.ac_encode(sym, cdf, tid, backend=backend)
            assert torch.equal(coders.ac_decode(payload, offsets, cdf, tid, N, backend=backend), sym)
            table = cdf
        else:
            payload, offsets = coders.rans_encode(sym, freq, tid, pb, backend=backend)
            assert torch.equal(coders.rans_decode(payload, offsets, freq, tid, N, pb, backend=backend), sym)
            table = freq
        stats["clean_roundtrip"] += 1
        p2, o2, t2, i2, op = mutate(rng, payload, offsets, table, tid, kind)
        try:
            if kind == "ac":
                out = coders.ac_decode(p2, o2, t2, i2, N, backend=backend)
            elif kind == "rans":
                out = coders.rans_decode(p2, o2, t2, i2, N, pb, backend=backend)
            elif kind == "rans_dq":
                per_seg = bool(it % 8 < 4)  # levels per table or per segment
                lut = torch.randn((i2.shape[0], t2.shape[1]) if per_seg else t2.shape, device=device)
                out = coders.rans_decode_dequant(p2, o2, t2, i2, N, pb, lut, lut_per_segment=per_seg,
                                                 backend=backend)
            else:
                out = decode_pages(rng, p2, o2, t2, i2, N, pb, device, backend)
                out = out[:, :N] if out is not None else sym
            assert tuple(out.shape) == tuple(sym.shape), (out.shape, sym.shape)
            stats["ok"] += 1
        except coders.CoderError as e:
            stats["raised"] += 1
            if verbose:
                print(it, kind, op, e)
    if device == "cuda":
        torch.cuda.synchronize()
    return stats


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--backend", default=None)
    ap.add_argument("-v", action="store_true")
    a = ap.parse_args(argv)
    stats = run(a.iters, a.seed, a.device, a.backend, a.v)
    print("mutation loop:", stats, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The CUDA decode-into-pages kernel (csrc/codec_dequant.cu) run on the host, without a GPU,
against the reference (kvkernels.reference.codec.rans_decode_pages_into).

The kernel is compiled by g++ with tests/test_paged_emu.py's CUDA shim plus warp collectives:
every warp of the grid runs as 32 host threads, ``__shfl_sync`` / ``__ballot_sync`` /
``__any_sync`` / ``__syncwarp`` are barriers over the 32 (every call site is warp-uniform, as
on the GPU), shared memory is a host buffer per block (the kernel's one inline-asm shared load
reads it), atomics are host atomics. The decode, the tile, the 16-byte stores, the slot loads
(int32 / int64) and the addressing are the real code; the Python side is the real CUDA backend
(kvkernels/cuda/codec_paged.py) with ``_C`` replaced. No substitute for the GPU run (no real
scheduling, conversions or alignment faults), but it checks every index without one.
"""
import ctypes
import hashlib
import pathlib
import re
import shutil

import pytest
import torch

from kvkernels.cuda import codec as ccodec
from kvkernels.cuda import codec_paged as ccp
from kvkernels.reference import codec as R

from test_codec_paged import (assert_no_slot_twice, coder_case, coder_segments, make_layout, raw, scales,
                              slots32, slots_for)
from test_paged_emu import SHIM as PAGED_SHIM, STUB, build_emu

ROOT = pathlib.Path(__file__).resolve().parents[1]

WARP = r'''
#define __align__(n) alignas(n)
#define __restrict__
extern thread_local unsigned char* emu_smem_base;
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
template <class K> cudaError_t cudaFuncSetAttribute(K, cudaFuncAttribute, int) { return cudaSuccess; }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int atomicOr(int* p, int v) { return __atomic_fetch_or(p, v, __ATOMIC_SEQ_CST); }
inline unsigned __cvta_generic_to_shared(const void* p) {
  return unsigned(static_cast<const unsigned char*>(p) - emu_smem_base);
}
inline unsigned emu_lds_u16(unsigned a) { uint16_t v; std::memcpy(&v, emu_smem_base + a, 2); return v; }
'''

HARNESS = r'''
#include "cuda_runtime.h"
thread_local uint3_ threadIdx, blockIdx;
dim3 blockDim, gridDim;
int emu_sms = 1;
thread_local EmuWarp* emu_w;
thread_local int emu_lane;
thread_local unsigned char* emu_smem_base;
template <class Kernel, class A>
void emu_launch(Kernel kernel, unsigned grid, unsigned block, size_t smem, const A& a) {
  gridDim = dim3(grid);
  blockDim = dim3(block);
  std::vector<unsigned char> buf(smem + 16, 0xCD);
  for (unsigned b = 0; b < grid; ++b)
    emu_run_block(b, dim3(block), [&] { emu_smem_base = buf.data(); kernel(a); });
}
#include "codec_dequant.cu"
extern "C" int emu_pages(int64_t payload, int64_t nbytes, int64_t offsets, int64_t cum, int64_t ok, int64_t K,
                         int bins, int64_t tid, int pb, int64_t S, int64_t N, int64_t C, int64_t lut, int lseg,
                         int64_t s_tok, int64_t s_ch, int64_t z_ch, int64_t segments, const int64_t* spec,
                         int64_t ptrs, int aligned16, const int64_t* sc, int64_t slots, int slots64, int64_t T,
                         int64_t status) {
  KvkPagedCaches c{};
  c.ptrs = reinterpret_cast<const int64_t*>(ptrs);
  c.num_layers = spec[0]; c.num_kv = spec[1]; c.num_blocks = spec[2]; c.block_size = spec[3];
  c.num_heads = spec[4]; c.head_dim = spec[5]; c.x = spec[6]; c.cache_dtype = int(spec[7]);
  for (int i = 0; i < 10; ++i) c.st[i / 5][i % 5] = spec[8 + i];
  c.aligned16 = aligned16;
  c.k_scale = reinterpret_cast<const float*>(sc[0]); c.ks_l = sc[1]; c.ks_h = sc[2];
  c.v_scale = reinterpret_cast<const float*>(sc[3]); c.vs_l = sc[4]; c.vs_h = sc[5];
  auto P = [](int64_t v) { return reinterpret_cast<void*>(v); };
  return kvk_rans_decode_pages((const uint8_t*)P(payload), nbytes, (const int64_t*)P(offsets),
                               (const uint16_t*)P(cum), (const uint8_t*)P(ok), K, bins, (const int32_t*)P(tid), pb,
                               S, N, C, (const float*)P(lut), lseg, (const float*)P(s_tok), (const float*)P(s_ch),
                               (const float*)P(z_ch), (const int64_t*)P(segments), &c, P(slots), slots64, T,
                               (int32_t*)P(status), nullptr);
}
'''


def _shim():
    return PAGED_SHIM + WARP


@pytest.fixture(scope="module")
def emu():
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    names = ("codec_dequant.cu", "codec_gpu.cuh", "codec_rans.cuh", "codec_common.cuh", "codec.h", "paged.h",
             "quant_math.cuh")
    srcs = {n: (ROOT / "csrc" / n).read_text() for n in names}
    asm = 'asm volatile("ld.shared.u16 %0, [%1];" : "=h"(v) : "r"(addr));'
    assert asm in srcs["codec_gpu.cuh"]
    srcs["codec_gpu.cuh"] = srcs["codec_gpu.cuh"].replace(asm, "v = (unsigned short)emu_lds_u16(addr);")
    sm = "extern __shared__ __align__(16) unsigned char smem[];"
    assert sm in srcs["codec_dequant.cu"]
    d = srcs["codec_dequant.cu"].replace(sm, "unsigned char* const smem = emu_smem_base;")
    d, n = re.subn(r"kern<<<(.*?), (warps \* 32), smem, stream>>>\(a\);", r"emu_launch(kern, \1, \2, smem, a);", d)
    assert n == 1
    srcs["codec_dequant.cu"] = d
    key = hashlib.sha1((_shim() + HARNESS + "".join(srcs.values())).encode()).hexdigest()[:16]
    inc = {"cuda_runtime.h": _shim(), **{h: STUB for h in ("cuda_bf16.h", "cuda_fp16.h", "cuda_fp8.h")}}
    lib = build_emu(cxx, f"kvk_codec_emu_{key}", {**srcs, "emu.cpp": HARNESS}, inc, [])
    so = ctypes.CDLL(str(lib))
    so.emu_pages.restype = ctypes.c_int
    return so


class _FakeExt:
    def __init__(self, so):
        self.so = so

    def codec_rans_decode_pages(self, payload, nbytes, offsets, cum, ok, K, bins, tid, pb, S, N, C, lut, lseg, s_tok,
                                s_ch, z_ch, segments, spec, ptrs, aligned16, sc, slots, slots64, T, status, device,
                                stream):
        i64 = ctypes.c_int64
        arr = lambda xs: (ctypes.c_int64 * len(xs))(*xs)  # noqa: E731
        err = self.so.emu_pages(i64(payload), i64(nbytes), i64(offsets), i64(cum), i64(ok), i64(K), int(bins),
                                i64(tid), int(pb), i64(S), i64(N), i64(C), i64(lut), int(bool(lseg)), i64(s_tok),
                                i64(s_ch), i64(z_ch), i64(segments), arr(spec), i64(ptrs), int(bool(aligned16)),
                                arr(sc), i64(slots), int(bool(slots64)), i64(T), i64(status))
        if err:
            raise RuntimeError(f"codec_rans_decode_pages: cudaError {err}")


def _prep(freq, prob_bits):
    """codec_rans_prep on the host: cum rows [K, bins + 1] (uint16 bits) and row validity."""
    f = freq.to(torch.int64)
    cum = torch.cat([torch.zeros(f.shape[0], 1, dtype=torch.int64), f.cumsum(1)], 1)
    ok = ((f >= 0).all(1) & (cum[:, -1] == 1 << prob_bits)).to(torch.uint8)
    return cum.to(torch.int32).to(torch.int16), ok


@pytest.fixture
def kern(emu, monkeypatch):
    monkeypatch.setattr(ccodec, "_ext", lambda: _FakeExt(emu))
    monkeypatch.setattr(ccodec, "_prep", _prep)
    monkeypatch.setattr(ccodec, "_dev", lambda t: (0, 0))
    return ccp.rans_decode_pages_into


def _run(impl, c, layout, slots, segs, per_segment, cs=None):
    st = torch.zeros(1, dtype=torch.int32)
    lut = c["lut_s"] if per_segment else c["lut"]
    impl(c["payload"], c["offsets"], c["freq"], c["table_id"], 12, c["N"], lut, per_segment, c["s_tok"], c["s_ch"],
         c["z_ch"], segs, layout, slots.contiguous(), cs, st)
    return int(st)


@pytest.mark.parametrize("per_segment", [False, True])
@pytest.mark.parametrize("kind,D", [("nhd", 64), ("legacy", 64), ("hnd", 40), ("sglang", 96)])
def test_emu_gpu_coder_case_equals_reference(kern, per_segment, kind, D):
    """tests/test_codec_paged.py::test_gpu_coder_level_equals_reference, on the host."""
    L, H, NB, BS, T = 2, 2, 8, 8, 50
    c = coder_case(S=7, N=13, C=H * D, bins=24)
    segs = coder_segments(c, L, T, "cpu")
    s32 = slots32(slots_for(T, NB, BS, "cpu"))
    assert_no_slot_twice(segs, s32, NB * BS)
    a, ta = make_layout(kind, L, NB, BS, H, D, torch.bfloat16, "cpu")
    b, tb = make_layout(kind, L, NB, BS, H, D, torch.bfloat16, "cpu")
    assert _run(kern, c, a, s32, segs, per_segment) == 0
    assert _run(R.rans_decode_pages_into, c, b, s32, segs, per_segment) == 0
    for x, y in zip(raw(ta), raw(tb)):
        assert torch.equal(x, y)


def test_emu_wrapped_int32_slots_differ_only_at_slot_0(kern):
    """The old test's ``slots.int()``: 1 << 40 wraps to slot 0, which token 8 also addresses
    (caches 0 and 3 get two writes of slot 0). The kernel keeps the later token's row (program
    order within a warp); the reference's index_put of duplicates may keep either: the caches
    differ at most in slot 0's rows, everything else is equal."""
    L, H, D, NB, BS, T = 2, 2, 64, 8, 8, 50
    c = coder_case(S=7, N=13, C=H * D, bins=24)
    segs = coder_segments(c, L, T, "cpu")
    slots = slots_for(T, NB, BS, "cpu")
    a, ta = make_layout("nhd", L, NB, BS, H, D, torch.bfloat16, "cpu")
    b, tb = make_layout("nhd", L, NB, BS, H, D, torch.bfloat16, "cpu")
    assert _run(kern, c, a, slots.int(), segs, False) == 0
    assert _run(R.rans_decode_pages_into, c, b, slots.int(), segs, False) == 0
    for x, y in zip(a.views(), b.views()):  # [NB, BS, H, D // x, x] per cache
        xx, yy = x.reshape(NB * BS, -1).view(torch.uint8), y.reshape(NB * BS, -1).view(torch.uint8)
        assert torch.equal(xx[1:], yy[1:])


@pytest.mark.parametrize("kind", ["nhd", "hnd", "kv_interleaved", "cross_layer"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float8_e4m3fn])
def test_emu_int64_and_int32_slots(kern, kind, dtype):
    """Partial tiles, unaligned segments, padding / out-of-range slots, both slot widths, fp8."""
    L, H, D, NB, BS, T = 2, 2, 32, 8, 8, 50
    c = coder_case(S=6, N=11, C=H * D, bins=20, seed=3)
    segs = coder_segments(c, L, T, "cpu")
    slots = slots_for(T, NB, BS, "cpu")
    for sl in (slots, slots32(slots)):
        a, ta = make_layout(kind, L, NB, BS, H, D, dtype, "cpu")
        b, tb = make_layout(kind, L, NB, BS, H, D, dtype, "cpu")
        cs = None
        if a.fp8:
            from kvkernels.paged import _check_scales
            ks, vs = scales(L, H, "cpu")
            cs = _check_scales(a, ks, vs)
        assert _run(kern, c, a, sl, segs, True, cs) == 0
        assert _run(R.rans_decode_pages_into, c, b, sl, segs, True, cs) == 0
        for x, y in zip(raw(ta), raw(tb)):
            assert torch.equal(x, y)

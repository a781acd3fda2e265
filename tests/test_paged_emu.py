"""The CUDA paged kernels (csrc/paged.cu, csrc/paged_gather_quant.cu) run on the host, without a
GPU, against the reference.

The kernels are compiled by g++ with ``KVK_PAGED_EMULATE`` and the small CUDA shim below (the
intrinsics they use, with the device's numerics: RNE conversions, e4m3 satfinite with NaN ->
0x7F, exact fp8 -> half, IEEE float ops without contraction); the launcher then runs every
block of the grid in turn, each warp of it as host threads (one per lane): ``__shfl_sync`` /
``__shfl_xor_sync`` / ``__ballot_sync`` / ``__any_sync`` / ``__syncwarp`` are barriers over the
warp's lanes (every call site is warp-uniform, as on the GPU), atomics are host atomics.
Addressing, chunking, packing, the grid-stride loop, the slot prefetch, the group shuffles and
the launch geometry are the real code. The Python side is the real CUDA backend
(kvkernels/cuda/paged.py) with its ``_C.paged_call`` replaced by the emulated one. This is no
substitute for the GPU suite (no real scheduling, alignment faults or cvt instructions), but it
checks every index without one. tests/test_codec_paged_emu.py builds on this shim.
"""
import ctypes
import hashlib
import os
import pathlib
import shutil
import subprocess
import tempfile

import pytest
import torch

import kvkernels
from kvkernels.cuda import paged as cpaged
from kvkernels.formats import QuantFormat
from kvkernels.reference import paged as pref

from test_paged import build, make_flat, make_slots, scales_for

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGED_SOURCES = ("paged.cu", "paged_gather_quant.cu", "paged_common.cuh", "paged.h", "quant_math.cuh")

SHIM = r'''
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>
#include <algorithm>
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#include <atomic>
#include <barrier>
#include <thread>
#include <vector>
typedef int cudaError_t;
typedef void* cudaStream_t;
enum { cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorNotSupported = 801 };
enum { cudaDevAttrMultiProcessorCount = 16 };
struct dim3 { unsigned x, y, z; dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {} };
struct uint3_ { unsigned x, y, z; };
extern thread_local uint3_ threadIdx, blockIdx;
extern dim3 blockDim, gridDim;
extern int emu_sms;
inline cudaError_t cudaGetDevice(int* d) { *d = 0; return cudaSuccess; }
inline cudaError_t cudaDeviceGetAttribute(int* v, int, int) { *v = emu_sms; return cudaSuccess; }
template <class K> cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* n, K, int, size_t) { *n = 1; return cudaSuccess; }
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
struct uint4 { unsigned x, y, z, w; };
struct uint2 { unsigned x, y; };
struct float2 { float x, y; };
struct float4 { float x, y, z, w; };
inline uint4 make_uint4(unsigned a, unsigned b, unsigned c, unsigned d) { return {a, b, c, d}; }
inline uint2 make_uint2(unsigned a, unsigned b) { return {a, b}; }
inline float2 make_float2(float a, float b) { return {a, b}; }
inline float4 make_float4(float a, float b, float c, float d) { return {a, b, c, d}; }
template <class T> inline T __ldg(const T* p) { return *p; }
template <class T> inline void __stwb(T* p, T v) { *p = v; }
inline unsigned __umulhi(unsigned a, unsigned b) { return unsigned((uint64_t(a) * b) >> 32); }
inline unsigned __byte_perm(unsigned x, unsigned y, unsigned s) {
  uint8_t b[8];
  for (int i = 0; i < 4; ++i) { b[i] = uint8_t(x >> (8 * i)); b[4 + i] = uint8_t(y >> (8 * i)); }
  unsigned r = 0;
  for (int i = 0; i < 4; ++i) r |= unsigned(b[(s >> (4 * i)) & 7]) << (8 * i);
  return r;
}
inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
inline float __int_as_float(int u) { float f; std::memcpy(&f, &u, 4); return f; }
inline float __fadd_rn(float a, float b) { volatile float r = a + b; return r; }
inline float __fsub_rn(float a, float b) { volatile float r = a - b; return r; }
inline float __fmul_rn(float a, float b) { volatile float r = a * b; return r; }
inline float __fdiv_rn(float a, float b) { volatile float r = a / b; return r; }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline float __fadd_rd(float a, float b) {  // round toward -inf (the sum is exact in double here)
  const double d = double(a) + double(b);
  float r = float(d);
  if (double(r) > d) r = std::nextafter(r, -INFINITY);
  return r;
}
inline int atomicAdd(int* p, int v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }
inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) {
  return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST);
}
// warp collectives: the lanes of a warp are host threads meeting at a barrier
struct EmuWarp {
  explicit EmuWarp(int n = 32) : bar(n) {}
  std::barrier<> bar;
  uint64_t v[32];
};
extern thread_local EmuWarp* emu_w;
extern thread_local int emu_lane;
template <class T> inline uint64_t emu_bits(T x) { uint64_t b = 0; std::memcpy(&b, &x, sizeof(T)); return b; }
template <class T> inline T emu_from(uint64_t b) { T x; std::memcpy(&x, &b, sizeof(T)); return x; }
template <class T> inline T __shfl_sync(unsigned, T x, int src) {
  emu_w->v[emu_lane] = emu_bits(x); emu_w->bar.arrive_and_wait();
  const uint64_t r = emu_w->v[src & 31]; emu_w->bar.arrive_and_wait(); return emu_from<T>(r);
}
template <class T> inline T __shfl_xor_sync(unsigned, T x, int d) {
  emu_w->v[emu_lane] = emu_bits(x); emu_w->bar.arrive_and_wait();
  const uint64_t r = emu_w->v[(emu_lane ^ d) & 31]; emu_w->bar.arrive_and_wait(); return emu_from<T>(r);
}
inline unsigned __ballot_sync(unsigned, int p) {
  emu_w->v[emu_lane] = p ? 1 : 0; emu_w->bar.arrive_and_wait();
  unsigned m = 0;
  for (int i = 0; i < 32; ++i) m |= unsigned(emu_w->v[i] & 1) << i;
  emu_w->bar.arrive_and_wait(); return m;
}
inline int __any_sync(unsigned m, int p) { return __ballot_sync(m, p) != 0; }
inline void __syncwarp(unsigned = 0xFFFFFFFFu) { emu_w->bar.arrive_and_wait(); }
// Runs block b of a kernel: each warp's lanes as host threads (threadIdx from the linear id).
template <class F>
void emu_run_block(unsigned b, dim3 block, F&& body) {
  const unsigned n = block.x * block.y;
  for (unsigned w0 = 0; w0 < n; w0 += 32) {
    const int lanes = int(std::min(32u, n - w0));
    EmuWarp warp(lanes);
    std::vector<std::thread> th;
    for (int lane = 0; lane < lanes; ++lane)
      th.emplace_back([&, lane] {
        const unsigned t = w0 + lane;
        emu_w = &warp; emu_lane = lane;
        threadIdx = {t % block.x, t / block.x, 0}; blockIdx = {b, 0, 0};
        body();
      });
    for (auto& t : th) t.join();
  }
}
// 16-bit floats
struct __half_raw { unsigned short x; };
struct __half2_raw { unsigned short x, y; };
struct __half { unsigned short b; __half() = default; __half(__half_raw r) : b(r.x) {} };
struct __half2 { __half x, y; __half2() = default; __half2(__half2_raw r) { x.b = r.x; y.b = r.y; } };
struct __nv_bfloat16 { unsigned short b; };
struct __nv_bfloat162 { __nv_bfloat16 x, y; };
inline float __half2float(__half h) { _Float16 v; std::memcpy(&v, &h.b, 2); return float(v); }
inline __half __ushort_as_half(unsigned short s) { __half h; h.b = s; return h; }
inline unsigned short __half_as_ushort(__half h) { return h.b; }
inline __half __float2half_rn(float f) { _Float16 v = (_Float16)f; __half h; std::memcpy(&h.b, &v, 2); return h; }
inline float2 __half22float2(__half2 h) { return {__half2float(h.x), __half2float(h.y)}; }
inline __half2 __floats2half2_rn(float a, float b) { __half2 h; h.x = __float2half_rn(a); h.y = __float2half_rn(b); return h; }
inline unsigned short bf16_rn(float f) {
  unsigned u = __float_as_uint(f);
  if (std::isnan(f)) return 0x7FFF;  // the device's canonical NaN
  return (unsigned short)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return {bf16_rn(f)}; }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 b) { return b.b; }
inline __nv_bfloat162 __floats2bfloat162_rn(float a, float b) { return {{bf16_rn(a)}, {bf16_rn(b)}}; }
// fp8 e4m3
typedef unsigned char __nv_fp8_storage_t;
typedef unsigned short __nv_fp8x2_storage_t;
enum __nv_saturation_t { __NV_NOSAT, __NV_SATFINITE };
enum __nv_fp8_interpretation_t { __NV_E4M3, __NV_E5M2 };
inline float e4m3_value(unsigned c) {
  const unsigned e = (c >> 3) & 15, m = c & 7;
  const float v = e ? std::ldexp(1.f + m / 8.f, int(e) - 7) : std::ldexp(m / 8.f, -6);
  return (c & 0x80) ? -v : v;
}
inline __nv_fp8_storage_t __nv_cvt_float_to_fp8(float f, __nv_saturation_t, __nv_fp8_interpretation_t) {
  if (std::isnan(f)) return 0x7F;
  const unsigned s = std::signbit(f) ? 0x80 : 0;
  const float a = std::fabs(f);
  if (a >= 448.f) return s | 0x7E;
  unsigned lo = 0, hi = 0x7E;  // largest code with value <= a
  while (lo < hi) { unsigned mid = (lo + hi + 1) / 2; if (e4m3_value(mid) <= a) lo = mid; else hi = mid - 1; }
  unsigned c = lo;
  if (c < 0x7E) {
    const double d0 = double(a) - e4m3_value(c), d1 = double(e4m3_value(c + 1)) - a;
    if (d1 < d0 || (d1 == d0 && (c & 1))) c += 1;
  }
  return (__nv_fp8_storage_t)(s | c);
}
inline __nv_fp8x2_storage_t __nv_cvt_float2_to_fp8x2(float2 v, __nv_saturation_t s, __nv_fp8_interpretation_t i) {
  return (__nv_fp8x2_storage_t)(__nv_cvt_float_to_fp8(v.x, s, i) | (unsigned(__nv_cvt_float_to_fp8(v.y, s, i)) << 8));
}
inline __half_raw __nv_cvt_fp8_to_halfraw(__nv_fp8_storage_t c, __nv_fp8_interpretation_t) {
  const float v = (c & 0x7F) == 0x7F ? NAN : e4m3_value(c);
  return {__float2half_rn(v).b};
}
inline __half2_raw __nv_cvt_fp8x2_to_halfraw2(__nv_fp8x2_storage_t c, __nv_fp8_interpretation_t i) {
  return {__nv_cvt_fp8_to_halfraw(c & 0xFF, i).x, __nv_cvt_fp8_to_halfraw(c >> 8, i).x};
}
'''

HARNESS = r'''
#include "cuda_runtime.h"
thread_local uint3_ threadIdx, blockIdx;
thread_local EmuWarp* emu_w;
thread_local int emu_lane;
dim3 blockDim, gridDim;
int emu_sms = 3;
template <class Kernel, class A>
void kvk_paged_emulate(Kernel kernel, dim3 grid, dim3 block, const A& a) {
  gridDim = grid;
  blockDim = block;
  for (unsigned b = 0; b < grid.x; ++b) emu_run_block(b, block, [&] { kernel(a); });
}
#include "paged.cu"
#include "paged_gather_quant.cu"
extern "C" int emu_call(int scatter, int64_t ptrs, const int64_t* spec, int aligned16, int64_t k_scale, int64_t ks_l,
                        int64_t ks_h, int64_t v_scale, int64_t vs_l, int64_t vs_h, int kind, int dtype, int64_t data,
                        const int64_t* fs, int bits, int64_t scale, int64_t zero, const int64_t* q, int64_t slots,
                        int slots64, int64_t T, int64_t cnt, int cnt64, int max_blocks, int sms) {
  emu_sms = sms;
  KvkPagedCaches c{};
  c.ptrs = reinterpret_cast<const int64_t*>(ptrs);
  c.num_layers = spec[0]; c.num_kv = spec[1]; c.num_blocks = spec[2]; c.block_size = spec[3];
  c.num_heads = spec[4]; c.head_dim = spec[5]; c.x = spec[6]; c.cache_dtype = int(spec[7]);
  for (int k = 0; k < 2; ++k) for (int j = 0; j < 5; ++j) c.st[k][j] = spec[8 + 5 * k + j];
  c.aligned16 = aligned16;
  c.k_scale = reinterpret_cast<const float*>(k_scale); c.ks_l = ks_l; c.ks_h = ks_h;
  c.v_scale = reinterpret_cast<const float*>(v_scale); c.vs_l = vs_l; c.vs_h = vs_h;
  KvkPagedFlat f{};
  f.kind = kind; f.dtype = dtype; f.data = reinterpret_cast<void*>(data);
  f.f_kv = fs[0]; f.f_l = fs[1]; f.f_t = fs[2]; f.f_h = fs[3]; f.bits = bits;
  f.scale = reinterpret_cast<const float*>(scale); f.zero = reinterpret_cast<const float*>(zero);
  f.tg = q[0]; f.dg = q[1]; f.a_row = q[2]; f.a_t = q[3]; f.a_h = q[4]; f.a_d = q[5];
  auto fn = scatter ? kvk_paged_scatter : kvk_paged_gather;
  return fn(&c, &f, reinterpret_cast<const void*>(slots), slots64, T, reinterpret_cast<void*>(cnt), cnt64,
            max_blocks, nullptr);
}
'''


STUB = '#pragma once\n#include "cuda_runtime.h"\n'


def build_emu(cxx, name, files, inc, flags) -> pathlib.Path:
    """The emulation library ``<tmp>/<name>/emu.so`` (cached by name): ``files`` (name -> text,
    ``emu.cpp`` the one compiled) and the ``inc`` headers (the shims) written to a private build
    folder, compiled there and renamed into place, so that xdist workers never share a file (one
    rewriting a header while another compiles makes ``#pragma once`` see two files)."""
    d = pathlib.Path(tempfile.gettempdir()) / name
    lib = d / "emu.so"
    if not lib.exists():
        d.mkdir(exist_ok=True)
        w = pathlib.Path(tempfile.mkdtemp(prefix="build_", dir=d))
        (w / "inc").mkdir()
        for n, t in inc.items():
            (w / "inc" / n).write_text(t)
        for n, t in files.items():
            (w / n).write_text(t)
        cmd = [cxx, "-std=c++20", "-O1", "-ffp-contract=off", "-fPIC", "-shared", "-pthread", "-x", "c++",
               f"-I{w / 'inc'}", f"-I{w}", *flags, str(w / "emu.cpp"), "-o", str(w / "emu.so")]
        p = subprocess.run(cmd, capture_output=True, text=True)
        assert p.returncode == 0, p.stderr[-6000:]
        os.replace(w / "emu.so", lib)
        shutil.rmtree(w, ignore_errors=True)
    return lib


@pytest.fixture(scope="module")
def emu():
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    src = "".join((ROOT / "csrc" / n).read_text() for n in PAGED_SOURCES) + SHIM + HARNESS
    key = hashlib.sha1(src.encode()).hexdigest()[:16]
    inc = {"cuda_runtime.h": SHIM, **{h: STUB for h in ("cuda_bf16.h", "cuda_fp16.h", "cuda_fp8.h")}}
    lib = build_emu(cxx, f"kvk_paged_emu_{key}", {"emu.cpp": HARNESS}, inc,
                    ["-DKVK_PAGED_EMULATE", f"-I{ROOT / 'csrc'}"])
    so = ctypes.CDLL(str(lib))
    so.emu_call.restype = ctypes.c_int
    return so


class _FakeExt:
    """kvkernels._C's paged_call, run by the emulated kernels (host pointers throughout)."""

    def __init__(self, so, sms):
        self.so, self.sms = so, sms

    def paged_call(self, scatter, ptrs, spec, aligned16, k_scale, ks_l, ks_h, v_scale, vs_l, vs_h, kind, dtype, data,
                   fs, bits, scale, zero, qidx, slots, slots64, T, cnt, cnt64, max_blocks, device, stream):
        arr = lambda xs: (ctypes.c_int64 * len(xs))(*xs)  # noqa: E731
        i64 = ctypes.c_int64
        err = self.so.emu_call(int(scatter), i64(ptrs), arr(spec), int(aligned16), i64(k_scale), i64(ks_l), i64(ks_h),
                               i64(v_scale), i64(vs_l), i64(vs_h), kind, dtype, i64(data), arr(fs), bits, i64(scale),
                               i64(zero), arr(qidx), i64(slots), int(slots64), i64(T), i64(cnt), int(cnt64),
                               int(max_blocks), self.sms)
        if err:
            raise RuntimeError(f"paged_call: cudaError {err}")


@pytest.fixture
def cuda_emu(emu, monkeypatch):
    monkeypatch.setattr(cpaged, "_ext", lambda: _FakeExt(emu, 3))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)

    class _S:
        cuda_stream = 0
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *a: _S())
    return cpaged


def _fmt(spec):
    return None if spec is None else QuantFormat.parse(spec)


def _scale_pair(lay, sc):
    if not lay.fp8:
        return None
    from kvkernels.paged import _check_scales

    return _check_scales(lay, sc.get("k_scale"), sc.get("v_scale"))


SCATTER_CASES = [  # layout, cache dtype, D, H, BS, source (None: flat of the cache dtype), max_sms
    ("flash_nhd", torch.bfloat16, 128, 2, 16, None, 0), ("flash_hnd", torch.float16, 80, 3, 8, None, 2),
    ("legacy", torch.bfloat16, 64, 2, 16, None, 0), ("vllm_interleaved", torch.float32, 64, 2, 16, None, 0),
    ("flash_nhd", torch.float8_e4m3fn, 128, 2, 16, None, 0), ("legacy", torch.float8_e4m3fn, 64, 2, 8, None, 0),
    ("mla", torch.bfloat16, 576, 1, 16, None, 1), ("cross_layer", torch.float8_e4m3fn, 80, 3, 16, None, 0),
    ("flash_nhd", torch.bfloat16, 128, 2, 16, "int8:g64:channel", 0),
    ("flash_nhd", torch.bfloat16, 128, 2, 16, "int4:g32:channel", 0),
    ("flash_hnd", torch.float16, 80, 3, 8, "int4:g16:channel", 0),
    ("flash_nhd", torch.bfloat16, 64, 2, 16, "int2:g16:channel", 0),
    ("flash_nhd", torch.float32, 128, 2, 16, "int8:g64:channel", 0),
    ("legacy", torch.bfloat16, 64, 2, 16, "int4:g32:channel", 0),
    ("flash_nhd", torch.bfloat16, 128, 2, 16, "fp8:token_head", 0),
    ("sglang", torch.float32, 64, 3, 8, "fp8:head", 0), ("flash_nhd", torch.float16, 64, 2, 8, "fp8:tensor", 0),
    ("flash_nhd", torch.float8_e4m3fn, 128, 2, 16, "int4:g32:channel", 0),
    ("vllm_interleaved", torch.float8_e4m3fn, 64, 2, 16, "fp8:token_head", 0),
    ("flash_nhd", torch.bfloat16, 64, 2, 16, "int4:g16:token", 0),
    ("flash_nhd", torch.float32, 64, 2, 16, "int2:g32:token", 0),
    ("flash_nhd", torch.float32, 64, 2, 8, "int4:g2:channel", 0),
    ("cross_layer", torch.float16, 48, 2, 8, "int8:g48:channel", 0),
]


@pytest.mark.parametrize("kind,dtype,D,H,BS,spec,sms", SCATTER_CASES,
                         ids=[f"{k}-{str(d)[6:]}-d{D}-h{H}-bs{b}-{f}-sms{m}" for k, d, D, H, b, f, m in SCATTER_CASES])
def test_cuda_scatter_gather_emulated(cuda_emu, kind, dtype, D, H, BS, spec, sms):
    L, NB, T = 2, 5, 29
    fmt = _fmt(spec)
    lay0, c0 = build(kind, L, NB, BS, H, D, dtype, device="cpu")
    kvd = torch.bfloat16 if (lay0.fp8 or fmt is not None) else dtype
    kv = make_flat(lay0.num_kv, L, T + 3, lay0.num_heads, D, kvd, device="cpu")
    if fmt is not None:
        q = kvkernels.quantize(kv.flatten(0, 1), fmt, backend="torch")
        src, scale, zero = q.codes, q.scale, q.zero
    else:
        src, scale, zero = kv, None, None
    slots = make_slots(T, NB, BS, device="cpu", dtype=torch.int32 if BS == 16 else torch.int64)
    slots[5] = NB * BS + 3  # out of range: skipped and counted
    slots[6] = NB * BS      # the first slot past the end
    sc = scales_for(lay0, device="cpu")
    cs = _scale_pair(lay0, sc)
    counts = [torch.zeros(1, dtype=torch.int64) for _ in range(2)]
    pref.scatter_into(lay0, src, scale, zero, fmt, slots, cs, counts[0])
    lay1, c1 = build(kind, L, NB, BS, H, D, dtype, device="cpu")
    cuda_emu.scatter_into(lay1, src, scale, zero, fmt, slots, _scale_pair(lay1, sc), counts[1], max_sms=sms)
    for a, b in zip(c1.snapshot(), c0.snapshot()):
        assert torch.equal(a, b), f"{int((a != b).sum())} cache bytes differ from the reference"
    assert int(counts[0]) == int(counts[1]) == 2
    # gather back (flat, every destination dtype the kernels take)
    for odt in ([torch.bfloat16, torch.float32] if lay1.fp8 else [dtype]):
        outs = []
        for which in ("ref", "cuda"):
            out = torch.full((lay1.num_kv, L, T, lay1.num_heads, D), float("nan"), dtype=odt)
            cnt = torch.zeros(1, dtype=torch.int32)
            if which == "ref":
                pref.gather_into(lay1, slots, out, None, None, None, None, _scale_pair(lay1, sc), cnt)
            else:
                cuda_emu.gather_into(lay1, slots, out, None, None, None, None, _scale_pair(lay1, sc), cnt,
                                     max_sms=sms)
            outs.append((out, int(cnt)))
        (a, na), (b, nb) = outs
        assert na == nb == 2
        assert torch.equal(a.isnan(), b.isnan()) and torch.equal(torch.nan_to_num(a), torch.nan_to_num(b))


MIXED = [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32), (torch.float16, torch.bfloat16),
         (torch.float32, torch.float8_e4m3fn), (torch.float16, torch.float8_e4m3fn)]


@pytest.mark.parametrize("flat_dtype,cache_dtype", MIXED, ids=[f"{str(a)[6:]}-{str(b)[6:]}" for a, b in MIXED])
def test_cuda_mixed_dtypes_emulated(cuda_emu, flat_dtype, cache_dtype):
    """Flat and cache element types that differ (the chunk is 16 bytes of the narrower side)."""
    L, NB, BS, H, D, T = 2, 4, 16, 2, 64, 23
    lay0, c0 = build("flash_nhd", L, NB, BS, H, D, cache_dtype, device="cpu")
    kv = make_flat(2, L, T, H, D, flat_dtype, device="cpu")
    slots = make_slots(T, NB, BS, device="cpu")
    sc = scales_for(lay0, device="cpu")
    pref.scatter_into(lay0, kv, None, None, None, slots, _scale_pair(lay0, sc), None)
    lay1, c1 = build("flash_nhd", L, NB, BS, H, D, cache_dtype, device="cpu")
    cuda_emu.scatter_into(lay1, kv, None, None, None, slots, _scale_pair(lay1, sc), None)
    for a, b in zip(c1.snapshot(), c0.snapshot()):
        assert torch.equal(a, b)
    outs = []
    for fn in (pref.gather_into, cuda_emu.gather_into):
        out = torch.full((2, L, T, H, D), float("nan"), dtype=flat_dtype)
        fn(lay1, slots, out, None, None, None, None, _scale_pair(lay1, sc), None)
        outs.append(out)
    assert torch.equal(outs[0].isnan(), outs[1].isnan())
    assert torch.equal(torch.nan_to_num(outs[0]), torch.nan_to_num(outs[1]))


GQ_CASES = [("flash_nhd", torch.bfloat16, 128, 2, "int8:g64:channel"), ("flash_hnd", torch.bfloat16, 80, 3, "int4:g16:channel"),
            ("flash_nhd", torch.float16, 64, 2, "int2:g16:channel"), ("legacy", torch.bfloat16, 64, 2, "int4:g32:channel"),
            ("flash_nhd", torch.float32, 64, 2, "int8:g8:channel"), ("flash_nhd", torch.float8_e4m3fn, 128, 2, "int8:g64:channel"),
            ("flash_nhd", torch.bfloat16, 128, 2, "fp8:token_head"), ("cross_layer", torch.float8_e4m3fn, 80, 3, "fp8:token_head"),
            ("flash_nhd", torch.float32, 64, 2, "fp8:token_head"), ("mla", torch.bfloat16, 576, 1, "int4:g32:channel"),
            ("flash_nhd", torch.bfloat16, 64, 2, "int8:g4:channel"),
            # the lanes kernel over two rounds of pieces (640 > 2 x 256) and 3 groups per head
            ("flash_nhd", torch.bfloat16, 128, 40, "int8:g64:channel"), ("flash_hnd", torch.float16, 96, 3, "int8:g32:channel"),
            ("flash_nhd", torch.bfloat16, 128, 40, "fp8:token_head")]


@pytest.mark.parametrize("kind,dtype,D,H,spec", GQ_CASES, ids=[f"{k}-{str(d)[6:]}-d{D}-h{H}-{f}" for k, d, D, H, f in GQ_CASES])
def test_cuda_gather_quantize_emulated(cuda_emu, kind, dtype, D, H, spec):
    """The fused gather + quantize: codes, scales and zero points equal the reference's (skipped
    tokens quantized as zeros), non-finite cache values included."""
    L, NB, BS, T = 2, 5, 8, 29
    fmt = QuantFormat.parse(spec)
    lay, c = build(kind, L, NB, BS, H, D, dtype, device="cpu")
    sc = scales_for(lay, device="cpu")
    kv = make_flat(lay.num_kv, L, T, lay.num_heads, D, torch.bfloat16 if lay.fp8 else dtype, device="cpu")
    if not lay.fp8:
        kv[0, 0, 2, 0, 3] = float("inf")
        kv[-1, 1, 4, -1, 0] = float("nan")
    slots = make_slots(T, NB, BS, device="cpu")
    slots[7] = NB * BS
    pref.scatter_into(lay, kv, None, None, None, slots, _scale_pair(lay, sc), None)
    assert cuda_emu.supports_gather(lay, None, fmt) is None or "CUDA device" in cuda_emu.supports_gather(lay, None, fmt) \
        or "extension" in cuda_emu.supports_gather(lay, None, fmt)
    R = lay.num_kv * L
    res = []
    for which in ("ref", "cuda"):
        codes = torch.full(fmt.codes_shape(R, T, lay.num_heads, D), 0xAB, dtype=torch.uint8)
        scale = torch.full(fmt.scale_shape(R, T, lay.num_heads, D), float("nan"))
        zero = torch.full_like(scale, float("nan")) if fmt.has_zero else None
        cnt = torch.zeros(1, dtype=torch.int64)
        fn = pref.gather_into if which == "ref" else cuda_emu.gather_into
        fn(lay, slots, None, codes, scale, zero, fmt, _scale_pair(lay, sc), cnt)
        res.append((codes, scale, zero, int(cnt)))
    (c0, s0, z0, n0), (c1, s1, z1, n1) = res
    assert n0 == n1 == 1
    assert torch.equal(c0, c1), f"{int((c0 != c1).sum())} code bytes differ"
    assert torch.equal(s0.isnan(), s1.isnan()) and torch.equal(torch.nan_to_num(s0), torch.nan_to_num(s1))
    if z0 is not None:
        assert torch.equal(torch.nan_to_num(z0), torch.nan_to_num(z1))

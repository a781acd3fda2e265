// Private experiment (twelfth session): how much of a layer too big for shared memory can the
// second pass of fp8 per-tensor quantize with computed scales (amax kernel, then quantize kernel)
// read back from L2 instead of HBM? Llama-3-8B at T=32768: 64 MiB bf16 layers, 32 MiB of codes,
// H200 L2 60 MiB. Per layer, the floor moves 96 MiB; two passes from HBM move 160 (60%).
//
// Variants, each over L = 8 layers (median of 10 runs, L2 flushed before each), against a
// device-to-device copy with the same bytes (48 MiB a layer: 96 MiB moved):
//   whole      amax over all layers, then quantize all (what the library does now)
//   fwd        per layer: amax(l), quantize(l), both in address order
//   rev        per layer, quantize in reverse order (the lines the amax read last come first)
//   rev+ef     rev, quantize's loads and stores L2::evict_first
//   keepK      rev+ef, and the amax pass reads the last K MiB of a layer L2::evict_last, the rest
//              evict_first
//   persist-keepK  keepK with the device's L2 set-aside for persisting lines at its maximum
//
//   nvcc -arch=sm_90 -std=c++17 -O3 experiments/l2_reread_exp.cu -o /tmp/l2r && /tmp/l2r
#include <cuda_fp8.h>

#include "exp_common.cuh"

using namespace kvkexp;

enum Pol { kNormal = 0, kFirst = 1, kLast = 2 };

__device__ __forceinline__ uint64_t policy(int p) {
  uint64_t r;
  if (p == kLast) asm volatile("createpolicy.fractional.L2::evict_last.b64 %0, 1.0;" : "=l"(r));
  else asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(r));
  return r;
}
__device__ __forceinline__ uint4 ldv(const uint4* p, int pol, uint64_t cp) {
  uint4 v;
  if (pol == kNormal) {
    asm volatile("ld.global.v4.u32 {%0,%1,%2,%3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
  } else {
    asm volatile("ld.global.L2::cache_hint.v4.u32 {%0,%1,%2,%3}, [%4], %5;"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p), "l"(cp));
  }
  return v;
}
__device__ __forceinline__ void stv(uint2* p, uint2 v, int pol, uint64_t cp) {
  if (pol == kNormal) asm volatile("st.global.v2.u32 [%0], {%1,%2};" ::"l"(p), "r"(v.x), "r"(v.y) : "memory");
  else asm volatile("st.global.L2::cache_hint.v2.u32 [%0], {%1,%2}, %3;" ::"l"(p), "r"(v.x), "r"(v.y), "l"(cp) : "memory");
}
__device__ __forceinline__ uint32_t amax8(uint4 w) {
  const uint32_t m = 0x7fff7fffu;
  uint32_t a = __vmaxu2(__vmaxu2(w.x & m, w.y & m), __vmaxu2(w.z & m, w.w & m));
  return max(a & 0xffffu, a >> 16);
}

// amax of nv vectors (bf16) into *amax (float bits); vectors >= split loaded with policy pol_hi,
// below with pol_lo. Grid-stride in address order, 4 loads in flight a thread.
__global__ void __launch_bounds__(1024) amax_kernel(const uint4* x, uint64_t nv, uint64_t split, int pol_lo,
                                                    int pol_hi, uint32_t* amax) {
  const uint64_t P = uint64_t(gridDim.x) * blockDim.x, g = blockIdx.x * uint64_t(blockDim.x) + threadIdx.x;
  const uint64_t clo = policy(pol_lo == kLast ? kLast : kFirst), chi = policy(pol_hi == kLast ? kLast : kFirst);
  uint32_t m = 0;
  for (uint64_t i = g; i < nv; i += 4 * P) {
    uint4 w[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const uint64_t v = i + j * P;
      w[j] = v < nv ? (v >= split ? ldv(x + v, pol_hi, chi) : ldv(x + v, pol_lo, clo)) : make_uint4(0, 0, 0, 0);
    }
#pragma unroll
    for (int j = 0; j < 4; ++j) m = max(m, amax8(w[j]));
  }
  m = __reduce_max_sync(0xffffffffu, m);
  if ((threadIdx.x & 31) == 0 && m) atomicMax(amax, __float_as_uint(__uint_as_float(m << 16)));
}

// codes = e4m3(x / (amax / 448)); reverse: the last vectors first. nv vectors of layer; amax of
// layer l at amax[v / nvl] (whole-tensor launch: nvl = vectors a layer).
__global__ void __launch_bounds__(1024) quant_kernel(const uint4* x, uint2* codes, uint64_t nv, uint64_t nvl,
                                                     const uint32_t* amax, bool reverse, int pol) {
  const uint64_t P = uint64_t(gridDim.x) * blockDim.x, g = blockIdx.x * uint64_t(blockDim.x) + threadIdx.x;
  const uint64_t cp = policy(kFirst);
  const uint64_t nit = (nv + 4 * P - 1) / (4 * P);
  for (uint64_t it = 0; it < nit; ++it) {
    const uint64_t i = (reverse ? nit - 1 - it : it) * 4 * P + g;
    uint4 w[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const uint64_t v = i + j * P;
      if (v < nv) w[j] = ldv(x + v, pol, cp);
    }
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const uint64_t v = i + j * P;
      if (v >= nv) continue;
      const float sc = __uint_as_float(amax[v / nvl]) / 448.f;
      const float inv = sc > 0 ? 1.f / sc : 1.f;
      const uint32_t u[4] = {w[j].x, w[j].y, w[j].z, w[j].w};
      uint32_t o[2];
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        float2 a = make_float2(__uint_as_float(u[2 * h] << 16) * inv, __uint_as_float(u[2 * h] & 0xffff0000u) * inv);
        float2 b = make_float2(__uint_as_float(u[2 * h + 1] << 16) * inv,
                               __uint_as_float(u[2 * h + 1] & 0xffff0000u) * inv);
        const uint32_t lo = __nv_cvt_float2_to_fp8x2(a, __NV_SATFINITE, __NV_E4M3);
        const uint32_t hi = __nv_cvt_float2_to_fp8x2(b, __NV_SATFINITE, __NV_E4M3);
        o[h] = lo | (hi << 16);
      }
      stv(codes + v, make_uint2(o[0], o[1]), pol, cp);
    }
  }
}

int main() {
  cudaDeviceProp prop;
  cudaStream_t st = start(prop);
  int persist = 0;
  CK(cudaDeviceGetAttribute(&persist, cudaDevAttrMaxPersistingL2CacheSize, 0));
  printf("max persisting L2 %d MiB\n", persist >> 20);
  const int L = 8;
  const uint64_t N = uint64_t(32768) * 8 * 128, nvl = N / 8;  // elements, vectors a layer
  uint16_t* x;
  uint8_t* codes;
  uint32_t* amax;
  CK(cudaMalloc(&x, L * N * 2));
  CK(cudaMalloc(&codes, L * N));
  CK(cudaMalloc(&amax, L * 4));
  fill_kernel<<<1024, 1024, 0, st>>>(x, L * N);
  Timer tm(st);
  const int grid = prop.multiProcessorCount * 2;
  const uint4* xv = reinterpret_cast<const uint4*>(x);
  uint2* cv = reinterpret_cast<uint2*>(codes);
  const double mb = L * 96.0;  // MiB moved at the floor
  uint8_t* scratch;
  CK(cudaMalloc(&scratch, 48 << 20));
  const float tcopy = tm.median_us([&] {  // 48 MiB read + 48 written a layer: the floor's bytes
    for (int l = 0; l < L; ++l)
      CK(cudaMemcpyAsync(scratch, reinterpret_cast<uint8_t*>(x) + l * N * 2, 48 << 20, cudaMemcpyDeviceToDevice, st));
  }, 10);
  const double copy_gbs = mb * 1048576 / (tcopy * 1e-6) / 1e9;
  printf("copy: %.1f us for %d x 48 MiB, %.0f GB/s\n", tcopy, L, copy_gbs);
  auto report = [&](const char* name, float us) {
    const double gbs = mb * 1048576 / (us * 1e-6) / 1e9;
    printf("%-14s %8.1f us  %.1f us/layer  %6.0f GB/s  %5.1f%% of copy\n", name, us, us / L, gbs, 100 * gbs / copy_gbs);
  };
  std::vector<uint32_t> ref(L), got(L);
  auto run = [&](const char* name, bool whole, bool rev, int qpol, uint64_t keep_mib) {
    const uint64_t keepv = keep_mib << 20 >> 4, split = keep_mib ? nvl - std::min(nvl, keepv) : nvl;
    const int plo = keep_mib ? kFirst : kNormal, phi = keep_mib ? kLast : kNormal;
    auto f = [&] {
      CK(cudaMemsetAsync(amax, 0, L * 4, st));
      if (whole) {
        for (int l = 0; l < L; ++l) amax_kernel<<<grid, 1024, 0, st>>>(xv + l * nvl, nvl, nvl, kNormal, kNormal, amax + l);
        quant_kernel<<<grid, 1024, 0, st>>>(xv, cv, L * nvl, nvl, amax, false, kNormal);
      } else {
        for (int l = 0; l < L; ++l) {
          amax_kernel<<<grid, 1024, 0, st>>>(xv + l * nvl, nvl, split, plo, phi, amax + l);
          quant_kernel<<<grid, 1024, 0, st>>>(xv + l * nvl, cv + l * nvl, nvl, nvl, amax + l, rev, qpol);
        }
      }
    };
    report(name, tm.median_us(f, 10));
    CK(cudaMemcpy(got.data(), amax, L * 4, cudaMemcpyDeviceToHost));
    if (ref[0] == 0) ref = got;
    if (got != ref) printf("  amax mismatch\n");
  };
  run("whole", true, false, kNormal, 0);
  run("fwd", false, false, kNormal, 0);
  run("rev", false, true, kNormal, 0);
  run("rev+ef", false, true, kFirst, 0);
  for (uint64_t k : {24, 32, 40, 48, 56}) {
    char name[32];
    snprintf(name, sizeof name, "keep%llu", (unsigned long long)k);
    run(name, false, true, kFirst, k);
  }
  // with the L2 set-aside for persisting lines at its maximum (a device-wide limit, 0 by
  // default): do evict_last lines then stay?
  CK(cudaDeviceSetLimit(cudaLimitPersistingL2CacheSize, size_t(persist)));
  size_t got_limit = 0;
  CK(cudaDeviceGetLimit(&got_limit, cudaLimitPersistingL2CacheSize));
  printf("persisting L2 set-aside: %zu MiB\n", got_limit >> 20);
  for (uint64_t k : {16, 24, 32, 36}) {
    char name[32];
    snprintf(name, sizeof name, "persist-keep%llu", (unsigned long long)k);
    run(name, false, true, kFirst, k);
  }
  CK(cudaDeviceSetLimit(cudaLimitPersistingL2CacheSize, 0));
  CK(cudaStreamSynchronize(st));
  return 0;
}

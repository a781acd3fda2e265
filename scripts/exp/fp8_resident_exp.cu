// Private experiment behind docs/perf-notes.md (not shipped): the one-pass fp8 tensor quantize
// (quant_fp8_resident_kernel) against variants, timed standalone with events after warm-up and
// an L2 flush, as a fraction of a device-to-device copy of the same bytes measured in the same run.
//   nvcc -arch=sm_90 -std=c++17 -O3 -Icsrc scripts/exp/fp8_resident_exp.cu -o /tmp/fp8x && /tmp/fp8x
// (or bash scripts/exp/run_fp8x.sh OUT). res_x is a copy of the kernel as it was at e09a8a4 (tensor
// scope) with switches: NT threads per block (1024, or 512 with two blocks per SM); ACC a thread's
// K slots max-reduced before the warp's; EARLY the first poll load issued before the landing wait
// (1) or before the publish (2); AGG warp-reduced slot polls; ZS slots cleared in-kernel behind a
// grid barrier (no memset); TRACE per-block %globaltimer stamps of each iteration (where the time
// goes). The L2-prefetch variant of the first run (PF, cp.async.bulk.prefetch.L2) is left in
// with PF = 0. The library kernel took ACC + EARLY 2 + AGG + ZS (ba608c0, 789844d); results in
// bench/results/fp8-resident-h200-2026-11-27.txt. Not part of the package or the tests.
#include "../../csrc/quant.cu"

#include <cooperative_groups.h>
#include <cstdio>
#include <cstring>
#include <vector>

namespace kvk {
namespace {

__device__ __forceinline__ uint64_t gtimer() {
  uint64_t t;
  asm volatile("mov.u64 %0, %globaltimer;" : "=l"(t));
  return t;
}
__device__ __forceinline__ void prefetch_l2_bulk(const void* p, uint32_t bytes) {
  asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(p), "r"(bytes) : "memory");
}

// A copy of quant_fp8_resident_kernel (tensor scope) with an L2 prefetch PF steps ahead of the
// shared-memory loads and optional stamps. x dense (sL == N).
// EARLY: 0 off, 1 the first poll load before the landing wait, 2 after it (before publish)
template <typename Tr, int K, int NT, bool TRACE, bool ACC, int EARLY, bool AGG = false, bool ZS = false>
__global__ void __launch_bounds__(NT, 1024 / NT) res_x(const ResidentArgs a, uint64_t* trace) {
  constexpr int PF = 0;
  constexpr int kResBlock = NT;
  using S = typename Tr::storage;
  constexpr int VE = 16 / Tr::kSize;
  constexpr int kStage = kResBlock * K;
  extern __shared__ uint4 stages[];
  __shared__ uint32_t s_amax[kResMaxKeys];
  __shared__ uint32_t s_red[kResMaxKeys];
  __shared__ float s_inv[kResMaxKeys];
  const uint32_t lane = threadIdx.x & 31;
  const uint32_t g = blockIdx.x * kResBlock + threadIdx.x, P = gridDim.x * kResBlock;
  const uint64_t N = uint64_t(a.Nv) * VE;
  for (uint32_t i = threadIdx.x; i < kResMaxKeys; i += kResBlock) s_amax[i] = s_red[i] = 0;
  uint32_t soff[K], slk[K];
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const uint32_t v = uint32_t(k) * P + g;
    uint32_t lb = 0, off = 0;
    if (v < a.B * a.Nv) {
      a.divNv.divmod(v, lb, off);
      slk[k] = lb | (lb << 16);
    } else {
      slk[k] = 0xffffffffu;
    }
    soff[k] = off;
  }
  auto locate = [&](uint32_t s, int k, uint32_t& lb, uint32_t& off, uint32_t& key) -> bool {
    if (slk[k] == 0xffffffffu) return false;
    lb = slk[k] & 0xffffu;
    if (lb >= a.L - s * a.B) return false;
    off = soff[k];
    key = slk[k] >> 16;
    return true;
  };
  // this block's K chunks of step s (1024 vectors each, contiguous since x is dense) -> L2
  auto prefetch = [&](uint32_t s) {
    if (PF == 0 || threadIdx.x != 0 || s >= a.nsteps) return;
    const uint64_t nv = uint64_t(min(a.B, a.L - s * a.B)) * a.Nv;  // vectors in step s
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const uint64_t v0 = uint64_t(k) * P + blockIdx.x * kResBlock;
      if (v0 >= nv) break;
      const uint64_t n = nv - v0 < uint64_t(kResBlock) ? nv - v0 : uint64_t(kResBlock);
      prefetch_l2_bulk(static_cast<const uint4*>(a.x) + uint64_t(s) * a.B * a.Nv + v0, uint32_t(n * 16));
    }
  };
  auto issue = [&](uint32_t s) {
    uint4* st = stages + (s % kResStages) * kStage;
#pragma unroll
    for (int k = 0; k < K; ++k) {
      uint32_t lb = 0, off = 0, key;
      const bool ok = s < a.nsteps && locate(s, k, lb, off, key);
      const S* src = static_cast<const S*>(a.x) + (ok ? int64_t(s * a.B + lb) * a.sL + int64_t(off) * VE : 0);
      cp_async16(st + k * kResBlock + threadIdx.x, src, ok);
    }
    cp_async_commit();
  };
  auto publish = [&](uint32_t s) {
    const uint4* st = stages + (s % kResStages) * kStage;
    auto flush = [&](uint32_t key, uint32_t m) {
      const uint32_t key0 = __shfl_sync(0xffffffffu, key, 0);
      if (__all_sync(0xffffffffu, key == key0)) {
        const uint32_t r = __reduce_max_sync(0xffffffffu, m);
        if (lane == 0 && key0 != 0xffffffffu && r) atomicMax(&s_amax[key0], r);
      } else if (key != 0xffffffffu && m) {
        atomicMax(&s_amax[key], m);
      }
    };
    uint32_t akey = 0xffffffffu, am = 0;
#pragma unroll
    for (int k = 0; k < K; ++k) {
      uint32_t lb, off, key = 0xffffffffu;
      const uint32_t m = locate(s, k, lb, off, key) ? abs_max_bits<Tr>(st[k * kResBlock + threadIdx.x]) : 0u;
      if (!ACC) {
        flush(key, m);
      } else if (__all_sync(0xffffffffu, key == akey || k == 0)) {  // warp-uniform (flush needs every lane)
        akey = key;
        am = max(am, m);
      } else {
        flush(akey, am);
        akey = key;
        am = m;
      }
    }
    if (ACC) flush(akey, am);
    __syncthreads();
    const uint32_t l0 = s * a.B, nkeys = min(a.B, a.L - l0) * a.Hs;
    for (uint32_t i = threadIdx.x; i < nkeys; i += kResBlock) {
      const uint32_t m = s_amax[i];
      s_amax[i] = 0;
      st_relaxed_gpu(a.slots + (uint64_t(l0 * a.Hs + i) * gridDim.x + blockIdx.x),
                     kSlotFull | __float_as_uint(abs_bits_to_float<Tr>(m)));
    }
  };
  uint64_t* tr = trace + uint64_t(blockIdx.x) * a.nsteps * 4;
  auto poll_first = [&](uint32_t s) -> uint32_t {
    const uint32_t l0 = s * a.B, nkeys = min(a.B, a.L - l0) * a.Hs;
    return threadIdx.x < nkeys * gridDim.x ? ld_relaxed_gpu(a.slots + uint64_t(l0 * a.Hs) * gridDim.x + threadIdx.x) : 0u;
  };
  auto quantize_step = [&](uint32_t s, uint32_t pv) {
    const uint32_t l0 = s * a.B, nkeys = min(a.B, a.L - l0) * a.Hs;
    const uint32_t nslots = nkeys * gridDim.x;
    const uint32_t* slots = a.slots + uint64_t(l0 * a.Hs) * gridDim.x;
    for (uint32_t i0 = 0; i0 < nslots; i0 += kResBlock) {  // uniform across the block
      const uint32_t i = i0 + threadIdx.x;
      uint32_t v = 0, key = 0xffffffffu;
      if (i < nslots) {
        v = EARLY && i0 == 0 ? pv : ld_relaxed_gpu(slots + i);
        while (!(v & kSlotFull)) {
          __nanosleep(32);
          v = ld_relaxed_gpu(slots + i);
        }
        v &= ~kSlotFull;
        key = i / gridDim.x;
      }
      if (AGG) {
        const uint32_t key0 = __shfl_sync(0xffffffffu, key, 0);
        if (__all_sync(0xffffffffu, key == key0)) {
          const uint32_t r = __reduce_max_sync(0xffffffffu, v);
          if (lane == 0 && key0 != 0xffffffffu && r) atomicMax(&s_red[key0], r);
        } else if (key != 0xffffffffu && v) {
          atomicMax(&s_red[key], v);
        }
      } else if (key != 0xffffffffu && v) {
        atomicMax(&s_red[key], v);
      }
    }
    __syncthreads();
    if (TRACE && threadIdx.x == 0) tr[s * 4 + 2] = gtimer();
    for (uint32_t i = threadIdx.x; i < nkeys; i += kResBlock) {
      const float sc = fp8_scale_from_amax(__uint_as_float(s_red[i]));
      s_red[i] = 0;
      s_inv[i] = fp8_inv(sc);
      if (blockIdx.x == 0) a.scale[l0 * a.Hs + i] = sc;
    }
    __syncthreads();
    const uint4* st = stages + (s % kResStages) * kStage;
#pragma unroll
    for (int k = 0; k < K; ++k) {
      uint32_t lb, off, key;
      if (!locate(s, k, lb, off, key)) continue;
      Vec<Tr, VE> raw;
      raw.w = st[k * kResBlock + threadIdx.x];
      float f[VE];
      raw_to_float<Tr, VE>(raw, f);
      const float inv = s_inv[key];
#pragma unroll
      for (int j = 0; j < VE; ++j) f[j] = __fmul_rn(f[j], inv);
      store_bytes<VE>(a.codes + (l0 + lb) * N + uint64_t(off) * VE, fp8_pack<VE>(f), true);
    }
    __syncthreads();
    if (TRACE && threadIdx.x == 0) tr[s * 4 + 3] = gtimer();
  };
  for (int p = 2; p < 2 + PF; ++p) prefetch(p);
  issue(0);
  issue(1);
  if (ZS) {  // this block's slot column -> 0, then a grid barrier (overlapping the first loads)
    for (uint32_t key = threadIdx.x; key < a.L * a.Hs; key += kResBlock)
      a.slots[uint64_t(key) * gridDim.x + blockIdx.x] = 0;
    cooperative_groups::this_grid().sync();
  }
  for (uint32_t s = 0; s < a.nsteps; ++s) {
    prefetch(s + 2 + PF);
    uint32_t pv = EARLY == 1 && s > 0 ? poll_first(s - 1) : 0u;
    cp_async_wait<1>();
    __syncthreads();
    if (EARLY == 2 && s > 0) pv = poll_first(s - 1);
    if (TRACE && threadIdx.x == 0) tr[s * 4 + 0] = gtimer();
    publish(s);
    if (TRACE && threadIdx.x == 0) tr[s * 4 + 1] = gtimer();
    if (s > 0) quantize_step(s - 1, pv);
    issue(s + 2);
  }
  quantize_step(a.nsteps - 1, EARLY ? poll_first(a.nsteps - 1) : 0u);
}

}  // namespace
}  // namespace kvk

#include "exp_common.cuh"

int main(int argc, char** argv) {
  using namespace kvk;
  using namespace kvkexp;
  cudaDeviceProp prop;
  cudaStream_t st = start(prop);
  Timer timer(st);
  struct Shape { const char* name; int64_t L, T, H, D; };
  const Shape shapes[] = {{"llama3-8b", 32, 4096, 8, 128}, {"smollm2", 30, 4096, 3, 64}};
  for (const Shape& sh : shapes) {
    const int64_t N = sh.T * sh.H * sh.D, n = sh.L * N, Nv = N / 8;
    uint16_t* x; uint8_t *codes, *codes_ref; float *scale, *scale_ref; uint32_t* ws; uint64_t* trace;
    void *cpa, *cpb;
    const int64_t bytes = n * 2 + n + sh.L * 4;
    CK(cudaMalloc(&x, n * 2)); CK(cudaMalloc(&codes, n)); CK(cudaMalloc(&codes_ref, n));
    CK(cudaMalloc(&scale, sh.L * 4)); CK(cudaMalloc(&scale_ref, sh.L * 4));
    const int64_t wsw = sh.L * 4 * prop.multiProcessorCount;
    CK(cudaMalloc(&ws, wsw * 4));
    CK(cudaMalloc(&cpa, bytes / 2)); CK(cudaMalloc(&cpb, bytes / 2));
    fill_kernel<<<1024, 256, 0, st>>>(x, n);
    CK(cudaMemsetAsync(cpa, 3, bytes / 2, st));
    const float t_copy = timer.median_us([&] { CK(cudaMemcpyAsync(cpb, cpa, bytes / 2, cudaMemcpyDeviceToDevice, st)); });
    const double copy_gbps = bytes / t_copy / 1e3;
    printf("\n== %s L=%ld T=%ld H=%ld D=%ld bf16, %.1f MiB counted; copy %.1f us = %.0f GB/s\n", sh.name, sh.L, sh.T,
           sh.H, sh.D, bytes / 1048576.0, t_copy, copy_gbps);
    auto pct = [&](float us) { return 100.0 * (bytes / us / 1e3) / copy_gbps; };
    // library (memset + resident kernel), as the bench runs it
    auto lib = [&] {
      CK(kvk_quantize_fp8(x, 2, sh.L, sh.T, sh.H, sh.D, N, sh.H * sh.D, sh.D, codes_ref, scale_ref, 0, true, ws, wsw, st));
    };
    const float t_lib = timer.median_us(lib);
    printf("library (memset + kernel)            %8.1f us %6.1f%%\n", t_lib, pct(t_lib));
    // two kernels (the resident path refused: no workspace)
    const float t_two = timer.median_us([&] {
      CK(kvk_quantize_fp8(x, 2, sh.L, sh.T, sh.H, sh.D, N, sh.H * sh.D, sh.D, codes, scale, 0, true, nullptr, 0, st));
    });
    printf("two kernels                          %8.1f us %6.1f%%\n", t_two, pct(t_two));
    lib();
    CK(cudaStreamSynchronize(st));
    std::vector<uint8_t> hc_ref(n), hc(n);
    std::vector<float> hs_ref(sh.L), hs(sh.L);
    CK(cudaMemcpy(hc_ref.data(), codes_ref, n, cudaMemcpyDeviceToHost));
    CK(cudaMemcpy(hs_ref.data(), scale_ref, sh.L * 4, cudaMemcpyDeviceToHost));
    for (int64_t step_kb : {8192}) {
      int64_t B = std::max<int64_t>(1, step_kb * 1024 / (Nv * 16));
      B = std::min<int64_t>(B, sh.L);
      const int64_t stepv = B * Nv;
      const int sms = prop.multiProcessorCount;
      int K = 1;
      while (int64_t(sms) * kResBlock * K < stepv) K *= 2;
      if (K > 4) continue;
      int nt = 1024;
      uint32_t grid = 0;
      auto set_nt = [&](int v) { nt = v; grid = uint32_t((stepv + nt * K - 1) / (nt * K)); };
      set_nt(512);
      ResidentArgs a{};
      a.x = x; a.sL = N; a.codes = codes; a.scale = scale; a.slots = ws;
      a.L = uint32_t(sh.L); a.B = uint32_t(B); a.Hs = 1; a.nsteps = uint32_t((sh.L + B - 1) / B); a.Nv = uint32_t(Nv);
      a.divNv = FastDiv(uint32_t(Nv)); a.divC = FastDiv(uint32_t(sh.D / 8)); a.divH = FastDiv(uint32_t(sh.H));
      CK(cudaMalloc(&trace, uint64_t(grid) * a.nsteps * 4 * 8));
      auto run = [&](auto kern, bool memset) {
        const int smem = kResStages * nt * K * 16;
        CK(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
        if (memset) CK(cudaMemsetAsync(ws, 0, size_t(sh.L) * grid * 4, st));
        cudaLaunchConfig_t cfg{};
        cfg.gridDim = dim3(grid); cfg.blockDim = dim3(nt); cfg.dynamicSmemBytes = smem; cfg.stream = st;
        cudaLaunchAttribute attr[1];
        attr[0].id = cudaLaunchAttributeCooperative; attr[0].val.cooperative = 1;
        cfg.attrs = attr; cfg.numAttrs = 1;
        CK(cudaLaunchKernelEx(&cfg, kern, a, trace));
      };
      auto variant = [&](const char* name, auto kern, int ntv, bool zs = false) {
        set_nt(ntv);
        // kernel alone: the slots are zeroed before the start event
        for (int i = 0; i < 5; ++i) run(kern, true);
        std::vector<float> v;
        for (int i = 0; i < 40; ++i) {
          CK(cudaMemsetAsync(ws, 0, size_t(sh.L) * grid * 4, st));
          flush_kernel<<<264, 1024, 0, st>>>(timer.fl, timer.fln, timer.sink);
          CK(cudaEventRecord(timer.e0, st)); run(kern, false); CK(cudaEventRecord(timer.e1, st));
          CK(cudaEventSynchronize(timer.e1));
          float ms; CK(cudaEventElapsedTime(&ms, timer.e0, timer.e1)); v.push_back(ms * 1e3f);
        }
        std::sort(v.begin(), v.end());
        const float t1 = v[v.size() / 2];
        const float t2 = timer.median_us([&] { run(kern, !zs); });
        if (zs) {  // garbage in the workspace must not matter
          CK(cudaMemsetAsync(ws, 0xff, size_t(sh.L) * grid * 4, st));
          run(kern, false);
        }
        CK(cudaMemcpy(hc.data(), codes, n, cudaMemcpyDeviceToHost));
        CK(cudaMemcpy(hs.data(), scale, sh.L * 4, cudaMemcpyDeviceToHost));
        const bool ok = hc == hc_ref && memcmp(hs.data(), hs_ref.data(), sh.L * 4) == 0;
        printf("step %5ld KiB B=%ld K=%d grid=%u %-14s kernel %8.1f us %6.1f%% | memset+kernel %8.1f us %6.1f%%  %s\n",
               step_kb, B, K, grid, name, t1, pct(t1), t2, pct(t2), ok ? "ok" : "MISMATCH");
      };
      auto trace_report = [&](const char* name, auto kern, int ntv) {
        set_nt(ntv);
        CK(cudaMemsetAsync(trace, 0, uint64_t(grid) * a.nsteps * 32, st));
        CK(cudaMemsetAsync(ws, 0, size_t(sh.L) * grid * 4, st));
        flush_kernel<<<264, 1024, 0, st>>>(timer.fl, timer.fln, timer.sink);
        run(kern, false);
        CK(cudaStreamSynchronize(st));
        std::vector<uint64_t> t(uint64_t(grid) * a.nsteps * 4);
        CK(cudaMemcpy(t.data(), trace, t.size() * 8, cudaMemcpyDeviceToHost));
        uint64_t t0 = ~0ull;
        for (uint32_t b = 0; b < grid; ++b) t0 = std::min(t0, t[uint64_t(b) * a.nsteps * 4]);
        printf("  trace %s (ns from the first landing; per step: land min/med/max, publish med, barrier-done "
               "med/max, quantized med/max)\n", name);
        double sum_wait = 0, sum_q = 0, sum_pub = 0;
        for (uint32_t s = 0; s < a.nsteps; ++s) {
          std::vector<double> land, pub, pol, qd;
          for (uint32_t b = 0; b < grid; ++b) {
            const uint64_t* r = &t[(uint64_t(b) * a.nsteps + s) * 4];
            land.push_back(double(r[0] - t0)); pub.push_back(double(r[1] - t0));
            pol.push_back(double(r[2] - t0)); qd.push_back(double(r[3] - t0));
          }
          auto srt = [](std::vector<double>& v) { std::sort(v.begin(), v.end()); };
          std::vector<double> dw, dq, dp;
          for (uint32_t b = 0; b < grid; ++b) {
            const uint64_t* r = &t[(uint64_t(b) * a.nsteps + s) * 4];
            dp.push_back(double(r[1] - r[0]));
            dq.push_back(double(r[3] - r[2]));
          }
          srt(land); srt(pub); srt(pol); srt(qd); srt(dp); srt(dq);
          const size_t m = grid / 2;
          sum_pub += dp[m]; sum_q += dq[m];
          if (s < 6 || s + 3 >= a.nsteps)
            printf("  s=%2u land %7.0f %7.0f %7.0f | pub %7.0f | bar %7.0f %7.0f | q %7.0f %7.0f | publish %5.0f quant %5.0f\n",
                   s, land[0], land[m], land.back(), pub[m], pol[m], pol.back(), qd[m], qd.back(), dp[m], dq[m]);
        }
        printf("  median per step: publish %.0f ns, quantize+store %.0f ns\n", sum_pub / a.nsteps, sum_q / a.nsteps);
        // gaps: land(s) - quantized(s-1) per block, i.e. time waiting for data after the last work
        double wl = 0, wb = 0;
        for (uint32_t b = 0; b < grid; ++b)
          for (uint32_t s = 1; s < a.nsteps; ++s) {
            const uint64_t* r = &t[(uint64_t(b) * a.nsteps + s) * 4];
            const uint64_t* rp = &t[(uint64_t(b) * a.nsteps + s - 1) * 4];
            wl += double(r[0]) - double(s >= 2 ? t[(uint64_t(b) * a.nsteps + s - 2) * 4 + 3] : rp[1]);
            wb += double(rp[2]) - double(r[1]);  // barrier of s-1 done minus publish of s
          }
        printf("  mean per block-step: wait for the landing %.0f ns, wait in the barrier %.0f ns\n",
               wl / grid / (a.nsteps - 1), wb / grid / (a.nsteps - 1));
      };
      auto all = [&](auto kc) {
        constexpr int KK = decltype(kc)::value;
        variant("base", res_x<BF16, KK, 1024, false, false, 0>, 1024);
        variant("acc+early1", res_x<BF16, KK, 1024, false, true, 1>, 1024);
        variant("agg", res_x<BF16, KK, 1024, false, false, 0, true>, 1024);
        variant("acc+early1+agg", res_x<BF16, KK, 1024, false, true, 1, true>, 1024);
        variant("acc+early2+agg", res_x<BF16, KK, 1024, false, true, 2, true>, 1024);
        variant("early1+agg", res_x<BF16, KK, 1024, false, false, 1, true>, 1024);
        variant("early2+agg", res_x<BF16, KK, 1024, false, false, 2, true>, 1024);
        variant("acc+early1+agg+zs", res_x<BF16, KK, 1024, false, true, 1, true, true>, 1024, true);
        variant("early2+agg+zs", res_x<BF16, KK, 1024, false, false, 2, true, true>, 1024, true);
        variant("agg+zs", res_x<BF16, KK, 1024, false, false, 0, true, true>, 1024, true);
      };
      if (K == 1) all(std::integral_constant<int, 1>{});
      else if (K == 2) all(std::integral_constant<int, 2>{});
      else all(std::integral_constant<int, 4>{});
      CK(cudaFree(trace));
    }
    CK(cudaFree(x)); CK(cudaFree(codes)); CK(cudaFree(codes_ref)); CK(cudaFree(scale)); CK(cudaFree(scale_ref));
    CK(cudaFree(ws)); CK(cudaFree(cpa)); CK(cudaFree(cpb));
  }
  return 0;
}

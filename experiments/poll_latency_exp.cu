// Private experiment (fourteenth session): does a block's own cp.async traffic delay its amax-slot
// poll? The one-pass fp8 kernel's grid barrier is a relaxed load of slots that sit in L2 (hits),
// issued while the block has a step of cp.async loads (64 KiB an SM) in flight to HBM. Here every
// block of a full grid (one 1024-thread block an SM) starts K * 16 KiB of loads into shared
// memory, then thread 0 times one relaxed load of an L2-resident word (clock64 before the load and
// after a use of its value). Loads by cp.async (1024 threads, 16 B each) or by TMA bulk copies
// (thread 0, one 16 KiB copy per k, an mbarrier counting the bytes). K = 0: no traffic. Modes
// cp.async-w0idle (warp 0, the prober, copies nothing; the other warps as in cp.async) and
// tma-bulk-w1 (the bulk copies issued by warp 1) tell whether the wait is the prober's own.
//
//   nvcc -arch=sm_90 -std=c++17 -O3 -Icsrc experiments/poll_latency_exp.cu -o /tmp/pl && /tmp/pl
#include "quant_all.cuh"  // (the harnesses' convention, exp_common.cuh: ld_relaxed_gpu)

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <vector>

#include "exp_common.cuh"

using kvk::ld_relaxed_gpu;
__device__ __forceinline__ long long clock_after(uint32_t dep) {  // clock64 once dep is available
  long long t = 0;
  asm volatile("{ .reg .pred p; setp.ne.u32 p, %1, 0x12345678; @p mov.u64 %0, %%clock64; }" : "+l"(t) : "r"(dep)
               : "memory");
  return t;
}

// out[block] = {probe cycles, cycles until the block's data landed (thread 0's view)}
__global__ void __launch_bounds__(1024, 1) probe_kernel(const uint4* src, const uint32_t* slot, int K, int mode,
                                                        long long* out) {
  extern __shared__ uint4 sm[];
  __shared__ alignas(8) uint64_t mbar;
  const uint4* base = src + uint64_t(blockIdx.x) * 1024 * K;
  const uint32_t sbar = static_cast<uint32_t>(__cvta_generic_to_shared(&mbar));
  if (threadIdx.x == 0) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(sbar) : "memory");
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    (void)ld_relaxed_gpu(slot);  // the line in L2 (and nowhere closer: .relaxed.gpu loads skip L1)
  }
  __syncthreads();
  long long t0 = clock64();
  if (mode == 0 || (mode == 2 && threadIdx.x >= 32)) {
    for (int k = 0; k < K; ++k) {
      const uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(sm + k * 1024 + threadIdx.x));
      asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(s), "l"(base + k * 1024 + threadIdx.x) : "memory");
    }
    asm volatile("cp.async.commit_group;" ::: "memory");
  } else if ((mode == 1 ? threadIdx.x == 0 : threadIdx.x == 32) && K > 0) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(sbar), "r"(K * 16384) : "memory");
    for (int k = 0; k < K; ++k) {
      const uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(sm + k * 1024));
      asm volatile(
          "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], 16384, [%2];" ::"r"(s),
          "l"(base + k * 1024), "r"(sbar)
          : "memory");
    }
  }
  long long probe = 0, landed = 0;
  if (threadIdx.x == 0) {
    const long long a = clock64();
    const uint32_t v = ld_relaxed_gpu(slot);
    probe = clock_after(v) - a;
  }
  if (mode == 0 || mode == 2) {
    asm volatile("cp.async.wait_group 0;" ::: "memory");
  } else if (K > 0) {
    uint32_t done = 0;
    while (!done)
      asm volatile("{ .reg .pred p; mbarrier.try_wait.parity.shared::cta.b64 p, [%1], 0; selp.u32 %0, 1, 0, p; }"
                   : "=r"(done) : "r"(sbar) : "memory");
  }
  __syncthreads();
  landed = clock64() - t0;
  if (threadIdx.x == 0) {
    out[blockIdx.x * 2] = probe;
    out[blockIdx.x * 2 + 1] = landed;
  }
}

int main() {
  using namespace kvkexp;
  cudaDeviceProp prop;
  cudaStream_t st = start(prop);
  const int sms = prop.multiProcessorCount, Kmax = 12;
  const uint64_t nvec = uint64_t(sms) * 1024 * Kmax;
  uint4* src; uint32_t* slot; long long* out;
  CK(cudaMalloc(&src, nvec * 16)); CK(cudaMemset(src, 1, nvec * 16));
  CK(cudaMalloc(&slot, 4096)); CK(cudaMemset(slot, 0, 4096));
  CK(cudaMalloc(&out, sms * 16));
  CK(cudaFuncSetAttribute(probe_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Kmax * 16384));
  Timer tm(st);
  std::vector<long long> h(sms * 2);
  printf("grid %d x 1024 threads; an L2-hit relaxed load timed by thread 0 while the block's loads are in flight\n", sms);
  printf("  mode      K  KiB/SM   probe cycles (p10 / median / p90)   landed cycles (median)\n");
  const char* names[4] = {"cp.async", "tma-bulk", "cp.async-w0idle", "tma-bulk-w1"};
  for (int mode : {0, 2, 1, 3}) {
    for (int K : {0, 1, 2, 4, 8, 12}) {
      std::vector<long long> pr, ld;
      for (int rep = 0; rep < 10; ++rep) {
        tm.flush();
        probe_kernel<<<sms, 1024, Kmax * 16384, st>>>(src, slot, K, mode, out);
        CK(cudaGetLastError());
        CK(cudaMemcpyAsync(h.data(), out, sms * 16, cudaMemcpyDeviceToHost, st));
        CK(cudaStreamSynchronize(st));
        for (int b = 0; b < sms; ++b) pr.push_back(h[2 * b]), ld.push_back(h[2 * b + 1]);
      }
      std::sort(pr.begin(), pr.end());
      std::sort(ld.begin(), ld.end());
      const size_t n = pr.size();
      printf("  %-15s %2d %7d   %8lld / %8lld / %8lld          %8lld\n", names[mode], K, K * 16,
             pr[n / 10], pr[n / 2], pr[n * 9 / 10], ld[n / 2]);
    }
  }
  return 0;
}

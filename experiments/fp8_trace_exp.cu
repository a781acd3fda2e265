// Private experiment (seventh session; run in the eighth and tenth, records in
// bench/results/fp8-trace-h200-2026-11-27.txt and fp8-groups-h200-2026-11-27.txt): per-block
// %globaltimer trace of the library's one-pass fp8 kernel (quant_fp8_resident_kernel, the variant
// the launcher picks), per tensor and per head, Llama-3-8B and SmolLM2 at T=4096.
//
// csrc/quant*.cu (quant_all.cuh) are compiled here with KVK_FP8_TRACE: thread 0 of each block stores the time at
// four points of each step (landed, published, scale known, quantized), and at block start and
// past the first grid barrier. Prints, per step, the median over blocks of each point (ns from the
// first landing), the kernel's ends (block start -> first landing, via the grid barrier; last
// landing -> last quantized) and the mean time per block of each phase of an iteration s: landing
// wait [quantized(s-2) -> landed(s)], publish [landed(s) -> published(s)], barrier wait
// [published(s) -> scale known(s-1)], quantize [scale known(s-1) -> quantized(s-1)]. Also times
// the kernel with the trace pointers null (the hooks then cost thread 0 a load and a branch each;
// no L2 flush between runs; each launch alone, so the time includes the launch), for reference.
// Developer knobs (KVK_FP8_GROUPS=0, ...) apply as in the library.
//
//   nvcc -arch=sm_90 -std=c++17 -O3 -Icsrc experiments/fp8_trace_exp.cu -o /tmp/fp8t && /tmp/fp8t
#define KVK_FP8_TRACE 1
#include "quant_all.cuh"

#include <algorithm>
#include <cstdio>
#include <vector>

#include "exp_common.cuh"

static double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0 : v[v.size() / 2];
}

int main() {
  using namespace kvk;
  using namespace kvkexp;
  cudaDeviceProp prop;
  cudaStream_t st = start(prop);
  const int sms = prop.multiProcessorCount;
  struct Shape { const char* name; int64_t L, T, H, D; };
  const Shape shapes[] = {{"llama3-8b", 32, 4096, 8, 128}, {"smollm2", 30, 4096, 3, 64}};
  for (const Shape& sh : shapes) {
    const int64_t N = sh.T * sh.H * sh.D, n = sh.L * N;
    uint16_t* x; uint8_t* codes; float* scale; uint32_t* ws; uint64_t* trace;
    CK(cudaMalloc(&x, n * 2)); CK(cudaMalloc(&codes, n)); CK(cudaMalloc(&scale, sh.L * sh.H * 4));
    const int64_t wsw = sh.L * sh.H * 4 * sms;
    CK(cudaMalloc(&ws, wsw * 4));
    const int64_t ntr = int64_t(4 * sms + 1) * 64 * 4;  // grid <= 4 blocks/SM (+1: a zero row ends it)
    CK(cudaMalloc(&trace, ntr * 8));
    uint64_t* starts;  // when each block started (KVK_FP8_TRACE_START)
    CK(cudaMalloc(&starts, (4 * sms + 1) * 16));
    fill_kernel<<<1024, 256, 0, st>>>(x, n);
    for (int scope : {0, 1}) {
      auto run = [&] {
        CK(kvk_quantize_fp8(x, 2, sh.L, sh.T, sh.H, sh.D, N, sh.H * sh.D, sh.D, codes, scale, scope, true, ws, wsw, st));
      };
      uint64_t* none = nullptr;
      CK(cudaMemcpyToSymbol(g_kvk_fp8_trace, &none, sizeof(none)));
      CK(cudaMemcpyToSymbol(g_kvk_fp8_start, &none, sizeof(none)));
      for (int i = 0; i < 5; ++i) run();
      cudaEvent_t e0, e1; CK(cudaEventCreate(&e0)); CK(cudaEventCreate(&e1));
      std::vector<double> ts;
      for (int i = 0; i < 20; ++i) {
        CK(cudaEventRecord(e0, st)); run(); CK(cudaEventRecord(e1, st)); CK(cudaEventSynchronize(e1));
        float ms; CK(cudaEventElapsedTime(&ms, e0, e1)); ts.push_back(ms * 1e3);
      }
      CK(cudaMemsetAsync(trace, 0, ntr * 8, st));
      CK(cudaMemsetAsync(starts, 0, (4 * sms + 1) * 16, st));
      CK(cudaMemcpyToSymbol(g_kvk_fp8_trace, &trace, sizeof(trace)));
      CK(cudaMemcpyToSymbol(g_kvk_fp8_start, &starts, sizeof(starts)));
      run();
      CK(cudaStreamSynchronize(st));
      CK(cudaMemcpyToSymbol(g_kvk_fp8_trace, &none, sizeof(none)));
      CK(cudaMemcpyToSymbol(g_kvk_fp8_start, &none, sizeof(none)));
      std::vector<uint64_t> h(ntr), hs(2 * (4 * sms + 1));
      CK(cudaMemcpy(h.data(), trace, ntr * 8, cudaMemcpyDeviceToHost));
      CK(cudaMemcpy(hs.data(), starts, hs.size() * 8, cudaMemcpyDeviceToHost));
      // [block][64 steps][4]: grid = blocks with stamps, nsteps = block 0's stamped steps
      auto at = [&](int b, int s, int p) { return h[(uint64_t(b) * 64 + s) * 4 + p]; };
      int grid = 0, nsteps = 0;
      while (grid < 4 * sms && at(grid, 0, 0) != 0) ++grid;
      while (nsteps < 64 && at(0, nsteps, 0) != 0) ++nsteps;
      uint64_t t0 = ~0ull;
      for (int b = 0; b < grid; ++b) t0 = std::min(t0, at(b, 0, 0));
      printf("\n== %s %s: %.1f us with the trace off (median of 20), grid %d, %d steps\n", sh.name, scope ? "head" : "tensor",
             median(ts), grid, nsteps);
      printf("   step   landed   published   scale-known   quantized   (median over blocks, ns from the first landing)\n");
      double wl = 0, wp = 0, wb = 0, wq = 0; int cnt = 0;
      for (int s = 0; s < nsteps; ++s) {
        std::vector<double> v[4];
        for (int b = 0; b < grid; ++b)
          for (int p = 0; p < 4; ++p) v[p].push_back(double(at(b, s, p)) - double(t0));
        if (s < 4 || s >= nsteps - 2)
          printf("   %4d %8.0f %11.0f %13.0f %11.0f\n", s, median(v[0]), median(v[1]), median(v[2]), median(v[3]));
        if (s >= 2) {
          for (int b = 0; b < grid; ++b) {
            wl += double(at(b, s, 0)) - double(at(b, s - 2, 3));
            wp += double(at(b, s, 1)) - double(at(b, s, 0));
            wb += double(at(b, s - 1, 2)) - double(at(b, s, 1));
            wq += double(at(b, s - 1, 3)) - double(at(b, s - 1, 2));
            ++cnt;
          }
        }
      }
      {  // the ends: block starts -> first landing, last landing -> last quantized
        std::vector<double> st0, fill, tail, sync, sync_land;
        uint64_t last = 0;
        for (int b = 0; b < grid; ++b) {
          st0.push_back(double(hs[2 * b]) - double(t0));
          fill.push_back(double(at(b, 0, 0)) - double(hs[2 * b]));
          sync.push_back(double(hs[2 * b + 1]) - double(hs[2 * b]));
          sync_land.push_back(double(at(b, 0, 0)) - double(hs[2 * b + 1]));
          tail.push_back(double(at(b, nsteps - 1, 3)) - double(at(b, nsteps - 1, 0)));
          last = std::max(last, at(b, nsteps - 1, 3));
        }
        uint64_t first = ~0ull;
        uint64_t lastst = 0;
        for (int b = 0; b < grid; ++b) first = std::min(first, hs[2 * b]), lastst = std::max(lastst, hs[2 * b]);
        printf("   block start (median) %.0f ns from the first landing; start -> own first landing %.0f; last step landed ->"
               " quantized %.0f; first start -> last quantized %.0f ns\n",
               median(st0), median(fill), median(tail), double(last - first));
        printf("   block starts spread over %.0f ns; start -> past the first grid barrier %.0f (median), then -> first landing %.0f\n",
               double(lastst - first), median(sync), median(sync_land));
      }
      if (cnt)
        printf("   mean per block-iteration (s >= 2): landing wait %.0f ns, publish %.0f, barrier wait %.0f, quantize %.0f\n",
               wl / cnt, wp / cnt, wb / cnt, wq / cnt);
    }
    CK(cudaFree(x)); CK(cudaFree(codes)); CK(cudaFree(scale)); CK(cudaFree(ws)); CK(cudaFree(trace));
    CK(cudaFree(starts));
  }
  return 0;
}

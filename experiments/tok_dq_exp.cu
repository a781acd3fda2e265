// Private experiment (2026-11-27, eighth session; results in
// bench/results/tok-dq-dense-h200-2026-11-27.txt): int4/int2 token-group dequantize (G = 32) by the
// library's two kernels, launched directly: dequant_tok_kernel (4 channels = 8-byte outputs per
// thread, any strides and groups) and dequant_tok_dense_kernel (16-byte outputs, whole g32 groups,
// contiguous output). The dense kernel began here as a harness kernel with U = 8/16/32 code words
// in flight (U = 32 won: 90.6% vs 88.5% for int4 at T=4096); it now lives in csrc/quant_token.cu.
//
// The harness #includes quant_all.cuh (csrc/quant*.cu), builds codes/scale/zero with the library's quantize, takes
// the general kernel's output as the reference (bit-exact comparison of the bf16 output) and times
// both with events after warm-up, L2 flushed, median of 40, against a device copy of the same
// byte count in the same run (bytes = codes + scale + zero read + output written, as the bench).
//
//   nvcc -arch=sm_90 -std=c++17 -O3 -Icsrc experiments/tok_dq_exp.cu -o /tmp/tokdq && /tmp/tokdq
#include "quant_all.cuh"

#include <cstdio>
#include <cstring>
#include <vector>

#include "exp_common.cuh"

int main() {
  using namespace kvk;
  using namespace kvkexp;
  cudaDeviceProp prop;
  cudaStream_t st = start(prop);
  Timer timer(st);
  const int64_t L = 32, H = 8, D = 128, G = 32;
  for (int64_t T : {4096, 32768}) {
    for (int bits : {4, 2}) {
      const int64_t n = L * T * H * D, ncode = n * bits / 8, nsz = L * (T / G) * H * D;
      const int64_t bytes = ncode + 2 * nsz * 4 + n * 2;
      uint16_t *x, *out, *ref; uint8_t* codes; float *scale, *zero; void *cpa, *cpb;
      CK(cudaMalloc(&x, n * 2)); CK(cudaMalloc(&out, n * 2)); CK(cudaMalloc(&ref, n * 2));
      CK(cudaMalloc(&codes, ncode)); CK(cudaMalloc(&scale, nsz * 4)); CK(cudaMalloc(&zero, nsz * 4));
      CK(cudaMalloc(&cpa, bytes / 2)); CK(cudaMalloc(&cpb, bytes / 2));
      fill_kernel<<<1024, 256, 0, st>>>(x, n);
      CK(cudaMemsetAsync(cpa, 3, bytes / 2, st));
      CK(kvk_quantize_int(x, 2, L, T, H, D, T * H * D, H * D, D, codes, scale, zero, bits, G, 1, st));
      const float t_copy = timer.median_us([&] { CK(cudaMemcpyAsync(cpb, cpa, bytes / 2, cudaMemcpyDeviceToDevice, st)); });
      const double copy_gbps = bytes / t_copy / 1e3;
      auto pct = [&](float us) { return 100.0 * (bytes / us / 1e3) / copy_gbps; };
      printf("\n== int%d:g32:token dequantize, L=%ld T=%ld H=%ld D=%ld -> bf16, %.1f MiB counted; copy %.1f us\n",
             bits, L, T, H, D, bytes / 1048576.0, t_copy);
      // TokArgs of one launch over all L layers with E channels per thread (as launch_tok fills it)
      auto args = [&](uint16_t* o, int E, int np) {
        TokArgs a{};
        a.out = o; a.sL = T * H * D; a.sT = H * D; a.sH = D;
        a.codes = codes; a.scale = scale; a.zero = zero;
        a.T = uint32_t(T); a.H = uint32_t(H); a.D = uint32_t(D); a.G = uint32_t(G);
        a.NTG = uint32_t(T / G); a.Dp = uint32_t(D * bits / 8);
        a.n = uint32_t(L * (T / G) * np * H * (D / E));
        a.divC = FastDiv(uint32_t(D / E)); a.divH = FastDiv(uint32_t(H)); a.divNTG = FastDiv(uint32_t(T / G));
        a.x_aligned = a.c_aligned = a.s_aligned = true;
        return a;
      };
      std::vector<uint16_t> href(n), hout(n);
      auto variant = [&](const char* name, auto kern, int E, int np, uint16_t* o, bool check) {
        cudaFuncAttributes fa;
        CK(cudaFuncGetAttributes(&fa, kern));
        const TokArgs a = args(o, E, np);
        auto run = [&] { kern<<<(a.n + kBlock - 1) / kBlock, kBlock, 0, st>>>(a); CK(cudaGetLastError()); };
        CK(cudaMemsetAsync(o, 0xff, n * 2, st));  // poisoned
        run();
        CK(cudaStreamSynchronize(st));
        CK(cudaMemcpy(check ? hout.data() : href.data(), o, n * 2, cudaMemcpyDeviceToHost));
        const char* verdict = !check ? "reference" : std::memcmp(hout.data(), href.data(), n * 2) == 0 ? "bit-exact" : "MISMATCH";
        const float t = timer.median_us(run);
        printf("%-40s %8.1f us %6.1f%%  %3d regs  %s\n", name, t, pct(t), fa.numRegs, verdict);
      };
      // dense kernel: NP threads per group, 32 / NP tokens each (the library launches NP = 4)
      if (bits == 4) {
        variant("dequant_tok_kernel (E=4)", dequant_tok_kernel<BF16, 4, 4, true>, 4, 1, ref, false);
        variant("dequant_tok_dense_kernel (E=8, 32 tok)", dequant_tok_dense_kernel<BF16, 8, 4, 1>, 8, 1, out, true);
        variant("dequant_tok_dense_kernel (E=8, 16 tok)", dequant_tok_dense_kernel<BF16, 8, 4, 2>, 8, 2, out, true);
        variant("dequant_tok_dense_kernel (E=8, 8 tok)", dequant_tok_dense_kernel<BF16, 8, 4, 4>, 8, 4, out, true);
      } else {
        variant("dequant_tok_kernel (E=4)", dequant_tok_kernel<BF16, 4, 2, true>, 4, 1, ref, false);
        variant("dequant_tok_dense_kernel (E=8, 32 tok)", dequant_tok_dense_kernel<BF16, 8, 2, 1>, 8, 1, out, true);
        variant("dequant_tok_dense_kernel (E=8, 16 tok)", dequant_tok_dense_kernel<BF16, 8, 2, 2>, 8, 2, out, true);
        variant("dequant_tok_dense_kernel (E=8, 8 tok)", dequant_tok_dense_kernel<BF16, 8, 2, 4>, 8, 4, out, true);
      }
      CK(cudaFree(x)); CK(cudaFree(out)); CK(cudaFree(ref)); CK(cudaFree(codes));
      CK(cudaFree(scale)); CK(cudaFree(zero)); CK(cudaFree(cpa)); CK(cudaFree(cpb));
    }
  }
  return 0;
}

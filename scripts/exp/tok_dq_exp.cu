// Private experiment (prepared 2026-11-27, seventh session; not yet run on a GPU): int4/int2
// token-group dequantize (G = 32) with 16-byte output vectors and a short code batch.
//
// Why: the library's dequant_tok_kernel gives each thread 4 channels (8-byte stores) and loads its
// 32 tokens' 1-2 byte code words before decoding: 87.6-87.9% of copy at T=4096 on the H200, while
// the Triton kernel, whose threads write 16-byte vectors, reaches 89.8-91.7% (97% of the ceiling of
// its read:write mix). The earlier 16-byte CUDA attempt batched 32 code words and needed 74
// registers (3 blocks/SM, 61-67%). Here a thread owns 8 channels and batches U = 8 or 16 tokens:
// U code words (4 bytes int4, 2 bytes int2) + 16 scale/zero registers.
//
// The harness #includes csrc/quant.cu, builds codes/scale/zero with the library's quantize, takes
// the library's dequantize as the reference (bit-exact comparison of the bf16 output) and times
// both with events after warm-up, L2 flushed, median of 40, against a device copy of the same
// byte count in the same run (bytes = codes + scale + zero read + output written, as the bench).
//
//   nvcc -arch=sm_90 -std=c++17 -O3 -Icsrc scripts/exp/tok_dq_exp.cu -o /tmp/tokdq && /tmp/tokdq
#include "../../csrc/quant.cu"

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <vector>

namespace kvk {
namespace {

struct WideArgs {
  const uint8_t* codes;  // [L, T, H, D*BITS/8]
  const float* scale;    // [L, T/32, H, D]
  const float* zero;
  uint16_t* out;         // bf16 [L, T, H, D], dense
  uint32_t T, H, D, NTG, n;  // n = L * NTG * H * D/8 threads
  FastDiv divC, divH, divNTG;
};

// One thread: 8 channels of one head over one 32-token group; U code words in flight.
template <int BITS, int U, int MINB>
__global__ void __launch_bounds__(256, MINB) dq_tok_wide(const WideArgs a) {
  constexpr int E = 8, NB = E * BITS / 8, G = 32;
  const uint32_t s = blockIdx.x * blockDim.x + threadIdx.x;
  if (s >= a.n) return;
  uint32_t q1, c, q2, h, l, tg;
  a.divC.divmod(s, q1, c);
  a.divH.divmod(q1, q2, h);
  a.divNTG.divmod(q2, l, tg);
  const uint64_t row = uint64_t(a.H) * a.D;  // output elements per token
  const uint64_t crow = uint64_t(a.H) * a.D * BITS / 8;
  const uint64_t t0 = uint64_t(l) * a.T + uint64_t(tg) * G;
  uint16_t* __restrict__ op = a.out + t0 * row + uint64_t(h) * a.D + c * E;
  const uint8_t* __restrict__ cp = a.codes + t0 * crow + (uint64_t(h) * a.D + c * E) * BITS / 8;
  float sc[E], zp[E];
  load_floats<E>(a.scale + uint64_t(q1) * a.D + c * E, true, sc);
  load_floats<E>(a.zero + uint64_t(q1) * a.D + c * E, true, zp);
#pragma unroll 1
  for (int b = 0; b < G; b += U) {
    uint32_t w[U];
#pragma unroll
    for (int u = 0; u < U; ++u) w[u] = uint32_t(load_bytes<NB>(cp + uint64_t(b + u) * crow, true));
#pragma unroll
    for (int u = 0; u < U; ++u) {
      uint32_t q[E];
      float f[E];
      unpack_codes<BITS, E>(w[u], q);
#pragma unroll
      for (int j = 0; j < E; ++j) f[j] = int_dequantize(q[j], sc[j], zp[j]);
      store_vec<BF16, E>(op + uint64_t(b + u) * row, true, f);
    }
  }
}

}  // namespace
}  // namespace kvk

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
      auto lib = [&] {
        CK(kvk_dequantize_int(codes, scale, zero, ref, 2, L, T, H, D, T * H * D, H * D, D, bits, G, 1, st));
      };
      const float t_lib = timer.median_us(lib);
      printf("library dequant_tok_kernel        %8.1f us %6.1f%%\n", t_lib, pct(t_lib));
      lib();
      CK(cudaStreamSynchronize(st));
      std::vector<uint16_t> href(n), hout(n);
      CK(cudaMemcpy(href.data(), ref, n * 2, cudaMemcpyDeviceToHost));
      WideArgs a{};
      a.codes = codes; a.scale = scale; a.zero = zero; a.out = out;
      a.T = uint32_t(T); a.H = uint32_t(H); a.D = uint32_t(D); a.NTG = uint32_t(T / G);
      a.n = uint32_t(L * (T / G) * H * (D / 8));
      a.divC = FastDiv(uint32_t(D / 8)); a.divH = FastDiv(uint32_t(H)); a.divNTG = FastDiv(uint32_t(T / G));
      auto variant = [&](const char* name, auto kern) {
        int regs = 0;
        cudaFuncAttributes fa; CK(cudaFuncGetAttributes(&fa, kern)); regs = fa.numRegs;
        auto run = [&] { kern<<<(a.n + 255) / 256, 256, 0, st>>>(a); CK(cudaGetLastError()); };
        CK(cudaMemsetAsync(out, 0xff, n * 2, st));  // poisoned
        run();
        CK(cudaStreamSynchronize(st));
        CK(cudaMemcpy(hout.data(), out, n * 2, cudaMemcpyDeviceToHost));
        const bool ok = std::memcmp(hout.data(), href.data(), n * 2) == 0;
        const float t = timer.median_us(run);
        printf("%-33s %8.1f us %6.1f%%  %3d regs  %s\n", name, t, pct(t), regs, ok ? "bit-exact" : "MISMATCH");
      };
      if (bits == 4) {
        variant("wide U=8", dq_tok_wide<4, 8, 1>);
        variant("wide U=16", dq_tok_wide<4, 16, 1>);
        variant("wide U=16, 4 blocks/SM", dq_tok_wide<4, 16, 4>);
        variant("wide U=32", dq_tok_wide<4, 32, 1>);
      } else {
        variant("wide U=8", dq_tok_wide<2, 8, 1>);
        variant("wide U=16", dq_tok_wide<2, 16, 1>);
        variant("wide U=16, 4 blocks/SM", dq_tok_wide<2, 16, 4>);
        variant("wide U=32", dq_tok_wide<2, 32, 1>);
      }
      CK(cudaFree(x)); CK(cudaFree(out)); CK(cudaFree(ref)); CK(cudaFree(codes));
      CK(cudaFree(scale)); CK(cudaFree(zero)); CK(cudaFree(cpa)); CK(cudaFree(cpb));
    }
  }
  return 0;
}

// csrc/blend.cu -- RoPE re-rotation of cached keys in place (spec: kvkernels/reference/blend.py).
//
// One block per (layer, token): the token's cos/sin rows at both positions are read once (into
// shared memory as the composed rotation by new - old, in float32), then the block's threads
// walk the H * half rotary pairs. Only rotary channels are read and written; a token whose
// position lies outside the cache is skipped (no read of the cache, no write of the key).
#include "blend.h"

#include "quant_math.cuh"

namespace kvk {
namespace {

struct FP8 {};

template <typename Tr>
struct KeyIO {
  using S = typename Tr::storage;
  __device__ __forceinline__ static float load(const S* p, float) { return Tr::to_float(*p); }
  __device__ __forceinline__ static void store(S* p, float v, float) { *p = Tr::from_float(v); }
};
template <>
struct KeyIO<FP8> {
  using S = uint8_t;
  __device__ __forceinline__ static float load(const S* p, float scale) { return fp8_decode(*p) * scale; }
  __device__ __forceinline__ static void store(S* p, float v, float scale) {
    *p = static_cast<uint8_t>(fp8_encode(fp8_prescale(v, fp8_inv(scale))));
  }
};

constexpr int kMaxHalf = 256;  // head_dim up to 512

template <typename Tr>
__global__ void rerotate_kernel(typename KeyIO<Tr>::S* key, int64_t T, int64_t H, int64_t sL, int64_t sT,
                                int64_t sH, const float* k_scale, int64_t ssL, int64_t ssT, int64_t ssH,
                                const int64_t* old_pos, const int64_t* new_pos, const float* cos_sin,
                                int64_t max_pos, int half, bool neox) {
  __shared__ float cd_s[kMaxHalf], sd_s[kMaxHalf];
  const int64_t l = blockIdx.x / T, t = blockIdx.x % T;
  const int64_t po = old_pos[t], pn = new_pos[t];
  if (po < 0 || po >= max_pos || pn < 0 || pn >= max_pos) return;  // whole block: uniform
  const float* ro = cos_sin + po * 2 * half;
  const float* rn = cos_sin + pn * 2 * half;
  for (int i = threadIdx.x; i < half; i += blockDim.x) {
    const float co = ro[i], so = ro[half + i], cn = rn[i], sn = rn[half + i];
    cd_s[i] = __fadd_rn(__fmul_rn(cn, co), __fmul_rn(sn, so));
    sd_s[i] = __fsub_rn(__fmul_rn(sn, co), __fmul_rn(cn, so));
  }
  __syncthreads();
  using IO = KeyIO<Tr>;
  const int64_t pairs = H * half;
  for (int64_t j = threadIdx.x; j < pairs; j += blockDim.x) {
    const int64_t h = j / half;
    const int i = static_cast<int>(j % half);
    auto* base = key + l * sL + t * sT + h * sH;
    const float sc = k_scale ? k_scale[l * ssL + t * ssT + h * ssH] : 1.f;
    const int64_t o1 = neox ? i : 2 * i, o2 = neox ? i + half : 2 * i + 1;
    const float x1 = IO::load(base + o1, sc), x2 = IO::load(base + o2, sc);
    const float c = cd_s[i], s = sd_s[i];
    IO::store(base + o1, __fsub_rn(__fmul_rn(x1, c), __fmul_rn(x2, s)), sc);
    IO::store(base + o2, __fadd_rn(__fmul_rn(x2, c), __fmul_rn(x1, s)), sc);
  }
}

template <typename Tr>
cudaError_t launch(void* key, int64_t L, int64_t T, int64_t H, int64_t sL, int64_t sT, int64_t sH,
                   const float* k_scale, int64_t ssL, int64_t ssT, int64_t ssH, const int64_t* old_pos,
                   const int64_t* new_pos, const float* cos_sin, int64_t max_pos, int64_t half, int neox,
                   cudaStream_t stream) {
  const int64_t blocks = L * T;
  const int64_t pairs = H * half;
  int threads = 32;
  while (threads < pairs && threads < 256) threads *= 2;
  rerotate_kernel<Tr><<<static_cast<unsigned>(blocks), threads, 0, stream>>>(
      static_cast<typename KeyIO<Tr>::S*>(key), T, H, sL, sT, sH, k_scale, ssL, ssT, ssH, old_pos, new_pos, cos_sin,
      max_pos, static_cast<int>(half), neox != 0);
  return cudaGetLastError();
}

}  // namespace
}  // namespace kvk

cudaError_t kvk_rerotate_keys(void* key, int key_dtype, int64_t L, int64_t T, int64_t H, int64_t D, int64_t sL,
                              int64_t sT, int64_t sH, const float* k_scale, int64_t ssL, int64_t ssT, int64_t ssH,
                              const int64_t* old_pos, const int64_t* new_pos, const float* cos_sin,
                              int64_t max_pos, int64_t half, int is_neox, cudaStream_t stream) {
  if (L <= 0 || T <= 0 || H <= 0) return cudaSuccess;
  if (half <= 0 || half > kvk::kMaxHalf || 2 * half > D || L * T > 0x7fffffffLL) return cudaErrorInvalidValue;
  switch (key_dtype) {
    case 0: return kvk::launch<kvk::F32>(key, L, T, H, sL, sT, sH, nullptr, 0, 0, 0, old_pos, new_pos, cos_sin, max_pos, half, is_neox, stream);
    case 1: return kvk::launch<kvk::F16>(key, L, T, H, sL, sT, sH, nullptr, 0, 0, 0, old_pos, new_pos, cos_sin, max_pos, half, is_neox, stream);
    case 2: return kvk::launch<kvk::BF16>(key, L, T, H, sL, sT, sH, nullptr, 0, 0, 0, old_pos, new_pos, cos_sin, max_pos, half, is_neox, stream);
    case 3:
      if (!k_scale) return cudaErrorInvalidValue;
      return kvk::launch<kvk::FP8>(key, L, T, H, sL, sT, sH, k_scale, ssL, ssT, ssH, old_pos, new_pos, cos_sin, max_pos, half, is_neox, stream);
    default: return cudaErrorInvalidValue;
  }
}

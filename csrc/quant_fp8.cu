// quant_fp8.cu -- fp8 tensor / head scopes with computed scales, two-kernel path: amax_kernel +
// fp8_finalize_kernel (then the rows kernels of quant_rows.cu quantize) and launch_fp8_scale.
#include "quant_launch.cuh"

namespace kvk {
namespace {

// ================================================================================================
// fp8 tensor / head scopes with computed scales: amax, then scale = amax / 448
// ================================================================================================
struct AmaxArgs {
  const void* x;  // [L, T, H, D]
  int64_t sL, sT, sH;
  float* amax;    // [L] (tensor) or [L, H] (head), zeroed first; receives amax as float bits
  uint32_t H, nvec, tiles;  // nvec: vectors per scope entry (T*H*C or T*C)
  int scope;      // 0 tensor, 1 head
  FastDiv divC, divH, divTiles;
  bool aligned;
};

template <typename Tr, int E>
__global__ void __launch_bounds__(kBlock) amax_kernel(const AmaxArgs a) {
  using S = typename Tr::storage;
  const S* __restrict__ x = static_cast<const S*>(a.x);
  uint32_t sidx, tile;
  a.divTiles.divmod(blockIdx.x, sidx, tile);
  const uint32_t l = a.scope == 0 ? sidx : sidx / a.H;
  const uint32_t hh = a.scope == 0 ? 0 : sidx - l * a.H;
  const uint32_t base = tile * uint32_t(kBlock * kItems * kAmaxIters);
  float m = 0.f;
  for (int it = 0; it < kAmaxIters; ++it) {
    float v[kItems][E];
    bool act[kItems];
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      const uint32_t f = base + uint32_t(it * kItems + i) * kBlock + threadIdx.x;
      act[i] = f < a.nvec;
      if (act[i]) {
        uint32_t sub, c, t, h;
        a.divC.divmod(f, sub, c);
        if (a.scope == 0) a.divH.divmod(sub, t, h);
        else { t = sub; h = hh; }
        load_vec<Tr, E>(x + int64_t(l) * a.sL + int64_t(t) * a.sT + int64_t(h) * a.sH + int64_t(c) * E, a.aligned, v[i]);
      }
    }
#pragma unroll
    for (int i = 0; i < kItems; ++i)
      if (act[i]) m = fmaxf(m, amax_finite<E>(v[i]));  // finite values only
  }
  __shared__ float red[kBlock / 32];
  m = group_max(m, 32);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) red[warp] = m;
  __syncthreads();
  if (warp == 0) {
    m = lane < kBlock / 32 ? red[lane] : 0.f;
    m = group_max(m, 32);
    // m >= 0 and finite: its int bits order like the floats
    if (lane == 0) atomicMax(reinterpret_cast<int*>(a.amax + sidx), __float_as_int(m));
  }
}

__global__ void fp8_finalize_kernel(float* __restrict__ scale, uint32_t n) {
  const uint32_t i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) scale[i] = fp8_scale_from_amax(scale[i]);
}

}  // namespace

// ---- fp8 tensor/head amax ----------------------------------------------------------------------
cudaError_t launch_fp8_scale(const void* x, int dt, int64_t L, int64_t T, int64_t H, int64_t D, int64_t sL,
                             int64_t sT, int64_t sH, float* scale, int scope, cudaStream_t stream) {
  const int sz = dtype_size(dt), emax = 16 / sz;
  const int E = D % emax == 0 ? emax : 1;
  const int64_t C = D / E;
  const int64_t nscale = L * (scope == 0 ? 1 : H);
  const int64_t nvec = T * C * (scope == 0 ? H : 1);
  const int64_t per_block = int64_t(kBlock) * kItems * kAmaxIters;
  const int64_t tiles = (nvec + per_block - 1) / per_block;
  if (nvec > kMaxCount || nscale * tiles > kMaxCount) return cudaErrorNotSupported;
  cudaError_t err = cudaMemsetAsync(scale, 0, size_t(nscale) * sizeof(float), stream);
  if (err != cudaSuccess) return err;
  AmaxArgs a{};
  a.x = x;
  a.sL = sL; a.sT = sT; a.sH = sH;
  a.amax = scale;
  a.H = uint32_t(H);
  a.nvec = uint32_t(nvec);
  a.tiles = uint32_t(tiles);
  a.scope = scope;
  a.divC = FastDiv(uint32_t(C));
  a.divH = FastDiv(uint32_t(H));
  a.divTiles = FastDiv(uint32_t(tiles));
  a.aligned = ptr_aligned(x, int64_t(E) * sz) && stride_ok(sL, L, E) && stride_ok(sT, T, E) && stride_ok(sH, H, E);
  const uint32_t blocks = uint32_t(nscale * tiles);
  err = with_dtype(dt, [&](auto tr) {
    using Tr = decltype(tr);
    if (E == 16 / Tr::kSize) amax_kernel<Tr, 16 / Tr::kSize><<<blocks, kBlock, 0, stream>>>(a);
    else amax_kernel<Tr, 1><<<blocks, kBlock, 0, stream>>>(a);
    return cudaGetLastError();
  });
  if (err != cudaSuccess) return err;
  fp8_finalize_kernel<<<ceil_div_u32(nscale, kBlock), kBlock, 0, stream>>>(scale, uint32_t(nscale));
  return cudaGetLastError();
}

}  // namespace kvk

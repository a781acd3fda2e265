// csrc/codec.cu -- GPU kernels + host launchers of the entropy coders (csrc/codec.h). The coders
// themselves are the __host__ __device__ code of codec_ac.cuh / codec_rans.cuh, so the bytes are
// the CPU build's (csrc/codec_cpu.cpp).
//
// ac: one thread a (segment, channel) stream (as CacheGen's GPU coder), symbols read coalesced
//     across the channels of a warp.
// rans: one warp a 32-lane block (lane = channel). Decode: the block's 32 cum rows (and, fused,
//     the level rows) in shared memory; per token each lane finds its symbol, one ballot gives
//     the lanes that renormalise and a prefix popcount their word; output stores are coalesced
//     across the 32 channels. Encode: the same backwards, words written from the block's end.
// Every read is bounded by the stream's offsets (checked against the payload size), every write
// by the caller's shapes; failing streams/blocks are written as zeros and flag *status.
#include "codec.h"

#include <type_traits>

#include "codec_ac.cuh"
#include "codec_gpu.cuh"

using namespace kvk_codec;
using kvk_codec::gpu::kFull;
using kvk_codec::gpu::warp_rows;

namespace {

constexpr int kThreads = 256;

inline unsigned blocks_for(int64_t n, int per) { return (unsigned)((n + per - 1) / per); }

__global__ void ac_encode_kernel(const uint8_t* __restrict__ sym, int64_t S, int64_t N, int64_t C,
                                 const int32_t* __restrict__ cdf, int64_t K, int bins, const int32_t* __restrict__ tid,
                                 uint8_t* __restrict__ scratch, int64_t cap, int64_t* __restrict__ lens,
                                 int32_t* status) {
  const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= S * C) return;
  const int64_t s = i / C, c = i - s * C;
  const int64_t k = tid[i];
  int32_t st;
  int64_t len = 0;
  if (k < 0 || k >= K) {
    st = ERR_TABLE_ID;
  } else if (!ac_row_ok(cdf + k * (bins + 1), bins)) {
    st = ERR_TABLE;
  } else {
    st = ac_encode_stream(sym + s * N * C + c, N, C, cdf + k * (bins + 1), bins, scratch + i * cap, cap, &len);
  }
  lens[i] = st ? 0 : len;
  if (st) atomicOr(status, st);
}

// One warp a stream.
__global__ void pack_kernel(const uint8_t* __restrict__ scratch, int64_t n, int64_t cap, bool from_end,
                            const int64_t* __restrict__ lens, const int64_t* __restrict__ offsets,
                            uint8_t* __restrict__ payload, int64_t payload_cap) {
  const int64_t i = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x & 31;
  if (i >= n) return;
  int64_t len = lens[i];
  const int64_t dst = offsets[i];
  if (len < 0 || len > cap || dst < 0 || dst > payload_cap - len) return;  // never past either buffer
  const uint8_t* src = scratch + i * cap + (from_end ? cap - len : 0);
  for (int64_t j = lane; j < len; j += 32) payload[dst + j] = src[j];
}

__global__ void ac_decode_kernel(const uint8_t* __restrict__ payload, int64_t nbytes,
                                 const int64_t* __restrict__ offsets, const int32_t* __restrict__ cdf, int64_t K,
                                 int bins, const int32_t* __restrict__ tid, int64_t S, int64_t N, int64_t C,
                                 uint8_t* __restrict__ out, int32_t* status) {
  const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= S * C) return;
  const int64_t s = i / C, c = i - s * C;
  uint8_t* o = out + s * N * C + c;
  int64_t lo, hi;
  int32_t st = 0;
  const int64_t k = tid[i];
  if (!stream_bounds(offsets, i, nbytes, &lo, &hi)) st = ERR_OFFSETS;
  else if (k < 0 || k >= K) st = ERR_TABLE_ID;
  else if (!ac_row_ok(cdf + k * (bins + 1), bins)) st = ERR_TABLE;
  if (st) {
    for (int64_t n = 0; n < N; ++n) o[n * C] = 0;
  } else {
    st = ac_decode_stream(payload + lo, hi - lo, cdf + k * (bins + 1), bins, o, N, C);
  }
  if (st) atomicOr(status, st);
}

__global__ void rans_prep_kernel(const int32_t* __restrict__ freq, int64_t K, int bins, int pb,
                                 uint16_t* __restrict__ cum, uint8_t* __restrict__ ok) {
  const int64_t k = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (k >= K) return;
  ok[k] = rans_prep_row(freq + k * bins, bins, pb, cum + k * (bins + 1)) ? 1 : 0;
}

__global__ void rans_encode_kernel(const uint8_t* __restrict__ sym, int64_t S, int64_t N, int64_t C,
                                   const uint16_t* __restrict__ cum, const uint8_t* __restrict__ ok, int64_t K,
                                   int bins, const int32_t* __restrict__ tid, int pb, uint8_t* __restrict__ scratch,
                                   int64_t cap, int64_t* __restrict__ lens, int32_t* status) {
  const int lane = threadIdx.x & 31;
  gpu::WarpBlock wb;
  if (!wb.init(((int64_t)blockIdx.x * blockDim.x + threadIdx.x) / 32, S, C, lane)) return;  // warp-uniform
  const int64_t b = wb.b, s = wb.s, c0 = wb.c0;
  const int na = wb.na;
  const bool active = wb.active;
  int64_t k;
  int32_t st = warp_rows(tid, ok, K, s, C, c0, lane, active, &k);
  uint8_t* end = scratch + b * cap + cap;
  int64_t p = 0;  // bytes written before end
  uint32_t x = RANS_L;
  const uint16_t* row = cum + k * (bins + 1);
  const uint8_t* src = sym + s * N * C + c0 + lane;
  for (int64_t n = N - 1; n >= 0 && !st; --n) {
    bool bad = false, emit = false;
    uint32_t f = 1, c = 0;
    if (active) {
      const int v = src[n * C];
      if (v >= bins) {
        bad = true;
      } else {
        c = row[v];
        f = (uint32_t)row[v + 1] - c;
        bad = f == 0;
      }
      emit = !bad && rans_enc_renorm(x, f, pb);
    }
    if (__any_sync(kFull, bad)) { st = ERR_SYMBOL; break; }
    const unsigned m = __ballot_sync(kFull, emit);
    if (emit) {
      store_u16le(end - p - 2 * __popc(m >> lane), x & 0xFFFF);
      x >>= 16;
    }
    p += 2 * __popc(m);
    if (active) x = rans_enc_put(x, f, c, pb);
  }
  if (!st && active) store_u32le(end - p - 4 * (na - lane), x);
  if (lane == 0) {
    lens[b] = st ? 0 : p + 4 * na;
    if (st) atomicOr(status, st);
  }
}

// Symbols only (the fused decode is csrc/codec_dequant.cu): one warp a block, out uint8 [S, N, C].
template <bool SMALL>
__global__ void rans_decode_kernel(const uint8_t* __restrict__ payload, int64_t nbytes,
                                   const int64_t* __restrict__ offsets, const uint16_t* __restrict__ cum,
                                   const uint8_t* __restrict__ ok, int64_t K, int bins,
                                   const int32_t* __restrict__ tid, int pb, int64_t S, int64_t N, int64_t C,
                                   uint8_t* __restrict__ out, int32_t* status) {
  extern __shared__ __align__(16) unsigned char smem[];
  const int warp = threadIdx.x / 32, lane = threadIdx.x & 31;
  const gpu::WarpSmem lay(bins, 0, false);
  uint16_t* sh_cum = reinterpret_cast<uint16_t*>(smem + warp * lay.bytes());
  gpu::WarpBlock wb;
  if (!wb.init((int64_t)blockIdx.x * (blockDim.x / 32) + warp, S, C, lane)) return;  // warp-uniform
  const int64_t b = wb.b, s = wb.s, c0 = wb.c0;
  const int na = wb.na;
  const bool active = wb.active;
  int64_t k;
  int32_t st = warp_rows(tid, ok, K, s, C, c0, lane, active, &k);
  gpu::load_rows(cum, nullptr, bins, k, na, lane, sh_cum, nullptr, 0);
  gpu::WarpDecoder dec;
  st = dec.begin(payload, nbytes, offsets, b, na, lane, sh_cum + lane * gpu::cum_stride(bins), bins, pb, active, st);
  uint8_t* o = out + s * N * C + c0 + lane;
  auto run = [&](auto w16) {
    uint8_t* on = o;
    for (int64_t n = 0; n < N && !st; ++n, on += C) {
      int sy;
      if (!dec.template step<SMALL, decltype(w16)::value>(&sy)) { st = ERR_TRUNCATED; break; }
      if (active) *on = (uint8_t)sy;
    }
  };
  if (dec.w16) run(std::true_type{});  // warp-uniform: one loop per word alignment
  else run(std::false_type{});
  if (!st && !dec.finished_ok()) st = ERR_TRAILING;
  if (st) {  // the whole block as zeros (as the CPU coder)
    if (active)
      for (int64_t t = 0; t < N; ++t) o[t * C] = 0;
    if (lane == 0) atomicOr(status, st);
  }
}

}  // namespace

cudaError_t kvk_ac_encode(const uint8_t* sym, int64_t S, int64_t N, int64_t C, const int32_t* cdf, int64_t K,
                          int bins, const int32_t* tid, uint8_t* scratch, int64_t cap_stream, int64_t* lens,
                          int32_t* status, cudaStream_t stream) {
  const int64_t n = S * C;
  if (n <= 0) return cudaSuccess;
  ac_encode_kernel<<<blocks_for(n, kThreads), kThreads, 0, stream>>>(sym, S, N, C, cdf, K, bins, tid, scratch,
                                                                     cap_stream, lens, status);
  return cudaGetLastError();
}

cudaError_t kvk_codec_pack(const uint8_t* scratch, int64_t n, int64_t cap, bool from_end, const int64_t* lens,
                           const int64_t* offsets, uint8_t* payload, int64_t payload_cap, cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  pack_kernel<<<blocks_for(n, kThreads / 32), kThreads, 0, stream>>>(scratch, n, cap, from_end, lens, offsets,
                                                                     payload, payload_cap);
  return cudaGetLastError();
}

cudaError_t kvk_ac_decode(const uint8_t* payload, int64_t nbytes, const int64_t* offsets, const int32_t* cdf,
                          int64_t K, int bins, const int32_t* tid, int64_t S, int64_t N, int64_t C, uint8_t* out,
                          int32_t* status, cudaStream_t stream) {
  const int64_t n = S * C;
  if (n <= 0) return cudaSuccess;
  ac_decode_kernel<<<blocks_for(n, kThreads), kThreads, 0, stream>>>(payload, nbytes, offsets, cdf, K, bins, tid, S,
                                                                     N, C, out, status);
  return cudaGetLastError();
}

cudaError_t kvk_rans_prep(const int32_t* freq, int64_t K, int bins, int pb, uint16_t* cum, uint8_t* ok,
                          cudaStream_t stream) {
  if (K <= 0) return cudaSuccess;
  rans_prep_kernel<<<blocks_for(K, kThreads), kThreads, 0, stream>>>(freq, K, bins, pb, cum, ok);
  return cudaGetLastError();
}

cudaError_t kvk_rans_encode(const uint8_t* sym, int64_t S, int64_t N, int64_t C, const uint16_t* cum,
                            const uint8_t* ok, int64_t K, int bins, const int32_t* tid, int pb, uint8_t* scratch,
                            int64_t cap_block, int64_t* lens, int32_t* status, cudaStream_t stream) {
  const int64_t nb = S * ((C + LANES - 1) / LANES);
  if (nb <= 0) return cudaSuccess;
  rans_encode_kernel<<<blocks_for(nb, kThreads / 32), kThreads, 0, stream>>>(sym, S, N, C, cum, ok, K, bins, tid, pb,
                                                                             scratch, cap_block, lens, status);
  return cudaGetLastError();
}

cudaError_t kvk_rans_decode(const uint8_t* payload, int64_t nbytes, const int64_t* offsets, const uint16_t* cum,
                            const uint8_t* ok, int64_t K, int bins, const int32_t* tid, int pb, int64_t S, int64_t N,
                            int64_t C, void* out, const float* lut, const float* s_tok, const float* s_ch,
                            const float* z_ch, int dtype, int64_t os_s, int64_t os_n, int32_t* status,
                            cudaStream_t stream) {
  if (lut != nullptr)
    return kvk_rans_decode_dequant(payload, nbytes, offsets, cum, ok, K, bins, tid, pb, S, N, C, out, lut, 0, s_tok,
                                   s_ch, z_ch, dtype, os_s, os_n, status, stream);
  const int64_t nb = S * ((C + LANES - 1) / LANES);
  if (nb <= 0) return cudaSuccess;
  const int warp_bytes = gpu::WarpSmem(bins, 0, false).bytes();
  int warps = 4;  // fewer warps a block for wide tables: at most 48 KiB of shared memory a block
  while (warps > 1 && warps * warp_bytes > 48 * 1024) warps >>= 1;
  const size_t smem = (size_t)warps * warp_bytes;
  auto kern = bins <= gpu::kSmallBins ? rans_decode_kernel<true> : rans_decode_kernel<false>;
  kern<<<blocks_for(nb, warps), warps * 32, smem, stream>>>(payload, nbytes, offsets, cum, ok, K, bins, tid, pb, S, N,
                                                            C, static_cast<uint8_t*>(out), status);
  return cudaGetLastError();
}

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

#include "codec_ac.cuh"
#include "codec_rans.cuh"

using namespace kvk_codec;

namespace {

constexpr int kThreads = 256;
constexpr unsigned kFull = 0xFFFFFFFFu;

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

// Lane j's row index of block (s, c0) and whether every active lane's row is usable.
__device__ __forceinline__ int32_t warp_rows(const int32_t* tid, const uint8_t* ok, int64_t K, int64_t s, int64_t C,
                                             int64_t c0, int lane, bool active, int64_t* k_out) {
  int32_t st = 0;
  int64_t k = 0;
  if (active) {
    k = tid[s * C + c0 + lane];
    if (k < 0 || k >= K) { st = ERR_TABLE_ID; k = 0; }
    else if (!ok[k]) st = ERR_TABLE;
  }
  *k_out = k;
  // OR over the warp (uniform result)
  for (int d = 16; d > 0; d >>= 1) st |= __shfl_xor_sync(kFull, st, d);
  return st;
}

__global__ void rans_encode_kernel(const uint8_t* __restrict__ sym, int64_t S, int64_t N, int64_t C,
                                   const uint16_t* __restrict__ cum, const uint8_t* __restrict__ ok, int64_t K,
                                   int bins, const int32_t* __restrict__ tid, int pb, uint8_t* __restrict__ scratch,
                                   int64_t cap, int64_t* __restrict__ lens, int32_t* status) {
  const int64_t G = (C + LANES - 1) / LANES;
  const int64_t b = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x & 31;
  if (b >= S * G) return;  // warp-uniform
  const int64_t s = b / G, c0 = (b - s * G) * LANES;
  const int na = (int)(C - c0 < LANES ? C - c0 : LANES);
  const bool active = lane < na;
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

template <bool kDequant>
__global__ void rans_decode_kernel(const uint8_t* __restrict__ payload, int64_t nbytes,
                                   const int64_t* __restrict__ offsets, const uint16_t* __restrict__ cum,
                                   const uint8_t* __restrict__ ok, int64_t K, int bins,
                                   const int32_t* __restrict__ tid, int pb, int64_t S, int64_t N, int64_t C,
                                   void* __restrict__ out, const float* __restrict__ lut,
                                   const float* __restrict__ s_tok, const float* __restrict__ s_ch,
                                   const float* __restrict__ z_ch, int dtype, int64_t os_s, int64_t os_n,
                                   int32_t* status) {
  extern __shared__ unsigned char smem[];
  const int warp = threadIdx.x / 32, lane = threadIdx.x & 31;
  const int cum_words = LANES * (bins + 1);                    // uint16 per warp
  const int cum_bytes = (cum_words * 2 + 15) / 16 * 16;
  const int warp_bytes = cum_bytes + (kDequant ? LANES * bins * 4 : 0);
  uint16_t* sh_cum = reinterpret_cast<uint16_t*>(smem + warp * warp_bytes);
  float* sh_lut = reinterpret_cast<float*>(smem + warp * warp_bytes + cum_bytes);

  const int64_t G = (C + LANES - 1) / LANES;
  const int64_t b = (int64_t)blockIdx.x * (blockDim.x / 32) + warp;
  if (b >= S * G) return;  // warp-uniform
  const int64_t s = b / G, c0 = (b - s * G) * LANES;
  const int na = (int)(C - c0 < LANES ? C - c0 : LANES);
  const bool active = lane < na;
  int64_t k;
  int32_t st = warp_rows(tid, ok, K, s, C, c0, lane, active, &k);
  int64_t lo = 0, hi = 0;
  if (!st && !stream_bounds(offsets, b, nbytes, &lo, &hi)) st = ERR_OFFSETS;
  const int64_t len = hi - lo;
  if (!st && (len < 4 * na || ((len - 4 * na) & 1))) st = ERR_TRUNCATED;

  // the block's rows into shared memory, coalesced: row r by all lanes
  for (int r = 0; r < na; ++r) {
    const int64_t kr = __shfl_sync(kFull, k, r);
    for (int e = lane; e <= bins; e += 32) sh_cum[r * (bins + 1) + e] = cum[kr * (bins + 1) + e];
    if (kDequant)
      for (int e = lane; e < bins; e += 32) sh_lut[r * bins + e] = lut[kr * bins + e];
  }
  __syncwarp();
  const uint16_t* row = sh_cum + lane * (bins + 1);
  const uint8_t* in = payload + lo;
  uint32_t x = RANS_L;
  if (!st && active) x = load_u32le(in + 4 * lane);
  if (!st && __any_sync(kFull, active && x < RANS_L)) st = ERR_TRUNCATED;

  float sch = 1.f, zch = 0.f;
  if (kDequant && active) {
    if (s_ch) sch = s_ch[s * C + c0 + lane];
    if (z_ch) zch = z_ch[s * C + c0 + lane];
  }
  const uint8_t* w = in + 4 * na;
  const int64_t nw = st ? 0 : (len - 4 * na) / 2;
  const uint32_t mask = (1u << pb) - 1;
  const unsigned lt = (1u << lane) - 1;
  int64_t p = 0;
  int64_t n = 0;
  for (; n < N && !st; ++n) {
    int sy = 0;
    bool need = false;
    uint32_t v = x;
    if (active) {
      const uint32_t slot = x & mask;
      sy = rans_find(row, bins, slot);
      v = rans_dec_advance(x, row, sy, pb);
      need = v < RANS_L;
    }
    const unsigned m = __ballot_sync(kFull, need);
    if (p + __popc(m) > nw) { st = ERR_TRUNCATED; break; }
    if (need) v = (v << 16) | load_u16le(w + 2 * (p + __popc(m & lt)));
    p += __popc(m);
    x = v;
    if (active) {
      if (kDequant) {
        float val = sh_lut[lane * bins + sy];
        if (s_tok) val = fmul_rn(val, s_tok[s * N + n]);
        if (s_ch) val = fmul_rn(val, sch);
        if (z_ch) val = fadd_rn(val, zch);
        store_out(out, s * os_s + n * os_n + c0 + lane, dtype, val);
      } else {
        static_cast<uint8_t*>(out)[(s * N + n) * C + c0 + lane] = (uint8_t)sy;
      }
    }
  }
  if (!st && (p != nw || __any_sync(kFull, active && x != RANS_L))) st = ERR_TRAILING;
  if (st) {  // the whole block as zeros (as the CPU coder)
    if (active)
      for (int64_t t = 0; t < N; ++t) {
        if (kDequant) store_out(out, s * os_s + t * os_n + c0 + lane, dtype, 0.f);
        else static_cast<uint8_t*>(out)[(s * N + t) * C + c0 + lane] = 0;
      }
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
  const int64_t nb = S * ((C + LANES - 1) / LANES);
  if (nb <= 0) return cudaSuccess;
  const bool dq = lut != nullptr;
  const int cum_bytes = (LANES * (bins + 1) * 2 + 15) / 16 * 16;
  const int warp_bytes = cum_bytes + (dq ? LANES * bins * 4 : 0);
  int warps = 4;
  while (warps > 1 && warps * warp_bytes > 48 * 1024) warps >>= 1;
  const size_t smem = (size_t)warps * warp_bytes;
  const unsigned grid = blocks_for(nb, warps);
  if (dq) {
    if (smem > 48 * 1024) {
      cudaError_t e = cudaFuncSetAttribute(rans_decode_kernel<true>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                           (int)smem);
      if (e != cudaSuccess) return e;
    }
    rans_decode_kernel<true><<<grid, warps * 32, smem, stream>>>(payload, nbytes, offsets, cum, ok, K, bins, tid, pb,
                                                                 S, N, C, out, lut, s_tok, s_ch, z_ch, dtype, os_s,
                                                                 os_n, status);
  } else {
    rans_decode_kernel<false><<<grid, warps * 32, smem, stream>>>(payload, nbytes, offsets, cum, ok, K, bins, tid,
                                                                  pb, S, N, C, out, nullptr, nullptr, nullptr,
                                                                  nullptr, 0, 0, 0, status);
  }
  return cudaGetLastError();
}

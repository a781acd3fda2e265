// csrc/codec_gpu.cuh -- device-side building blocks of the GPU rANS decoders (csrc/codec.cu,
// csrc/codec_paged.cu): one warp a 32-lane block (lane = channel), the block's tables in shared
// memory, one token a step (symbol search, one ballot for the lanes that renormalise, a prefix
// popcount for each one's word). GPU only (nvcc); the CPU coder is codec_rans.cuh's sequential
// block decoder, which produces the same symbols.
#pragma once

#include "codec_rans.cuh"

namespace kvk_codec {
namespace gpu {

constexpr unsigned kFull = 0xFFFFFFFFu;

// The block a warp codes: b = s * G + g (segment s, channels c0 = 32 g ...), na active lanes.
struct WarpBlock {
  int64_t b, s, c0;
  int na;
  bool active;
  // False (warp-uniform) when b is past the last block.
  __device__ __forceinline__ bool init(int64_t b_, int64_t S, int64_t C, int lane) {
    const int64_t G = (C + LANES - 1) / LANES;
    b = b_;
    if (b >= S * G) return false;
    s = b / G;
    c0 = (b - s * G) * LANES;
    na = (int)(C - c0 < LANES ? C - c0 : LANES);
    active = lane < na;
    return true;
  }
};

// Lane j's row index of block (s, c0) and whether every active lane's row is usable (warp-uniform).
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
  for (int d = 16; d > 0; d >>= 1) st |= __shfl_xor_sync(kFull, st, d);
  return st;
}

// Tables of at most 32 symbols (every preset's) get cum rows padded to 33 entries (0xFFFF past
// bins: above every slot) and a fixed, unrolled 5-step search; wider tables the generic search.
constexpr int kSmallBins = 32;
__host__ __device__ __forceinline__ int cum_stride(int bins) { return bins <= kSmallBins ? kSmallBins + 1 : bins + 1; }

// Shared memory of one warp: cum rows [32][cum_stride] (uint16, 16-byte padded), then the level
// rows: none, one (levels per segment: every lane reads the same row, a broadcast or distinct
// banks) or 32 ([32][lut_stride] float, lut_stride = bins | 1: odd, so lanes reading the same
// symbol of their own rows hit distinct banks), then optionally a 512-byte store tile.
struct WarpSmem {
  int cum_bytes, lut_stride, lut_bytes, tile_bytes;
  __host__ __device__ WarpSmem(int bins, int lut_rows, bool tile)
      : cum_bytes((LANES * cum_stride(bins) * 2 + 15) / 16 * 16), lut_stride(lut_rows > 1 ? (bins | 1) : 0),
        lut_bytes((lut_rows > 1 ? LANES * (bins | 1) * 4 : lut_rows * bins * 4 + 15) / 16 * 16),
        tile_bytes(tile ? 512 : 0) {}
  __host__ __device__ int bytes() const { return cum_bytes + lut_bytes + tile_bytes; }
};

// Copies the block's rows (cum, and lut when sh_lut) into shared memory, coalesced: row r by all lanes.
__device__ __forceinline__ void load_rows(const uint16_t* __restrict__ cum, const float* __restrict__ lut, int bins,
                                          int64_t k, int na, int lane, uint16_t* sh_cum, float* sh_lut,
                                          int lut_stride) {
  const int cs = cum_stride(bins);
  for (int r = 0; r < na; ++r) {
    const int64_t kr = __shfl_sync(kFull, k, r);
    for (int e = lane; e < cs; e += 32) sh_cum[r * cs + e] = e <= bins ? cum[kr * (bins + 1) + e] : (uint16_t)0xFFFF;
    if (sh_lut != nullptr)
      for (int e = lane; e < bins; e += 32) sh_lut[r * lut_stride + e] = lut[kr * bins + e];
  }
  __syncwarp();
}

// 16-bit shared-memory load at a 32-bit shared address (the search below steps addresses).
__device__ __forceinline__ uint32_t lds_u16(uint32_t addr) {
  unsigned short v;
  asm volatile("ld.shared.u16 %0, [%1];" : "=h"(v) : "r"(addr));
  return v;
}

// The symbol of a slot: the last s with row[s] <= slot (rows are non-decreasing, row[bins] =
// 2^pb > slot: s < bins); the same symbol as codec_rans.cuh's rans_find for every valid row.
// Also gives its cum and frequency (*c, *f). SMALL (padded 33-entry rows): five unrolled steps
// on the row's shared address, 3 instructions each.
template <bool SMALL>
__device__ __forceinline__ int find_symbol(const uint16_t* row, uint32_t row_s, int bins, uint32_t slot, uint32_t* c,
                                           uint32_t* f) {
  if constexpr (SMALL) {
    uint32_t q = row_s;
#pragma unroll
    for (uint32_t h = kSmallBins / 2; h > 0; h >>= 1) q = lds_u16(q + 2 * h) <= slot ? q + 2 * h : q;
    *c = lds_u16(q);
    *f = lds_u16(q + 2) - *c;
    return (int)((q - row_s) >> 1);
  } else {
    const int s = rans_find(row, bins, slot);
    *c = row[s];
    *f = (uint32_t)row[s + 1] - *c;
    return s;
  }
}

// The decoder state of one block (every lane of the warp holds one; call step() warp-uniformly).
struct WarpDecoder {
  const uint16_t* row;  // this lane's cum row (shared memory)
  uint32_t row_s;       // ... its shared-memory address
  const uint8_t* w;     // the block's words
  int64_t nw, p;
  uint32_t x, mask;
  unsigned lt;
  int bins, pb;
  bool active;
  bool w16;             // the words are 2-byte aligned: one 16-bit load each

  // Validates the block's stream and reads the states; returns the (warp-uniform) status.
  __device__ __forceinline__ int32_t begin(const uint8_t* payload, int64_t nbytes, const int64_t* offsets, int64_t b,
                                           int na, int lane, const uint16_t* my_row, int bins_, int pb_, bool act,
                                           int32_t st) {
    row = my_row;
    row_s = (uint32_t)__cvta_generic_to_shared(my_row);
    bins = bins_;
    pb = pb_;
    active = act;
    mask = (1u << pb) - 1;
    lt = (1u << lane) - 1;
    p = 0;
    x = RANS_L;
    int64_t lo = 0, hi = 0;
    if (!st && !stream_bounds(offsets, b, nbytes, &lo, &hi)) st = ERR_OFFSETS;
    const int64_t len = hi - lo;
    if (!st && (len < 4 * na || ((len - 4 * na) & 1))) st = ERR_TRUNCATED;
    const uint8_t* in = payload + lo;
    if (!st && active) x = load_u32le(in + 4 * lane);
    if (!st && __any_sync(kFull, active && x < RANS_L)) st = ERR_TRUNCATED;
    w = in + 4 * na;
    w16 = (reinterpret_cast<uintptr_t>(w) & 1) == 0;
    nw = st ? 0 : (len - 4 * na) / 2;
    return st;
  }

  // One token: this lane's symbol into *sy; false when the block runs out of words (uniform).
  // W16: the words are 2-byte aligned (w16; callers branch once per block, not per token).
  template <bool SMALL, bool W16>
  __device__ __forceinline__ bool step(int* sy) {
    int s = 0;
    bool need = false;
    uint32_t v = x;
    if (active) {
      const uint32_t slot = x & mask;
      uint32_t c, f;
      s = find_symbol<SMALL>(row, row_s, bins, slot, &c, &f);
      v = f * (x >> pb) + slot - c;  // rans_dec_advance
      need = v < RANS_L;
    }
    const unsigned m = __ballot_sync(kFull, need);
    const int cnt = __popc(m);
    if (p + cnt > nw) return false;
    if (need) {
      const int64_t i = p + __popc(m & lt);
      uint32_t word;
      if constexpr (W16) word = __ldg(reinterpret_cast<const unsigned short*>(w) + i);
      else word = load_u16le(w + 2 * i);
      v = (v << 16) | word;
    }
    p += cnt;
    x = v;
    *sy = s;
    return true;
  }

  // After the last token: every word used and every state back at 2^16 (uniform).
  __device__ __forceinline__ bool finished_ok() const { return p == nw && !__any_sync(kFull, active && x != RANS_L); }
};

}  // namespace gpu
}  // namespace kvk_codec

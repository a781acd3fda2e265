// csrc/codec_rans.cuh -- interleaved rANS (32 lanes a block, 32-bit states, 16-bit words,
// prob_bits <= 12), __host__ __device__ (docs/codec-spec.md, "Coders" / "rans").
//
// The per-symbol steps below are the whole coder; the sequential block functions (the CPU path)
// visit lanes in order, the GPU kernels in csrc/codec.cu run one lane a thread of a warp and
// place words with a ballot + prefix popcount. Both produce the same bytes.
#pragma once

#include "codec_common.cuh"

namespace kvk_codec {

constexpr uint32_t RANS_L = 1u << 16;

// Row check + cumulative frequencies: cum[0..bins] (uint16: M <= 4096). False if a frequency is
// negative or the row does not sum to 2^pb (cum then unspecified, within bins + 1 entries).
KVK_HD bool rans_prep_row(const int32_t* freq, int bins, int pb, uint16_t* cum) {
  int64_t acc = 0;
  bool ok = true;
  cum[0] = 0;
  for (int i = 0; i < bins; ++i) {
    int32_t f = freq[i];
    if (f < 0) ok = false;
    acc += f < 0 ? 0 : f;
    cum[i + 1] = (uint16_t)(acc > 0xFFFF ? 0xFFFF : acc);
  }
  return ok && acc == (int64_t(1) << pb);
}

// Encoder, one symbol (f > 0, c = cum[s]): does x need a word out first ...
KVK_HD bool rans_enc_renorm(uint32_t x, uint32_t f, int pb) { return (uint64_t)x >= ((uint64_t)f << (32 - pb)); }
// ... and the coded state (x already renormalised).
KVK_HD uint32_t rans_enc_put(uint32_t x, uint32_t f, uint32_t c, int pb) { return ((x / f) << pb) + (x % f) + c; }

// Decoder: the symbol of a slot, last s in [0, bins-1] with cum[s] <= slot.
KVK_HD int rans_find(const uint16_t* cum, int bins, uint32_t slot) {
  int base = 0, n = bins;
  while (n > 1) {
    int half = n >> 1;
    base = ((uint32_t)cum[base + half] <= slot) ? base + half : base;
    n -= half;
  }
  return base;
}

// Decoder, one symbol: the state after removing symbol s (before the word read).
KVK_HD uint32_t rans_dec_advance(uint32_t x, const uint16_t* cum, int s, int pb) {
  const uint32_t f = (uint32_t)cum[s + 1] - cum[s];
  return f * (x >> pb) + (x & ((1u << pb) - 1)) - cum[s];
}

// ---- sequential block coders (CPU) --------------------------------------------------------
// sym[n * sym_stride + j] is lane j's symbol of token n; cums[j] its row (bins + 1 entries).
// The block is written backwards ending at `end` (at most rans_block_capacity(N, na) bytes
// before it); *size gets its length. Returns 0 or ERR_SYMBOL.
KVK_HD int32_t rans_encode_block(const uint8_t* sym, int64_t sym_stride, int64_t N, int na,
                                 const uint16_t* const* cums, int bins, int pb, uint8_t* end, int64_t* size) {
  uint32_t x[LANES];
  for (int j = 0; j < na; ++j) x[j] = RANS_L;
  uint8_t* p = end;
  for (int64_t n = N - 1; n >= 0; --n) {
    const uint8_t* row = sym + n * sym_stride;
    for (int j = na - 1; j >= 0; --j) {
      const int s = row[j];
      if (s >= bins) return ERR_SYMBOL;
      const uint16_t* cum = cums[j];
      const uint32_t c = cum[s], f = (uint32_t)cum[s + 1] - c;
      if (f == 0) return ERR_SYMBOL;
      uint32_t v = x[j];
      if (rans_enc_renorm(v, f, pb)) {
        p -= 2;
        store_u16le(p, v & 0xFFFF);
        v >>= 16;
      }
      x[j] = rans_enc_put(v, f, c, pb);
    }
  }
  for (int j = na - 1; j >= 0; --j) {
    p -= 4;
    store_u32le(p, x[j]);
  }
  *size = end - p;
  return 0;
}

// Decode one block in[0, len) into out[n * out_stride + j] via the callback-free symbol sink
// `Sink` (sink(n, j, s)). Returns 0, ERR_TRUNCATED or ERR_TRAILING.
template <class Sink>
KVK_HD int32_t rans_decode_block(const uint8_t* in, int64_t len, int64_t N, int na, const uint16_t* const* cums,
                                 int bins, int pb, Sink& sink) {
  if (len < 4 * na || ((len - 4 * na) & 1)) return ERR_TRUNCATED;
  uint32_t x[LANES];
  for (int j = 0; j < na; ++j) {
    x[j] = load_u32le(in + 4 * j);
    if (x[j] < RANS_L) return ERR_TRUNCATED;
  }
  const uint8_t* w = in + 4 * na;
  const int64_t nw = (len - 4 * na) / 2;
  int64_t p = 0;
  const uint32_t mask = (1u << pb) - 1;
  for (int64_t n = 0; n < N; ++n) {
    for (int j = 0; j < na; ++j) {
      const uint16_t* cum = cums[j];
      const uint32_t slot = x[j] & mask;
      const int s = rans_find(cum, bins, slot);
      uint32_t v = rans_dec_advance(x[j], cum, s, pb);
      sink(n, j, s);
      if (v < RANS_L) {
        if (p >= nw) return ERR_TRUNCATED;
        v = (v << 16) | load_u16le(w + 2 * p);
        ++p;
      }
      x[j] = v;
    }
  }
  if (p != nw) return ERR_TRAILING;
  for (int j = 0; j < na; ++j)
    if (x[j] != RANS_L) return ERR_TRAILING;
  return 0;
}

}  // namespace kvk_codec

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

// Symbol lookup policies of the decoder (the same function of the slot): binary search over the
// row's cum (RansCumLookup: GPU and CPU) or a per-row slot table (RansSlotLookup: CPU, when the
// tables are reused enough to pay for building them). lookup(j, slot, &s) -> (freq, cum[s]).
struct RansCumLookup {
  const uint16_t* const* cums;
  int bins;
  KVK_HD uint32_t operator()(int j, uint32_t slot, int* s, uint32_t* c) const {
    const uint16_t* cum = cums[j];
    *s = rans_find(cum, bins, slot);
    *c = cum[*s];
    return (uint32_t)cum[*s + 1] - *c;
  }
};

// Coarse lookup (CPU): coarse[q] = the symbol holding slot q << shift (2^qbits entries a row),
// then a short forward scan. Same symbol as rans_find for a valid row.
KVK_HD void rans_build_coarse(const uint16_t* cum, int bins, int pb, int qbits, uint8_t* coarse) {
  const int shift = pb - qbits;
  int s = 0;
  for (int q = 0; q < (1 << qbits); ++q) {
    const uint32_t slot = (uint32_t)q << shift;
    while (s < bins - 1 && (uint32_t)cum[s + 1] <= slot) ++s;
    coarse[q] = (uint8_t)s;
  }
}

struct RansCoarseLookup {
  const uint16_t* const* cums;
  const uint8_t* const* coarse;
  int bins, shift;
  KVK_HD uint32_t operator()(int j, uint32_t slot, int* s, uint32_t* c) const {
    const uint16_t* cum = cums[j];
    int v = coarse[j][slot >> shift];
    while (v < bins - 1 && (uint32_t)cum[v + 1] <= slot) ++v;
    *s = v;
    *c = cum[v];
    return (uint32_t)cum[v + 1] - *c;
  }
};

// Slot table entry: sym | (freq - 1) << 8 | cum[sym] << 20 (freq <= 4096, cum < 4096).
KVK_HD void rans_build_slot_table(const uint16_t* cum, int bins, int pb, uint32_t* tab) {
  for (int s = 0; s < bins; ++s) {
    const uint32_t c = cum[s], f = (uint32_t)cum[s + 1] - c;
    for (uint32_t slot = c; slot < c + f && slot < (1u << pb); ++slot)
      tab[slot] = (uint32_t)s | ((f - 1) << 8) | (c << 20);
  }
}

struct RansSlotLookup {
  const uint32_t* const* tabs;
  KVK_HD uint32_t operator()(int j, uint32_t slot, int* s, uint32_t* c) const {
    const uint32_t e = tabs[j][slot];
    *s = (int)(e & 0xFF);
    *c = e >> 20;
    return ((e >> 8) & 0xFFF) + 1;
  }
};

// The decode loop of a block from token n0: states x[0, na), word position p in w[0, nw) (16-bit
// words). Returns 0, ERR_TRUNCATED or ERR_TRAILING (the end-of-block checks). The CPU's vector
// path resumes here after its fast tokens.
template <class Lookup, class Sink>
KVK_HD int32_t rans_decode_rows(const uint8_t* w, int64_t nw, int64_t n0, int64_t N, uint32_t* x, int na, int64_t p,
                                const Lookup& lookup, int pb, Sink& sink) {
  bool bad = false;
  const uint32_t mask = (1u << pb) - 1;
  for (int64_t n = n0; n < N; ++n) {
    for (int j = 0; j < na; ++j) {
      const uint32_t xj = x[j], slot = xj & mask;
      int s;
      uint32_t c;
      const uint32_t f = lookup(j, slot, &s, &c);
      uint32_t v = f * (xj >> pb) + slot - c;
      sink(n, j, s);
      const bool need = v < RANS_L;
      uint32_t word = 0;
      if (p < nw) word = load_u16le(w + 2 * p);
      bad |= need && p >= nw;
      v = need ? (v << 16) | word : v;
      p += need;
      x[j] = v;
    }
  }
  if (bad) return ERR_TRUNCATED;
  if (p != nw) return ERR_TRAILING;
  for (int j = 0; j < na; ++j)
    if (x[j] != RANS_L) return ERR_TRAILING;
  return 0;
}

// Decode one block in[0, len), symbols to sink(n, j, s). Returns 0, ERR_TRUNCATED or
// ERR_TRAILING. (Branch-free word reads: a lane that needs a word past the block's end marks the
// block truncated; the caller then overwrites the block's output.)
template <class Lookup, class Sink>
KVK_HD int32_t rans_decode_block(const uint8_t* in, int64_t len, int64_t N, int na, const Lookup& lookup, int pb,
                                 Sink& sink) {
  if (len < 4 * na || ((len - 4 * na) & 1)) return ERR_TRUNCATED;
  uint32_t x[LANES];
  for (int j = 0; j < na; ++j) {
    x[j] = load_u32le(in + 4 * j);
    if (x[j] < RANS_L) return ERR_TRUNCATED;
  }
  const uint8_t* w = in + 4 * na;
  return rans_decode_rows(w, (len - 4 * na) / 2, 0, N, x, na, 0, lookup, pb, sink);
}

}  // namespace kvk_codec

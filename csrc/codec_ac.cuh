// csrc/codec_ac.cuh -- the torchac-compatible 32-bit bitwise arithmetic coder (16-bit CDFs), one
// stream at a time, __host__ __device__ (docs/codec-spec.md, "Coders" / "ac").
//
// The renormalisation loop is batched without changing a bit of the output: while the MSBs of
// low and high agree (clz(low ^ high) of them) they are shifted out at once (the first with the
// pending bits); the "underflow" steps (low = 01.., high = 10..) are counted and applied at once.
// Every write is bounded by the caller's capacity, every read by the stream's length.
#pragma once

#include "codec_common.cuh"

namespace kvk_codec {

// Is cdf row [bins + 1] usable: cdf[0] == 0, non-decreasing, entries < bins at most 65536.
KVK_HD bool ac_row_ok(const int32_t* cdf, int bins) {
  if (cdf[0] != 0) return false;
  int32_t prev = 0;
  for (int i = 1; i < bins; ++i) {
    int32_t v = cdf[i];
    if (v < prev || v > 0x10000) return false;
    prev = v;
  }
  return true;
}

struct AcWriter {
  uint8_t* out;
  int64_t cap;
  int64_t pos = 0;
  uint64_t acc = 0;
  int nacc = 0;  // bits in acc not yet written (< 8 between calls)
  bool overflow = false;

  KVK_HD AcWriter(uint8_t* o, int64_t c) : out(o), cap(c) {}

  KVK_HD void put(uint32_t bits, int n) {  // the low n (<= 32) bits of `bits`, MSB first
    if (n == 0) return;
    acc = (acc << n) | (uint64_t)bits;
    nacc += n;
    while (nacc >= 8) {
      nacc -= 8;
      if (pos < cap) out[pos] = (uint8_t)(acc >> nacc);
      else overflow = true;
      ++pos;
    }
  }
  KVK_HD void put_with_pending(int bit, uint64_t& pending) {
    put((uint32_t)bit, 1);
    uint32_t fill = bit ? 0u : 0xFFFFFFFFu;
    while (pending > 0) {
      int k = pending > 32 ? 32 : (int)pending;
      put(fill & low_mask(k), k);
      pending -= (uint64_t)k;
    }
  }
  KVK_HD void flush() {
    if (nacc > 0) put(0, 8 - nacc);
  }
};

// Encode n symbols sym[i * stride] with cdf row [bins + 1]. Writes at most `cap` bytes; returns
// 0 and the length in *len, or ERR_SYMBOL (symbol >= bins / zero width) or ERR_CAPACITY.
KVK_HD int32_t ac_encode_stream(const uint8_t* sym, int64_t n, int64_t stride, const int32_t* cdf, int bins,
                                uint8_t* out, int64_t cap, int64_t* len) {
  AcWriter w(out, cap);
  uint32_t low = 0, high = 0xFFFFFFFFu;
  uint64_t pending = 0;
  const int max_sym = bins - 1;
  *len = 0;
  for (int64_t i = 0; i < n; ++i) {
    const int s = sym[i * stride];
    if (s > max_sym) return ERR_SYMBOL;
    const uint64_t span = (uint64_t)high - (uint64_t)low + 1;
    const uint32_t c_lo = (uint32_t)cdf[s];
    const uint32_t c_hi = s == max_sym ? 0x10000u : (uint32_t)cdf[s + 1];
    if (c_hi <= c_lo) return ERR_SYMBOL;
    high = (uint32_t)((uint64_t)low - 1 + ((span * c_hi) >> 16));
    low = (uint32_t)((uint64_t)low + ((span * c_lo) >> 16));
    // MSBs agree: shift out the common prefix (first bit with the pending ones).
    int k = clz32(low ^ high);
    if (k > 0) {
      const int top = (int)(low >> 31);
      w.put_with_pending(top, pending);
      if (k > 1) w.put((low >> (32 - k)) & low_mask(k - 1), k - 1);
      low = (uint32_t)((uint64_t)low << k);
      high = (uint32_t)(((uint64_t)high << k) | low_mask(k));
    }
    // Underflow: low = 01.., high = 10..; count the steps (bit 30 of low 1, of high 0).
    while (low >= 0x40000000u && high < 0xC0000000u) {
      int a = clz32(~(low << 1)), b = clz32(high << 1);
      int m = a < b ? a : b;
      if (m > 30) m = 30;
      if (m < 1) m = 1;
      pending += (uint64_t)m;
      low = (uint32_t)((uint64_t)low << m) & 0x7FFFFFFFu;
      high = (uint32_t)((uint64_t)high << m) | 0x80000000u | low_mask(m);
    }
  }
  pending += 1;
  w.put_with_pending(low < 0x40000000u ? 0 : 1, pending);
  w.flush();
  if (w.overflow) return ERR_CAPACITY;
  *len = w.pos;
  return 0;
}

struct AcReader {
  const uint8_t* in;
  int64_t len;
  int64_t pos = 0;
  uint64_t acc = 0;  // bits MSB-aligned
  int nacc = 0;

  KVK_HD AcReader(const uint8_t* i, int64_t l) : in(i), len(l) {}

  KVK_HD void refill() {
    while (nacc <= 56) {
      uint64_t b = pos < len ? in[pos] : 0;  // past the end: zero bits (torchac)
      if (pos < len) ++pos;
      acc |= b << (56 - nacc);
      nacc += 8;
    }
  }
  KVK_HD uint32_t get(int n) {  // next n (1..32) bits
    if (nacc < n) refill();
    uint32_t v = (uint32_t)(acc >> (64 - n));
    acc <<= n;
    nacc -= n;
    return v;
  }
};

// Last m in [0, bins-1] with cdf[m] <= count (cdf[0] == 0 for a valid row).
KVK_HD int ac_find(const int32_t* cdf, int bins, uint32_t count) {
  int base = 0, n = bins;
  while (n > 1) {
    int half = n >> 1;
    base = ((uint32_t)cdf[base + half] <= count) ? base + half : base;
    n -= half;
  }
  return base;
}

// The row's symbol search: the largest s with cdf[s] <= count.
struct AcFind {
  const int32_t* cdf;
  int bins;
  KVK_HD int operator()(uint32_t count) const { return ac_find(cdf, bins, count); }
};

// Decode n symbols into out[i * stride] from stream in[0, len), the symbol of each step found by
// find(count) (a drop-in for ac_find on the same row: the CPU passes a vectorised count). Returns
// 0, or ERR_TRAILING if the coder state becomes impossible (only with zero-width symbols: never
// for a valid row).
template <class Find>
KVK_HD int32_t ac_decode_stream_with(const uint8_t* in, int64_t len, const int32_t* cdf, int bins, uint8_t* out,
                                     int64_t n, int64_t stride, const Find& find) {
  AcReader r(in, len);
  uint32_t low = 0, high = 0xFFFFFFFFu;
  uint32_t value = r.get(32);
  const int max_sym = bins - 1;
  for (int64_t i = 0; i < n; ++i) {
    const uint64_t span = (uint64_t)high - (uint64_t)low + 1;
    if (span == 0 || span > 0x100000000ull) {
      for (int64_t j = i; j < n; ++j) out[j * stride] = 0;
      return ERR_TRAILING;
    }
    const uint64_t t = ((uint64_t)value - (uint64_t)low + 1) * 0x10000ull - 1;
    const uint32_t count = (uint32_t)(uint16_t)(t / span);
    const int s = find(count);
    out[i * stride] = (uint8_t)s;
    if (i == n - 1) break;
    const uint32_t c_lo = (uint32_t)cdf[s];
    const uint32_t c_hi = s == max_sym ? 0x10000u : (uint32_t)cdf[s + 1];
    high = (uint32_t)((uint64_t)low - 1 + ((span * c_hi) >> 16));
    low = (uint32_t)((uint64_t)low + ((span * c_lo) >> 16));
    int k = clz32(low ^ high);
    if (k > 0) {
      low = (uint32_t)((uint64_t)low << k);
      high = (uint32_t)(((uint64_t)high << k) | low_mask(k));
      value = (uint32_t)(((uint64_t)value << k) | r.get(k));
    }
    while (low >= 0x40000000u && high < 0xC0000000u) {
      low = (low << 1) & 0x7FFFFFFFu;
      high = (high << 1) | 0x80000001u;
      value = ((value - 0x40000000u) << 1) | r.get(1);
    }
  }
  return 0;
}

KVK_HD int32_t ac_decode_stream(const uint8_t* in, int64_t len, const int32_t* cdf, int bins, uint8_t* out, int64_t n,
                                int64_t stride) {
  return ac_decode_stream_with(in, len, cdf, bins, out, n, stride, AcFind{cdf, bins});
}

}  // namespace kvk_codec

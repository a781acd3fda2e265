// csrc/codec_cpu.cpp -- CPU launchers of the entropy coders: the __host__ __device__ coders of
// codec_ac.cuh / codec_rans.cuh run over every stream in order (one core). Compiled by g++ (no
// CUDA needed) into kvkernels._codec_cpu; see csrc/codec_cpu.h for the conventions.
#include "codec_cpu.h"

#include <stdlib.h>
#include <string.h>

#include <vector>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif
#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define KVK_CPU_X86 1
#endif

#include "codec_ac.cuh"
#include "codec_rans.cuh"

using namespace kvk_codec;

int32_t kvk_cpu_ac_encode(const uint8_t* sym, int64_t S, int64_t N, int64_t C, const int32_t* cdf, int64_t K,
                          int bins, const int32_t* tid, uint8_t* out, int64_t cap, int64_t* offsets) {
  const int64_t Lp = bins + 1;
  std::vector<uint8_t> ok(K);
  for (int64_t k = 0; k < K; ++k) ok[k] = ac_row_ok(cdf + k * Lp, bins);
  int64_t pos = 0;
  int32_t status = 0;
  offsets[0] = 0;
  for (int64_t s = 0; s < S && !status; ++s) {
    for (int64_t c = 0; c < C; ++c) {
      const int64_t i = s * C + c;
      const int64_t k = tid[i];
      if (k < 0 || k >= K) { status = ERR_TABLE_ID; break; }
      if (!ok[k]) { status = ERR_TABLE; break; }
      int64_t len = 0;
      status = ac_encode_stream(sym + s * N * C + c, N, C, cdf + k * Lp, bins, out + pos, cap - pos, &len);
      if (status) break;
      pos += len;
      offsets[i + 1] = pos;
    }
  }
  if (status) memset(offsets, 0, sizeof(int64_t) * (S * C + 1));
  return status;
}

namespace {

// ---- ac decode (CPU): ac_decode_stream with the symbol search as a count ---------------------
// ac_find's binary search is a chain of dependent loads on the decoder's critical path (~30 of
// the ~95 cycles a symbol); for rows of <= 64 bins the symbol is instead (the number of entries
// of cdf[0, bins) <= count) - 1, over the row copied to a local buffer padded to 8/16/32/64
// entries and compared 4 at a time (SSE2, baseline x86-64; fully unrolled) -- the same symbol
// for a usable row (cdf[0] == 0, non-decreasing: ac_row_ok). The rest is ac_decode_stream's.
#if defined(__SSE2__)
template <int P>  // entries of row[0, P) <= count (count <= 0xFFFF, entries in [0, 2^16] or INT32_MAX)
inline int ac_count_le(const int32_t* row, uint32_t count) {
  const __m128i c4 = _mm_set1_epi32((int)count);
  __m128i gt = _mm_setzero_si128();
#pragma GCC unroll 16
  for (int i = 0; i < P; i += 4) gt = _mm_add_epi32(gt, _mm_cmpgt_epi32(_mm_load_si128((const __m128i*)(row + i)), c4));
  gt = _mm_add_epi32(gt, _mm_shuffle_epi32(gt, 0x4E));
  gt = _mm_add_epi32(gt, _mm_shuffle_epi32(gt, 0xB1));
  return P + _mm_cvtsi128_si32(gt);
}
#else
template <int P>
inline int ac_count_le(const int32_t* row, uint32_t count) {
  int n = 0;
  for (int i = 0; i < P; ++i) n += row[i] <= (int32_t)count;
  return n;
}
#endif

// ac_decode_stream with the search as a count over the row padded to P entries.
template <int P>
struct AcCountFind {  // cdf[0, bins) padded with INT32_MAX (never <= count)
  alignas(16) int32_t row[P];
  AcCountFind(const int32_t* cdf, int bins) {
    for (int i = 0; i < P; ++i) row[i] = i < bins ? cdf[i] : 0x7FFFFFFF;
  }
  int operator()(uint32_t count) const { return ac_count_le<P>(row, count) - 1; }
};

template <int P>
int32_t ac_decode_stream_p(const uint8_t* in, int64_t len, const int32_t* cdf, int bins, uint8_t* out, int64_t n,
                           int64_t stride) {
  const AcCountFind<P> find(cdf, bins);
  return ac_decode_stream_with(in, len, cdf, bins, out, n, stride, find);
}

int32_t ac_decode_stream_cpu(const uint8_t* in, int64_t len, const int32_t* cdf, int bins, uint8_t* out, int64_t n,
                             int64_t stride) {
  if (bins <= 8) return ac_decode_stream_p<8>(in, len, cdf, bins, out, n, stride);
  if (bins <= 16) return ac_decode_stream_p<16>(in, len, cdf, bins, out, n, stride);
  if (bins <= 32) return ac_decode_stream_p<32>(in, len, cdf, bins, out, n, stride);
  if (bins <= 64) return ac_decode_stream_p<64>(in, len, cdf, bins, out, n, stride);
  return ac_decode_stream(in, len, cdf, bins, out, n, stride);
}

bool cpu_generic() {
  const char* e = getenv("KVK_CODEC_CPU_ISA");
  return e && strcmp(e, "generic") == 0;
}

}  // namespace

int32_t kvk_cpu_ac_decode(const uint8_t* payload, int64_t nbytes, const int64_t* offsets, int64_t n_offsets,
                          const int32_t* cdf, int64_t K, int bins, const int32_t* tid, int64_t S, int64_t N,
                          int64_t C, uint8_t* out) {
  memset(out, 0, (size_t)(S * N * C));
  if (n_offsets != S * C + 1) return ERR_OFFSETS;
  const int64_t Lp = bins + 1;
  std::vector<uint8_t> ok(K);
  for (int64_t k = 0; k < K; ++k) ok[k] = ac_row_ok(cdf + k * Lp, bins);
  int32_t status = 0;
  const bool generic = cpu_generic();
  for (int64_t s = 0; s < S; ++s) {
    for (int64_t c = 0; c < C; ++c) {
      const int64_t i = s * C + c;
      int64_t lo, hi;
      if (!stream_bounds(offsets, i, nbytes, &lo, &hi)) { status |= ERR_OFFSETS; continue; }
      const int64_t k = tid[i];
      if (k < 0 || k >= K) { status |= ERR_TABLE_ID; continue; }
      if (!ok[k]) { status |= ERR_TABLE; continue; }
      status |= generic ? ac_decode_stream(payload + lo, hi - lo, cdf + k * Lp, bins, out + s * N * C + c, N, C)
                        : ac_decode_stream_cpu(payload + lo, hi - lo, cdf + k * Lp, bins, out + s * N * C + c, N, C);
    }
  }
  return status;
}

namespace {

struct RansTables {
  std::vector<uint16_t> cum;
  std::vector<uint8_t> ok;
  std::vector<uint32_t> slots;  // [K, 2^pb] slot tables, when built
  int64_t stride, M;
  RansTables(const int32_t* freq, int64_t K, int bins, int pb) : cum(K * (bins + 1)), ok(K), stride(bins + 1),
                                                                 M(int64_t(1) << pb) {
    for (int64_t k = 0; k < K; ++k) ok[k] = rans_prep_row(freq + k * bins, bins, pb, cum.data() + k * stride);
  }
  const uint16_t* row(int64_t k) const { return cum.data() + k * stride; }
  // Slot tables pay when each row decodes more symbols than it has slots (and fit 64 MiB).
  void build_slots(int64_t n_symbols, int bins, int pb) {
    const int64_t K = (int64_t)ok.size();
    if (K * M > n_symbols || K * M > (int64_t(16) << 20)) return;
    slots.assign((size_t)(K * M), 0);
    for (int64_t k = 0; k < K; ++k)
      if (ok[k]) rans_build_slot_table(row(k), bins, pb, slots.data() + k * M);
  }
  const uint32_t* slot_row(int64_t k) const { return slots.data() + k * M; }
  // Otherwise coarse tables (2^qbits entries a row) when they pay.
  std::vector<uint8_t> coarse;
  int qbits = 0;
  void build_coarse(int64_t n_symbols, int bins, int pb) {
    const int64_t K = (int64_t)ok.size();
    qbits = pb < 7 ? pb : 7;
    if (!slots.empty() || K * (int64_t(1) << qbits) > n_symbols) return;
    coarse.assign((size_t)(K << qbits), 0);
    for (int64_t k = 0; k < K; ++k)
      if (ok[k]) rans_build_coarse(row(k), bins, pb, qbits, coarse.data() + (k << qbits));
  }
};

// Row pointers of block (s, g); 0 or the status bits.
int32_t block_rows(const RansTables& t, const int32_t* tid, int64_t K, int64_t s, int64_t C, int64_t c0, int na,
                   const uint16_t** rows) {
  for (int j = 0; j < na; ++j) {
    const int64_t k = tid[s * C + c0 + j];
    if (k < 0 || k >= K) return ERR_TABLE_ID;
    if (!t.ok[k]) return ERR_TABLE;
    rows[j] = t.row(k);
  }
  return 0;
}

struct SymSink {
  uint8_t* base;  // &out[s, 0, c0]
  int64_t C;
  void operator()(int64_t n, int j, int sym) const { base[n * C + j] = (uint8_t)sym; }
};

struct DqSink {
  const float* lut_rows[LANES];
  float sch[LANES], zch[LANES];
  const float* stok;  // [N] or null
  bool has_sch, has_z;
  void* out;
  int dtype;
  int64_t base, os_n;  // element index of (s, 0, c0); token stride
  void operator()(int64_t n, int j, int sym) const {
    float v = lut_rows[j][sym];
    if (stok) v = fmul_rn(v, stok[n]);
    if (has_sch) v = fmul_rn(v, sch[j]);
    if (has_z) v = fadd_rn(v, zch[j]);
    store_out(out, base + n * os_n + j, dtype, v);
  }
};


// ---- rANS block decode, x86-64 AVX-512 (runtime dispatch; the generic loop is the spec) --------
// One full 32-lane block: the 32 states live in two 16 x u32 registers; the symbol of every lane is
// found at once by comparing the 32 slots (u16) against the block's transposed cumulative table
// cumT[b][j] = cum_j[b] for b = 1..nb-1 (nb = the block's last used bin + 1, <= 32, padded with
// 0xFFFF to a multiple of 8) and counting the bins passed -- the same symbol as rans_find for a
// valid row (cum non-decreasing); (cum[s], freq[s]) then come from one gather per 16 lanes of the
// block's packed table. The lanes that renormalise read consecutive words in lane order (the
// encoder's order): a 16-word load, zero-extended to u32, expanded into the lanes that need one
// (vpexpandd), the position advanced by the popcount. Two blocks are decoded in lockstep (their
// dependency chains overlap). A row runs on the fast path while 32 words remain in its block, then
// on the block's last words copied into a zero-padded buffer while the position stays within the
// block (beyond: the block is truncated); the end-of-block checks are those of rans_decode_block,
// so symbols and status are byte for byte the generic decoder's.
constexpr int FAST_MAX_BINS = 32;
#ifndef KVK_RANS_ASM
#define KVK_RANS_ASM 1  // the bin step in inline asm (0: the same in intrinsics)
#endif

struct BlockT {
  alignas(64) uint16_t cum[FAST_MAX_BINS][LANES];  // [b][j] = cum_j[b]; padding rows 2^pb
  alignas(64) uint16_t df[FAST_MAX_BINS][LANES];   // [b][j] = freq_j[b] - freq_j[b-1] mod 2^16; [0] = freq_j[0]
  // Window of WIN_BINS bins a lane holding most of its probability, bins base_j .. base_j + 15:
  // wcum[b][j] = cum_j[base_j + b], wdf the deltas of freq_j from freq_j[base_j], whi[j] =
  // cum_j[base_j + 16]. A row whose slots all lie in their windows compares 15 bins, not nbp - 1.
  alignas(64) uint16_t wcum[16][LANES];
  alignas(64) uint16_t wdf[16][LANES];
  alignas(64) uint16_t whi[LANES];
  alignas(32) uint8_t wbase[LANES];
  int nbp;   // bins compared, padded: 8, 16, 24 or 32
  bool win;  // windows built (nb > 16)
};
constexpr int WIN_BINS = 16;

// Transposed tables of a block (rows valid); false if a lane uses a bin >= FAST_MAX_BINS.
bool block_transpose(const uint16_t* const* rows, int bins, int pb, BlockT* t) {
  int nb = 1;
  for (int j = 0; j < LANES; ++j) {
    int last = bins - 1;
    while (last > 0 && rows[j][last + 1] == rows[j][last]) --last;
    if (last + 1 > nb) nb = last + 1;
  }
  if (nb > FAST_MAX_BINS) return false;
  const int nbp = (nb + 7) & ~7;
  for (int j = 0; j < LANES; ++j) {
    const uint16_t* row = rows[j];
    uint16_t fprev = 0;
    for (int b = 0; b < nbp; ++b) {
      const bool used = b < nb;
      const uint16_t f = used ? (uint16_t)(row[b + 1] - row[b]) : 0;
      t->cum[b][j] = used ? row[b] : (uint16_t)(1u << pb);  // padding: above every slot
      t->df[b][j] = (uint16_t)(f - fprev);
      fprev = f;
    }
  }
  t->nbp = nbp;
  t->win = nb > WIN_BINS;
  if (t->win)
    for (int j = 0; j < LANES; ++j) {
      const uint16_t* row = rows[j];
      int best = 0, mass = -1;
      for (int a = 0; a + WIN_BINS <= nb; ++a) {
        const int m = row[a + WIN_BINS] - row[a];
        if (m > mass) { mass = m; best = a; }
      }
      uint16_t fprev = 0;
      for (int b = 0; b < WIN_BINS; ++b) {
        const uint16_t f = (uint16_t)(row[best + b + 1] - row[best + b]);
        t->wcum[b][j] = row[best + b];
        t->wdf[b][j] = (uint16_t)(f - fprev);
        fprev = f;
      }
      t->whi[j] = row[best + WIN_BINS];
      t->wbase[j] = (uint8_t)best;
    }
  return true;
}

struct RowSink {  // symbols of token n, lane j -> out[n * stride + j]
  uint8_t* out;
  int64_t stride;
  void operator()(int64_t n, int j, int s) const { out[n * stride + j] = (uint8_t)s; }
};

// One full block on the fast path: its words, states, position and output.
struct FastBlock {
  const uint8_t* w;  // the block's words
  int64_t nw;        // their count
  int64_t p = 0;     // next word
  int64_t n = 0;     // next token
  uint32_t x[LANES];
  uint8_t* out;  // symbol (n, j) at out[n * stride + j]
  int64_t stride;
  const BlockT* t;
  const uint16_t* const* rows;  // for the generic rows
  int32_t status = 0;
};

#if KVK_CPU_X86
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,popcnt")
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"  // GCC 12: _mm512_undefined_* in the intrinsics
#define KVK_AI static inline __attribute__((always_inline))

struct Row512 {  // one block's state in registers
  __m512i x0, x1;
  const uint8_t* w;
  int64_t p;
  const BlockT* t;
  uint8_t* out;
  int64_t stride;
};

// One token of one block (tables padded to NBP bins).
KVK_AI void row_update(Row512& r, int64_t n, __m512i sl0, __m512i sl1, __m256i s8, __m512i c, __m512i f, __m512i L,
                       __m128i cnt);

// Bins 1..NB-1 of tables cum/df: per bin b, k = (cum[b] <= slot); s += k; c = k ? cum[b] : c;
// f += k ? df[b] : 0. The passed bins are a prefix (cum non-decreasing), so from s = s0, c = cum[0],
// f = df[0] this ends at the symbol, its cum and its freq.
template <int NB>
KVK_AI void bin_scan(const uint16_t (*cum)[LANES], const uint16_t (*df)[LANES], __m512i slot, __m256i& s8, __m512i& c,
                     __m512i& f) {
  const __m256i one8 = _mm256_set1_epi8(1);
#pragma GCC unroll 32
  for (int b = 1; b < NB; ++b) {
#if KVK_RANS_ASM
    // (GCC 12 copies merge-masked accumulators between registers: ~1.7 extra moves a bin)
    __mmask32 k;
    __m512i t;
    asm("vmovdqa64 %[cum], %[t]\n\t"
        "vpcmpnltuw %[t], %[slot], %[k]\n\t"
        "vpaddb %[one], %[s], %[s]%{%[k]%}\n\t"
        "vmovdqu16 %[t], %[c]%{%[k]%}\n\t"
        "vpaddw %[df], %[f], %[f]%{%[k]%}"
        : [k] "=&Yk"(k), [t] "=&v"(t), [s] "+v"(s8), [c] "+v"(c), [f] "+v"(f)
        : [cum] "m"(*(const __m512i*)cum[b]), [slot] "v"(slot), [one] "v"(one8),
          [df] "m"(*(const __m512i*)df[b]));
#else
    const __m512i cb = _mm512_load_si512(cum[b]);
    const __mmask32 k = _mm512_cmple_epu16_mask(cb, slot);
    s8 = _mm256_mask_add_epi8(s8, k, s8, one8);
    c = _mm512_mask_mov_epi16(c, k, cb);
    f = _mm512_mask_add_epi16(f, k, f, _mm512_load_si512(df[b]));
#endif
  }
}

template <int NBP>
KVK_AI void row_step(Row512& r, int64_t n, __m512i m, __m512i L, __m128i cnt) {
  const __m512i sl0 = _mm512_and_si512(r.x0, m), sl1 = _mm512_and_si512(r.x1, m);
  const __m512i slot = _mm512_inserti64x4(_mm512_castsi256_si512(_mm512_cvtepi32_epi16(sl0)),
                                          _mm512_cvtepi32_epi16(sl1), 1);
  __m256i s8;
  __m512i c, f;
  if (NBP > WIN_BINS && r.t->win &&
      (_mm512_cmple_epu16_mask(_mm512_load_si512(r.t->wcum[0]), slot) &
       _mm512_cmplt_epu16_mask(slot, _mm512_load_si512(r.t->whi))) == 0xFFFFFFFFu) {
    s8 = _mm256_load_si256((const __m256i*)r.t->wbase);  // every lane's slot in its window
    c = _mm512_load_si512(r.t->wcum[0]);
    f = _mm512_load_si512(r.t->wdf[0]);
    bin_scan<WIN_BINS>(r.t->wcum, r.t->wdf, slot, s8, c, f);
  } else {
    s8 = _mm256_setzero_si256();
    c = _mm512_setzero_si512();
    f = _mm512_load_si512(r.t->df[0]);
    bin_scan<NBP>(r.t->cum, r.t->df, slot, s8, c, f);
  }
  row_update(r, n, sl0, sl1, s8, c, f, L, cnt);
}

// Store the symbols, advance the states, read the words.
KVK_AI void row_update(Row512& r, int64_t n, __m512i sl0, __m512i sl1, __m256i s8, __m512i c, __m512i f, __m512i L,
                       __m128i cnt) {
  _mm256_storeu_si256((__m256i*)(r.out + n * r.stride), s8);
  const __m512i c0 = _mm512_cvtepu16_epi32(_mm512_castsi512_si256(c));
  const __m512i c1 = _mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(c, 1));
  const __m512i f0 = _mm512_cvtepu16_epi32(_mm512_castsi512_si256(f));
  const __m512i f1 = _mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(f, 1));
  // x' = f * (x >> pb) + slot - c, then a word into the lanes with x' < 2^16, in lane order
  const __m512i v0 = _mm512_add_epi32(_mm512_mullo_epi32(f0, _mm512_srl_epi32(r.x0, cnt)), _mm512_sub_epi32(sl0, c0));
  const __m512i v1 = _mm512_add_epi32(_mm512_mullo_epi32(f1, _mm512_srl_epi32(r.x1, cnt)), _mm512_sub_epi32(sl1, c1));
  const __mmask16 k0 = _mm512_cmplt_epu32_mask(v0, L), k1 = _mm512_cmplt_epu32_mask(v1, L);
  const int64_t p1 = r.p + __builtin_popcount((unsigned)k0);
  const __m512i w0 = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)(r.w + 2 * r.p)));
  const __m512i w1 = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)(r.w + 2 * p1)));
  r.x0 = _mm512_mask_or_epi32(v0, k0, _mm512_slli_epi32(v0, 16), _mm512_maskz_expand_epi32(k0, w0));
  r.x1 = _mm512_mask_or_epi32(v1, k1, _mm512_slli_epi32(v1, 16), _mm512_maskz_expand_epi32(k1, w1));
  r.p = p1 + __builtin_popcount((unsigned)k1);
}

KVK_AI Row512 row_load(const FastBlock& b, const uint8_t* w, int64_t p) {
  Row512 r;
  r.x0 = _mm512_loadu_si512(b.x);
  r.x1 = _mm512_loadu_si512(b.x + 16);
  r.w = w;
  r.p = p;
  r.t = b.t;
  r.out = b.out;
  r.stride = b.stride;
  return r;
}

KVK_AI void row_store(const Row512& r, FastBlock& b) {
  _mm512_storeu_si512(b.x, r.x0);
  _mm512_storeu_si512(b.x + 16, r.x1);
}

// Rows of one block while p + 32 <= limit (reads inside w[0, limit)) and p <= nw.
template <int NBP>
void rows1(FastBlock& b, const uint8_t* w, int64_t p, int64_t nw, int64_t limit, int64_t N, int pb, int64_t* p_out) {
  const __m512i m = _mm512_set1_epi32((int)((1u << pb) - 1)), L = _mm512_set1_epi32((int)RANS_L);
  const __m128i cnt = _mm_cvtsi32_si128(pb);
  Row512 r = row_load(b, w, p);
  int64_t n = b.n;
  for (; n < N && r.p + 32 <= limit && r.p <= nw; ++n) row_step<NBP>(r, n, m, L, cnt);
  row_store(r, b);
  b.n = n;
  *p_out = r.p;
}

// Rows of two blocks in lockstep while both have 32 words left.
template <int NBP>
void rows2(FastBlock& a, FastBlock& b, int64_t N, int pb) {
  const __m512i m = _mm512_set1_epi32((int)((1u << pb) - 1)), L = _mm512_set1_epi32((int)RANS_L);
  const __m128i cnt = _mm_cvtsi32_si128(pb);
  Row512 ra = row_load(a, a.w, a.p), rb = row_load(b, b.w, b.p);
  int64_t n = a.n;
  for (; n < N && ra.p + 32 <= a.nw && rb.p + 32 <= b.nw; ++n) {
    row_step<NBP>(ra, n, m, L, cnt);
    row_step<NBP>(rb, n, m, L, cnt);
  }
  row_store(ra, a);
  row_store(rb, b);
  a.n = b.n = n;
  a.p = ra.p;
  b.p = rb.p;
}
// The fused decode's map over a fast-path block's symbols [N, 32] (fp32 / bf16 out; DqSink's
// arithmetic in the same order, one rounding per product: the same bits): the level of each
// symbol by a gather from the block's lut rows, copied to lut32[j * 32 + s] (s < 32 here).
void dq_rows_avx512(const DqSink& k, const uint8_t* syms, int64_t N, int bins, float* lut32) {
  const int nb = bins < FAST_MAX_BINS ? bins : FAST_MAX_BINS;
  for (int j = 0; j < LANES; ++j)
    for (int b = 0; b < FAST_MAX_BINS; ++b) lut32[j * FAST_MAX_BINS + b] = b < nb ? k.lut_rows[j][b] : 0.f;
  const __m512i lane0 = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                           _mm512_set1_epi32(FAST_MAX_BINS));
  const __m512i lane1 = _mm512_add_epi32(lane0, _mm512_set1_epi32(16 * FAST_MAX_BINS));
  const __m512 sch0 = _mm512_loadu_ps(k.sch), sch1 = _mm512_loadu_ps(k.sch + 16);
  const __m512 z0 = _mm512_loadu_ps(k.zch), z1 = _mm512_loadu_ps(k.zch + 16);
  const __m512i abs_mask = _mm512_set1_epi32(0x7FFFFFFF), inf = _mm512_set1_epi32(0x7F800000);
  const __m512i rnd = _mm512_set1_epi32(0x7FFF), one = _mm512_set1_epi32(1), qnan = _mm512_set1_epi32(0x40);
  auto bf16 = [&](__m512 v) {  // f32_to_bf16: round to nearest even, NaN -> (x >> 16) | 0x40
    const __m512i x = _mm512_castps_si512(v);
    const __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(x, abs_mask), inf);
    const __m512i r = _mm512_srli_epi32(
        _mm512_add_epi32(_mm512_add_epi32(x, rnd), _mm512_and_si512(_mm512_srli_epi32(x, 16), one)), 16);
    return _mm512_cvtepi32_epi16(_mm512_mask_mov_epi32(r, nan, _mm512_or_si512(_mm512_srli_epi32(x, 16), qnan)));
  };
  for (int64_t n = 0; n < N; ++n) {
    const __m256i s8 = _mm256_loadu_si256((const __m256i*)(syms + n * LANES));
    const __m512i i0 = _mm512_add_epi32(lane0, _mm512_cvtepu8_epi32(_mm256_castsi256_si128(s8)));
    const __m512i i1 = _mm512_add_epi32(lane1, _mm512_cvtepu8_epi32(_mm256_extracti128_si256(s8, 1)));
    __m512 v0 = _mm512_i32gather_ps(i0, lut32, 4), v1 = _mm512_i32gather_ps(i1, lut32, 4);
    if (k.stok) {
      const __m512 t = _mm512_set1_ps(k.stok[n]);
      v0 = _mm512_mul_ps(v0, t);
      v1 = _mm512_mul_ps(v1, t);
    }
    if (k.has_sch) {
      v0 = _mm512_mul_ps(v0, sch0);
      v1 = _mm512_mul_ps(v1, sch1);
    }
    if (k.has_z) {
      v0 = _mm512_add_ps(v0, z0);
      v1 = _mm512_add_ps(v1, z1);
    }
    const int64_t e = k.base + n * k.os_n;
    if (k.dtype == 0) {
      _mm512_storeu_ps(static_cast<float*>(k.out) + e, v0);
      _mm512_storeu_ps(static_cast<float*>(k.out) + e + 16, v1);
    } else {
      _mm256_storeu_si256((__m256i*)(static_cast<uint16_t*>(k.out) + e), bf16(v0));
      _mm256_storeu_si256((__m256i*)(static_cast<uint16_t*>(k.out) + e + 16), bf16(v1));
    }
  }
}
#undef KVK_AI
#pragma GCC diagnostic pop
#pragma GCC pop_options

template <int NBP>
void fast_finish(FastBlock& b, int64_t N, int pb) {
  rows1<NBP>(b, b.w, b.p, b.nw, b.nw, N, pb, &b.p);
  if (b.n < N && b.p <= b.nw) {
    // The block's last (< 32) words, zero-padded to 64: rows go on while the position stays within.
    uint16_t tail[64] = {0};
    const int64_t left = b.nw - b.p;
    memcpy(tail, b.w + 2 * b.p, (size_t)(2 * left));
    int64_t pt = 0;
    rows1<NBP>(b, reinterpret_cast<const uint8_t*>(tail), 0, left, 64, N, pb, &pt);
    b.p += pt;
  }
}

// Both blocks to the end (rows2 while both have words, then each alone); statuses in .status.
template <int NBP>
void fast_pair(FastBlock* a, FastBlock* b, int64_t N, int pb) {
  if (b) rows2<NBP>(*a, *b, N, pb);
  fast_finish<NBP>(*a, N, pb);
  if (b) fast_finish<NBP>(*b, N, pb);
}
#endif

// The end of a block after its fast rows: the generic rows (none, unless the fast path did not
// run) and rans_decode_block's checks.
void fast_epilogue(FastBlock& b, int64_t N, int bins, int pb) {
  if (b.p > b.nw) {
    b.status = ERR_TRUNCATED;
    return;
  }
  const RansCumLookup lookup{b.rows, bins};
  RowSink sink{b.out, b.stride};
  b.status = rans_decode_rows(b.w, b.nw, b.n, N, b.x, LANES, b.p, lookup, pb, sink);
}

enum class Isa { generic, avx512 };

Isa cpu_isa() {
  if (cpu_generic()) return Isa::generic;
#if KVK_CPU_X86
  // (libgcc's CPU model, which also checks that the OS saves the AVX-512 state (XCR0))
  static const bool has512 = (__builtin_cpu_init(), true) && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  if (has512) return Isa::avx512;
#endif
  return Isa::generic;
}

// Block header: states and words (rans_decode_block's checks). 0 or ERR_TRUNCATED.
int32_t fast_header(const uint8_t* in, int64_t len, FastBlock* b) {
  if (len < 4 * LANES || ((len - 4 * LANES) & 1)) return ERR_TRUNCATED;
  for (int j = 0; j < LANES; ++j) {
    b->x[j] = load_u32le(in + 4 * j);
    if (b->x[j] < RANS_L) return ERR_TRUNCATED;
  }
  b->w = in + 4 * LANES;
  b->nw = (len - 4 * LANES) / 2;
  b->p = 0;
  b->n = 0;
  return 0;
}

// Decode up to two prepared blocks of the same padded bin count (b may be null).
void fast_run(Isa isa, FastBlock* a, FastBlock* b, int64_t N, int bins, int pb) {
#if KVK_CPU_X86
  if (isa == Isa::avx512) {
    switch (a->t->nbp) {
      case 8: fast_pair<8>(a, b, N, pb); break;
      case 16: fast_pair<16>(a, b, N, pb); break;
      case 24: fast_pair<24>(a, b, N, pb); break;
      default: fast_pair<32>(a, b, N, pb); break;
    }
  }
#else
  (void)isa;
#endif
  fast_epilogue(*a, N, bins, pb);
  if (b) fast_epilogue(*b, N, bins, pb);
}

}  // namespace

int32_t kvk_cpu_rans_encode(const uint8_t* sym, int64_t S, int64_t N, int64_t C, const int32_t* freq, int64_t K,
                            int bins, const int32_t* tid, int pb, uint8_t* out, int64_t cap, int64_t* offsets) {
  const int64_t G = (C + LANES - 1) / LANES;
  RansTables t(freq, K, bins, pb);
  std::vector<uint8_t> scratch((size_t)rans_block_capacity(N, LANES));
  uint8_t* end = scratch.data() + scratch.size();
  int64_t pos = 0;
  int32_t status = 0;
  offsets[0] = 0;
  const uint16_t* rows[LANES];
  for (int64_t s = 0; s < S && !status; ++s) {
    for (int64_t g = 0; g < G; ++g) {
      const int64_t c0 = g * LANES;
      const int na = (int)(C - c0 < LANES ? C - c0 : LANES);
      status = block_rows(t, tid, K, s, C, c0, na, rows);
      if (status) break;
      int64_t size = 0;
      status = rans_encode_block(sym + s * N * C + c0, C, N, na, rows, bins, pb, end, &size);
      if (status) break;
      if (size > cap - pos) { status = ERR_CAPACITY; break; }
      memcpy(out + pos, end - size, (size_t)size);
      pos += size;
      offsets[s * G + g + 1] = pos;
    }
  }
  if (status) memset(offsets, 0, sizeof(int64_t) * (S * G + 1));
  return status;
}

int32_t kvk_cpu_rans_decode(const uint8_t* payload, int64_t nbytes, const int64_t* offsets, int64_t n_offsets,
                            const int32_t* freq, int64_t K, int bins, const int32_t* tid, int pb, int64_t S,
                            int64_t N, int64_t C, uint8_t* out, const DequantArgs* dq) {
  const int64_t G = (C + LANES - 1) / LANES;
  if (n_offsets != S * G + 1) {
    if (dq == nullptr) memset(out, 0, (size_t)(S * N * C));
    if (dq)
      for (int64_t s = 0; s < S; ++s)
        for (int64_t n = 0; n < N; ++n)
          for (int64_t c = 0; c < C; ++c) store_out(dq->out, s * dq->os_s + n * dq->os_n + c, dq->dtype, 0.f);
    return ERR_OFFSETS;
  }
  RansTables t(freq, K, bins, pb);
  bool built = false, use_slots = false, use_coarse = false;  // lookup tables of the generic path, on first use
  int32_t status = 0;
  const uint16_t* rows[LANES];
  const uint32_t* srows[LANES];
  const RansSlotLookup slot_lookup{srows};
  const uint8_t* crows[LANES];
  RansCoarseLookup coarse_lookup{rows, crows, bins, pb};  // shift set once the tables are built
  const RansCumLookup cum_lookup{rows, bins};
  auto decode = [&](const uint8_t* in, int64_t len, int na, auto& sink) -> int32_t {
    if (!built) {
      t.build_slots(S * N * C, bins, pb);
      t.build_coarse(S * N * C, bins, pb);
      use_slots = !t.slots.empty();
      use_coarse = !t.coarse.empty();
      coarse_lookup.shift = pb - t.qbits;
      built = true;
    }
    if (use_slots) {
      for (int j = 0; j < na; ++j) srows[j] = t.slot_row((rows[j] - t.row(0)) / t.stride);
      return rans_decode_block(in, len, N, na, slot_lookup, pb, sink);
    }
    if (use_coarse) {
      for (int j = 0; j < na; ++j) crows[j] = t.coarse.data() + (((rows[j] - t.row(0)) / t.stride) << t.qbits);
      return rans_decode_block(in, len, N, na, coarse_lookup, pb, sink);
    }
    return rans_decode_block(in, len, N, na, cum_lookup, pb, sink);
  };
  auto dq_sink = [&](int64_t s, int64_t c0, int na) {
    DqSink sink;
    sink.stok = dq->s_tok ? dq->s_tok + s * N : nullptr;
    sink.has_sch = dq->s_ch != nullptr;
    sink.has_z = dq->z_ch != nullptr;
    sink.out = dq->out;
    sink.dtype = dq->dtype;
    sink.base = s * dq->os_s + c0;
    sink.os_n = dq->os_n;
    for (int j = 0; j < na; ++j) {
      int64_t k = tid[s * C + c0 + j];
      k = k < 0 ? 0 : (k >= K ? K - 1 : k);
      sink.lut_rows[j] = dq->lut + k * bins;
      sink.sch[j] = sink.has_sch ? dq->s_ch[s * C + c0 + j] : 1.f;
      sink.zch[j] = sink.has_z ? dq->z_ch[s * C + c0 + j] : 0.f;
    }
    return sink;
  };
  const Isa isa = cpu_isa();
#if KVK_CPU_X86
  alignas(64) float lut32[LANES * FAST_MAX_BINS];  // dq_rows_avx512's lut rows of a block
#endif
  // A block's result: zeros if it failed, else (fused decode on the fast path) its levels.
  auto finish = [&](int64_t s, int64_t c0, int na, int32_t st, const uint8_t* syms) {
    if (dq == nullptr) {
      if (st)
        for (int64_t n = 0; n < N; ++n) memset(out + (s * N + n) * C + c0, 0, (size_t)na);
    } else if (st) {
      const int64_t base = s * dq->os_s + c0;
      for (int64_t n = 0; n < N; ++n)
        for (int j = 0; j < na; ++j) store_out(dq->out, base + n * dq->os_n + j, dq->dtype, 0.f);
    } else if (syms) {
      const DqSink sink = dq_sink(s, c0, na);
#if KVK_CPU_X86
      if (isa == Isa::avx512 && dq->dtype != 1) {  // fp16 stays scalar (f32_to_f16's NaN / subnormal rules)
        dq_rows_avx512(sink, syms, N, bins, lut32);
        status |= st;
        return;
      }
#endif
      for (int64_t n = 0; n < N; ++n)
        for (int j = 0; j < LANES; ++j) sink(n, j, syms[n * LANES + j]);
    }
    status |= st;
  };
  // Fast path: full blocks queued in pairs (of the same padded bin count), channel group by channel
  // group (consecutive chunks of one (kind, layer) reuse the transposed tables).
  struct Slot {
    FastBlock fb;
    const uint16_t* rows[LANES];
    uint8_t* tmp;  // [N, 32] symbols (fused decode)
    int64_t s, c0;
  };
  struct Tab {
    BlockT* t;
    const uint16_t* key[LANES];  // the rows it was built from (null: none)
  };
  std::vector<uint8_t> mem;
  Slot slots[2];
  Tab tabs[2];
  int queued = 0, next_tab = 0;
  if (isa != Isa::generic) {
    const size_t tab_size = (sizeof(BlockT) + 63) & ~size_t(63), sym = dq ? (size_t)(N * LANES) : 0;
    mem.resize(2 * tab_size + 2 * sym + 64);
    uint8_t* base = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(mem.data()) + 63) & ~uintptr_t(63));
    for (int i = 0; i < 2; ++i) {
      tabs[i].t = reinterpret_cast<BlockT*>(base + i * tab_size);
      memset(tabs[i].key, 0, sizeof(tabs[i].key));
      slots[i].tmp = dq ? base + 2 * tab_size + i * sym : nullptr;
    }
  }
  auto flush = [&](int count) {
    FastBlock* a = &slots[0].fb;
    FastBlock* b = count > 1 ? &slots[1].fb : nullptr;
    fast_run(isa, a, b, N, bins, pb);
    for (int i = 0; i < count; ++i) finish(slots[i].s, slots[i].c0, LANES, slots[i].fb.status, slots[i].tmp);
    queued = 0;
  };
  // The transposed tables of `rows` (null: not on the fast path), not those of a queued block
  // unless they are the same.
  auto table_for = [&](const uint16_t* const* r) -> BlockT* {
    for (int i = 0; i < 2; ++i)
      if (memcmp(tabs[i].key, r, sizeof(tabs[i].key)) == 0) return tabs[i].t;
    int i = next_tab;
    if (queued == 1 && slots[0].fb.t == tabs[i].t) i ^= 1;
    next_tab = i ^ 1;
    if (!block_transpose(r, bins, pb, tabs[i].t)) {
      memset(tabs[i].key, 0, sizeof(tabs[i].key));
      return nullptr;
    }
    memcpy(tabs[i].key, r, sizeof(tabs[i].key));
    return tabs[i].t;
  };
  for (int64_t g = 0; g < G; ++g) {
    for (int64_t s = 0; s < S; ++s) {
      const int64_t c0 = g * LANES, b = s * G + g;
      const int na = (int)(C - c0 < LANES ? C - c0 : LANES);
      int64_t lo, hi;
      int32_t st = 0;
      if (!stream_bounds(offsets, b, nbytes, &lo, &hi)) st = ERR_OFFSETS;
      if (!st) st = block_rows(t, tid, K, s, C, c0, na, rows);
      if (!st && na == LANES && isa != Isa::generic) {
        BlockT* tab = table_for(rows);
        if (tab) {
          if (queued == 1 && tab->nbp != slots[0].fb.t->nbp) flush(1);  // different bin counts
          Slot& r = slots[queued];
          st = fast_header(payload + lo, hi - lo, &r.fb);
          if (!st) {
            for (int j = 0; j < LANES; ++j) r.rows[j] = rows[j];
            r.fb.rows = r.rows;
            r.fb.t = tab;
            r.fb.out = dq ? r.tmp : out + s * N * C + c0;
            r.fb.stride = dq ? LANES : C;
            r.fb.status = 0;
            r.s = s;
            r.c0 = c0;
            if (++queued == 2) flush(2);
            continue;
          }
          finish(s, c0, na, st, nullptr);
          continue;
        }
      }
      if (!st) {
        if (dq == nullptr) {
          SymSink sink{out + s * N * C + c0, C};
          st = decode(payload + lo, hi - lo, na, sink);
        } else {
          DqSink sink = dq_sink(s, c0, na);
          st = decode(payload + lo, hi - lo, na, sink);
        }
      }
      finish(s, c0, na, st, nullptr);
    }
  }
  if (queued) flush(queued);
  return status;
}

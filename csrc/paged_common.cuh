// paged_common.cuh -- what the paged kernels share (paged.cu: scatter / gather;
// paged_gather_quant.cu: gather fused with quantization): the argument block, chunk words and
// conversions, addressing, the row loop, cache / flat access, and the host side's chunk choice,
// argument checks and launch geometry. Host functions are inline (two translation units).
//
// One launch for all layers: a work item is (cache r = kv*L + layer, flat token i), one token row
// of H heads x D channels of one cache; a block holds ROWS work items (threadIdx.y), each done by
// TPR threads (threadIdx.x). A row is cut into chunks of E consecutive channels of one head; a
// thread takes U chunks of a row (c, c + TPR, ...), issues every load of them (codes, scales,
// values) before the first conversion or store, then converts and stores them. E and U are
// template parameters picked on the host (pref_e): a chunk is 16 bytes of the WRITTEN side (fp8
// cache -> bf16: 8 channels, 8 bytes read, 16 written; bf16 -> fp8 cache: 16 channels, 32 bytes
// read, 16 written), so that a warp's stores are one contiguous span, except int codes (16 codes
// a chunk); U chunks give a thread >= 16-32 bytes of reads in flight. Every access is a vector load / store where the
// host found that legal (dense inner dim, aligned bases and strides), element-wise otherwise
// (legacy V [NB, H, D, BS], odd strides).
//
// No per-element integer division: (row -> cache, token), (slot -> block, offset), (chunk ->
// head, channel) and (token -> token group) use FastDiv (quant_math.cuh), once per row or chunk;
// a chunk's scale / zero point is one load (per chunk, broadcast in registers) for channel
// groups (group >= E) and fp8 scales; per-channel scales (token-axis int formats) are loaded per
// element. Codes are unpacked by bytes: a nibble / crumb plane is one AND + shift per word and
// each code becomes the float 2^23 + q with one PRMT (code_to_float without the OR), then the
// spec's FSUB + FFMA. fp8 conversions run two at a time (cvt ...x2), bf16 / f16 rounding too.
// The numbers are the quant_math.cuh functions' (bit-identical to the torch reference); the
// fp8-cache clamp is the encoder's satfinite (as the quantize kernels).
#pragma once

#include "paged.h"

#include <algorithm>
#include <initializer_list>
#include <type_traits>

#include "quant_math.cuh"

namespace kvk {
namespace paged {

struct FP8 {  // e4m3 cache elements (bytes)
  using storage = uint8_t;
  static constexpr int kSize = 1;
};

struct Args {
  KvkPagedCaches c;
  KvkPagedFlat f;
  const void* slots;
  int slots64;
  int64_t T, R, nslots;
  int chunks;           // H * D / E per token row
  FastDiv cph;          // chunks per head (D / E)
  FastDiv tdiv;         // T (work index -> cache, token), when work32
  FastDiv bsdiv;        // block_size (slot -> block, offset), when nslots32
  FastDiv xdiv;         // the head_dim split x
  FastDiv tgdiv;        // token group of the scales
  FastDiv dgdiv;        // channel group of the scales (smode 2)
  int work32, nslots32;
  int cache_vec;        // cache pieces (min(16 bytes, chunk)) are contiguous and aligned
  int flat_vec;         // flat chunks (values or codes) are aligned to min(16 bytes, chunk)
  int smode;            // scales: 0 one per chunk, 1 one per channel (a_d == 1, dg == 1), 2 general
  int gl;               // gather + quantize over lanes: lanes (pieces) per group
  void* cnt;
  int cnt64;
};

// ---- words of a chunk -------------------------------------------------------------------------
template <int NB>
struct Words {  // NB bytes, little-endian, in 32-bit words (the low bytes when NB < 4)
  static constexpr int N = NB >= 4 ? NB / 4 : 1;
  uint32_t w[N];
};

// One vector access per 16 bytes (or one access of NB < 16 bytes); p aligned to min(NB, 16).
template <int NB>
__device__ __forceinline__ void load_words(const void* p, Words<NB>& x) {
  if constexpr (NB >= 16) {
#pragma unroll
    for (int k = 0; k < NB / 16; ++k) {
      const uint4 t = __ldg(static_cast<const uint4*>(p) + k);
      x.w[4 * k] = t.x; x.w[4 * k + 1] = t.y; x.w[4 * k + 2] = t.z; x.w[4 * k + 3] = t.w;
    }
  } else if constexpr (NB == 8) {
    const uint2 t = __ldg(static_cast<const uint2*>(p));
    x.w[0] = t.x; x.w[1] = t.y;
  } else if constexpr (NB == 4) {
    x.w[0] = __ldg(static_cast<const unsigned int*>(p));
  } else if constexpr (NB == 2) {
    x.w[0] = __ldg(static_cast<const unsigned short*>(p));
  } else {
    x.w[0] = __ldg(static_cast<const unsigned char*>(p));
  }
}

// Stores name the global space (st.global: the cache bases come from an int64 array, so the
// compiler cannot tell; a generic store resolves the space at run time).
template <int NB>
__device__ __forceinline__ void store_words(void* p, const Words<NB>& x) {
  if constexpr (NB >= 16) {
#pragma unroll
    for (int k = 0; k < NB / 16; ++k)
      __stwb(static_cast<uint4*>(p) + k, make_uint4(x.w[4 * k], x.w[4 * k + 1], x.w[4 * k + 2], x.w[4 * k + 3]));
  } else if constexpr (NB == 8) {
    __stwb(static_cast<uint2*>(p), make_uint2(x.w[0], x.w[1]));
  } else if constexpr (NB == 4) {
    __stwb(static_cast<unsigned int*>(p), x.w[0]);
  } else if constexpr (NB == 2) {
    __stwb(static_cast<unsigned short*>(p), static_cast<unsigned short>(x.w[0]));
  } else {
    __stwb(static_cast<unsigned char*>(p), static_cast<unsigned char>(x.w[0]));
  }
}

// Element j (compile-time after unrolling) of S-byte elements.
template <int S, int NB>
__device__ __forceinline__ uint32_t get_elem(const Words<NB>& x, int j) {
  if constexpr (S == 4) return x.w[j];
  else if constexpr (S == 2) return (x.w[j / 2] >> (16 * (j % 2))) & 0xffffu;
  else return (x.w[j / 4] >> (8 * (j % 4))) & 0xffu;
}

template <int S, int NB>
__device__ __forceinline__ void set_elem(Words<NB>& x, int j, uint32_t v) {
  if constexpr (S == 4) {
    x.w[j] = v;
  } else if constexpr (S == 2) {
    if (j % 2 == 0) x.w[j / 2] = v & 0xffffu;
    else x.w[j / 2] |= v << 16;
  } else {
    if (j % 4 == 0) x.w[j / 4] = v & 0xffu;
    else x.w[j / 4] |= (v & 0xffu) << (8 * (j % 4));
  }
}

template <typename Tr> __device__ __forceinline__ uint32_t bits_of(typename Tr::storage s) {
  if constexpr (std::is_same<Tr, F32>::value) return __float_as_uint(s);
  else return static_cast<uint32_t>(s);
}
template <typename Tr> __device__ __forceinline__ typename Tr::storage storage_of(uint32_t b) {
  if constexpr (std::is_same<Tr, F32>::value) return __uint_as_float(b);
  else return static_cast<typename Tr::storage>(b);
}

// ---- conversions ------------------------------------------------------------------------------
// E values of a 16/32-bit float type -> float (exact).
template <typename Tr, int E>
__device__ __forceinline__ void to_floats(const Words<E * Tr::kSize>& x, float (&f)[E]) {
  if constexpr (std::is_same<Tr, F32>::value) {
#pragma unroll
    for (int j = 0; j < E; ++j) f[j] = __uint_as_float(x.w[j]);
  } else if constexpr (std::is_same<Tr, BF16>::value) {
#pragma unroll
    for (int k = 0; k < E / 2; ++k) {
      f[2 * k] = __uint_as_float(x.w[k] << 16);
      f[2 * k + 1] = __uint_as_float(x.w[k] & 0xffff0000u);
    }
  } else {
#pragma unroll
    for (int k = 0; k < E / 2; ++k) {
      const float2 t = __half22float2(*reinterpret_cast<const __half2*>(&x.w[k]));
      f[2 * k] = t.x;
      f[2 * k + 1] = t.y;
    }
  }
}

// float -> E values, round to nearest even (two per cvt for 16-bit types).
template <typename Tr, int E>
__device__ __forceinline__ void from_floats(const float (&f)[E], Words<E * Tr::kSize>& x) {
  if constexpr (std::is_same<Tr, F32>::value) {
#pragma unroll
    for (int j = 0; j < E; ++j) x.w[j] = __float_as_uint(f[j]);
  } else if constexpr (std::is_same<Tr, BF16>::value) {
#pragma unroll
    for (int k = 0; k < E / 2; ++k) {
      const __nv_bfloat162 t = __floats2bfloat162_rn(f[2 * k], f[2 * k + 1]);
      x.w[k] = *reinterpret_cast<const uint32_t*>(&t);
    }
  } else {
#pragma unroll
    for (int k = 0; k < E / 2; ++k) {
      const __half2 t = __floats2half2_rn(f[2 * k], f[2 * k + 1]);
      x.w[k] = *reinterpret_cast<const uint32_t*>(&t);
    }
  }
}

// E e4m3 bytes -> float (exact), two per cvt.
template <int E>
__device__ __forceinline__ void fp8_to_floats(const Words<E>& x, float (&f)[E]) {
#pragma unroll
  for (int k = 0; k < E / 2; ++k) {
    const uint32_t pair = (x.w[k / 2] >> (16 * (k % 2))) & 0xffffu;
    const __half2_raw hr = __nv_cvt_fp8x2_to_halfraw2(static_cast<__nv_fp8x2_storage_t>(pair), __NV_E4M3);
    const float2 t = __half22float2(__half2(hr));
    f[2 * k] = t.x;
    f[2 * k + 1] = t.y;
  }
}

// E floats (already multiplied by 1 / scale) -> e4m3 bytes, satfinite (the spec's clamp), NaN ->
// 0x7F; two per cvt.
template <int E>
__device__ __forceinline__ void floats_to_fp8(const float (&y)[E], Words<E>& x) {
#pragma unroll
  for (int k = 0; k < E / 2; ++k) {
    const uint32_t pair = fp8_encode2(y[2 * k], y[2 * k + 1]);
    if (k % 2 == 0) x.w[k / 2] = pair;
    else x.w[k / 2] |= pair << 16;
  }
}

// E BITS-bit codes (first channel in the low bits) -> the floats 2^23 + q: per 32-bit word, the
// K = 8 / BITS planes (w >> k*BITS) & mask put code (4 bytes x K planes) b*K + k in byte b of
// plane k; one PRMT makes 0x4B0000qq = 2^23 + q of it.
template <int BITS, int E>
__device__ __forceinline__ void codes_to_biased(const Words<E * BITS / 8>& x, float (&q)[E]) {
  constexpr int K = 8 / BITS;
  constexpr uint32_t kMask = BITS == 8 ? 0xffffffffu : BITS == 4 ? 0x0f0f0f0fu : 0x03030303u;
  constexpr int NBYTES = E * BITS / 8;
#pragma unroll
  for (int wi = 0; wi < Words<NBYTES>::N; ++wi) {
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const uint32_t plane = (x.w[wi] >> (k * BITS)) & kMask;
#pragma unroll
      for (int b = 0; b < 4; ++b) {
        const int j = wi * 4 * K + b * K + k;
        if (j < E) q[j] = __uint_as_float(__byte_perm(plane, 0x4B000000u, 0x7650u | b));
      }
    }
  }
}

// ---- addressing -------------------------------------------------------------------------------
__device__ __forceinline__ int64_t load_slot(const Args& a, int64_t i) {
  return a.slots64 ? static_cast<const int64_t*>(a.slots)[i] : int64_t(static_cast<const int32_t*>(a.slots)[i]);
}

__device__ __forceinline__ void count_oob(const Args& a) {
  if (a.cnt == nullptr) return;
  if (a.cnt64) atomicAdd(static_cast<unsigned long long*>(a.cnt), 1ull);
  else atomicAdd(static_cast<int*>(a.cnt), 1);
}

// Offset of channel d of a head in a cache row (elements).
__device__ __forceinline__ int64_t chan_off(const Args& a, const int64_t* st, int d) {
  uint32_t q, rem;
  a.xdiv.divmod(uint32_t(d), q, rem);
  return int64_t(q) * st[3] + int64_t(rem) * st[4];
}

__device__ __forceinline__ float cache_scale(const Args& a, int kv, int64_t l, int64_t h) {
  return kv ? __ldg(a.c.v_scale + l * a.c.vs_l + h * a.c.vs_h) : __ldg(a.c.k_scale + l * a.c.ks_l + h * a.c.ks_h);
}

struct Row {
  int64_t r, i, l, crow;  // cache, flat token, layer, block*s_block + offset*s_token
  int kv;
  const int64_t* st;
  int64_t base;           // ptrs[r]
  bool valid;             // the token's slot is addressed (else: skipped, kSkipped rows only)
};

__device__ __forceinline__ void split_work(const Args& a, int64_t w, int64_t& r, int64_t& i) {
  if (a.work32) {
    uint32_t q, rem;
    a.tdiv.divmod(uint32_t(w), q, rem);
    r = q;
    i = rem;
  } else {
    r = w / a.T;
    i = w - r * a.T;
  }
}

// Work-item loop shared by both directions: body(row) for every addressed row of this thread's
// rows (kSkipped: every row, skipped ones with row.valid false); the next row's slot and cache
// base are loaded before the current row's body runs.
template <bool kSkipped = false, typename Body>
__device__ __forceinline__ void for_each_row(const Args& a, Body&& body) {
  const int64_t work = a.R * a.T;
  const int64_t step = int64_t(gridDim.x) * blockDim.y;
  int64_t w = int64_t(blockIdx.x) * blockDim.y + threadIdx.y;
  if (w >= work) return;
  int64_t r, i;
  split_work(a, w, r, i);
  int64_t s = load_slot(a, i);
  int64_t base = a.c.ptrs[r];
  while (true) {
    const int64_t wn = w + step;
    int64_t rn = 0, in = 0, sn = -1, bn = 0;
    if (wn < work) {  // prefetch the next row's slot and base
      split_work(a, wn, rn, in);
      sn = load_slot(a, in);
      bn = a.c.ptrs[rn];
    }
    if (s >= a.nslots && r == 0 && threadIdx.x == 0) count_oob(a);
    if (s >= a.nslots || s < 0) {
      if constexpr (kSkipped) {  // the row is still visited (valid = false): gather-quantize writes zeros
        Row row{};
        row.r = r;
        row.i = i;
        row.kv = r >= a.c.num_layers;
        row.l = r - row.kv * a.c.num_layers;
        row.st = a.c.st[row.kv];
        row.valid = false;
        body(row);
      }
    } else {
      int64_t blk, off;
      if (a.nslots32) {
        uint32_t q, rem;
        a.bsdiv.divmod(uint32_t(s), q, rem);
        blk = q;
        off = rem;
      } else {
        blk = s / a.c.block_size;
        off = s - blk * a.c.block_size;
      }
      Row row;
      row.r = r;
      row.i = i;
      row.kv = r >= a.c.num_layers;
      row.l = r - row.kv * a.c.num_layers;
      row.st = a.c.st[row.kv];
      row.crow = blk * row.st[0] + off * row.st[1];
      row.base = base;
      row.valid = true;
      body(row);
    }
    if (wn >= work) break;
    w = wn; r = rn; i = in; s = sn; base = bn;
  }
}

// Chunks per thread: two (one where a chunk reads >= 32 bytes); four where a chunk reads 8 bytes
// that widen into a wider side (`widen8`: fp8 codes or an fp8 cache into bf16, 16-bit values into
// fp32; 32 bytes of reads and 64 of writes in flight, as the Triton kernels; four chunks of int
// codes or into an fp8 cache spill at the 64 registers of a 1024-thread block). Plain copies (no conversion, few
// registers) take four 16-byte chunks, as the Triton copy kernels that reach 98% of a device copy
// (64 bytes a thread).
constexpr int chunks_per_thread(int read_bytes, bool copy = false, bool widen8 = false) {
  return (copy && read_bytes == 16) ? 4 : read_bytes >= 32 ? 1 : (read_bytes == 8 && widen8) ? 4 : 2;
}

// The contract's chunk (16 bytes of the widest element): every case runs with it; wider chunks
// (kWide) are picked only where every access is a vector and a chunk has one scale.
constexpr int emin_for(int wide_bytes) { return wide_bytes == 4 ? 4 : 8; }

// Head and first channel of chunk c of a row.
template <int E>
__device__ __forceinline__ void chunk_pos(const Args& a, int c, int& h, int& d) {
  uint32_t q, rem;
  a.cph.divmod(uint32_t(c), q, rem);
  h = int(q);
  d = int(rem) * E;
}

// ---- cache chunk access -----------------------------------------------------------------------
// Store CB bytes of a chunk (channels d .. d+E-1 of head h) into a cache row: pieces of
// min(16, CB) bytes at their own channel offsets (vector stores), or element-wise.
template <typename CTr, int E, bool kVecOnly>
__device__ __forceinline__ void store_cache(const Args& a, const Row& row, int64_t h, int d,
                                            const Words<E * CTr::kSize>& x) {
  constexpr int CB = E * CTr::kSize;
  constexpr int PB = CB < 16 ? CB : 16;
  constexpr int PC = PB / CTr::kSize;  // channels per piece
  auto* p = reinterpret_cast<typename CTr::storage*>(row.base) + row.crow + h * row.st[2];
  if (kVecOnly || a.cache_vec) {
#pragma unroll
    for (int k = 0; k < CB / PB; ++k) {
      Words<PB> piece;
#pragma unroll
      for (int j = 0; j < Words<PB>::N; ++j) piece.w[j] = x.w[k * Words<PB>::N + j];
      store_words<PB>(p + chan_off(a, row.st, d + k * PC), piece);
    }
  } else {
#pragma unroll
    for (int j = 0; j < E; ++j) p[chan_off(a, row.st, d + j)] = storage_of<CTr>(get_elem<CTr::kSize>(x, j));
  }
}

template <typename CTr, int E, bool kVecOnly>
__device__ __forceinline__ void load_cache(const Args& a, const Row& row, int64_t h, int d,
                                           Words<E * CTr::kSize>& x) {
  constexpr int CB = E * CTr::kSize;
  constexpr int PB = CB < 16 ? CB : 16;
  constexpr int PC = PB / CTr::kSize;
  const auto* p = reinterpret_cast<const typename CTr::storage*>(row.base) + row.crow + h * row.st[2];
  if (kVecOnly || a.cache_vec) {
#pragma unroll
    for (int k = 0; k < CB / PB; ++k) {
      Words<PB> piece;
      load_words<PB>(p + chan_off(a, row.st, d + k * PC), piece);
#pragma unroll
      for (int j = 0; j < Words<PB>::N; ++j) x.w[k * Words<PB>::N + j] = piece.w[j];
    }
  } else {
#pragma unroll
    for (int j = 0; j < E; ++j) set_elem<CTr::kSize>(x, j, bits_of<CTr>(p[chan_off(a, row.st, d + j)]));
  }
}

// Flat side: NB contiguous bytes at p, a vector access when aligned (flat_vec), else bytes.
template <int NB, bool kVecOnly>
__device__ __forceinline__ void load_flat(const Args& a, const uint8_t* p, Words<NB>& x) {
  if (kVecOnly || a.flat_vec) {
    load_words<NB>(p, x);
  } else {
#pragma unroll
    for (int j = 0; j < Words<NB>::N; ++j) x.w[j] = 0;
#pragma unroll
    for (int j = 0; j < NB; ++j) x.w[j / 4] |= uint32_t(p[j]) << (8 * (j % 4));
  }
}

template <int NB, bool kVecOnly>
__device__ __forceinline__ void store_flat(const Args& a, uint8_t* p, const Words<NB>& x) {
  if (kVecOnly || a.flat_vec) {
    store_words<NB>(p, x);
  } else {
#pragma unroll
    for (int j = 0; j < NB; ++j) p[j] = uint8_t(x.w[j / 4] >> (8 * (j % 4)));
  }
}

// ---- host side --------------------------------------------------------------------------------
inline int esize_of(int code) { return code == 0 ? 4 : code == 3 ? 1 : 2; }

inline bool valid_caches(const KvkPagedCaches* c) {
  return c && c->ptrs && c->num_layers > 0 && (c->num_kv == 1 || c->num_kv == 2) && c->num_blocks > 0 &&
         c->block_size > 0 && c->num_heads > 0 && c->head_dim > 0 && c->x > 0 && c->head_dim % c->x == 0 &&
         c->cache_dtype >= 0 && c->cache_dtype <= 3 &&
         (c->cache_dtype != 3 || (c->k_scale && (c->num_kv == 1 || c->v_scale)));
}

// Bytes per element of the flat side (codes: bits / 8, as a fraction: returns bits).
inline int flat_bits(const KvkPagedFlat* f) { return f->kind == 0 ? 8 * esize_of(f->dtype) : f->kind == 1 ? f->bits : 8; }

// The smallest chunk (the contract's E: 16 bytes of the widest element, 8 channels for 1-byte
// sides) and the largest compiled one (16 bytes of the narrowest side, at most 16 channels).
inline int widest_bytes(const KvkPagedCaches* c, const KvkPagedFlat* f) {
  return std::max(esize_of(c->cache_dtype), f->kind == 0 ? esize_of(f->dtype) : 1);
}
inline int min_e(const KvkPagedCaches* c, const KvkPagedFlat* f) { return widest_bytes(c, f) == 4 ? 4 : 8; }
inline int max_e(const KvkPagedCaches* c, const KvkPagedFlat* f) {
  return std::min(16, 128 / std::min(8 * esize_of(c->cache_dtype), flat_bits(f)));
}
// The preferred chunk: 16 bytes of the WRITTEN side (the cache for scatter, the flat side for
// gather), so that a warp's stores are one contiguous span; reads of 32 bytes a thread are
// merged in L1. Measured on an H100 (Llama-3-8B, 4K tokens, % of copy): gather fp8 cache -> bf16
// 79 -> 89%, scatter fp8 codes -> bf16 79 -> 86% with 8-channel chunks, while scatter bf16 ->
// fp8 cache stays at 16 channels (94.5%; 87% with 8). Int codes keep 16 bytes of codes a chunk
// (int4 -> bf16: 83% with 16 channels, 68% with 8; int8 77-80% either way).
inline int pref_e(const KvkPagedCaches* c, const KvkPagedFlat* f, bool scatter) {
  if (f->kind == 1) return max_e(c, f);
  const int written = scatter ? esize_of(c->cache_dtype) : esize_of(f->dtype);
  return std::max(min_e(c, f), std::min(max_e(c, f), 16 / written));
}

inline bool multiple(int64_t v, int64_t m) { return v % m == 0; }

// Whether chunks of E channels can use vector accesses on the flat side / cache side.
inline bool flat_vec_ok(const KvkPagedFlat* f, int E) {
  const int64_t nb = int64_t(E) * flat_bits(f) / 8;  // chunk bytes
  const int64_t al = std::min<int64_t>(nb, 16);
  const int64_t es = f->kind == 0 ? esize_of(f->dtype) : 1;  // stride unit (bytes for codes)
  if (reinterpret_cast<uintptr_t>(f->data) % al) return false;
  for (int64_t s : {f->f_kv, f->f_l, f->f_t, f->f_h})
    if (!multiple(s * es, al)) return false;
  return true;
}
inline bool cache_vec_ok(const KvkPagedCaches* c, int E) {
  const int es = esize_of(c->cache_dtype);
  const int pb = std::min(16, E * es);
  const int pc = pb / es;
  if (!c->aligned16 || c->x % pc) return false;
  for (int k = 0; k < c->num_kv; ++k) {
    if (c->st[k][4] != 1) return false;
    for (int j = 0; j < 4; ++j)
      if (!multiple(c->st[k][j] * es, pb)) return false;
  }
  return true;
}

// Fill the launch geometry for chunks of E channels.
inline cudaError_t prepare(Args& a, const KvkPagedCaches* c, const KvkPagedFlat* f, const void* slots, int slots64, int64_t T,
                    void* cnt, int cnt64, int E) {
  a = Args{};
  a.c = *c;
  a.f = *f;
  a.slots = slots;
  a.slots64 = slots64;
  a.T = T;
  a.R = c->num_kv * c->num_layers;
  a.nslots = c->num_blocks * c->block_size;
  a.cnt = cnt;
  a.cnt64 = cnt64;
  if (c->head_dim % E) return cudaErrorNotSupported;
  const int64_t chunks = c->num_heads * (c->head_dim / E);
  if (chunks >= (int64_t(1) << 30) || c->head_dim >= (int64_t(1) << 30) || T >= (int64_t(1) << 31))
    return cudaErrorNotSupported;
  a.chunks = int(chunks);
  a.cph = FastDiv(uint32_t(c->head_dim / E));
  a.work32 = a.R * T < (int64_t(1) << 31);
  if (a.work32) a.tdiv = FastDiv(uint32_t(T));
  a.nslots32 = a.nslots <= (int64_t(1) << 31) && c->block_size < (int64_t(1) << 31);
  if (a.nslots32) a.bsdiv = FastDiv(uint32_t(c->block_size));
  a.xdiv = FastDiv(uint32_t(c->x));
  a.cache_vec = cache_vec_ok(c, E);
  a.flat_vec = flat_vec_ok(f, E);
  if (f->kind != 0) {
    if (f->tg >= (int64_t(1) << 31) || f->dg >= (int64_t(1) << 30)) return cudaErrorNotSupported;
    a.tgdiv = FastDiv(uint32_t(f->tg));
    a.dgdiv = FastDiv(uint32_t(f->dg));
    if (f->a_d == 0 || f->dg % E == 0) a.smode = 0;
    else if (f->dg == 1 && f->a_d == 1) a.smode = 1;
    else a.smode = 2;
  }
  return cudaSuccess;
}

// The chunk width for this case: the preferred one, halved until it divides head_dim, keeps
// every access a vector and holds one scale (group) per chunk; else the contract's minimum.
inline int pick_e(const KvkPagedCaches* c, const KvkPagedFlat* f, bool scatter) {
  const int emin = min_e(c, f);
  for (int e = pref_e(c, f, scatter); e > emin; e /= 2) {
    if (c->head_dim % e == 0 && flat_vec_ok(f, e) && cache_vec_ok(c, e) &&
        (f->kind == 0 || f->a_d == 0 || f->dg % e == 0))
      return e;
  }
  return emin;
}

// Block shape: TPR threads per row (ceil(chunks / U), at most 256, rounded up to a multiple of
// tpr_align), ROWS rows per block (256
// threads; 1024 for the SM-bounded path). Grid: persistent (at most the blocks that fit on the
// GPU at once, from the occupancy API: each block grid-strides over the rows with no
// block-scheduling overhead between rows), or max_blocks blocks for the SM-bounded path.
constexpr int kMaxDevices = 64;

// `per_sm_cache`: this kernel's resident blocks per SM by (device, block size), so that the
// occupancy API runs once per kernel and device, not inside a CUDA-graph capture later.
template <typename Kernel>
cudaError_t launch_geometry(const Args& a, int U, int max_blocks, Kernel kernel, int* per_sm_cache, dim3& grid,
                            dim3& block, int max_threads = 1024, int tpr_align = 1) {
  int tpr = std::max(1, std::min(256, (a.chunks + U - 1) / U));
  tpr = (tpr + tpr_align - 1) / tpr_align * tpr_align;  // tpr_align divides 256
  const int rows = std::max(1, (max_blocks > 0 ? max_threads : 256) / tpr);
  const int64_t work = a.R * a.T;
  int64_t nb = (work + rows - 1) / rows;
  if (max_blocks > 0) {
    nb = std::min<int64_t>(nb, max_blocks);
  } else {
    int dev = 0, sms = 0, per_sm = 0;
    cudaError_t e = cudaGetDevice(&dev);
    if (e == cudaSuccess) e = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
    if (e != cudaSuccess) return e;
    const int slot = (dev >= 0 && dev < kMaxDevices) ? dev : -1;
    const int key = slot * 33 + (tpr * rows + 31) / 32;
    per_sm = slot >= 0 ? per_sm_cache[key] : 0;
    if (per_sm == 0) {
      e = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, tpr * rows, 0);
      if (e != cudaSuccess) return e;
      per_sm = std::max(per_sm, 1);
      if (slot >= 0) per_sm_cache[key] = per_sm;
    }
    nb = std::min<int64_t>(nb, int64_t(sms) * std::max(per_sm, 1));
  }
  nb = std::min<int64_t>(nb, 0x7fffffff);
  grid = dim3(unsigned(nb));
  block = dim3(tpr, rows);
  return cudaSuccess;
}

template <typename Kernel>
cudaError_t launch(const Args& a, int U, int max_blocks, Kernel kernel, int* per_sm, cudaStream_t stream,
                   int max_threads = 1024, int tpr_align = 1) {
  dim3 grid, block;
  cudaError_t err = launch_geometry(a, U, max_blocks, kernel, per_sm, grid, block, max_threads, tpr_align);
  if (err != cudaSuccess) return err;
#ifdef KVK_PAGED_EMULATE  // tests/test_paged_emu.py: every thread run in turn on the host (no GPU)
  kvk_paged_emulate(kernel, grid, block, a);
#else
  kernel<<<grid, block, 0, stream>>>(a);
#endif
  return cudaGetLastError();
}

// Gather fused with quantization (paged_gather_quant.cu): dst->kind != 0, arguments checked.
cudaError_t gather_quant(const KvkPagedCaches* c, const KvkPagedFlat* f, const void* slots, int slots64, int64_t T,
                         void* cnt, int cnt64, int max_blocks, cudaStream_t stream);

}  // namespace paged
}  // namespace kvk

// paged.cu -- paged KV scatter / gather between the flat side and engines' caches (paged.h).
//
// One launch for all layers: a work item is (cache r = kv*L + layer, flat token i), one token row
// of H heads x D channels of one cache; a block holds ROWS work items (threadIdx.y), each done by
// TPR threads (threadIdx.x). A row is cut into chunks of E consecutive channels of one head; a
// thread takes U chunks of a row (c, c + TPR, ...), issues every load of them (codes, scales,
// values) before the first conversion or store, then converts and stores them. E and U are
// template parameters picked on the host so that a chunk is 16 bytes of its NARROWEST side (16
// int8 codes -> 32 bytes of bf16; 16 bf16 -> 16 bytes of fp8) and a thread has ~64 bytes of
// reads in flight; every access is one or more 16-byte (or the chunk's) vector loads / stores
// where the host found that legal (dense inner dim, aligned bases and strides), element-wise
// otherwise (legacy V [NB, H, D, BS], odd strides).
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

// Chunks per thread: two where a chunk reads less than 32 bytes (>= 16 bytes of reads in flight
// per thread, ~16-32 KB per SM at 64 registers: several times what the bandwidth-latency product
// of an H100 SM asks, ~25 B/ns x ~0.7 us), else one.
// Plain copies (no conversion, few registers) take four 16-byte chunks, as the Triton copy
// kernels that reach 98% of a device copy (64 bytes a thread).
constexpr int chunks_per_thread(int read_bytes, bool copy = false) {
  return read_bytes >= 32 ? 1 : (copy && read_bytes == 16) ? 4 : 2;
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

// ---- scatter ----------------------------------------------------------------------------------
// KIND 0: flat values of STr; 1: int codes of BITS (scale, zero); 2: fp8 codes (scale).
template <typename STr, int KIND, int BITS, typename CTr, int E>
__global__ void __launch_bounds__(1024) scatter_kernel(const Args a) {
  constexpr int SB = KIND == 0 ? E * STr::kSize : E * BITS / 8;  // source bytes of a chunk
  constexpr bool kCopy = KIND == 0 && std::is_same<STr, CTr>::value;
  constexpr int U = chunks_per_thread(SB, kCopy);
  constexpr bool kFp8Cache = std::is_same<CTr, FP8>::value;
  constexpr bool kWide =
      E > emin_for(KIND == 0 ? (STr::kSize > CTr::kSize ? STr::kSize : CTr::kSize) : CTr::kSize);
  for_each_row(a, [&](const Row& row) {
    const int64_t frow = row.kv * a.f.f_kv + row.l * a.f.f_l + row.i * a.f.f_t;  // elements (bytes for codes)
    int64_t sbase = 0;
    if constexpr (KIND != 0) sbase = row.r * a.f.a_row + int64_t(a.tgdiv.div(uint32_t(row.i))) * a.f.a_t;
    for (int c0 = threadIdx.x; c0 < a.chunks; c0 += U * blockDim.x) {
      Words<SB> src[U];
      float sc[U], zp[U], cs[U];
      int hh[U], dd[U];
      // every load first
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int c = c0 + u * blockDim.x;
        chunk_pos<E>(a, c, hh[u], dd[u]);
        sc[u] = 1.f;
        zp[u] = 0.f;
        cs[u] = 1.f;
        if (c < a.chunks) {
          if constexpr (kFp8Cache) cs[u] = cache_scale(a, row.kv, row.l, hh[u]);
          if constexpr (KIND == 0) {
            const auto* p = static_cast<const typename STr::storage*>(a.f.data) + frow + hh[u] * a.f.f_h + dd[u];
            load_flat<SB, kWide>(a, reinterpret_cast<const uint8_t*>(p), src[u]);
          } else {
            const uint8_t* p = static_cast<const uint8_t*>(a.f.data) + frow + hh[u] * a.f.f_h + dd[u] * BITS / 8;
            load_flat<SB, kWide>(a, p, src[u]);
            if (kWide || a.smode == 0) {
              const int64_t si = sbase + hh[u] * a.f.a_h + int64_t(a.dgdiv.div(uint32_t(dd[u]))) * a.f.a_d;
              sc[u] = __ldg(a.f.scale + si);
              if constexpr (KIND == 1) zp[u] = __ldg(a.f.zero + si);
            }
          }
        }
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int c = c0 + u * blockDim.x;
        if (c >= a.chunks) continue;
        Words<E * CTr::kSize> out;
        if constexpr (kCopy) {
#pragma unroll
          for (int j = 0; j < Words<SB>::N; ++j) out.w[j] = src[u].w[j];
        } else {
          float f[E];
          if constexpr (KIND == 0) {
            to_floats<STr, E>(src[u], f);
          } else {
            if constexpr (KIND == 1) codes_to_biased<BITS, E>(src[u], f);
            else fp8_to_floats<E>(src[u], f);
            const int64_t hb = sbase + hh[u] * a.f.a_h;
#pragma unroll
            for (int j = 0; j < E; ++j) {
              float s = sc[u], z = zp[u];
              if (!kWide && a.smode != 0) {  // per channel (token-axis groups) or odd channel groups
                const int64_t si = hb + (a.smode == 1 ? int64_t(dd[u] + j)
                                                      : int64_t(a.dgdiv.div(uint32_t(dd[u] + j))) * a.f.a_d);
                s = __ldg(a.f.scale + si);
                if constexpr (KIND == 1) z = __ldg(a.f.zero + si);
              }
              if constexpr (KIND == 1) f[j] = __fmaf_rn(__fsub_rn(f[j], 0x1p23f), s, z);  // int_dequantize
              else f[j] = __fmul_rn(f[j], s);                                           // fp8_dequantize
            }
          }
          if constexpr (kFp8Cache) {
            const float inv = fp8_inv(cs[u]);
#pragma unroll
            for (int j = 0; j < E; ++j) f[j] = __fmul_rn(f[j], inv);
            floats_to_fp8<E>(f, out);
          } else {
            from_floats<CTr, E>(f, out);
          }
        }
        store_cache<CTr, E, kWide>(a, row, hh[u], dd[u], out);
      }
    }
  });
}

// ---- gather -----------------------------------------------------------------------------------
template <typename CTr, typename DTr, int E>
__global__ void __launch_bounds__(1024) gather_kernel(const Args a) {
  constexpr int CB = E * CTr::kSize;
  constexpr int DB = E * DTr::kSize;
  constexpr bool kCopy = std::is_same<DTr, CTr>::value;
  constexpr int U = chunks_per_thread(CB, kCopy);
  constexpr bool kFp8Cache = std::is_same<CTr, FP8>::value;
  constexpr bool kWide = E > emin_for(CTr::kSize > DTr::kSize ? CTr::kSize : DTr::kSize);
  for_each_row(a, [&](const Row& row) {
    auto* out = static_cast<typename DTr::storage*>(a.f.data) + row.kv * a.f.f_kv + row.l * a.f.f_l + row.i * a.f.f_t;
    for (int c0 = threadIdx.x; c0 < a.chunks; c0 += U * blockDim.x) {
      Words<CB> src[U];
      float cs[U];
      int hh[U], dd[U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int c = c0 + u * blockDim.x;
        chunk_pos<E>(a, c, hh[u], dd[u]);
        cs[u] = 1.f;
        if (c < a.chunks) {
          load_cache<CTr, E, kWide>(a, row, hh[u], dd[u], src[u]);
          if constexpr (kFp8Cache) cs[u] = cache_scale(a, row.kv, row.l, hh[u]);
        }
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int c = c0 + u * blockDim.x;
        if (c >= a.chunks) continue;
        Words<DB> o;
        if constexpr (kCopy) {
#pragma unroll
          for (int j = 0; j < Words<CB>::N; ++j) o.w[j] = src[u].w[j];
        } else {
          float f[E];
          if constexpr (kFp8Cache) {
            fp8_to_floats<E>(src[u], f);
#pragma unroll
            for (int j = 0; j < E; ++j) f[j] = __fmul_rn(f[j], cs[u]);  // fp8_dequantize
          } else {
            to_floats<CTr, E>(src[u], f);
          }
          from_floats<DTr, E>(f, o);
        }
        store_flat<DB, kWide>(a, reinterpret_cast<uint8_t*>(out + hh[u] * a.f.f_h + dd[u]), o);
      }
    }
  });
}

// ---- gather + quantize -------------------------------------------------------------------------
// A thread quantizes one group of G channels of one head of one token row (int `channel` groups,
// G = group size; fp8 `token_head`, G = head_dim): pass 1 reads the group in pieces of E channels
// (16-byte vector loads of the cache) for the finite min / max (int) or amax (fp8); pass 2 reads
// it again (the lines this thread just loaded: L1 hits) and writes the codes, then the scale
// (and zero point). The math is quant_math.cuh's (make_int_group / int_quantize,
// fp8_scale_from_amax / fp8_inv / satfinite encode): the codes and scales of kvkernels.quantize.
// Skipped tokens are quantized as zeros (as the reference). Codes [R, T, H, D*bits/8] (bytes),
// scale / zero [R, T, H, D/G] (fp8: [R, T, H]), contiguous, R = num_kv * L.
template <typename CTr, int E>
__device__ __forceinline__ void load_piece(const Args& a, const Row& row, int h, int d, float (&f)[E], float cs) {
  Words<E * CTr::kSize> x;
  load_cache<CTr, E, false>(a, row, h, d, x);
  if constexpr (std::is_same<CTr, FP8>::value) {
    fp8_to_floats<E>(x, f);
#pragma unroll
    for (int j = 0; j < E; ++j) f[j] = __fmul_rn(f[j], cs);  // fp8_dequantize
  } else {
    to_floats<CTr, E>(x, f);
  }
}

template <typename CTr, int KIND, int BITS, int E>
__global__ void __launch_bounds__(256) gather_quant_kernel(const Args a) {
  constexpr bool kFp8Cache = std::is_same<CTr, FP8>::value;
  constexpr int qmax = (1 << BITS) - 1;
  constexpr int CB = KIND == 1 ? E * BITS / 8 : E;  // code bytes of a piece
  const int G = int(a.f.dg);
  const int groups = a.chunks;  // H * D / G
  uint8_t* codes = static_cast<uint8_t*>(a.f.data);
  for_each_row<true>(a, [&](const Row& row) {
    const int64_t rowi = row.r * a.T + row.i;  // (r, token) row of the quantized output
    for (int gi = threadIdx.x; gi < groups; gi += blockDim.x) {
      uint32_t hq, gq;
      a.cph.divmod(uint32_t(gi), hq, gq);  // groups per head
      const int h = int(hq), d0 = int(gq) * G;
      const float cs = (kFp8Cache && row.valid) ? cache_scale(a, row.kv, row.l, h) : 1.f;
      // pass 1: the group's finite min / max or amax
      float mn = __int_as_float(0x7fffffff), mx = mn, amax = 0.f;
      bool nonfinite = false;
      if (row.valid) {
#pragma unroll 4
        for (int d = d0; d < d0 + G; d += E) {
          float f[E];
          load_piece<CTr, E>(a, row, h, d, f, cs);
#pragma unroll
          for (int j = 0; j < E; ++j) {
            if constexpr (KIND == 1) {
              const float v = finite_or_nan(f[j]);
              nonfinite |= v != v;
              mn = fminf(mn, v);
              mx = fmaxf(mx, v);
            } else {
              const float m = fabsf(f[j]);
              if (m <= 3.402823466e38f) amax = fmaxf(amax, m);
            }
          }
        }
      }
      const int64_t gidx = rowi * groups + gi;  // scale / zero index: [R, T, H, NG] or [R, T, H]
      uint8_t* cp = codes + (rowi * a.c.num_heads + h) * a.f.f_h + int64_t(d0) * BITS / 8;
      if constexpr (KIND == 1) {
        const IntGroup grp = make_int_group(mn, mx, qmax, nonfinite);
#pragma unroll 4
        for (int d = d0; d < d0 + G; d += E) {
          float f[E];
          if (row.valid) load_piece<CTr, E>(a, row, h, d, f, cs);
          else {
#pragma unroll
            for (int j = 0; j < E; ++j) f[j] = 0.f;
          }
          uint32_t q[E];
#pragma unroll
          for (int j = 0; j < E; ++j) q[j] = int_quantize(f[j], grp, float(qmax));
          Words<CB> w;
          if constexpr (CB <= 8) {
            const uint64_t word = pack_code_word<BITS, E>(q);
            w.w[0] = uint32_t(word);
            if constexpr (CB == 8) w.w[1] = uint32_t(word >> 32);
          } else {  // 16 int8 codes: two 8-byte words
            uint32_t lo[E / 2], hi[E / 2];
#pragma unroll
            for (int j = 0; j < E / 2; ++j) { lo[j] = q[j]; hi[j] = q[E / 2 + j]; }
            const uint64_t a0 = pack_code_word<BITS, E / 2>(lo), a1 = pack_code_word<BITS, E / 2>(hi);
            w.w[0] = uint32_t(a0); w.w[1] = uint32_t(a0 >> 32); w.w[2] = uint32_t(a1); w.w[3] = uint32_t(a1 >> 32);
          }
          store_flat<CB, false>(a, cp + int64_t(d - d0) * BITS / 8, w);
        }
        const_cast<float*>(a.f.scale)[gidx] = grp.scale;
        const_cast<float*>(a.f.zero)[gidx] = grp.mn;
      } else {
        const float scale = fp8_scale_from_amax(amax);
        const float inv = fp8_inv(scale);
#pragma unroll 4
        for (int d = d0; d < d0 + G; d += E) {
          float f[E];
          if (row.valid) load_piece<CTr, E>(a, row, h, d, f, cs);
          else {
#pragma unroll
            for (int j = 0; j < E; ++j) f[j] = 0.f;
          }
#pragma unroll
          for (int j = 0; j < E; ++j) f[j] = __fmul_rn(f[j], inv);
          Words<E> w;
          floats_to_fp8<E>(f, w);
          store_flat<E, false>(a, cp + (d - d0), w);
        }
        const_cast<float*>(a.f.scale)[gidx] = scale;
      }
    }
  });
}

// ---- host side --------------------------------------------------------------------------------
int esize_of(int code) { return code == 0 ? 4 : code == 3 ? 1 : 2; }

bool valid_caches(const KvkPagedCaches* c) {
  return c && c->ptrs && c->num_layers > 0 && (c->num_kv == 1 || c->num_kv == 2) && c->num_blocks > 0 &&
         c->block_size > 0 && c->num_heads > 0 && c->head_dim > 0 && c->x > 0 && c->head_dim % c->x == 0 &&
         c->cache_dtype >= 0 && c->cache_dtype <= 3 &&
         (c->cache_dtype != 3 || (c->k_scale && (c->num_kv == 1 || c->v_scale)));
}

// Bytes per element of the flat side (codes: bits / 8, as a fraction: returns bits).
int flat_bits(const KvkPagedFlat* f) { return f->kind == 0 ? 8 * esize_of(f->dtype) : f->kind == 1 ? f->bits : 8; }

// The smallest chunk (the contract's E: 16 bytes of the widest element) and the preferred one
// (16 bytes of the narrowest side, at most 16 channels: 64 registers per thread).
int min_e(const KvkPagedCaches* c, const KvkPagedFlat* f) {
  const int widest = std::max(esize_of(c->cache_dtype), f->kind == 0 ? esize_of(f->dtype) : 1);
  return widest == 4 ? 4 : 8;
}
int pref_e(const KvkPagedCaches* c, const KvkPagedFlat* f) {
  const int nbits = std::min(8 * esize_of(c->cache_dtype), flat_bits(f));
  return std::min(16, 128 / nbits);
}

bool multiple(int64_t v, int64_t m) { return v % m == 0; }

// Whether chunks of E channels can use vector accesses on the flat side / cache side.
bool flat_vec_ok(const KvkPagedFlat* f, int E) {
  const int64_t nb = int64_t(E) * flat_bits(f) / 8;  // chunk bytes
  const int64_t al = std::min<int64_t>(nb, 16);
  const int64_t es = f->kind == 0 ? esize_of(f->dtype) : 1;  // stride unit (bytes for codes)
  if (reinterpret_cast<uintptr_t>(f->data) % al) return false;
  for (int64_t s : {f->f_kv, f->f_l, f->f_t, f->f_h})
    if (!multiple(s * es, al)) return false;
  return true;
}
bool cache_vec_ok(const KvkPagedCaches* c, int E) {
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
cudaError_t prepare(Args& a, const KvkPagedCaches* c, const KvkPagedFlat* f, const void* slots, int slots64, int64_t T,
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
int pick_e(const KvkPagedCaches* c, const KvkPagedFlat* f) {
  const int emin = min_e(c, f);
  for (int e = pref_e(c, f); e > emin; e /= 2) {
    if (c->head_dim % e == 0 && flat_vec_ok(f, e) && cache_vec_ok(c, e) &&
        (f->kind == 0 || f->a_d == 0 || f->dg % e == 0))
      return e;
  }
  return emin;
}

// Block shape: TPR threads per row (ceil(chunks / U), at most 256), ROWS rows per block (256
// threads; 1024 for the SM-bounded path). Grid: persistent (at most the blocks that fit on the
// GPU at once, from the occupancy API: each block grid-strides over the rows with no
// block-scheduling overhead between rows), or max_blocks blocks for the SM-bounded path.
constexpr int kMaxDevices = 64;

// `per_sm_cache`: this kernel's resident blocks per SM by (device, block size), so that the
// occupancy API runs once per kernel and device, not inside a CUDA-graph capture later.
template <typename Kernel>
cudaError_t launch_geometry(const Args& a, int U, int max_blocks, Kernel kernel, int* per_sm_cache, dim3& grid,
                            dim3& block, int max_threads = 1024) {
  const int tpr = std::max(1, std::min(256, (a.chunks + U - 1) / U));
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
                   int max_threads = 1024) {
  dim3 grid, block;
  cudaError_t err = launch_geometry(a, U, max_blocks, kernel, per_sm, grid, block, max_threads);
  if (err != cudaSuccess) return err;
#ifdef KVK_PAGED_EMULATE  // tests/test_paged_emu.py: every thread run in turn on the host (no GPU)
  kvk_paged_emulate(kernel, grid, block, a);
#else
  kernel<<<grid, block, 0, stream>>>(a);
#endif
  return cudaGetLastError();
}

// The chunk widths pick_e can choose: from emin (16 bytes of the widest element) to the
// preferred one (16 bytes of the narrowest side, at most 16 channels); others are not compiled.
constexpr bool e_ok(int E, int wide_bytes, int narrow_bits) {
  const int emin = wide_bytes == 4 ? 4 : 8;
  const int pref = 128 / narrow_bits < 16 ? 128 / narrow_bits : 16;
  return E >= emin && E <= (pref > emin ? pref : emin);  // pref < emin: fp32 with 2-byte codes
}
template <typename STr, int KIND, int BITS, typename CTr, int E>
constexpr bool scatter_e_ok() {
  constexpr int wide = KIND == 0 ? (STr::kSize > CTr::kSize ? STr::kSize : CTr::kSize) : CTr::kSize;
  constexpr int sbits = KIND == 0 ? 8 * STr::kSize : BITS;
  return e_ok(E, wide, sbits < 8 * CTr::kSize ? sbits : 8 * CTr::kSize);
}

template <typename STr, int KIND, int BITS, typename CTr, int E>
cudaError_t run_scatter(Args& a, int max_blocks, cudaStream_t stream) {
  if constexpr (!scatter_e_ok<STr, KIND, BITS, CTr, E>()) {
    return cudaErrorNotSupported;  // never picked (pick_e)
  } else {
    constexpr int SB = KIND == 0 ? E * STr::kSize : E * BITS / 8;
    static int per_sm[kMaxDevices * 33] = {};
    constexpr bool kCopy = KIND == 0 && std::is_same<STr, CTr>::value;
    return launch(a, chunks_per_thread(SB, kCopy), max_blocks, scatter_kernel<STr, KIND, BITS, CTr, E>, per_sm, stream);
  }
}

template <typename STr, int KIND, int BITS, typename CTr>
cudaError_t scatter_by_e(Args& a, int E, int max_blocks, cudaStream_t s) {
  switch (E) {
    case 4: return run_scatter<STr, KIND, BITS, CTr, 4>(a, max_blocks, s);
    case 8: return run_scatter<STr, KIND, BITS, CTr, 8>(a, max_blocks, s);
    case 16: return run_scatter<STr, KIND, BITS, CTr, 16>(a, max_blocks, s);
    case 32: return run_scatter<STr, KIND, BITS, CTr, 32>(a, max_blocks, s);
    default: return cudaErrorNotSupported;
  }
}

template <typename STr, int KIND, int BITS>
cudaError_t scatter_by_cache(Args& a, int cache_dtype, int E, int max_blocks, cudaStream_t s) {
  switch (cache_dtype) {
    case 0: return scatter_by_e<STr, KIND, BITS, F32>(a, E, max_blocks, s);
    case 1: return scatter_by_e<STr, KIND, BITS, F16>(a, E, max_blocks, s);
    case 2: return scatter_by_e<STr, KIND, BITS, BF16>(a, E, max_blocks, s);
    default: return scatter_by_e<STr, KIND, BITS, FP8>(a, E, max_blocks, s);
  }
}

cudaError_t scatter_dispatch(Args& a, const KvkPagedCaches* c, const KvkPagedFlat* f, int E, int max_blocks,
                             cudaStream_t s) {
  if (f->kind == 0) {
    switch (f->dtype) {
      case 0: return scatter_by_cache<F32, 0, 8>(a, c->cache_dtype, E, max_blocks, s);
      case 1: return scatter_by_cache<F16, 0, 8>(a, c->cache_dtype, E, max_blocks, s);
      default: return scatter_by_cache<BF16, 0, 8>(a, c->cache_dtype, E, max_blocks, s);
    }
  }
  if (f->kind == 2) return scatter_by_cache<F32, 2, 8>(a, c->cache_dtype, E, max_blocks, s);
  switch (f->bits) {
    case 8: return scatter_by_cache<F32, 1, 8>(a, c->cache_dtype, E, max_blocks, s);
    case 4: return scatter_by_cache<F32, 1, 4>(a, c->cache_dtype, E, max_blocks, s);
    default: return scatter_by_cache<F32, 1, 2>(a, c->cache_dtype, E, max_blocks, s);
  }
}

template <typename CTr, typename DTr, int E>
cudaError_t run_gather(Args& a, int max_blocks, cudaStream_t s) {
  constexpr int wide = CTr::kSize > DTr::kSize ? CTr::kSize : DTr::kSize;
  constexpr int narrow = CTr::kSize < DTr::kSize ? CTr::kSize : DTr::kSize;
  if constexpr (!e_ok(E, wide, 8 * narrow)) {
    return cudaErrorNotSupported;  // never picked (pick_e)
  } else {
    static int per_sm[kMaxDevices * 33] = {};
    return launch(a, chunks_per_thread(E * CTr::kSize, std::is_same<CTr, DTr>::value), max_blocks,
                  gather_kernel<CTr, DTr, E>, per_sm, s);
  }
}

template <typename CTr, typename DTr>
cudaError_t gather_by_e(Args& a, int E, int max_blocks, cudaStream_t s) {
  switch (E) {
    case 4: return run_gather<CTr, DTr, 4>(a, max_blocks, s);
    case 8: return run_gather<CTr, DTr, 8>(a, max_blocks, s);
    case 16: return run_gather<CTr, DTr, 16>(a, max_blocks, s);
    case 32: return run_gather<CTr, DTr, 32>(a, max_blocks, s);
    default: return cudaErrorNotSupported;
  }
}

template <typename CTr>
cudaError_t gather_by_dst(Args& a, int dst_dtype, int E, int max_blocks, cudaStream_t s) {
  switch (dst_dtype) {
    case 0: return gather_by_e<CTr, F32>(a, E, max_blocks, s);
    case 1: return gather_by_e<CTr, F16>(a, E, max_blocks, s);
    default: return gather_by_e<CTr, BF16>(a, E, max_blocks, s);
  }
}

cudaError_t gather_dispatch(Args& a, const KvkPagedCaches* c, const KvkPagedFlat* f, int E, int max_blocks,
                            cudaStream_t s) {
  switch (c->cache_dtype) {
    case 0: return gather_by_dst<F32>(a, f->dtype, E, max_blocks, s);
    case 1: return gather_by_dst<F16>(a, f->dtype, E, max_blocks, s);
    case 2: return gather_by_dst<BF16>(a, f->dtype, E, max_blocks, s);
    default: return gather_by_dst<FP8>(a, f->dtype, E, max_blocks, s);
  }
}

// ---- gather + quantize: host ----------------------------------------------------------------
// Pieces of E channels: 16 bytes of the cache element where the group and the layout allow.
int pick_e_quant(const KvkPagedCaches* c, int G) {
  for (int e = 16 / esize_of(c->cache_dtype); e > 4; e /= 2)
    if (G % e == 0 && cache_vec_ok(c, e)) return e;
  return 4;
}

cudaError_t prepare_quant(Args& a, const KvkPagedCaches* c, const KvkPagedFlat* f, const void* slots, int slots64,
                          int64_t T, void* cnt, int cnt64, int E) {
  cudaError_t err = prepare(a, c, f, slots, slots64, T, cnt, cnt64, 4);  // rows, slots, divisors
  if (err != cudaSuccess) return err;
  const int64_t G = f->dg, D = c->head_dim;
  if (G < 4 || G % E || D % G) return cudaErrorNotSupported;
  a.chunks = int(c->num_heads * (D / G));
  a.cph = FastDiv(uint32_t(D / G));
  a.cache_vec = cache_vec_ok(c, E);
  const int cb = f->kind == 1 ? E * f->bits / 8 : E;  // code bytes of a piece
  const int al = std::min(cb, 16);
  a.flat_vec = reinterpret_cast<uintptr_t>(f->data) % al == 0 && f->f_h % al == 0;
  return cudaSuccess;
}

template <typename CTr, int KIND, int BITS, int E>
cudaError_t run_gather_quant(Args& a, int max_blocks, cudaStream_t s) {
  if constexpr (E > 16 / CTr::kSize) {
    return cudaErrorNotSupported;  // never picked (pick_e_quant)
  } else {
    static int per_sm[kMaxDevices * 33] = {};
    return launch(a, 1, max_blocks, gather_quant_kernel<CTr, KIND, BITS, E>, per_sm, s, 256);
  }
}

template <typename CTr, int KIND, int BITS>
cudaError_t gather_quant_by_e(Args& a, int E, int max_blocks, cudaStream_t s) {
  switch (E) {
    case 4: return run_gather_quant<CTr, KIND, BITS, 4>(a, max_blocks, s);
    case 8: return run_gather_quant<CTr, KIND, BITS, 8>(a, max_blocks, s);
    case 16: return run_gather_quant<CTr, KIND, BITS, 16>(a, max_blocks, s);
    default: return cudaErrorNotSupported;
  }
}

template <typename CTr>
cudaError_t gather_quant_by_fmt(Args& a, const KvkPagedFlat* f, int E, int max_blocks, cudaStream_t s) {
  if (f->kind == 2) return gather_quant_by_e<CTr, 2, 8>(a, E, max_blocks, s);
  switch (f->bits) {
    case 8: return gather_quant_by_e<CTr, 1, 8>(a, E, max_blocks, s);
    case 4: return gather_quant_by_e<CTr, 1, 4>(a, E, max_blocks, s);
    default: return gather_quant_by_e<CTr, 1, 2>(a, E, max_blocks, s);
  }
}

cudaError_t gather_quant_dispatch(Args& a, const KvkPagedCaches* c, const KvkPagedFlat* f, int E, int max_blocks,
                                  cudaStream_t s) {
  switch (c->cache_dtype) {
    case 0: return gather_quant_by_fmt<F32>(a, f, E, max_blocks, s);
    case 1: return gather_quant_by_fmt<F16>(a, f, E, max_blocks, s);
    case 2: return gather_quant_by_fmt<BF16>(a, f, E, max_blocks, s);
    default: return gather_quant_by_fmt<FP8>(a, f, E, max_blocks, s);
  }
}

}  // namespace paged
}  // namespace kvk

using namespace kvk::paged;

extern "C" cudaError_t kvk_paged_scatter(const KvkPagedCaches* caches, const KvkPagedFlat* src, const void* slots,
                                         int slots_int64, int64_t T, void* oob_count, int count_int64, int max_blocks,
                                         cudaStream_t stream) {
  if (!valid_caches(caches) || !src || !src->data || T < 0 || (T > 0 && !slots) || max_blocks < 0)
    return cudaErrorInvalidValue;
  if (src->kind < 0 || src->kind > 2 || (src->kind == 0 && (src->dtype < 0 || src->dtype > 2)))
    return cudaErrorInvalidValue;
  if (src->kind == 1 && ((src->bits != 8 && src->bits != 4 && src->bits != 2) || !src->scale || !src->zero))
    return cudaErrorInvalidValue;
  if (src->kind == 2 && !src->scale) return cudaErrorInvalidValue;
  if (src->kind != 0 && (src->tg < 1 || src->dg < 1)) return cudaErrorInvalidValue;
  if (T == 0) return cudaSuccess;
  Args a;
  const int E = pick_e(caches, src);
  cudaError_t err = prepare(a, caches, src, slots, slots_int64, T, oob_count, count_int64, E);
  if (err != cudaSuccess) return err;
  return scatter_dispatch(a, caches, src, E, max_blocks, stream);
}

extern "C" cudaError_t kvk_paged_gather(const KvkPagedCaches* caches, const KvkPagedFlat* dst, const void* slots,
                                        int slots_int64, int64_t T, void* oob_count, int count_int64, int max_blocks,
                                        cudaStream_t stream) {
  if (!valid_caches(caches) || !dst || !dst->data || T < 0 || (T > 0 && !slots) || max_blocks < 0)
    return cudaErrorInvalidValue;
  if (dst->kind < 0 || dst->kind > 2 || (dst->kind == 0 && (dst->dtype < 0 || dst->dtype > 2)))
    return cudaErrorInvalidValue;
  if (dst->kind != 0) {  // quantize: int channel groups of dg (bits, scale, zero) or fp8 per token-head
    if (!dst->scale || (dst->kind == 1 && (!dst->zero || (dst->bits != 8 && dst->bits != 4 && dst->bits != 2))))
      return cudaErrorInvalidValue;
    if (dst->dg < 1 || caches->head_dim % dst->dg || (dst->kind == 2 && dst->dg != caches->head_dim))
      return cudaErrorInvalidValue;
    if (T == 0) return cudaSuccess;
    Args a;
    const int E = pick_e_quant(caches, int(dst->dg));
    cudaError_t err = prepare_quant(a, caches, dst, slots, slots_int64, T, oob_count, count_int64, E);
    if (err != cudaSuccess) return err;
    return gather_quant_dispatch(a, caches, dst, E, max_blocks, stream);
  }
  if (T == 0) return cudaSuccess;
  Args a;
  const int E = pick_e(caches, dst);
  cudaError_t err = prepare(a, caches, dst, slots, slots_int64, T, oob_count, count_int64, E);
  if (err != cudaSuccess) return err;
  return gather_dispatch(a, caches, dst, E, max_blocks, stream);
}

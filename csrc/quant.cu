// quant.cu -- KV quantize / dequantize kernels and their launchers (see quant.h, docs/quant-spec.md).
//
// Kernel families. The common case (head_dim % 32 == 0, 16-byte-aligned rows and buffers, group
// sizes dividing or divisible by 32) takes the fast paths; the general kernels below them take
// everything else (misaligned views, head_dim 80/96 with odd groups, tiny groups):
//
//  * quant_chunk_kernel -- fast channel-group / fp8-row quantize: a thread owns 32 channels of a
//    row; groups > 32 (and fp8 rows) span G/32 lanes. dequant_vec_kernel -- fast dequantize:
//    kItems 16-byte output vectors per thread, linear addressing for dense rows.
//  * quant_tok_split_kernel -- fast token-group quantize for 17..32-token groups: the group's
//    tokens split over two lanes that combine min / max with one shuffle.
//    dequant_tok_dense_kernel -- fast token-group dequantize (G = 32, whole groups, contiguous
//    output): a thread writes 16-byte vectors of one head over 8 tokens of a group (four threads
//    a group), its 8 code words loaded first.
//
// General kernels (E = elements per thread-vector: 16 bytes of input when D and G allow it,
// i.e. 8 for fp16/bf16 and 4 for fp32, else 8/bits so that a vector packs into whole bytes):
//
//  * quant_rows_kernel  -- groups along the channel dim: int `channel` groups and fp8 (one row of
//    D channels per (l, t, h); token_head scales are reduced in the same pass). A "unit" is one
//    group (G >= E: G/E vectors, spread over P = next_pow2 lanes, up to NV = kItems vectors per
//    lane, reduced by shuffles; padding lanes are masked) or one vector holding E/G small groups
//    (G < E: reduced in registers). A thread handles one vector when a group spans <= 32 lanes
//    (fewest registers, most resident warps: measured fastest on H100), else 4.
//  * dequant_rows_kernel -- the inverse for channel groups and all fp8 scopes: one thread per
//    vector, kItems vectors per thread, one 16-byte store each.
//  * quant_tok_kernel / dequant_tok_kernel -- int `token` groups (G consecutive tokens of one
//    channel): a thread owns E channels (8 bytes of input, at least one code byte) of one
//    (layer, token group, head); quantize keeps the group's G <= 32 tokens in registers (else
//    two passes over them, the second from cache).
//  * quant_fp8_resident_kernel -- fp8 tensor/head scopes with computed scales in one pass over x
//    (a cooperative grid keeps up to 8 MiB of layers in shared memory across a grid barrier; the
//    head scope of larger layers runs as the tensor scope over one pseudo-layer per head; block
//    groups of <= 16 blocks run as thread-block clusters that exchange their amax on chip).
//  * amax_kernel + fp8_finalize_kernel -- the same for larger layers (or without a workspace):
//    block reduction, atomicMax on the bits of non-negative floats, then s = amax / 448 (0 -> 1),
//    then the rows kernels quantize.
//
// Index math: per-launch row/vector counts are < 2^31 (the launchers split L to guarantee it),
// so decompositions use 32-bit magic-number division; element offsets are int64.
#include "quant.h"
#include "quant_math.cuh"

#include <cooperative_groups.h>

#include <algorithm>
#include <cstdlib>
#include <type_traits>

namespace kvk {
namespace {

constexpr int kBlock = 256;     // threads per block (rows kernels, amax, token dequant)
constexpr int kTokBlock = 128;  // threads per block, register-resident token quantize
#ifndef KVK_ROW_MINB
#define KVK_ROW_MINB 1
#endif
#ifndef KVK_TOK_MINB
#define KVK_TOK_MINB 2
#endif
constexpr int kItems = 4;       // vectors per thread: dequantize, amax; quantize with groups > 32 vectors
constexpr int kAmaxIters = 4;   // amax: kItems * kAmaxIters vectors per thread
constexpr int kTokReg = 32;     // token groups up to this size stay in registers
constexpr int kTokDqBatch = 32; // token dequantize: code words loaded before decoding
constexpr int64_t kMaxCount = (int64_t(1) << 31) - 1;

constexpr int codes_per_byte(int mode) { return mode == 0 ? 1 : 8 / mode; }  // mode: bits, 0 = fp8

// The (E, mode) pairs the launchers pick, hence the only ones instantiated.
template <typename Tr, int E, int MODE>
constexpr bool valid_vec() {
  return E * Tr::kSize <= 16 && (E == 16 / Tr::kSize || E == codes_per_byte(MODE));
}
// Token groups: 8 bytes of input per thread (keeps a 32-token group in registers), at least one
// code byte.
constexpr int tok_vec(int size, int mode) { return 8 / size > codes_per_byte(mode) ? 8 / size : codes_per_byte(mode); }
template <typename Tr, int E, int MODE>
constexpr bool valid_tok_vec() {
  return MODE != 0 && (E == tok_vec(Tr::kSize, MODE) || E == codes_per_byte(MODE));
}

// ================================================================================================
// Channel groups / fp8 rows: quantize
// ================================================================================================
struct RowQuantArgs {
  const void* x;         // [L, T, H, D] elements, strides sL/sT/sH, D dense
  int64_t sL, sT, sH;
  uint8_t* codes;        // [L, T, H, D*bits/8] (fp8: [L, T, H, D])
  float* scale;          // int: [L, T, H, D/G]; fp8: [L] / [L, H] / [L, T, H]
  float* zero;           // int: [L, T, H, D/G]; fp8: unused
  uint32_t H;
  uint32_t nunits;       // L * T * H * NU
  uint32_t lpu;          // vectors per unit (U / E, U = max(G, E))
  uint32_t Dp;           // code bytes per row
  int G, logG;           // group size; log2(G) when G < E (then a power of two)
  int logP, logNV;       // lanes per unit P = 1 << logP (<= 32), vectors per lane NV = 1 << logNV (<= 4)
  FastDiv divNU, divH, divT;  // NU = units per row
  bool x_aligned, c_aligned;
  int fp8_scope;         // 0 tensor, 1 head, 2 token_head
  bool fp8_reduce;       // fp8: compute the token_head scale in this pass (else read `scale`)
};

// ITEMS: vectors per thread (1 when a group spans <= 32 lanes: fewest registers, most resident
// warps, measured fastest on H100; 4 for larger groups: up to 4 vectors per lane).
template <typename Tr, int E, int MODE, int ITEMS>
__global__ void __launch_bounds__(kBlock, KVK_ROW_MINB) quant_rows_kernel(const RowQuantArgs a) {
  using S = typename Tr::storage;
  constexpr int NB = MODE == 0 ? E : E * MODE / 8;  // code bytes per vector
  constexpr float kQmax = MODE == 0 ? 0.f : float((1 << (MODE == 0 ? 1 : MODE)) - 1);
  const S* __restrict__ x = static_cast<const S*>(a.x);
  const int P = 1 << a.logP;
  const int NV = 1 << a.logNV;
  const int upt = ITEMS >> a.logNV;  // units per thread
  const bool whole = a.G >= E;        // a group is made of whole vectors

  float v[ITEMS][E];
  uint32_t row[ITEMS], unit[ITEMS], vin[ITEMS], vir[ITEMS];
  float sc_in[ITEMS];
  bool act[ITEMS];

  // ---- load: slot i of this thread is vector `vin` (of `lpu`) of unit `unit` -----------------
#pragma unroll
  for (int i = 0; i < ITEMS; ++i) {
    const int sub = i >> a.logNV, vv = i & (NV - 1);
    const uint64_t s = (uint64_t(blockIdx.x) * upt + sub) * blockDim.x + threadIdx.x;
    const uint64_t u = s >> a.logP;
    vin[i] = uint32_t(vv) * P + (uint32_t(s) & (P - 1));
    act[i] = u < a.nunits && vin[i] < a.lpu;
    row[i] = unit[i] = vir[i] = 0;
    sc_in[i] = 1.f;
    if (act[i]) {
      uint32_t r, uir, rt, h, l, t;
      unit[i] = uint32_t(u);
      a.divNU.divmod(unit[i], r, uir);
      a.divH.divmod(r, rt, h);
      a.divT.divmod(rt, l, t);
      row[i] = r;
      vir[i] = uir * a.lpu + vin[i];
      const int64_t off = int64_t(l) * a.sL + int64_t(t) * a.sT + int64_t(h) * a.sH + int64_t(vir[i]) * E;
      load_vec<Tr, E>(x + off, a.x_aligned, v[i]);
      if constexpr (MODE == 0) {
        if (!a.fp8_reduce) sc_in[i] = __ldg(a.scale + (a.fp8_scope == 0 ? l : a.fp8_scope == 1 ? l * a.H + h : r));
      }
    } else {
#pragma unroll
      for (int j = 0; j < E; ++j) v[i][j] = 0.f;
    }
  }

  if (whole) {
    // ---- groups of whole vectors: per-slot stats, then across the unit's slots and lanes ------
    float smn[ITEMS] = {}, smx[ITEMS] = {};
    const bool stats = MODE != 0 || a.fp8_reduce;  // uniform
    if (stats) {
#pragma unroll
      for (int i = 0; i < ITEMS; ++i) {
        if constexpr (MODE == 0) {  // amax of |x|; neutral 0
          float m = 0.f;
#pragma unroll
          for (int j = 0; j < E; ++j) m = max_nan(m, fabsf(v[i][j]));
          smx[i] = m;
          smn[i] = 0.f;
        } else {  // min / max; neutral +-inf for masked slots
          float mn = __int_as_float(0x7f800000), mx = -__int_as_float(0x7f800000);
          if (act[i]) {
#pragma unroll
            for (int j = 0; j < E; ++j) { mn = min_nan(mn, v[i][j]); mx = max_nan(mx, v[i][j]); }
          }
          smn[i] = mn;
          smx[i] = mx;
        }
      }
      // slots i of one unit are consecutive (i >> logNV equal): butterfly over them
#pragma unroll
      for (int st = 1; st < ITEMS; st <<= 1) {
        if (st < NV) {
          float tmn[ITEMS], tmx[ITEMS];
#pragma unroll
          for (int i = 0; i < ITEMS; ++i) { tmn[i] = min_nan(smn[i], smn[i ^ st]); tmx[i] = max_nan(smx[i], smx[i ^ st]); }
#pragma unroll
          for (int i = 0; i < ITEMS; ++i) { smn[i] = tmn[i]; smx[i] = tmx[i]; }
        }
      }
      if (P > 1) {  // every lane of the warp takes part (masked lanes hold neutral values)
#pragma unroll
        for (int i = 0; i < ITEMS; ++i) {
          if constexpr (MODE != 0) smn[i] = group_min(smn[i], P);
          smx[i] = group_max(smx[i], P);
        }
      }
    }
    // ---- quantize + store --------------------------------------------------------------------
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
      if (!act[i]) continue;
      uint64_t w;
      if constexpr (MODE == 0) {
        float sc = sc_in[i];
        if (a.fp8_reduce) {
          sc = fp8_scale_from_amax(smx[i]);
          if (vin[i] == 0) a.scale[row[i]] = sc;  // token_head: [L, T, H] = one per row
        }
        const float inv = fp8_inv(sc);
        float pv[E];
#pragma unroll
        for (int j = 0; j < E; ++j) pv[j] = fp8_prescale(v[i][j], inv);
        w = fp8_pack<E>(pv);
      } else {
        const IntGroup g = make_int_group(smn[i], smx[i], (1 << MODE) - 1);
        if (vin[i] == 0) {  // one writer per group; scale index = unit (U = G)
          a.scale[unit[i]] = g.scale;
          a.zero[unit[i]] = smn[i];
        }
        uint32_t q[E];
        if (g.fast) {  // the common case: no clamps
#pragma unroll
          for (int j = 0; j < E; ++j) q[j] = int_quantize_fast(v[i][j], g);
        } else {
#pragma unroll
          for (int j = 0; j < E; ++j) q[j] = int_quantize(v[i][j], g, kQmax);
        }
        w = pack_codes<MODE == 0 ? 8 : MODE, E>(q);
      }
      store_bytes<NB>(a.codes + uint64_t(row[i]) * a.Dp + uint64_t(vir[i]) * NB, w, a.c_aligned);
    }
  } else {
    // ---- G < E (int only): E/G groups inside each vector, reduced in registers ----------------
    if constexpr (MODE != 0) {
      const int G = a.G;
#pragma unroll
      for (int i = 0; i < ITEMS; ++i) {
        if (!act[i]) continue;
        float mn[E], mx[E];
#pragma unroll
        for (int j = 0; j < E; ++j) mn[j] = mx[j] = v[i][j];
        // butterfly over aligned blocks of G elements (G a power of two dividing E)
#pragma unroll
        for (int st = 1; st < E; st <<= 1) {
          if (st < G) {
            float tmn[E], tmx[E];
#pragma unroll
            for (int j = 0; j < E; ++j) { tmn[j] = min_nan(mn[j], mn[j ^ st]); tmx[j] = max_nan(mx[j], mx[j ^ st]); }
#pragma unroll
            for (int j = 0; j < E; ++j) { mn[j] = tmn[j]; mx[j] = tmx[j]; }
          }
        }
        uint32_t q[E];
        const uint32_t gpv = uint32_t(E) >> a.logG;  // groups per vector
#pragma unroll
        for (int j = 0; j < E; ++j) {
          const float sc = int_group_scale(mn[j], mx[j], (1 << MODE) - 1);
          q[j] = int_quantize_one(v[i][j], mn[j], mx[j], kQmax);
          if ((j & (G - 1)) == 0) {
            const uint64_t gi = uint64_t(unit[i]) * gpv + (uint32_t(j) >> a.logG);
            a.scale[gi] = sc;
            a.zero[gi] = mn[j];
          }
        }
        store_bytes<NB>(a.codes + uint64_t(row[i]) * a.Dp + uint64_t(vir[i]) * NB, pack_codes<MODE, E>(q),
                        a.c_aligned);
      }
    }
  }
}

// ================================================================================================
// Channel groups / fp8 rows: dequantize
// ================================================================================================
struct RowDequantArgs {
  const uint8_t* codes;  // [L, T, H, D*bits/8] (fp8: [L, T, H, D])
  const float* scale;    // as RowQuantArgs
  const float* zero;
  void* out;             // [L, T, H, D], strides osL/osT/osH, D dense
  int64_t osL, osT, osH;
  uint32_t H, nvec;      // nvec = L * T * H * (D/E)
  uint32_t ngr;          // int: groups per row D/G
  int G, logG;
  FastDiv divVPR, divH, divT, divG;  // VPR = D/E vectors per row
  bool o_aligned, c_aligned;
  int fp8_scope;
};

template <typename Tr, int E, int MODE>
__global__ void __launch_bounds__(kBlock) dequant_rows_kernel(const RowDequantArgs a) {
  using S = typename Tr::storage;
  constexpr int NB = MODE == 0 ? E : E * MODE / 8;
  S* __restrict__ out = static_cast<S*>(a.out);
  const bool whole = a.G >= E;

  uint64_t w[kItems];
  float sc[kItems], zp[kItems];
  int64_t ooff[kItems];
  uint32_t vidx[kItems];
  bool act[kItems];
#pragma unroll
  for (int i = 0; i < kItems; ++i) {
    const uint64_t s = (uint64_t(blockIdx.x) * kItems + i) * blockDim.x + threadIdx.x;
    act[i] = s < a.nvec;
    w[i] = 0;
    sc[i] = zp[i] = 0.f;
    ooff[i] = 0;
    vidx[i] = 0;
    if (act[i]) {
      uint32_t r, c, rt, h, l, t;
      vidx[i] = uint32_t(s);
      a.divVPR.divmod(vidx[i], r, c);
      a.divH.divmod(r, rt, h);
      a.divT.divmod(rt, l, t);
      w[i] = load_bytes<NB>(a.codes + s * NB, a.c_aligned);  // codes rows are dense: vector s
      ooff[i] = int64_t(l) * a.osL + int64_t(t) * a.osT + int64_t(h) * a.osH + int64_t(c) * E;
      if constexpr (MODE == 0) {
        sc[i] = __ldg(a.scale + (a.fp8_scope == 0 ? l : a.fp8_scope == 1 ? l * a.H + h : r));
      } else if (whole) {
        const uint64_t g = uint64_t(r) * a.ngr + a.divG.div(c * E);
        sc[i] = __ldg(a.scale + g);
        zp[i] = __ldg(a.zero + g);
      }
    }
  }
#pragma unroll
  for (int i = 0; i < kItems; ++i) {
    if (!act[i]) continue;
    float f[E];
    bool done = false;
    if constexpr (MODE != 0) {
      if (!whole) {  // E/G groups per vector; vector s covers groups s*(E/G) ...
        uint32_t q[E];
        unpack_codes<MODE, E>(w[i], q);
        const uint64_t g0 = uint64_t(vidx[i]) * (uint32_t(E) >> a.logG);
#pragma unroll
        for (int j = 0; j < E; ++j) {
          const uint64_t g = g0 + (uint32_t(j) >> a.logG);
          f[j] = int_dequantize(q[j], __ldg(a.scale + g), __ldg(a.zero + g));
        }
        done = true;
      }
    }
    if (!done) decode_codes<MODE, E>(w[i], sc[i], zp[i], f);
    store_vec<Tr, E>(out + ooff[i], a.o_aligned, f);
  }
}

// ================================================================================================
// Fast paths for dense, 16-byte-aligned rows (the common case; the kernels above handle the rest)
// ================================================================================================
// quant_chunk_kernel: a thread owns one CHUNK of 32 consecutive channels of a row (4 x 16-byte
// loads for fp16/bf16, all in flight before the first use), so a group of G <= 32 channels never
// leaves the thread (GPC = 32 / G groups per chunk, reduced in registers) and a larger group
// (G = 64 ... 1024; fp8 rows: G = D) spans P = G / 32 consecutive lanes (log2 P shuffles). The
// per-group work (two IEEE divisions) is spread over >= 32 elements, the codes are packed with
// shifted adds + PRMT and leave as one 8/16/32-byte store, and with LINEAR (rows densely packed:
// strides D, H*D, T*H*D) chunk s simply lives at element 32*s, codes at byte 32*bits/8*s.
//
// dequant_vec_kernel: a thread handles kItems 16-byte output vectors strided by the block size
// (coalesced stores), reads their 2-8 code bytes and their group's scale / zero (vector v is in
// group v / (G / VE)), decodes with code_to_float (no I2F) and stores once.
constexpr int kCh = 32;

struct FastArgs {
  const void* x;         // quantize: input [L, T, H, D]
  void* out;             // dequantize: output [L, T, H, D]
  int64_t sL, sT, sH;    // strides of x / out (elements); D dense
  uint8_t* codes;        // [L, T, H, D*bits/8], 16-byte aligned
  float* scale;          // as RowQuantArgs; 16-byte aligned
  float* zero;
  uint32_t n;            // quantize: chunks L*T*H*(D/32); dequantize: vectors L*T*H*(D/VE)
  uint32_t H;
  int logP;              // quantize: lanes per group, log2
  FastDiv divPR;         // chunks (quantize) or vectors (dequantize) per row
  FastDiv divH, divT, divTH;
  FastDiv divGV;         // dequantize, int: vectors per group G / VE
  int fp8_scope;         // 0 tensor, 1 head, 2 token_head
  bool fp8_reduce;       // quantize fp8 token_head: compute the scale in this pass
};

// Element offset of unit `idx` (chunk or vector of `elems` elements) and its row (l, t, h).
template <bool LINEAR>
__device__ __forceinline__ int64_t fast_offset(const FastArgs& a, uint32_t idx, int elems, uint32_t& row) {
  uint32_t c;
  a.divPR.divmod(idx, row, c);
  if (LINEAR) return int64_t(idx) * elems;
  uint32_t rt, h, l, t;
  a.divH.divmod(row, rt, h);
  a.divT.divmod(rt, l, t);
  return int64_t(l) * a.sL + int64_t(t) * a.sT + int64_t(h) * a.sH + int64_t(c) * elems;
}

// fp8 scale index of a row for the tensor ([L]), head ([L, H]) and token_head ([L, T, H]) scopes.
__device__ __forceinline__ uint32_t fp8_scale_index(const FastArgs& a, uint32_t row) {
  if (a.fp8_scope == 2) return row;
  const uint32_t l = a.divTH.div(row);
  return a.fp8_scope == 0 ? l : l * a.H + (row - a.divH.div(row) * a.H);
}

template <typename Tr, int MODE, int GPC, bool LINEAR>
__global__ void __launch_bounds__(kBlock) quant_chunk_kernel(const FastArgs a) {
  using S = typename Tr::storage;
  using W = typename Vec<Tr, 16 / Tr::kSize>::Word;
  constexpr int VE = 16 / Tr::kSize, NV = kCh / VE;
  constexpr int GE = kCh / GPC;  // elements of one group inside the chunk
  constexpr int BITS = MODE == 0 ? 8 : MODE;
  constexpr int NW = kCh * BITS / 32;  // code words per chunk: 8 / 4 / 2
  const uint32_t s = blockIdx.x * kBlock + threadIdx.x;
  const bool act = s < a.n;
  // Inactive lanes (the grid's tail) re-read a valid chunk and store nothing; they still take
  // part in the shuffles, but only among themselves (groups are aligned to P lanes, n % P == 0).
  const uint32_t si = act ? s : a.n - 1;
  uint32_t row;
  const int64_t off = fast_offset<LINEAR>(a, si, kCh, row);
  const W* xp = reinterpret_cast<const W*>(static_cast<const S*>(a.x) + off);
  Vec<Tr, VE> raw[NV];
#pragma unroll
  for (int i = 0; i < NV; ++i) raw[i].w = __ldg(xp + i);
  float f[kCh];
#pragma unroll
  for (int i = 0; i < NV; ++i)
#pragma unroll
    for (int j = 0; j < VE; ++j) f[i * VE + j] = Tr::to_float(raw[i].e[j]);

  const int P = 1 << a.logP;
  uint32_t w[NW];
  if constexpr (MODE == 0) {
    float sc;
    if (a.fp8_reduce) {  // token_head: amax over the row (P lanes)
      float m = 0.f;
#pragma unroll
      for (int j = 0; j < kCh; ++j) m = max_nan(m, fabsf(f[j]));
      m = group_max(m, P);
      sc = fp8_scale_from_amax(m);
      if (act && (s & (P - 1)) == 0) a.scale[row] = sc;
    } else {
      sc = __ldg(a.scale + fp8_scale_index(a, row));
    }
    const float inv = fp8_inv(sc);
#pragma unroll
    for (int o = 0; o < NW; ++o)  // the encoders saturate at +-448 (the spec's clamp)
      w[o] = __byte_perm(fp8_encode2(__fmul_rn(f[4 * o], inv), __fmul_rn(f[4 * o + 1], inv)),
                         fp8_encode2(__fmul_rn(f[4 * o + 2], inv), __fmul_rn(f[4 * o + 3], inv)), 0x5410);
  } else {
    constexpr float kQmax = float((1 << BITS) - 1);
    float mn[GPC], mx[GPC];
#pragma unroll
    for (int g = 0; g < GPC; ++g) {
      mn[g] = mx[g] = f[g * GE];
#pragma unroll
      for (int j = 1; j < GE; ++j) { mn[g] = min_nan(mn[g], f[g * GE + j]); mx[g] = max_nan(mx[g], f[g * GE + j]); }
    }
    if (GPC == 1 && P > 1) {
      mn[0] = group_min(mn[0], P);
      mx[0] = group_max(mx[0], P);
    }
    IntGroup gr[GPC];
    bool fast = true;
#pragma unroll
    for (int g = 0; g < GPC; ++g) {
      gr[g] = make_int_group(mn[g], mx[g], (1 << BITS) - 1);
      fast = fast && gr[g].fast;
    }
    uint32_t q[kCh];
    if (fast) {
#pragma unroll
      for (int j = 0; j < kCh; ++j) q[j] = int_code_bits_fast(f[j], gr[j / GE]);
    } else {
#pragma unroll
      for (int j = 0; j < kCh; ++j) q[j] = int_quantize(f[j], gr[j / GE], kQmax);
    }
    pack_code_bytes<BITS, kCh>(q, w);
    if (act) {
      if constexpr (GPC == 1) {
        if ((s & (P - 1)) == 0) {  // group index: s / P (groups are in row-major order)
          a.scale[s >> a.logP] = gr[0].scale;
          a.zero[s >> a.logP] = mn[0];
        }
      } else {
        float sc[GPC];
#pragma unroll
        for (int g = 0; g < GPC; ++g) sc[g] = gr[g].scale;
        store_floats<GPC>(a.scale + uint64_t(s) * GPC, true, sc);
        store_floats<GPC>(a.zero + uint64_t(s) * GPC, true, mn);
      }
    }
  }
  if (act) {
    uint8_t* cp = a.codes + uint64_t(s) * (NW * 4);
    if constexpr (NW == 2) {
      *reinterpret_cast<uint2*>(cp) = make_uint2(w[0], w[1]);
    } else {
#pragma unroll
      for (int o = 0; o < NW; o += 4) reinterpret_cast<uint4*>(cp)[o / 4] = make_uint4(w[o], w[o + 1], w[o + 2], w[o + 3]);
    }
  }
}

template <typename Tr, int MODE, bool LINEAR, int ITEMS>
__global__ void __launch_bounds__(kBlock) dequant_vec_kernel(const FastArgs a) {
  using S = typename Tr::storage;
  constexpr int VE = 16 / Tr::kSize;
  constexpr int BITS = MODE == 0 ? 8 : MODE;
  constexpr int NB = VE * BITS / 8;  // code bytes per vector
  uint64_t w[ITEMS];
  float sc[ITEMS], zp[ITEMS];
  int64_t off[ITEMS];
  bool act[ITEMS];
#pragma unroll
  for (int i = 0; i < ITEMS; ++i) {
    const uint32_t v = (blockIdx.x * ITEMS + i) * kBlock + threadIdx.x;
    act[i] = v < a.n;
    const uint32_t vi = act[i] ? v : 0;
    uint32_t row;
    off[i] = fast_offset<LINEAR>(a, vi, VE, row);
    w[i] = load_bytes<NB>(a.codes + uint64_t(vi) * NB, true);
    if constexpr (MODE == 0) {
      sc[i] = __ldg(a.scale + fp8_scale_index(a, row));
      zp[i] = 0.f;
    } else {
      const uint32_t g = a.divGV.div(vi);
      sc[i] = __ldg(a.scale + g);
      zp[i] = __ldg(a.zero + g);
    }
  }
#pragma unroll
  for (int i = 0; i < ITEMS; ++i) {
    if (!act[i]) continue;
    float f[VE];
    decode_codes<MODE, VE>(w[i], sc[i], zp[i], f);
    store_vec<Tr, VE>(static_cast<S*>(a.out) + off[i], true, f);
  }
}

// ================================================================================================
// Token groups (int, axis token)
// ================================================================================================
struct TokArgs {
  const void* x;   // quantize: input [L, T, H, D]; dequantize: unused
  void* out;       // dequantize: output [L, T, H, D]; quantize: unused
  int64_t sL, sT, sH;  // strides of x (quantize) or out (dequantize)
  uint8_t* codes;  // [L, T, H, D*bits/8]
  float* scale;    // [L, NTG, H, D]
  float* zero;     // [L, NTG, H, D]
  uint32_t T, H, D, G, NTG, Dp, n;  // n = L * NTG * H * (D/E) threads
  FastDiv divC, divH, divNTG;
  bool x_aligned, c_aligned, s_aligned;
};

struct TokCoord {
  uint32_t l, tg, h, c, t0, nt;
  uint64_t q1;  // (l * NTG + tg) * H + h
};

__device__ __forceinline__ TokCoord tok_coord(const TokArgs& a, uint32_t s) {
  TokCoord k;
  uint32_t q1, q2;
  a.divC.divmod(s, q1, k.c);
  a.divH.divmod(q1, q2, k.h);
  a.divNTG.divmod(q2, k.l, k.tg);
  k.q1 = q1;
  k.t0 = k.tg * a.G;
  k.nt = min(a.G, a.T - k.t0);
  return k;
}

// One channel vector's group constants from its min / max; writes scale and zero, returns
// whether every channel can take the clamp-free path.
template <int E, int BITS>
__device__ __forceinline__ bool tok_groups(const float (&mn)[E], const float (&mx)[E], IntGroup (&g)[E],
                                           float* scale, float* zero, bool s_aligned, bool write = true) {
  float sc[E];
  bool all_fast = true;
#pragma unroll
  for (int j = 0; j < E; ++j) {
    g[j] = make_int_group(mn[j], mx[j], (1 << BITS) - 1);
    sc[j] = g[j].scale;
    all_fast = all_fast && g[j].fast;
  }
  if (write) {
    store_floats<E>(scale, s_aligned, sc);
    store_floats<E>(zero, s_aligned, mn);
  }
  return all_fast;
}

// Quantize one token's channel vector with its groups' constants and store the packed codes.
template <typename Tr, int E, int BITS>
__device__ __forceinline__ void tok_quantize_store(const Vec<Tr, E>& raw, const IntGroup (&g)[E], bool all_fast,
                                                   uint8_t* dst, bool c_aligned) {
  constexpr int NB = E * BITS / 8;
  float f[E];
  uint32_t q[E];
  raw_to_float<Tr, E>(raw, f);
  if (all_fast) {
#pragma unroll
    for (int j = 0; j < E; ++j) q[j] = int_code_bits_fast(f[j], g[j]);
  } else {
#pragma unroll
    for (int j = 0; j < E; ++j) q[j] = int_quantize(f[j], g[j], float((1 << BITS) - 1));
  }
  store_bytes<NB>(dst, pack_code_word<BITS, E>(q), c_aligned);
}

template <typename Tr, int E, int BITS, bool REG, bool AL>
__global__ void __launch_bounds__(REG ? kTokBlock : kBlock, KVK_TOK_MINB) quant_tok_kernel(const TokArgs a) {
  using S = typename Tr::storage;
  constexpr int NB = E * BITS / 8;
  const uint32_t s = blockIdx.x * blockDim.x + threadIdx.x;
  if (s >= a.n) return;  // no collectives below
  const TokCoord k = tok_coord(a, s);
  const S* __restrict__ xp = static_cast<const S*>(a.x) + int64_t(k.l) * a.sL + int64_t(k.t0) * a.sT +
                             int64_t(k.h) * a.sH + int64_t(k.c) * E;
  uint8_t* __restrict__ cp = a.codes + ((uint64_t(k.l) * a.T + k.t0) * a.H + k.h) * a.Dp + uint64_t(k.c) * NB;
  const uint64_t crow = uint64_t(a.H) * a.Dp;  // code bytes per token
  const uint64_t sidx = k.q1 * a.D + uint64_t(k.c) * E;
  const int nt = int(k.nt);

  float mn[E], mx[E];
#pragma unroll
  for (int j = 0; j < E; ++j) { mn[j] = __int_as_float(0x7f800000); mx[j] = -__int_as_float(0x7f800000); }

  if constexpr (REG) {
    Vec<Tr, E> raw[kTokReg];
    if (nt == kTokReg) {  // whole group: 32 unconditional loads in flight
#pragma unroll
      for (int t = 0; t < kTokReg; ++t) raw[t] = load_raw<Tr, E>(xp + int64_t(t) * a.sT, AL);
    } else {
#pragma unroll
      for (int t = 0; t < kTokReg; ++t) {
        raw[t].w = {};
        if (t < nt) raw[t] = load_raw<Tr, E>(xp + int64_t(t) * a.sT, AL);
      }
    }
#pragma unroll
    for (int t = 0; t < kTokReg; ++t) {
      if (t < nt) {
        float f[E];
        raw_to_float<Tr, E>(raw[t], f);
#pragma unroll
        for (int j = 0; j < E; ++j) { mn[j] = min_nan(mn[j], f[j]); mx[j] = max_nan(mx[j], f[j]); }
      }
    }
    IntGroup g[E];
    const bool all_fast = tok_groups<E, BITS>(mn, mx, g, a.scale + sidx, a.zero + sidx, AL);
#pragma unroll
    for (int t = 0; t < kTokReg; ++t)
      if (t < nt) tok_quantize_store<Tr, E, BITS>(raw[t], g, all_fast, cp + uint64_t(t) * crow, AL);
  } else {
    // pass 1: min / max, 8 loads in flight
    for (int t0 = 0; t0 < nt; t0 += 8) {
      Vec<Tr, E> raw[8];
#pragma unroll
      for (int u = 0; u < 8; ++u)
        if (t0 + u < nt) raw[u] = load_raw<Tr, E>(xp + int64_t(t0 + u) * a.sT, AL);
#pragma unroll
      for (int u = 0; u < 8; ++u) {
        if (t0 + u < nt) {
          float f[E];
          raw_to_float<Tr, E>(raw[u], f);
#pragma unroll
          for (int j = 0; j < E; ++j) { mn[j] = min_nan(mn[j], f[j]); mx[j] = max_nan(mx[j], f[j]); }
        }
      }
    }
    IntGroup g[E];
    const bool all_fast = tok_groups<E, BITS>(mn, mx, g, a.scale + sidx, a.zero + sidx, AL);
    // pass 2: quantize (re-reads hit L1/L2)
    for (int t0 = 0; t0 < nt; t0 += 4) {
      Vec<Tr, E> raw[4];
#pragma unroll
      for (int u = 0; u < 4; ++u)
        if (t0 + u < nt) raw[u] = load_raw<Tr, E>(xp + int64_t(t0 + u) * a.sT, AL);
#pragma unroll
      for (int u = 0; u < 4; ++u)
        if (t0 + u < nt)
          tok_quantize_store<Tr, E, BITS>(raw[u], g, all_fast, cp + uint64_t(t0 + u) * crow, AL);
    }
  }
}

// Token groups of 17..32 tokens, aligned: the group's tokens are split over two lanes of a warp
// (lane bit 4: tokens [0, 16) or [16, 32) of the same E channels), which combine their min / max
// with one shuffle per channel. Half the registers and half the serial work per thread of
// quant_tok_kernel<REG>: twice the resident warps to cover the loads' latency.
template <typename Tr, int E, int BITS>
__global__ void __launch_bounds__(kTokBlock, 6) quant_tok_split_kernel(const TokArgs a) {
  using S = typename Tr::storage;
  constexpr int NB = E * BITS / 8, HT = kTokReg / 2;
  const uint32_t lane = threadIdx.x & 31;
  const uint32_t half = lane >> 4;
  const uint32_t u = ((blockIdx.x * blockDim.x + threadIdx.x) >> 5) * 16 + (lane & 15);
  const bool act = u < a.n;
  const TokCoord k = tok_coord(a, act ? u : 0);
  const int t0 = int(half) * HT;
  const int cnt = act ? max(0, min(int(k.nt) - t0, HT)) : 0;
  const S* __restrict__ xp = static_cast<const S*>(a.x) + int64_t(k.l) * a.sL + int64_t(k.t0 + t0) * a.sT +
                             int64_t(k.h) * a.sH + int64_t(k.c) * E;
  uint8_t* __restrict__ cp =
      a.codes + ((uint64_t(k.l) * a.T + k.t0 + t0) * a.H + k.h) * a.Dp + uint64_t(k.c) * NB;
  const uint64_t crow = uint64_t(a.H) * a.Dp;
  // 16-bit inputs: min / max on packed words of two channels (Half2MinMax), widened once at
  // the end; float32: per channel.
  constexpr bool kPacked = Half2MinMax<Tr>::kOk && E % 2 == 0;
  constexpr int NW = kPacked ? E / 2 : 1;
  using HM = Half2MinMax<Tr>;
  float mn[E], mx[E];
  uint32_t mn2[NW], mx2[NW];
  if constexpr (kPacked) {
#pragma unroll
    for (int j = 0; j < NW; ++j) { mn2[j] = HM::kPosInf; mx2[j] = HM::kNegInf; }
  } else {
#pragma unroll
    for (int j = 0; j < E; ++j) { mn[j] = __int_as_float(0x7f800000); mx[j] = -__int_as_float(0x7f800000); }
  }
  auto reduce = [&](const Vec<Tr, E>& r) {
    if constexpr (kPacked) {
#pragma unroll
      for (int j = 0; j < NW; ++j) {
        const uint32_t w = half2_word<Tr, E>(r, j);
        HM::update(mn2[j], mx2[j], w, w);
      }
    } else {
      float f[E];
      raw_to_float<Tr, E>(r, f);
#pragma unroll
      for (int j = 0; j < E; ++j) { mn[j] = min_nan(mn[j], f[j]); mx[j] = max_nan(mx[j], f[j]); }
    }
  };
  // Only whole halves (all but a partial last group) take the unrolled register path; the rest
  // loop over memory twice. One unrolled copy keeps the kernel small (instruction-cache stalls
  // were 18% with two).
  const bool full = cnt == HT;
  Vec<Tr, E> raw[HT];
  if (full) {
#pragma unroll
    for (int t = 0; t < HT; ++t) raw[t] = load_raw<Tr, E>(xp + int64_t(t) * a.sT, true);
#pragma unroll
    for (int t = 0; t < HT; ++t) reduce(raw[t]);
  } else {
#pragma unroll 1
    for (int t = 0; t < cnt; ++t) reduce(load_raw<Tr, E>(xp + int64_t(t) * a.sT, true));
  }
  // every lane takes part; empty halves hold +-inf
  if constexpr (kPacked) {
#pragma unroll
    for (int j = 0; j < NW; ++j) {
      HM::update(mn2[j], mx2[j], __shfl_xor_sync(0xffffffffu, mn2[j], 16), __shfl_xor_sync(0xffffffffu, mx2[j], 16));
      mn[2 * j] = Tr::to_float(static_cast<typename Tr::storage>(mn2[j] & 0xffffu));
      mn[2 * j + 1] = Tr::to_float(static_cast<typename Tr::storage>(mn2[j] >> 16));
      mx[2 * j] = Tr::to_float(static_cast<typename Tr::storage>(mx2[j] & 0xffffu));
      mx[2 * j + 1] = Tr::to_float(static_cast<typename Tr::storage>(mx2[j] >> 16));
    }
  } else {
#pragma unroll
    for (int j = 0; j < E; ++j) {
      mn[j] = min_nan(mn[j], __shfl_xor_sync(0xffffffffu, mn[j], 16));
      mx[j] = max_nan(mx[j], __shfl_xor_sync(0xffffffffu, mx[j], 16));
    }
  }
  if (!act) return;
  const uint64_t sidx = k.q1 * a.D + uint64_t(k.c) * E;
  IntGroup g[E];
  const bool all_fast = tok_groups<E, BITS>(mn, mx, g, a.scale + sidx, a.zero + sidx, true, half == 0);
  if (full) {
#pragma unroll
    for (int t = 0; t < HT; ++t) tok_quantize_store<Tr, E, BITS>(raw[t], g, all_fast, cp + uint64_t(t) * crow, true);
  } else {
#pragma unroll 1
    for (int t = 0; t < cnt; ++t)
      tok_quantize_store<Tr, E, BITS>(load_raw<Tr, E>(xp + int64_t(t) * a.sT, true), g, all_fast,
                                      cp + uint64_t(t) * crow, true);
  }
}

template <typename Tr, int E, int BITS, bool AL>
__global__ void __launch_bounds__(kBlock) dequant_tok_kernel(const TokArgs a) {
  using S = typename Tr::storage;
  constexpr int NB = E * BITS / 8;
  const uint32_t s = blockIdx.x * blockDim.x + threadIdx.x;
  if (s >= a.n) return;
  const TokCoord k = tok_coord(a, s);
  S* __restrict__ op = static_cast<S*>(a.out) + int64_t(k.l) * a.sL + int64_t(k.t0) * a.sT + int64_t(k.h) * a.sH +
                       int64_t(k.c) * E;
  const uint8_t* __restrict__ cp =
      a.codes + ((uint64_t(k.l) * a.T + k.t0) * a.H + k.h) * a.Dp + uint64_t(k.c) * NB;
  const uint64_t crow = uint64_t(a.H) * a.Dp;
  const uint64_t sidx = k.q1 * a.D + uint64_t(k.c) * E;
  const int nt = int(k.nt);
  float sc[E], zp[E];
  // The code words of up to kTokDqBatch tokens are loaded before the first is decoded: they
  // are 1-4 bytes each, so fewer in flight left this kernel waiting on load latency (8 at a
  // time: 82% of copy for int2 at 320 MiB on an H200, ncu: long-scoreboard stalls).
  constexpr int U = kTokDqBatch;
  static_assert(NB <= 4, "token dequantize vectors carry at most 4 code bytes");
  uint32_t w[U];
#pragma unroll
  for (int u = 0; u < U; ++u) w[u] = u < nt ? uint32_t(load_bytes<NB>(cp + uint64_t(u) * crow, AL)) : 0u;
  load_floats<E>(a.scale + sidx, AL, sc);
  load_floats<E>(a.zero + sidx, AL, zp);
  for (int t0 = 0; t0 < nt; t0 += U) {
    if (t0 > 0) {
#pragma unroll
      for (int u = 0; u < U; ++u)
        w[u] = t0 + u < nt ? uint32_t(load_bytes<NB>(cp + uint64_t(t0 + u) * crow, AL)) : 0u;
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (t0 + u < nt) {
        uint32_t q[E];
        float f[E];
        unpack_codes<BITS, E>(w[u], q);
#pragma unroll
        for (int j = 0; j < E; ++j) f[j] = int_dequantize(q[j], sc[j], zp[j]);
        store_vec<Tr, E>(op + int64_t(t0 + u) * a.sT, AL, f);
      }
    }
  }
}

// Dense token dequantize, G = 32 and whole groups (the launcher checks: output [L, T, H, D]
// contiguous and 16-byte aligned, T % 32 == 0): a thread owns 16 bytes of output (E = 16 / size
// channels) of one head over TPT tokens of one group, with their TPT code words (2-4 bytes each)
// loaded before the first is decoded. Launch bound: at least one block per SM. H200, bench A/B
// against dequant_tok_kernel (KVK_TOK_DQ_DENSE, eighth session, one thread a group:
// bench/results/tok-dq-dense-h200-2026-11-27.txt): Llama-3-8B T=4096 int4 88.4 -> 89.5% of copy,
// int2 87.5 -> 88.4%; SmolLM2 int4 82 -> 97%; T=32768 int2 90.7 -> 89.9%, the rest +0.2-0.5.
// The same 16-byte layout inside dequant_tok_kernel (run-time strides, partial groups) measured
// 61-69%: there NVVM splits each 16-byte store into four 4-byte ones (SASS: STG.E).
// NP: threads per group, each with TPT = 32 / NP of its tokens (the launcher's a.n counts them).
// The launcher takes NP = 4 (scripts/exp/tok_dq_exp.cu runs NP = 1/2/4): shorter-lived blocks (a
// shorter tail at the end of the grid) and 48 registers instead of 72. H200 bench A/B (ninth
// session, then a knob; bench/results/tok-dq-tpt-h200-2026-11-27.txt): Llama-3-8B T=4096 int4
// 89.6 -> 92.3-92.5% of copy, int2 88.1 -> 91.6-91.8%; T=32768 91.1 -> 93.0%, 90.3 -> 93.0-93.1%;
// SmolLM2 T=32768 86-87 -> 91%; SmolLM2 T=4096 (below 64 MiB) 95 -> 92-94%.
template <typename Tr, int E, int BITS, int NP>
__global__ void __launch_bounds__(kBlock, 1) dequant_tok_dense_kernel(const TokArgs a) {
  using S = typename Tr::storage;
  constexpr int NB = E * BITS / 8, G = 32, TPT = G / NP;
  static_assert(E * Tr::kSize == 16 && NB <= 4, "16-byte output vectors, code words of at most 4 bytes");
  static_assert(NP == 1 || NP == 2 || NP == 4, "a group is split into 1, 2 or 4 token ranges");
  const uint32_t s = blockIdx.x * blockDim.x + threadIdx.x;
  if (s >= a.n) return;
  uint32_t q1, c, q2, h, l, tg;
  a.divC.divmod(s, q1, c);
  a.divH.divmod(q1, q2, h);
  const uint32_t part = q2 % NP;  // (head, channel vector) fastest, then the group's token range
  q2 /= NP;
  a.divNTG.divmod(q2, l, tg);
  const uint64_t row = uint64_t(a.H) * a.D;    // output elements per token
  const uint64_t crow = uint64_t(a.H) * a.Dp;  // code bytes per token
  const uint64_t t0 = uint64_t(l) * a.T + uint64_t(tg) * G + part * TPT;
  S* __restrict__ op = static_cast<S*>(a.out) + t0 * row + uint64_t(h) * a.D + c * E;
  const uint8_t* __restrict__ cp = a.codes + t0 * crow + uint64_t(h) * a.Dp + c * NB;
  const uint64_t gi = (uint64_t(q2) * a.H + h) * a.D + c * E;  // the group's scale / zero
  float sc[E], zp[E];
  load_floats<E>(a.scale + gi, true, sc);
  load_floats<E>(a.zero + gi, true, zp);
  uint32_t w[TPT];
#pragma unroll
  for (int u = 0; u < TPT; ++u) w[u] = uint32_t(load_bytes<NB>(cp + uint64_t(u) * crow, true));
#pragma unroll
  for (int u = 0; u < TPT; ++u) {
    uint32_t q[E];
    float f[E];
    unpack_codes<BITS, E>(w[u], q);
#pragma unroll
    for (int j = 0; j < E; ++j) f[j] = int_dequantize(q[j], sc[j], zp[j]);
    store_vec<Tr, E>(op + uint64_t(u) * row, true, f);
  }
}

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
      if (act[i]) {
#pragma unroll
        for (int j = 0; j < E; ++j) m = max_nan(m, fabsf(v[i][j]));
      }
  }
  __shared__ float red[kBlock / 32];
  m = group_max(m, 32);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) red[warp] = m;
  __syncthreads();
  if (warp == 0) {
    m = lane < kBlock / 32 ? red[lane] : 0.f;
    m = group_max(m, 32);
    // m >= 0 (or a positive NaN): its int bits order like the floats
    if (lane == 0) atomicMax(reinterpret_cast<int*>(a.amax + sidx), __float_as_int(m));
  }
}

__global__ void fp8_finalize_kernel(float* __restrict__ scale, uint32_t n) {
  const uint32_t i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) scale[i] = fp8_scale_from_amax(scale[i]);
}

// ================================================================================================
// fp8 tensor / head scopes with computed scales, one pass: quant_fp8_resident_kernel
// ================================================================================================
// The two-kernel path above reads x twice (amax, then quantize). Here the grid is co-resident
// (cooperative launch, one block of 1024 threads per SM) and x is read from HBM once: a step (B
// whole layers, <= 8 MiB of input) is copied into shared memory (cp.async), where it stays until
// every block has reduced its amax. Three steps are on chip at a time; at iteration s:
//
//   step s has landed: its amax per key -> this block's slots (publish)
//   step s-1 (published one iteration ago): wait for every block's slots, scale, quantize, store
//   step s+2: loads start into the stage step s-1 held (two iterations to land)
//
// The barrier is the data: workspace slot (key, block) (key = layer, or (layer, head); uint32)
// receives block b's amax for the key with bit 31 set, in one store; a block waiting for step s
// polls the step's slots until all are set and reduces them. No fence, no counter (an arrival
// counter behind a fence cost two more L2 round trips per step). The first poll load of step s-1
// is issued before step s's publish, so its L2 round trip (~0.6 us under load) overlaps it. Each
// block clears its own slot column at the start, behind one grid barrier before the first loads
// (a memset node before the kernel cost 2-3 us).
// Measured (H200, bench/results/fp8-resident-h200-2026-11-27.txt, per-block %globaltimer traces
// by the fifth session's harness, git show 15bb67d:scripts/exp/fp8_resident_exp.cu, of this
// pipeline with the early poll): a step costs ~3.3 us for ~2.6 us of HBM time: landing wait
// ~0.7, publish ~1.1, barrier wait ~0.5, quantize + store ~1.1, phases that all 32 warps of an
// SM go through together, so a step's instructions and block barriers are on the critical path.
// With one layer per step the UNI variant (below) cuts both: bench (5867c14,
// bench/results/fp8-uni-h200-2026-11-27.txt) 91.1% of copy for fp8:tensor on Llama-3-8B T=4096
// (was 85.5%), head 81.3% (79.1%); SmolLM2 (5 layers a step, generic variant) 73% / 61%, where
// the two kernels reach 49-57%. Larger layers take the two-kernel path,
// except for the head scope where one head's [T, D] fits: it runs as the tensor scope over L * H
// pseudo-layers (ResidentArgs: Hsub > 1), fp8:head on Llama-3-8B T=32768 58 -> 89.5-90.0% of copy
// (ninth session, bench/results/fp8-head-split-h200-2026-11-27.txt; KVK_FP8_HEAD_SPLIT=0: off).
// Block groups (tenth session, bench/results/fp8-groups-h200-2026-11-27.txt; KVK_FP8_GROUPS=0:
// off): wherever a (pseudo-)layer has >= kGroupMinVectors vectors, the grid is NG groups of gpb
// blocks and group g holds (pseudo-)layer s * NG + g at step s, whole, so every block has one key
// and runs the UNI tensor-scope variant, and each layer's barrier involves its own group only.
// The head scope then always runs as pseudo-layers. Llama-3-8B fp8:head T=4096 80 -> 88-89%,
// SmolLM2 tensor / head T=4096 70 / 58 -> 79-81 / 74-76%, SmolLM2 head T=32768 70 -> 89-90%.
// The first grid barrier moved before the first loads (same session, same record): 88-89 -> 90%
// (Llama tensor and head), SmolLM2 79 / 74 -> 83-84 / 80%.
// Clusters (fifteenth session, bench/results/fp8-onepass-15th-h100-2026-12-06.txt;
// KVK_FP8_CLUSTER=0: off): groups of <= 16 blocks on sm_90 are thread-block clusters (CL
// variant). Each block sends its amax of a step to every peer with st.async, which completes the
// peer's mbarrier; no L2 slots, no polling, no clearing, no grid barrier, no cooperative launch.
// H100, two calls of two alternating A/B runs: SmolLM2 fp8:head T=4096 (15 clusters of 8)
// 84.7-86.2 -> 93.8-95.5% of copy; Llama-3-8B fp8:head T=4096 (7 clusters of 16 instead of 8
// cooperative groups) 96.2-96.5 -> 96.0-96.1. Two first versions (a red from every warp, or one a
// block, into each peer, and one cluster barrier a step) ran at 78-82%: the trace's publish phase,
// which holds the barrier's wait, took ~2 us a step (presumably the arrive's release waiting for
// the thread's copies and stores in flight, as the grid barrier did in the fourteenth session).
constexpr int kResBlock = 1024;   // 32 warps per SM
constexpr int kResStages = 3;     // steps held in shared memory
constexpr uint32_t kSlotFull = 0x80000000u;
constexpr int kResMaxKeys = 256;  // amax entries per step (B * Hs)
constexpr int64_t kGroupMinVectors = 4 * kResBlock;  // block groups: layers of at least 4 blocks' vectors (K = 1)

// "Layer" below is a layer of x, or with Hsub > 1 one head of one (the head scope of a layer too
// big for the chip whose heads fit, run as the tensor scope over L * H pseudo-layers [T, D]):
// pseudo-layer p = l * Hsub + h starts at x + l * sL + h * D (codes: l * N * Hsub + h * D), and
// its rows of C vectors are Hsub * C vectors apart in x and codes.
struct ResidentArgs {
  const void* x;       // layer l: N = T*H*D dense elements at x + l * sL
  int64_t sL;
  uint8_t* codes;      // [L, N] e4m3
  float* scale;        // [L * Hs]
  uint32_t* slots;     // workspace [L * Hs, gpb]: block bl's (of the key's group) amax of a key, kSlotFull | float bits
  uint32_t L, B, Hs, nsteps, Nv;  // Nv: 16-byte vectors per layer
  uint32_t Hsub;                  // pseudo-layers (above); 1 for whole layers
  uint32_t NG;                    // UNI variant: block groups (below); 1 otherwise
  FastDiv divNv, divC, divH, divHsub;  // C = D / VE vectors per (token, head) row
};

// max |x| of 16-byte vectors, in the element type's bit format (|x| bits order like the values
// for fp32/fp16/bf16, NaN above inf). For 16-bit types a word holds two running maxima (packed
// max; unpack with abs_acc_finish): abs_acc accumulates vectors without unpacking each.
template <typename Tr>
__device__ __forceinline__ uint32_t abs_vmax(uint32_t a, uint32_t b) {  // max of (packed) |x| bits
  if constexpr (Tr::kSize == 4) return max(a, b);
  else return __vmaxu2(a, b);
}
template <typename Tr>
__device__ __forceinline__ uint32_t abs_pair(uint32_t a, uint32_t b) {  // of two raw words
  constexpr uint32_t M = Tr::kSize == 4 ? 0x7fffffffu : 0x7fff7fffu;
  return abs_vmax<Tr>(a & M, b & M);
}
template <typename Tr>
__device__ __forceinline__ uint32_t abs_acc_finish(uint32_t acc) {
  if constexpr (Tr::kSize == 4) return acc;
  else return max(acc & 0xffffu, acc >> 16);
}
template <typename Tr>
__device__ __forceinline__ uint32_t abs_vec(const uint4& w) {  // one vector, packed for 16-bit types
  return abs_vmax<Tr>(abs_pair<Tr>(w.x, w.y), abs_pair<Tr>(w.z, w.w));
}
template <typename Tr>
__device__ __forceinline__ uint32_t abs_acc(uint32_t acc, const uint4& w) {
  // (the association that compiles to 3-input max instructions in both cases)
  if constexpr (Tr::kSize == 4) return abs_vmax<Tr>(acc, abs_vec<Tr>(w));
  else return abs_vmax<Tr>(abs_vmax<Tr>(acc, abs_pair<Tr>(w.x, w.y)), abs_pair<Tr>(w.z, w.w));
}
template <typename Tr>
__device__ __forceinline__ uint32_t abs_max_bits(const uint4& w) { return abs_acc_finish<Tr>(abs_vec<Tr>(w)); }
template <typename Tr>
__device__ __forceinline__ float abs_bits_to_float(uint32_t b) {
  if constexpr (Tr::kSize == 4) return __uint_as_float(b);
  else return Tr::to_float(static_cast<typename Tr::storage>(b));
}

// A 16-byte vector as floats. bf16 straight from the 32-bit words (low element: w << 16, high: the
// word with its low half cleared), one instruction per element.
template <typename Tr, int VE>
__device__ __forceinline__ void vec16_to_float(const uint4& w, float (&f)[VE]) {
  if constexpr (std::is_same<Tr, BF16>::value) {
    const uint32_t u[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      f[2 * j] = __uint_as_float(u[j] << 16);
      f[2 * j + 1] = __uint_as_float(u[j] & 0xffff0000u);
    }
  } else {
    Vec<Tr, VE> raw;
    raw.w = w;
    raw_to_float<Tr, VE>(raw, f);
  }
}

__device__ __forceinline__ uint32_t ld_relaxed_gpu(const uint32_t* p) {  // from L2, never a stale L1 line
  uint32_t v;
  asm volatile("ld.relaxed.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}
__device__ __forceinline__ void st_relaxed_gpu(uint32_t* p, uint32_t v) {
  asm volatile("st.relaxed.gpu.global.u32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
  const uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(valid ? 16 : 0)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory"); }

// Thread-block clusters (sm_90) for the one-pass kernel's CL variant: the cluster barrier, split
// into arrive (release) and wait (acquire), and shared-memory mbarriers with transaction counts:
// st_async_cluster stores 4 bytes into a peer block's shared memory and completes 4 bytes of its
// mbarrier's transaction count, with no fence on the sender (a release -- a fence, or a
// barrier.cluster.arrive -- waits for the thread's copies and stores in flight: ~2 us a step,
// fifteenth session). The PTX needs CUDA 12.1 (st.async); with an older toolkit the helpers are
// empty and the launcher never picks the variant. Thread 0's arrival on its own mbarrier is
// relaxed from CUDA 12.8 on (PTX ISA 8.6) and a release before it.
#if defined(__CUDACC_VER_MAJOR__) && (__CUDACC_VER_MAJOR__ > 12 || (__CUDACC_VER_MAJOR__ == 12 && __CUDACC_VER_MINOR__ >= 1))
#define KVK_CLUSTER_PTX 1
#else
#define KVK_CLUSTER_PTX 0
#endif
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900 && KVK_CLUSTER_PTX
#define KVK_CLUSTER_DEVICE 1
#else
#define KVK_CLUSTER_DEVICE 0
#endif
__device__ __forceinline__ void cluster_arrive() {
#if KVK_CLUSTER_DEVICE
  asm volatile("barrier.cluster.arrive.release.aligned;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void cluster_wait() {
#if KVK_CLUSTER_DEVICE
  asm volatile("barrier.cluster.wait.acquire.aligned;\n" ::: "memory");
#endif
}
#if !defined(__CUDA_ARCH__) || KVK_CLUSTER_DEVICE
__device__ __forceinline__ uint32_t smem_u32(const void* p) { return static_cast<uint32_t>(__cvta_generic_to_shared(p)); }
#endif
__device__ __forceinline__ void mbar_init(uint64_t* bar, uint32_t count) {
#if KVK_CLUSTER_DEVICE
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_u32(bar)), "r"(count) : "memory");
#endif
}
__device__ __forceinline__ void mbar_init_fence() {
#if KVK_CLUSTER_DEVICE
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void mbar_arrive_expect_tx(uint64_t* bar, uint32_t bytes) {
#if KVK_CLUSTER_DEVICE
#if __CUDACC_VER_MAJOR__ > 12 || __CUDACC_VER_MINOR__ >= 8
  asm volatile("mbarrier.arrive.expect_tx.relaxed.cta.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_u32(bar)), "r"(bytes)
               : "memory");
#else
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_u32(bar)), "r"(bytes) : "memory");
#endif
#endif
}
__device__ __forceinline__ void mbar_wait_parity(uint64_t* bar, uint32_t parity) {
#if KVK_CLUSTER_DEVICE
  asm volatile(
      "{\n .reg .pred p;\n"
      "W: mbarrier.try_wait.parity.acquire.cluster.shared::cta.b64 p, [%0], %1;\n"
      " @!p bra W;\n}\n" ::"r"(smem_u32(bar)), "r"(parity) : "memory");
#endif
}
__device__ __forceinline__ void st_async_cluster(uint32_t* local_dst, uint64_t* local_bar, uint32_t rank, uint32_t v) {
#if KVK_CLUSTER_DEVICE
  uint32_t rd, rb;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;\n" : "=r"(rd) : "r"(smem_u32(local_dst)), "r"(rank));
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;\n" : "=r"(rb) : "r"(smem_u32(local_bar)), "r"(rank));
  asm volatile("st.async.shared::cluster.mbarrier::complete_tx::bytes.u32 [%0], %1, [%2];\n" ::"r"(rd), "r"(v), "r"(rb)
               : "memory");
#endif
}

// Developer trace (scripts/exp/fp8_trace_exp.cu compiles this file with KVK_FP8_TRACE): thread 0
// of each block stores %globaltimer at four points of each of the first 64 steps into
// g_kvk_fp8_trace[grid][64][4]: 0 landed, 1 published, 2 scale known (grid barrier passed),
// 3 quantized (and per block its start and the time past the first grid barrier -- in the CL
// variant, past its first cluster arrive). Without the macro the hooks are empty.
#ifdef KVK_FP8_TRACE
__device__ uint64_t* g_kvk_fp8_trace;
__device__ __forceinline__ void fp8_trace(uint32_t s, int phase) {
  if (threadIdx.x == 0 && g_kvk_fp8_trace && s < 64) {
    uint64_t t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    g_kvk_fp8_trace[(uint64_t(blockIdx.x) * 64 + s) * 4 + phase] = t;
  }
}
#define KVK_FP8_TRACE_AT(s, phase) fp8_trace((s), (phase))
__device__ uint64_t* g_kvk_fp8_start;  // [grid][2]: when each block started, passed the first grid barrier
__device__ __forceinline__ void fp8_trace_start(int i) {
  if (threadIdx.x == 0 && g_kvk_fp8_start) {
    uint64_t t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    g_kvk_fp8_start[blockIdx.x * 2 + i] = t;
  }
}
#define KVK_FP8_TRACE_START(i) fp8_trace_start(i)
#else
#define KVK_FP8_TRACE_AT(s, phase)
#define KVK_FP8_TRACE_START(i)
#endif

// UNI (tensor scope, one (pseudo-)layer per block a step: block groups, or one layer a step; the
// launcher checks the layout): all K slots of a thread, and all threads of a block, have one key.
// A thread reduces its slots in packed registers and the warp with one instruction, with no
// per-slot key bookkeeping: fewer instructions in the publish and quantize phases, which all warps
// of an SM go through together. (A head-scope UNI variant, keys uniform over lane groups of a head
// row, was replaced by block groups over pseudo-layers: 80% against 88-90% of copy.)
//
// CL (UNI with block groups of <= 16 blocks, sm_90): a group is a thread-block cluster and the
// amax exchange stays on chip: each block sends its amax of a step into every peer's shared
// memory (st.async, completing the peer's mbarrier for that step) and waits on its own
// mbarrier. That replaces the L2 slots, their polling, one of the two block barriers a step, the
// slot clearing and its grid barrier; groups never wait for each other, so the launch is not
// cooperative.
template <typename Tr, int K, bool HEAD, bool UNI, bool CL = false>
__global__ void __launch_bounds__(kResBlock, 1) quant_fp8_resident_kernel(const ResidentArgs a) {
  static_assert(!(HEAD && UNI), "the UNI variant is tensor-scope only");
  static_assert(UNI || !CL, "the cluster variant is a UNI variant");
  // UNI: two block barriers per step instead of five. Warp 0 alone polls the step's slots and
  // computes the scale; a thread touches only its own slots of a stage, so no barrier guards the
  // stages; s_amax and s_inv alternate by step parity.
  KVK_FP8_TRACE_START(0);
  constexpr int kPollEarly = UNI ? 5 : 1;  // UNI: slots lane + 32 j loaded early (grids <= 160)
  const uint32_t warp = threadIdx.x >> 5;
  using S = typename Tr::storage;
  constexpr int VE = 16 / Tr::kSize;
  constexpr int kStage = kResBlock * K;  // 16-byte vectors per stage
  extern __shared__ uint4 stages[];      // kResStages x kStage vectors; slot k of thread i at k*kResBlock + i
  __shared__ uint32_t s_amax[kResMaxKeys];
  __shared__ uint32_t s_red[kResMaxKeys];
  __shared__ float s_inv[kResMaxKeys];
  // CL: block r's amax of step s (|x| bits of Tr) in s_cl[s % 4][r], complete when s_bar[s % 4]
  // has passed phase s / 4
  __shared__ uint32_t s_cl[4][16];
  __shared__ __align__(8) uint64_t s_bar[4];
  const uint32_t lane = threadIdx.x & 31;
  // UNI: the grid is NG groups of gpb blocks; group grp takes (pseudo-)layer s * NG + grp at step
  // s, so a step holds NG layers, each with a grid barrier of its own group's gpb blocks. The
  // other variants: one group (gpb = gridDim.x, bl = blockIdx.x).
  const uint32_t gpb = gridDim.x / a.NG, grp = blockIdx.x / gpb, bl = blockIdx.x - grp * gpb;
  const uint32_t g = bl * kResBlock + threadIdx.x, P = gpb * kResBlock;
  auto layer_of = [&](uint32_t s) { return s * a.NG + grp; };  // UNI: this block's layer of step s
  const uint64_t N = uint64_t(a.Nv) * VE;
  for (uint32_t i = threadIdx.x; i < kResMaxKeys; i += kResBlock) s_amax[i] = s_red[i] = 0;

  // Slot k of this thread in a step: vector v = k * P + g of the step's B layers, i.e. layer lb of
  // the step, vector off in it, amax key. The same in every step (decomposed once; only the last
  // step can have fewer layers).
  uint32_t soff[K], slk[K];  // slk: lb | key << 16, or ~0 past a full step
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const uint32_t v = uint32_t(k) * P + g;
    uint32_t lb = 0, off = 0, key = 0;
    if (v < a.B * a.Nv) {
      a.divNv.divmod(v, lb, off);
      if constexpr (HEAD) {
        const uint32_t row = a.divC.div(off);
        key = lb * a.Hs + (row - a.divH.div(row) * a.Hs);
      } else {
        key = lb;
        if (a.Hsub > 1) {  // a head's row: C vectors, then the next token's row of that head
          const uint32_t row = a.divC.div(off);
          off = row * (a.Hsub * a.divC.d) + (off - row * a.divC.d);
        }
      }
      slk[k] = lb | (key << 16);
    } else {
      slk[k] = 0xffffffffu;
    }
    soff[k] = off;
  }
  auto locate = [&](uint32_t s, int k, uint32_t& lb, uint32_t& off, uint32_t& key) -> bool {
    if (slk[k] == 0xffffffffu) return false;
    lb = slk[k] & 0xffffu;
    if (uint64_t(s) * a.B * a.NG + grp + lb >= a.L) return false;  // past the last layer (last step)
    off = soff[k];
    key = slk[k] >> 16;
    return true;
  };
  // where (pseudo-)layer p starts in x and in codes (elements)
  auto x_base = [&](uint32_t p) -> int64_t {
    if (a.Hsub == 1) return int64_t(p) * a.sL;
    uint32_t l, h;
    a.divHsub.divmod(p, l, h);
    return int64_t(l) * a.sL + int64_t(h) * a.divC.d * VE;  // head h: h * D elements in
  };
  auto codes_base = [&](uint32_t p) -> uint64_t {
    if (a.Hsub == 1) return uint64_t(p) * N;
    uint32_t l, h;
    a.divHsub.divmod(p, l, h);
    return uint64_t(l) * N * a.Hsub + uint64_t(h) * a.divC.d * VE;
  };
  // step s's vectors -> stage s % kResStages, asynchronously (invalid slots are zero-filled)
  auto issue = [&](uint32_t s) {
    uint4* st = stages + (s % kResStages) * kStage;
    const int64_t xb = UNI && s < a.nsteps && layer_of(s) < a.L ? x_base(layer_of(s)) : 0;  // UNI: one layer a step
#pragma unroll
    for (int k = 0; k < K; ++k) {
      uint32_t lb = 0, off = 0, key;
      const bool ok = s < a.nsteps && locate(s, k, lb, off, key);
      const S* src = static_cast<const S*>(a.x) + (ok ? (UNI ? xb : x_base(s * a.B + lb)) + int64_t(off) * VE : 0);
      cp_async16(st + k * kResBlock + threadIdx.x, src, ok);
    }
    cp_async_commit();  // one group per step, empty ones too: wait_group counts stay uniform
  };
  // This block's amax per key of step s -> its slots (flag bit | float bits): one store each.
  // max of m per key over the block's warps into red[key] (key ~0: nothing); every lane calls it
  auto warp_max_into = [&](uint32_t* red, uint32_t key, uint32_t m) {
    const uint32_t key0 = __shfl_sync(0xffffffffu, key, 0);
    if (__all_sync(0xffffffffu, key == key0)) {  // the common case: one key per warp
      const uint32_t r = __reduce_max_sync(0xffffffffu, m);
      if (lane == 0 && key0 != 0xffffffffu && r) atomicMax(&red[key0], r);
    } else if (key != 0xffffffffu && m) {
      atomicMax(&red[key], m);
    }
  };
  // UNI: the amax of this warp's slots of step s (packed for 16-bit types) -> s_amax[s & 1]
  // (slots past the layer: 0)
  auto uni_amax_into = [&](uint32_t s) {
    const uint4* st = stages + (s % kResStages) * kStage;
    uint32_t acc = 0;
#pragma unroll
    for (int k = 0; k < K; ++k)
      if (slk[k] != 0xffffffffu) acc = abs_acc<Tr>(acc, st[k * kResBlock + threadIdx.x]);
    const uint32_t r = __reduce_max_sync(0xffffffffu, abs_acc_finish<Tr>(acc));
    if (lane == 0 && r) atomicMax(&s_amax[s & 1], r);
  };
  // CL: this block's amax of step s (warps -> s_amax[s & 1], one block barrier) -> slot bl of
  // every peer's s_cl[s % 4], by lanes of warp 0 (st.async, completing the peer's s_bar[s % 4]).
  // s_cl[s % 4] is next written at step s + 4, by peers that have received step s + 2 from this
  // block, which it sends after the block barrier of step s + 2, when its threads have read step s.
  auto publish_cl = [&](uint32_t s) {
    uni_amax_into(s);
    __syncthreads();
    if (warp == 0) {
      const uint32_t m = s_amax[s & 1];
      __syncwarp();
      if (lane == 0) s_amax[s & 1] = 0u;  // reused at step s + 2, behind the barrier of step s + 1
      if (lane < gpb) st_async_cluster(&s_cl[s % 4][bl], &s_bar[s % 4], lane, m);
    }
  };
  auto publish = [&](uint32_t s) {
    const uint4* st = stages + (s % kResStages) * kStage;
    if constexpr (UNI) {
      uni_amax_into(s);
    } else {
    // A thread's slots of one key are reduced before the warp's; the warp flushes when any lane's
    // key changes (the decision is warp-uniform: warp_max_into needs every lane).
    uint32_t akey = 0xffffffffu, am = 0;
#pragma unroll
    for (int k = 0; k < K; ++k) {
      uint32_t lb, off, key = 0xffffffffu;
      const uint32_t m = locate(s, k, lb, off, key) ? abs_max_bits<Tr>(st[k * kResBlock + threadIdx.x]) : 0u;
      if (__all_sync(0xffffffffu, k == 0 || key == akey)) {
        akey = key;
        am = max(am, m);
      } else {
        warp_max_into(s_amax, akey, am);
        akey = key;
        am = m;
      }
    }
    warp_max_into(s_amax, akey, am);
    }
    __syncthreads();
    if constexpr (UNI) {  // s_amax by step parity: warps run up to one publish ahead of thread 0
      if (threadIdx.x == 0) {
        const uint32_t m = s_amax[s & 1];
        s_amax[s & 1] = 0;  // reused at step s + 2, behind the barrier of step s + 1
        if (layer_of(s) < a.L)
          st_relaxed_gpu(a.slots + (uint64_t(layer_of(s)) * gpb + bl),
                         kSlotFull | __float_as_uint(abs_bits_to_float<Tr>(m)));
      }
      return;
    }
    const uint32_t l0 = s * a.B, nkeys = min(a.B, a.L - l0) * a.Hs;
    for (uint32_t i = threadIdx.x; i < nkeys; i += kResBlock) {
      const uint32_t m = s_amax[i];
      s_amax[i] = 0;  // the next publish is behind at least one more barrier
      // |x| as float: non-negative (or a positive NaN), at most 0x7fffffff: bit 31 is free
      st_relaxed_gpu(a.slots + (uint64_t(l0 * a.Hs + i) * gridDim.x + blockIdx.x),
                     kSlotFull | __float_as_uint(abs_bits_to_float<Tr>(m)));
    }
  };
  // Slot *p's value once its full bit is set; v: a first load of it.
  auto wait_full = [](const uint32_t* p, uint32_t v) -> uint32_t {
    while (!(v & kSlotFull)) {  // back-off 0, 32 or 200 ns: the same time (measured)
      __nanosleep(32);
      v = ld_relaxed_gpu(p);
    }
    return v & ~kSlotFull;
  };
  // The first slots a thread reads for step s, loaded early (their latency then overlaps a
  // publish): slot threadIdx.x, or with UNI slots lane + 32 j of the step.
  auto poll_first = [&](uint32_t s, uint32_t (&e)[kPollEarly]) {
    if constexpr (UNI) {
      if (warp != 0 || layer_of(s) >= a.L) return;
      const uint32_t* slots = a.slots + uint64_t(layer_of(s)) * gpb;
#pragma unroll
      for (int j = 0; j < kPollEarly; ++j) {
        const uint32_t i = lane + 32u * j;
        e[j] = i < gpb ? ld_relaxed_gpu(slots + i) : kSlotFull;
      }
    } else {
      const uint32_t l0 = s * a.B, nslots = min(a.B, a.L - l0) * a.Hs * gridDim.x;
      e[0] = threadIdx.x < nslots ? ld_relaxed_gpu(a.slots + uint64_t(l0 * a.Hs) * gridDim.x + threadIdx.x) : 0u;
    }
  };
  // UNI, warp 0: wait for the group's slots of the step's layer, reduce them, scale ->
  // s_inv[s & 1] (and a.scale).
  auto warp_scale_inv = [&](uint32_t s, const uint32_t (&e)[kPollEarly]) {
    const uint32_t p = layer_of(s);
    if (p >= a.L) return;  // no layer for this group in the last step
    const uint32_t* slots = a.slots + uint64_t(p) * gpb;
    // Each round reloads every slot of the lane not yet full, without a sleep, until all of
    // the warp's are (twelfth session: +0.5-1.5% of copy on every fp8 tensor/head row against
    // waiting on each slot in turn with a 32 ns back-off; bench/results/fp8-onepass-12th-h200-
    // 2026-11-27.txt)
    uint32_t v[kPollEarly];
#pragma unroll
    for (int j = 0; j < kPollEarly; ++j) v[j] = e[j];  // past the group: preset full, value 0
    while (true) {
      bool mine = true;
#pragma unroll
      for (int j = 0; j < kPollEarly; ++j) mine = mine && (v[j] & kSlotFull);
      if (__all_sync(0xffffffffu, mine)) break;
#pragma unroll
      for (int j = 0; j < kPollEarly; ++j)
        if (!(v[j] & kSlotFull)) v[j] = ld_relaxed_gpu(slots + lane + 32u * j);
    }
    uint32_t m = 0;
#pragma unroll
    for (int j = 0; j < kPollEarly; ++j) m = max(m, v[j] & ~kSlotFull);
    for (uint32_t i = lane + 32u * kPollEarly; i < gpb; i += 32)
      m = max(m, wait_full(slots + i, ld_relaxed_gpu(slots + i)));
    const float sc = fp8_scale_from_amax(__uint_as_float(__reduce_max_sync(0xffffffffu, m)));
    if (lane == 0) {
      s_inv[s & 1] = fp8_inv(sc);  // rewritten at step s + 2, behind the barrier of step s + 1
      if (bl == 0) a.scale[p] = sc;
    }
  };
  // UNI: quantize + store this thread's slots of step s (its layer), all with one inverse scale.
  auto quantize_own = [&](const uint4* st, uint32_t s, float inv) {
    if (layer_of(s) >= a.L) return;
    uint8_t* __restrict__ cb = a.codes + codes_base(layer_of(s));
#pragma unroll
    for (int k = 0; k < K; ++k) {
      if (slk[k] == 0xffffffffu) continue;
      float f[VE];
      vec16_to_float<Tr, VE>(st[k * kResBlock + threadIdx.x], f);
#pragma unroll
      for (int j = 0; j < VE; ++j) f[j] = __fmul_rn(f[j], inv);  // the encoder saturates (fp8_prescale)
      store_bytes<VE>(cb + uint64_t(soff[k]) * VE, fp8_pack<VE>(f), true);
    }
  };
  // Wait for every block's slots of step s (grid barrier), reduce them, quantize + store.
  // e: poll_first(s) of this thread.
  auto quantize_step = [&](uint32_t s, const uint32_t (&e)[kPollEarly]) {
    const uint4* st = stages + (s % kResStages) * kStage;
    if constexpr (UNI) {
      if (warp == 0) warp_scale_inv(s, e);
      __syncthreads();
      KVK_FP8_TRACE_AT(s, 2);
      quantize_own(st, s, s_inv[s & 1]);
      KVK_FP8_TRACE_AT(s, 3);
      return;
    }
    const uint32_t first = e[0];
    const uint32_t l0 = s * a.B, nkeys = min(a.B, a.L - l0) * a.Hs;
    const uint32_t nslots = nkeys * gridDim.x;
    const uint32_t* slots = a.slots + uint64_t(l0 * a.Hs) * gridDim.x;
    for (uint32_t i0 = 0; i0 < nslots; i0 += kResBlock) {  // uniform: warp_max_into needs every lane
      const uint32_t i = i0 + threadIdx.x;
      uint32_t v = 0, key = 0xffffffffu;
      if (i < nslots) {
        v = wait_full(slots + i, i0 == 0 ? first : ld_relaxed_gpu(slots + i));
        key = i / gridDim.x;  // (UNI has its own poll)
      }
      warp_max_into(s_red, key, v);
    }
    __syncthreads();
    for (uint32_t i = threadIdx.x; i < nkeys; i += kResBlock) {
      const float sc = fp8_scale_from_amax(__uint_as_float(s_red[i]));
      s_red[i] = 0;
      s_inv[i] = fp8_inv(sc);
      if (blockIdx.x == 0) a.scale[l0 * a.Hs + i] = sc;
    }
    __syncthreads();
    KVK_FP8_TRACE_AT(s, 2);
#pragma unroll
    for (int k = 0; k < K; ++k) {
      uint32_t lb, off, key;
      if (!locate(s, k, lb, off, key)) continue;
      float f[VE];
      vec16_to_float<Tr, VE>(st[k * kResBlock + threadIdx.x], f);
      const float inv = s_inv[key];
#pragma unroll
      for (int j = 0; j < VE; ++j) f[j] = __fmul_rn(f[j], inv);
      store_bytes<VE>(a.codes + codes_base(l0 + lb) + uint64_t(off) * VE, fp8_pack<VE>(f), true);
    }
    __syncthreads();  // the stage and s_inv are rewritten next
    KVK_FP8_TRACE_AT(s, 3);
  };

  if constexpr (CL) {
    // mbarrier i takes steps i, i + 4, ...: one arrival (thread 0's, with the expected bytes)
    // and gpb 4-byte st.async a phase. The cluster barrier makes every block's mbarriers ready
    // before any peer stores into them (its arrive comes before this block's first loads).
    if (threadIdx.x == 0) {
      for (int i = 0; i < 4; ++i) mbar_init(&s_bar[i], 1);
      mbar_init_fence();
      for (uint32_t i = 0; i < 4 && i < a.nsteps; ++i) mbar_arrive_expect_tx(&s_bar[i], 4 * gpb);
    }
    cluster_arrive();
    KVK_FP8_TRACE_START(1);
    issue(0);
    issue(1);
    // wait for the group's slots of step s, scale, quantize + store this thread's slots
    auto quantize_cl = [&](uint32_t s) {
      mbar_wait_parity(&s_bar[s % 4], (s / 4) & 1);
      uint32_t m = 0;
      for (uint32_t i = 0; i < gpb; ++i) m = max(m, s_cl[s % 4][i]);
      if (threadIdx.x == 0 && s + 4 < a.nsteps) mbar_arrive_expect_tx(&s_bar[s % 4], 4 * gpb);  // step s + 4
      const uint32_t p = layer_of(s);
      if (p >= a.L) return;
      const float sc = fp8_scale_from_amax(abs_bits_to_float<Tr>(m));
      if (bl == 0 && threadIdx.x == 0) a.scale[p] = sc;
      KVK_FP8_TRACE_AT(s, 2);
      quantize_own(stages + (s % kResStages) * kStage, s, fp8_inv(sc));
      KVK_FP8_TRACE_AT(s, 3);
    };
    for (uint32_t s = 0; s < a.nsteps; ++s) {
      cp_async_wait<1>();  // this thread's vectors of step s have landed (it reads only its own)
      KVK_FP8_TRACE_AT(s, 0);
      if (s == 0) cluster_wait();  // the peers' mbarriers are ready
      publish_cl(s);
      KVK_FP8_TRACE_AT(s, 1);
      if (s > 0) quantize_cl(s - 1);
      issue(s + 2);  // into the stage of step s - 1, quantized above by this thread
    }
    quantize_cl(a.nsteps - 1);  // (every peer's stores into this block have landed after it)
  } else {
    // The workspace holds garbage (it is not zeroed by the launcher: a memset node cost 2-3 us):
    // each block clears its own slot column (UNI: key = layer, the group's layers only), then one
    // grid barrier, 2.3-3 us. It comes before the first loads: behind 16 MiB of them (two steps on
    // every SM) its L2 round trips queue and it took ~7 us (trace, tenth session; splitting it
    // into arrive / loads / wait did not help, the wait queues the same way).
    for (uint32_t key = threadIdx.x * a.NG + grp; key < a.L * a.Hs; key += kResBlock * a.NG)
      a.slots[uint64_t(key) * gpb + bl] = 0u;
    cooperative_groups::this_grid().sync();
    KVK_FP8_TRACE_START(1);
    // Pipeline, kResStages = 3 steps on chip: at iteration s, step s lands and is published, step
    // s-1 (published one iteration ago) is quantized, and step s+2's loads start into its stage.
    // Loads get two iterations to land; a barrier gets the publish of the next step.
    issue(0);
    issue(1);
    uint32_t e[kPollEarly];
    for (uint32_t s = 0; s < a.nsteps; ++s) {
      cp_async_wait<1>();  // all but the newest group: step s has landed
      if (!UNI) __syncthreads();
      KVK_FP8_TRACE_AT(s, 0);
      if (s > 0) poll_first(s - 1, e);
      publish(s);
      KVK_FP8_TRACE_AT(s, 1);
      if (s > 0) quantize_step(s - 1, e);
      issue(s + 2);
    }
    poll_first(a.nsteps - 1, e);
    quantize_step(a.nsteps - 1, e);
  }
}

// ================================================================================================
// Host side
// ================================================================================================
template <typename F>
cudaError_t with_dtype(int dt, F&& f) {
  switch (dt) {
    case kF32: return f(F32{});
    case kF16: return f(F16{});
    case kBF16: return f(BF16{});
  }
  return cudaErrorInvalidValue;
}
// f(std::integral_constant<int, v>) for v in Vs, else `other`.
template <int... Vs, typename F>
cudaError_t with_int(int v, cudaError_t other, F&& f) {
  cudaError_t r = other;
  (void)((v == Vs && (r = f(std::integral_constant<int, Vs>{}), true)) || ...);
  return r;
}
template <typename F>
cudaError_t with_vec(int e, F&& f) { return with_int<8, 4, 2, 1>(e, cudaErrorNotSupported, f); }
template <typename F>
cudaError_t with_mode(int mode, F&& f) { return with_int<0, 2, 4, 8>(mode, cudaErrorInvalidValue, f); }

int dtype_size(int dt) { return dt == kF32 ? 4 : 2; }
bool ptr_aligned(const void* p, int64_t bytes) { return reinterpret_cast<uintptr_t>(p) % uint64_t(bytes) == 0; }
// A stride is irrelevant where its dim has size 1 (its index is always 0).
bool stride_ok(int64_t stride, int64_t dim, int64_t e) { return dim == 1 || stride % e == 0; }
int ilog2(int64_t v) { int r = 0; while ((int64_t(1) << r) < v) ++r; return r; }  // ceil(log2 v)
uint32_t ceil_div_u32(uint64_t a, uint64_t b) { return uint32_t((a + b - 1) / b); }

// Vector width for groups of G channels (G = D for fp8 rows): 16 bytes of input when D and G
// allow it, else 8/bits (whole code bytes per vector); 0 if neither works.
int pick_vec(int dt, int64_t D, int64_t G, int mode, bool limit_lanes) {
  const int emax = 16 / dtype_size(dt), k = codes_per_byte(mode);
  for (int e : {emax, k}) {
    if (e < k || D % e || (G % e && e % G)) continue;
    if (limit_lanes && std::max<int64_t>(G, e) / e > kItems * 32) continue;  // <= kItems vectors x 32 lanes
    return e;
  }
  return 0;
}

// Layers per launch so that `per_layer` * layers stays < 2^31; 0 if one layer is too many.
int64_t layers_per_launch(int64_t L, int64_t per_layer) {
  if (per_layer > kMaxCount) return 0;
  return std::max<int64_t>(1, std::min<int64_t>(L, kMaxCount / std::max<int64_t>(per_layer, 1)));
}

bool dims_ok(int64_t L, int64_t T, int64_t H, int64_t D) {
  return L > 0 && T > 0 && H > 0 && D > 0 && T <= kMaxCount && H <= kMaxCount && D <= 65536;
}

// fp8 scale entries per layer for a scope.
int64_t fp8_scale_per_layer(int scope, int64_t T, int64_t H) { return scope == 0 ? 1 : scope == 1 ? H : T * H; }

// ---- fast paths (dense, 16-byte-aligned rows) ---------------------------------------------------
bool is_pow2(int64_t v) { return v > 0 && (v & (v - 1)) == 0; }

// Developer A/B switches (bench/perf notes): KVK_FAST=0 disables the dense fast paths,
// KVK_TOK_SPLIT=0 the two-lane token kernel, KVK_FP8_RESIDENT=0 the one-pass fp8 kernel. Read once per
// process.
bool kvk_env_off(const char* name) {
  const char* v = std::getenv(name);
  return v && v[0] == '0';
}

// Whether x / out rows are 16-byte aligned (pointer and every stride that matters), and whether
// they are LINEAR (densely packed [L, T, H, D]).
bool fast_layout(const void* p, int sz, int64_t L, int64_t T, int64_t H, int64_t D, int64_t sL, int64_t sT,
                 int64_t sH, bool& linear) {
  const int64_t ve = 16 / sz;
  linear = (H == 1 || sH == D) && (T == 1 || sT == H * D) && (L == 1 || sL == T * H * D);
  return ptr_aligned(p, 16) && stride_ok(sL, L, ve) && stride_ok(sT, T, ve) && stride_ok(sH, H, ve);
}

bool fast_meta_ok(const uint8_t* codes, const float* scale, const float* zero) {
  return ptr_aligned(codes, 16) && ptr_aligned(scale, 16) && (!zero || ptr_aligned(zero, 16));
}

template <typename F>
cudaError_t with_bool(bool b, F&& f) {
  return b ? f(std::true_type{}) : f(std::false_type{});
}
// Run f(first layer, layers) over [0, L) in chunks of Lc layers (the launchers split L so that
// per-launch counts fit 32 bits); stops at the first error.
template <typename F>
cudaError_t for_layer_chunks(int64_t L, int64_t Lc, F&& f) {
  for (int64_t l0 = 0; l0 < L; l0 += Lc) {
    const cudaError_t err = f(l0, std::min(Lc, L - l0));
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}
// The launchers' compile-time dispatch: f(traits, mode, flag) / f(traits, vector, mode) with the
// run-time values as types (std::integral_constant / bool_constant).
template <typename F>
cudaError_t with_dtype_mode_bool(int dt, int mode, bool b, F&& f) {
  return with_dtype(dt, [&](auto tr) {
    return with_mode(mode, [&](auto mc) { return with_bool(b, [&](auto bc) { return f(tr, mc, bc); }); });
  });
}
template <typename F>
cudaError_t with_dtype_vec_mode(int dt, int e, int mode, F&& f) {
  return with_dtype(dt, [&](auto tr) {
    return with_vec(e, [&](auto ec) { return with_mode(mode, [&](auto mc) { return f(tr, ec, mc); }); });
  });
}

// Returns cudaErrorNotSupported (nothing launched) when the case needs the general kernels.
cudaError_t launch_fast_quant(const void* x, int dt, int64_t L, int64_t T, int64_t H, int64_t D, int64_t sL,
                              int64_t sT, int64_t sH, uint8_t* codes, float* scale, float* zero, int mode,
                              int64_t G, int fp8_scope, bool fp8_reduce, cudaStream_t stream) {
  static const bool off = kvk_env_off("KVK_FAST");
  if (off || D % kCh) return cudaErrorNotSupported;
  int64_t P = 1, GPC = 1;
  if (mode == 0) {
    P = D / kCh;
  } else if (G % kCh == 0) {
    P = G / kCh;
  } else if (kCh % G == 0 && G >= 4) {
    GPC = kCh / G;
  } else {
    return cudaErrorNotSupported;
  }
  if (!is_pow2(P) || P > 32 || GPC > 8) return cudaErrorNotSupported;
  bool linear;
  const int sz = dtype_size(dt);
  if (!fast_layout(x, sz, L, T, H, D, sL, sT, sH, linear) || !fast_meta_ok(codes, scale, zero))
    return cudaErrorNotSupported;
  const int64_t CPR = D / kCh, Dp = D * (mode == 0 ? 8 : mode) / 8;
  const int64_t Lc = layers_per_launch(L, T * H * CPR);
  if (!Lc) return cudaErrorNotSupported;
  const int64_t scale_per_layer = mode == 0 ? fp8_scale_per_layer(fp8_scope, T, H) : T * H * (D / G);
  return for_layer_chunks(L, Lc, [&](int64_t l0, int64_t n) -> cudaError_t {
    FastArgs a{};
    a.x = static_cast<const char*>(x) + l0 * sL * sz;
    a.sL = sL; a.sT = sT; a.sH = sH;
    a.codes = codes + l0 * T * H * Dp;
    a.scale = scale + l0 * scale_per_layer;
    a.zero = zero ? zero + l0 * scale_per_layer : nullptr;
    a.n = uint32_t(n * T * H * CPR);
    a.H = uint32_t(H);
    a.logP = ilog2(P);
    a.divPR = FastDiv(uint32_t(CPR));
    a.divH = FastDiv(uint32_t(H));
    a.divT = FastDiv(uint32_t(T));
    a.divTH = FastDiv(uint32_t(T * H));
    a.fp8_scope = fp8_scope;
    a.fp8_reduce = fp8_reduce;
    const uint32_t blocks = ceil_div_u32(a.n, kBlock);
    return with_dtype_mode_bool(dt, mode, linear, [&](auto tr, auto mc, auto lin) -> cudaError_t {
      using Tr = decltype(tr);
      constexpr int MC = decltype(mc)::value;
      constexpr bool LIN = decltype(lin)::value;
      if constexpr (MC == 0) {
        quant_chunk_kernel<Tr, 0, 1, LIN><<<blocks, kBlock, 0, stream>>>(a);
      } else {
        switch (GPC) {
          case 1: quant_chunk_kernel<Tr, MC, 1, LIN><<<blocks, kBlock, 0, stream>>>(a); break;
          case 2: quant_chunk_kernel<Tr, MC, 2, LIN><<<blocks, kBlock, 0, stream>>>(a); break;
          case 4: quant_chunk_kernel<Tr, MC, 4, LIN><<<blocks, kBlock, 0, stream>>>(a); break;
          case 8: quant_chunk_kernel<Tr, MC, 8, LIN><<<blocks, kBlock, 0, stream>>>(a); break;
          default: return cudaErrorNotSupported;
        }
      }
      return cudaGetLastError();
    });
  });
}

cudaError_t launch_fast_dequant(const uint8_t* codes, const float* scale, const float* zero, void* out, int dt,
                                int64_t L, int64_t T, int64_t H, int64_t D, int64_t osL, int64_t osT, int64_t osH,
                                int mode, int64_t G, int fp8_scope, cudaStream_t stream) {
  static const bool off = kvk_env_off("KVK_FAST") || kvk_env_off("KVK_FAST_DEQUANT");
  // measured alike on an H200: 4 or 8 vectors per thread, plain or streaming (evict-first) stores
  if (off) return cudaErrorNotSupported;
  const int sz = dtype_size(dt);
  const int64_t VE = 16 / sz;
  if (D % VE || (mode != 0 && G % VE)) return cudaErrorNotSupported;
  if (VE * (mode == 0 ? 8 : mode) < 8) return cudaErrorNotSupported;  // whole code bytes per vector
  bool linear;
  if (!fast_layout(out, sz, L, T, H, D, osL, osT, osH, linear) || !fast_meta_ok(codes, scale, zero))
    return cudaErrorNotSupported;
  const int64_t VPR = D / VE, Dp = D * (mode == 0 ? 8 : mode) / 8;
  const int64_t Lc = layers_per_launch(L, T * H * VPR);
  if (!Lc) return cudaErrorNotSupported;
  const int64_t scale_per_layer = mode == 0 ? fp8_scale_per_layer(fp8_scope, T, H) : T * H * (D / G);
  return for_layer_chunks(L, Lc, [&](int64_t l0, int64_t n) -> cudaError_t {
    FastArgs a{};
    a.out = static_cast<char*>(out) + l0 * osL * sz;
    a.sL = osL; a.sT = osT; a.sH = osH;
    a.codes = const_cast<uint8_t*>(codes) + l0 * T * H * Dp;
    a.scale = const_cast<float*>(scale) + l0 * scale_per_layer;
    a.zero = zero ? const_cast<float*>(zero) + l0 * scale_per_layer : nullptr;
    a.n = uint32_t(n * T * H * VPR);
    a.H = uint32_t(H);
    a.divPR = FastDiv(uint32_t(VPR));
    a.divH = FastDiv(uint32_t(H));
    a.divT = FastDiv(uint32_t(T));
    a.divTH = FastDiv(uint32_t(T * H));
    a.divGV = FastDiv(uint32_t(mode == 0 ? 1 : G / VE));
    a.fp8_scope = fp8_scope;
    const uint32_t blocks = ceil_div_u32(a.n, uint64_t(kItems) * kBlock);
    return with_dtype_mode_bool(dt, mode, linear, [&](auto tr, auto mc, auto lin) -> cudaError_t {
      using Tr = decltype(tr);
      constexpr int MC = decltype(mc)::value;
      constexpr bool LIN = decltype(lin)::value;
      if constexpr ((16 / Tr::kSize) * (MC == 0 ? 8 : MC) >= 8) {
        dequant_vec_kernel<Tr, MC, LIN, kItems><<<blocks, kBlock, 0, stream>>>(a);
        return cudaGetLastError();
      } else {
        return cudaErrorNotSupported;
      }
    });
  });
}

// ---- rows (channel groups / fp8) ---------------------------------------------------------------
cudaError_t launch_rows_quant(const void* x, int dt, int64_t L, int64_t T, int64_t H, int64_t D, int64_t sL,
                              int64_t sT, int64_t sH, uint8_t* codes, float* scale, float* zero, int mode,
                              int64_t G, int fp8_scope, bool fp8_reduce, cudaStream_t stream) {
  {
    const cudaError_t e = launch_fast_quant(x, dt, L, T, H, D, sL, sT, sH, codes, scale, zero, mode, G, fp8_scope,
                                            fp8_reduce, stream);
    if (e != cudaErrorNotSupported) return e;
  }
  const int E = pick_vec(dt, D, G, mode, true);
  if (!E) return cudaErrorNotSupported;
  const int sz = dtype_size(dt);
  const int NB = mode == 0 ? E : E * mode / 8;
  const int64_t U = std::max<int64_t>(G, E), lpu = U / E, NU = D / U;
  const int logP = ilog2(std::min<int64_t>(lpu, 32));
  const int64_t P = int64_t(1) << logP;
  const int logNV = ilog2((lpu + P - 1) / P);
  if ((1 << logNV) > kItems) return cudaErrorNotSupported;
  const int items = logNV == 0 ? 1 : kItems;  // see quant_rows_kernel
  const int upt = items >> logNV;
  const int64_t Dp = D * NB / E;
  const int64_t Lc = layers_per_launch(L, T * H * (D / E));
  if (!Lc) return cudaErrorNotSupported;
  const int64_t scale_per_layer = mode == 0 ? fp8_scale_per_layer(fp8_scope, T, H) : T * H * (D / G);
  return for_layer_chunks(L, Lc, [&](int64_t l0, int64_t n) -> cudaError_t {
    RowQuantArgs a{};
    a.x = static_cast<const char*>(x) + l0 * sL * sz;
    a.sL = sL; a.sT = sT; a.sH = sH;
    a.codes = codes + l0 * T * H * Dp;
    a.scale = scale + l0 * scale_per_layer;
    a.zero = zero ? zero + l0 * scale_per_layer : nullptr;
    a.H = uint32_t(H);
    a.nunits = uint32_t(n * T * H * NU);
    a.lpu = uint32_t(lpu);
    a.Dp = uint32_t(Dp);
    a.G = int(G);
    a.logG = G < E ? ilog2(G) : 0;
    a.logP = logP;
    a.logNV = logNV;
    a.divNU = FastDiv(uint32_t(NU));
    a.divH = FastDiv(uint32_t(H));
    a.divT = FastDiv(uint32_t(T));
    a.x_aligned = ptr_aligned(a.x, int64_t(E) * sz) && stride_ok(sL, n, E) && stride_ok(sT, T, E) && stride_ok(sH, H, E);
    a.c_aligned = ptr_aligned(a.codes, NB);
    a.fp8_scope = fp8_scope;
    a.fp8_reduce = fp8_reduce;
    const uint32_t blocks = ceil_div_u32(uint64_t(a.nunits) * P, uint64_t(upt) * kBlock);
    return with_dtype_vec_mode(dt, E, mode, [&](auto tr, auto ec, auto mc) -> cudaError_t {
      using Tr = decltype(tr);
      constexpr int EC = decltype(ec)::value;
      constexpr int MC = decltype(mc)::value;
      if constexpr (valid_vec<Tr, EC, MC>()) {
        if (items == 1) quant_rows_kernel<Tr, EC, MC, 1><<<blocks, kBlock, 0, stream>>>(a);
        else quant_rows_kernel<Tr, EC, MC, kItems><<<blocks, kBlock, 0, stream>>>(a);
        return cudaGetLastError();
      } else {
        return cudaErrorNotSupported;
      }
    });
  });
}

cudaError_t launch_rows_dequant(const uint8_t* codes, const float* scale, const float* zero, void* out, int dt,
                                int64_t L, int64_t T, int64_t H, int64_t D, int64_t osL, int64_t osT, int64_t osH,
                                int mode, int64_t G, int fp8_scope, cudaStream_t stream) {
  {
    const cudaError_t e = launch_fast_dequant(codes, scale, zero, out, dt, L, T, H, D, osL, osT, osH, mode, G,
                                              fp8_scope, stream);
    if (e != cudaErrorNotSupported) return e;
  }
  const int E = pick_vec(dt, D, G, mode, false);
  if (!E) return cudaErrorNotSupported;
  const int sz = dtype_size(dt);
  const int NB = mode == 0 ? E : E * mode / 8;
  const int64_t Dp = D * NB / E;
  const int64_t Lc = layers_per_launch(L, T * H * (D / E));
  if (!Lc) return cudaErrorNotSupported;
  const int64_t scale_per_layer = mode == 0 ? fp8_scale_per_layer(fp8_scope, T, H) : T * H * (D / G);
  return for_layer_chunks(L, Lc, [&](int64_t l0, int64_t n) -> cudaError_t {
    RowDequantArgs a{};
    a.codes = codes + l0 * T * H * Dp;
    a.scale = scale + l0 * scale_per_layer;
    a.zero = zero ? zero + l0 * scale_per_layer : nullptr;
    a.out = static_cast<char*>(out) + l0 * osL * sz;
    a.osL = osL; a.osT = osT; a.osH = osH;
    a.H = uint32_t(H);
    a.nvec = uint32_t(n * T * H * (D / E));
    a.ngr = uint32_t(D / G);
    a.G = int(G);
    a.logG = G < E ? ilog2(G) : 0;
    a.divVPR = FastDiv(uint32_t(D / E));
    a.divH = FastDiv(uint32_t(H));
    a.divT = FastDiv(uint32_t(T));
    a.divG = FastDiv(uint32_t(G));
    a.o_aligned = ptr_aligned(a.out, int64_t(E) * sz) && stride_ok(osL, n, E) && stride_ok(osT, T, E) &&
                  stride_ok(osH, H, E);
    a.c_aligned = ptr_aligned(a.codes, NB);
    a.fp8_scope = fp8_scope;
    const uint32_t blocks = ceil_div_u32(a.nvec, uint64_t(kItems) * kBlock);
    return with_dtype_vec_mode(dt, E, mode, [&](auto tr, auto ec, auto mc) -> cudaError_t {
      using Tr = decltype(tr);
      constexpr int EC = decltype(ec)::value;
      constexpr int MC = decltype(mc)::value;
      if constexpr (valid_vec<Tr, EC, MC>()) {
        dequant_rows_kernel<Tr, EC, MC><<<blocks, kBlock, 0, stream>>>(a);
        return cudaGetLastError();
      } else {
        return cudaErrorNotSupported;
      }
    });
  });
}

// ---- token groups --------------------------------------------------------------------------------
cudaError_t launch_tok(bool quant, const void* x, void* out, int dt, int64_t L, int64_t T, int64_t H, int64_t D,
                       int64_t sL, int64_t sT, int64_t sH, uint8_t* codes, float* scale, float* zero, int bits,
                       int64_t G, cudaStream_t stream) {
  const int sz = dtype_size(dt), emax = tok_vec(sz, bits), k = codes_per_byte(bits);
  const int E = D % emax == 0 ? emax : k;  // D % k == 0 is checked by the caller
  const int NB = E * bits / 8;
  const int64_t Dp = D * bits / 8, C = D / E, NTG = (T + G - 1) / G;
  const int64_t Lc = layers_per_launch(L, std::max(NTG * H * C, T * H));
  if (!Lc) return cudaErrorNotSupported;
  const bool reg = quant && E == emax && G <= kTokReg;
  static const bool split_off = kvk_env_off("KVK_TOK_SPLIT");
  static const bool dense_off = kvk_env_off("KVK_TOK_DQ_DENSE");  // developer A/B switch
  // TokArgs of layers [l0, l0 + n): e channels a thread, `per` threads a (group, head, e-vector)
  auto args = [&](int64_t l0, int64_t n, int64_t e, int64_t per) {
    TokArgs a{};
    const int64_t xoff = l0 * sL * sz;
    a.x = quant ? static_cast<const char*>(x) + xoff : nullptr;
    a.out = quant ? nullptr : static_cast<char*>(out) + xoff;
    a.sL = sL; a.sT = sT; a.sH = sH;
    a.codes = codes + l0 * T * H * Dp;
    a.scale = scale + l0 * NTG * H * D;
    a.zero = zero + l0 * NTG * H * D;
    a.T = uint32_t(T); a.H = uint32_t(H); a.D = uint32_t(D); a.G = uint32_t(G);
    a.NTG = uint32_t(NTG); a.Dp = uint32_t(Dp);
    a.n = uint32_t(n * NTG * per * H * (D / e));
    a.divC = FastDiv(uint32_t(D / e));
    a.divH = FastDiv(uint32_t(H));
    a.divNTG = FastDiv(uint32_t(NTG));
    return a;
  };
  // dequant_tok_dense_kernel: G = 32, whole groups, 16-byte output vectors, dense aligned output
  const int ED = 16 / sz;
  const bool dense = !quant && !dense_off && G == 32 && T % 32 == 0 && D % ED == 0 && ED * bits <= 32 &&
                     sT == H * D && sH == D && (L == 1 || sL == T * H * D) && ptr_aligned(out, 16) &&
                     ptr_aligned(codes, ED * bits / 8) && ptr_aligned(scale, 16) && ptr_aligned(zero, 16);
  if (dense) {
    constexpr int np = 4;  // threads per group (dequant_tok_dense_kernel's NP)
    const int64_t Ld = layers_per_launch(L, NTG * np * H * (D / ED));
    if (!Ld) return cudaErrorNotSupported;
    return for_layer_chunks(L, Ld, [&](int64_t l0, int64_t n) -> cudaError_t {
      const TokArgs a = args(l0, n, ED, np);
      return with_dtype(dt, [&](auto tr) -> cudaError_t {
        using Tr = decltype(tr);
        constexpr int EV = 16 / Tr::kSize;
        cudaError_t e = cudaErrorNotSupported;
        if (bits == 4) {
          dequant_tok_dense_kernel<Tr, EV, 4, np><<<ceil_div_u32(a.n, kBlock), kBlock, 0, stream>>>(a);
          e = cudaGetLastError();
        } else if (bits == 2) {
          dequant_tok_dense_kernel<Tr, EV, 2, np><<<ceil_div_u32(a.n, kBlock), kBlock, 0, stream>>>(a);
          e = cudaGetLastError();
        } else if constexpr (EV * 8 <= 32) {
          dequant_tok_dense_kernel<Tr, EV, 8, np><<<ceil_div_u32(a.n, kBlock), kBlock, 0, stream>>>(a);
          e = cudaGetLastError();
        }
        return e;
      });
    });
  }
  return for_layer_chunks(L, Lc, [&](int64_t l0, int64_t n) -> cudaError_t {
    TokArgs a = args(l0, n, E, 1);
    a.x_aligned = ptr_aligned(quant ? a.x : a.out, int64_t(E) * sz) && stride_ok(sL, n, E) && stride_ok(sT, T, E) &&
                  stride_ok(sH, H, E);
    a.c_aligned = ptr_aligned(a.codes, NB);
    const int64_t salign = std::min<int64_t>(4 * E, 16);
    a.s_aligned = ptr_aligned(a.scale, salign) && ptr_aligned(a.zero, salign);
    return with_dtype_vec_mode(dt, E, bits, [&](auto tr, auto ec, auto mc) -> cudaError_t {
      using Tr = decltype(tr);
      constexpr int EC = decltype(ec)::value;
      constexpr int MC = decltype(mc)::value;
      if constexpr (valid_tok_vec<Tr, EC, MC>()) {
        // alignment is a template flag: a run-time flag made the compiler merge the vector and
        // scalar load paths through one register, serializing the 32 loads (measured: 25% of copy)
        return with_bool(a.x_aligned && a.c_aligned && a.s_aligned, [&](auto alc) -> cudaError_t {
          constexpr bool AL = decltype(alc)::value;
          if (!quant) {
            dequant_tok_kernel<Tr, EC, MC, AL><<<ceil_div_u32(a.n, kBlock), kBlock, 0, stream>>>(a);
          } else if (reg) {
            if constexpr (EC == tok_vec(Tr::kSize, MC)) {
              if (AL && G > kTokReg / 2 && !split_off)
                quant_tok_split_kernel<Tr, EC, MC>
                    <<<ceil_div_u32(ceil_div_u32(a.n, 16) * 32ull, kTokBlock), kTokBlock, 0, stream>>>(a);
              else
                quant_tok_kernel<Tr, EC, MC, true, AL><<<ceil_div_u32(a.n, kTokBlock), kTokBlock, 0, stream>>>(a);
            } else {
              return cudaErrorNotSupported;  // unreachable: reg implies E == tok_vec
            }
          } else {
            quant_tok_kernel<Tr, EC, MC, false, AL><<<ceil_div_u32(a.n, kBlock), kBlock, 0, stream>>>(a);
          }
          return cudaGetLastError();
        });
      } else {
        return cudaErrorNotSupported;
      }
    });
  });
}

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

// ---- fp8 tensor/head, one pass (quant_fp8_resident_kernel) -------------------------------------
struct DeviceInfo {
  int sms = 0;
  bool coop = false;
  int major = 0;  // compute capability
};
DeviceInfo device_info() {
  static DeviceInfo cache[64];
  static bool known[64] = {};
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= 64) return {};
  if (!known[dev]) {
    int sms = 0, coop = 0, major = 0;
    cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
    cudaDeviceGetAttribute(&coop, cudaDevAttrCooperativeLaunch, dev);
    cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev);
    cache[dev] = DeviceInfo{sms, coop != 0, major};
    known[dev] = true;
  }
  return cache[dev];
}

constexpr int resident_smem_bytes(int K) { return kResStages * kResBlock * K * 16; }

// Resident blocks per SM of quant_fp8_resident_kernel<Tr, K, HEAD, UNI> (0 if unknown or it does not fit).
template <typename Tr, int K, bool HEAD, bool UNI>
int resident_blocks_per_sm() {
  static int cache[64] = {};
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= 64) return 0;
  if (!cache[dev]) {
    int n = 0;
    const int smem = resident_smem_bytes(K);
    if (cudaFuncSetAttribute(quant_fp8_resident_kernel<Tr, K, HEAD, UNI>,
                             cudaFuncAttributeMaxDynamicSharedMemorySize, smem) != cudaSuccess ||
        cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, quant_fp8_resident_kernel<Tr, K, HEAD, UNI>, kResBlock,
                                                      smem) !=
            cudaSuccess) {
      cudaGetLastError();  // clear: the caller falls back to the two-kernel path
      n = 0;
    }
    cache[dev] = n > 0 ? n : -1;
  }
  return std::max(cache[dev], 0);
}

// Clusters of gpb (<= 16) blocks of the cluster variant quant_fp8_resident_kernel<Tr, K, false,
// true, true> that the GPU runs at once (0 if none, or the query fails).
template <typename Tr, int K>
int resident_clusters(int gpb) {
  static int cache[64][17] = {};
  int dev = 0;
  if (gpb < 1 || gpb > 16 || cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= 64) return 0;
  if (!cache[dev][gpb]) {
    auto kern = quant_fp8_resident_kernel<Tr, K, false, true, true>;
    int n = 0;
    const int smem = resident_smem_bytes(K);
    cudaLaunchConfig_t cfg{};
    cfg.gridDim = dim3(gpb);
    cfg.blockDim = dim3(kResBlock);
    cfg.dynamicSmemBytes = smem;
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeClusterDimension;
    attr[0].val.clusterDim.x = gpb;
    attr[0].val.clusterDim.y = 1;
    attr[0].val.clusterDim.z = 1;
    cfg.attrs = attr;
    cfg.numAttrs = 1;
    if (cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, smem) != cudaSuccess ||
        (gpb > 8 && cudaFuncSetAttribute(kern, cudaFuncAttributeNonPortableClusterSizeAllowed, 1) != cudaSuccess) ||
        cudaOccupancyMaxActiveClusters(&n, kern, &cfg) != cudaSuccess) {
      cudaGetLastError();  // clear: the caller takes the cooperative variant
      n = 0;
    }
    cache[dev][gpb] = n > 0 ? n : -1;
  }
  return std::max(cache[dev][gpb], 0);
}

// Bytes of input per step (B layers): big enough that a step's loads cover the barrier's latency,
// small enough that the first load and the last store (not overlapped) stay short. Developer
// knob KVK_FP8_STEP_KB for the bench.
int64_t resident_step_bytes() {
  static const int64_t v = [] {
    const char* e = std::getenv("KVK_FP8_STEP_KB");
    const long long kb = e ? std::atoll(e) : 0;
    return kb > 0 ? int64_t(kb) * 1024 : int64_t(8) << 20;
  }();
  return v;
}

// Returns cudaErrorNotSupported (nothing launched) when the layers don't fit the resident grid or
// the layout isn't dense; the caller then takes the two-kernel path.
cudaError_t launch_fp8_resident(const void* x, int dt, int64_t L, int64_t T, int64_t H, int64_t D, int64_t sL,
                                int64_t sT, int64_t sH, uint8_t* codes, float* scale, int scope, uint32_t* ws,
                                int64_t ws_words, cudaStream_t stream) {
  static const bool off = kvk_env_off("KVK_FP8_RESIDENT");
  if (off || !ws || scope > 1 || ws_words <= 0) return cudaErrorNotSupported;
  const int sz = dtype_size(dt), VE = 16 / sz;
  const bool dense = (T == 1 || sT == H * D) && (H == 1 || sH == D);
  if (!dense || D % VE || !ptr_aligned(x, 16) || !stride_ok(sL, L, VE) || !ptr_aligned(codes, VE))
    return cudaErrorNotSupported;
  const DeviceInfo dev = device_info();
  if (!dev.coop || dev.sms <= 0) return cudaErrorNotSupported;
  if ((scope == 1 ? H : 1) > kResMaxKeys || T * H * D / VE > kMaxCount) return cudaErrorNotSupported;
  static const bool split_off = kvk_env_off("KVK_FP8_HEAD_SPLIT");  // developer A/B switches
  static const bool groups_off = kvk_env_off("KVK_FP8_GROUPS");
  // capacity in vectors with K vectors per thread; the smallest K that holds a step wins (more
  // blocks per SM, fewer registers per thread)
  auto cap = [&](int bps, int k) { return int64_t(bps) * dev.sms * kResBlock * k; };
  return with_dtype(dt, [&](auto tr) {
    using Tr = decltype(tr);
    // The head scope where a head's [T, D] fits (bf16: up to T = 33792 on 132 SMs): the
    // tensor-scope kernel over L * H pseudo-layers, one per (layer, head), whose scales [L * H]
    // are the head scope's [L, H]. Taken for layers too big for the chip (bf16 Llama-3-8B beyond
    // T = 4224), and for heads big enough for block groups (below); the HEAD variant takes the
    // others.
    const int64_t head_v = T * D / VE;
    const bool split = !split_off && scope == 1 && H > 1 &&
                       ((!groups_off && head_v >= kGroupMinVectors) ||
                        T * H * D / VE > cap(resident_blocks_per_sm<Tr, 4, true, false>(), 4)) &&
                       head_v <= cap(resident_blocks_per_sm<Tr, 4, false, false>(), 4);
    const int64_t Hsub = split ? H : 1;
    return with_bool(scope == 1 && !split, [&](auto hc) -> cudaError_t {
      constexpr bool HEAD = decltype(hc)::value;
      // from here on, layers are pseudo-layers where split
      const int64_t nL = L * Hsub, Hs = HEAD ? H : 1, Nv = T * H * D / VE / Hsub;
      constexpr int kK[3] = {1, 2, 4};  // 4: an 8 MiB bf16 layer on 132 SMs (one block each)
      const int bps[3] = {resident_blocks_per_sm<Tr, 1, HEAD, false>(), resident_blocks_per_sm<Tr, 2, HEAD, false>(),
                          resident_blocks_per_sm<Tr, 4, HEAD, false>()};
      const int64_t cap_max = cap(bps[2], kK[2]);
      if (Nv > cap_max) return cudaErrorNotSupported;
      int64_t B = std::max<int64_t>(1, resident_step_bytes() / (Nv * 16));
      B = std::min({B, nL, cap_max / Nv, int64_t(kResMaxKeys) / Hs});
      const int64_t stepv = B * Nv;
      int ki = 0;
      while (cap(bps[ki], kK[ki]) < stepv) ++ki;  // terminates: cap(bps[2], kK[2]) >= stepv
      int64_t nsteps = (nL + B - 1) / B;
      uint32_t grid = ceil_div_u32(stepv, uint64_t(kResBlock) * kK[ki]), NG = 1;
      // Block groups (tensor scope, UNI variant): NG groups of gpb = ceil(Nv / (1024 K)) blocks,
      // each holding one whole (pseudo-)layer a step: B = 1, a step of NG layers, every block
      // with one amax key, each layer's grid barrier among its own group. NG from the step bytes,
      // evened over the steps; the smallest K whose groups fit the chip. Layers of fewer than
      // kGroupMinVectors vectors would leave too many threads of a group idle: steps of several
      // layers (generic variant) instead.
      const bool grouped = !groups_off && !HEAD && Nv >= kGroupMinVectors;
      if (grouped) {
        const int64_t want = std::min<int64_t>(B, nL);
        nsteps = (nL + want - 1) / want;
        int64_t ng = (nL + nsteps - 1) / nsteps;
        auto gpb_of = [&](int i) { return (Nv + int64_t(kResBlock) * kK[i] - 1) / (int64_t(kResBlock) * kK[i]); };
        ki = 0;
        while (ki < 2 && int64_t(bps[ki]) * dev.sms / gpb_of(ki) < ng) ++ki;
        ng = std::min<int64_t>(ng, int64_t(bps[ki]) * dev.sms / gpb_of(ki));  // >= 1: Nv <= cap_max
        nsteps = (nL + ng - 1) / ng;
        B = 1;
        NG = uint32_t(ng);
        grid = uint32_t(ng * gpb_of(ki));
      }
      const int K = kK[ki];
      // Groups of <= 16 blocks on sm_90 run as thread-block clusters (the CL variant) when the GPU
      // runs at least 7/8 of the NG clusters at once (NG is then capped at that); clusters never
      // wait for each other, so more would still be correct, only slower.
      static const bool cl_off = kvk_env_off("KVK_FP8_CLUSTER");  // developer A/B switch
      bool cl = false;
      if (KVK_CLUSTER_PTX && grouped && !cl_off && dev.major >= 9 && grid / NG <= 16) {
        const int g = int(grid / NG);
        const int ncl = K == 1 ? resident_clusters<Tr, 1>(g) : K == 2 ? resident_clusters<Tr, 2>(g)
                                                                       : resident_clusters<Tr, 4>(g);
        if (ncl >= 1 && int64_t(ncl) >= int64_t(NG) - NG / 8) {
          NG = std::min<uint32_t>(NG, uint32_t(ncl));
          nsteps = (nL + NG - 1) / NG;
          grid = NG * uint32_t(g);
          cl = true;
        }
      }
      // workspace words: UNI, key = layer, gpb per key; otherwise grid per key (the kernel clears
      // what it uses)
      if (nL * Hs * (grid / NG) > ws_words) return cudaErrorNotSupported;
      ResidentArgs a{};
      a.x = x;
      a.sL = sL;
      a.codes = codes;
      a.scale = scale;
      a.slots = ws;
      a.L = uint32_t(nL); a.B = uint32_t(B); a.Hs = uint32_t(Hs); a.nsteps = uint32_t(nsteps); a.Nv = uint32_t(Nv);
      a.Hsub = uint32_t(Hsub);
      a.divNv = FastDiv(uint32_t(Nv));
      a.divC = FastDiv(uint32_t(D / VE));
      a.divH = FastDiv(uint32_t(H));
      a.divHsub = FastDiv(uint32_t(Hsub));
      a.NG = NG;
      cudaLaunchConfig_t cfg{};
      cfg.gridDim = dim3(grid);
      cfg.blockDim = dim3(kResBlock);
      cfg.dynamicSmemBytes = resident_smem_bytes(K);
      cfg.stream = stream;
      cudaLaunchAttribute attr[1];
      attr[0].id = cudaLaunchAttributeCooperative;
      attr[0].val.cooperative = 1;
      cfg.attrs = attr;
      cfg.numAttrs = 1;
      // The UNI variant (tensor scope): block groups, or without them one layer a step.
      static const bool uni_off = kvk_env_off("KVK_FP8_UNI");  // developer A/B switch
      [[maybe_unused]] const bool uni = !HEAD && (grouped || (!uni_off && B == 1));
      return with_int<1, 2, 4>(K, cudaErrorNotSupported, [&](auto kc) -> cudaError_t {
        constexpr int KC = decltype(kc)::value;
        // same shared memory; the occupancy is checked, as the grid must be co-resident
        if constexpr (!HEAD) {
          if (cl) {
            attr[0].id = cudaLaunchAttributeClusterDimension;
            attr[0].val.clusterDim.x = grid / NG;
            attr[0].val.clusterDim.y = 1;
            attr[0].val.clusterDim.z = 1;
            return cudaLaunchKernelEx(&cfg, quant_fp8_resident_kernel<Tr, KC, false, true, true>, a);
          }
          if (uni && resident_blocks_per_sm<Tr, KC, false, true>() >= bps[ki])
            return cudaLaunchKernelEx(&cfg, quant_fp8_resident_kernel<Tr, KC, false, true>, a);
        }
        if (NG > 1) return cudaErrorNotSupported;  // groups need the UNI variant: two kernels
        return cudaLaunchKernelEx(&cfg, quant_fp8_resident_kernel<Tr, KC, HEAD, false>, a);
      });
    });
  });
}

}  // namespace
}  // namespace kvk

using namespace kvk;

// ================================================================================================
// Public launchers
// ================================================================================================
extern "C" cudaError_t kvk_quantize_int(const void* x, int x_dtype, int64_t L, int64_t T, int64_t H, int64_t D,
                                        int64_t sL, int64_t sT, int64_t sH, uint8_t* codes, float* scale,
                                        float* zero, int bits, int group_size, int axis, cudaStream_t stream) {
  if (!x || !codes || !scale || !zero) return cudaErrorInvalidValue;
  if (x_dtype < 0 || x_dtype > 2 || !dims_ok(L, T, H, D)) return cudaErrorInvalidValue;
  if ((bits != 8 && bits != 4 && bits != 2) || group_size < 1 || (axis != 0 && axis != 1)) return cudaErrorInvalidValue;
  if (D % codes_per_byte(bits)) return cudaErrorInvalidValue;
  if (axis == 0) {
    if (D % group_size) return cudaErrorInvalidValue;
    return launch_rows_quant(x, x_dtype, L, T, H, D, sL, sT, sH, codes, scale, zero, bits, group_size, 0, false, stream);
  }
  return launch_tok(true, x, nullptr, x_dtype, L, T, H, D, sL, sT, sH, codes, scale, zero, bits, group_size, stream);
}

extern "C" cudaError_t kvk_dequantize_int(const uint8_t* codes, const float* scale, const float* zero, void* out,
                                          int out_dtype, int64_t L, int64_t T, int64_t H, int64_t D, int64_t osL,
                                          int64_t osT, int64_t osH, int bits, int group_size, int axis,
                                          cudaStream_t stream) {
  if (!codes || !scale || !zero || !out) return cudaErrorInvalidValue;
  if (out_dtype < 0 || out_dtype > 2 || !dims_ok(L, T, H, D)) return cudaErrorInvalidValue;
  if ((bits != 8 && bits != 4 && bits != 2) || group_size < 1 || (axis != 0 && axis != 1)) return cudaErrorInvalidValue;
  if (D % codes_per_byte(bits)) return cudaErrorInvalidValue;
  if (axis == 0) {
    if (D % group_size) return cudaErrorInvalidValue;
    return launch_rows_dequant(codes, scale, zero, out, out_dtype, L, T, H, D, osL, osT, osH, bits, group_size, 0,
                               stream);
  }
  return launch_tok(false, nullptr, out, out_dtype, L, T, H, D, osL, osT, osH, const_cast<uint8_t*>(codes),
                    const_cast<float*>(scale), const_cast<float*>(zero), bits, group_size, stream);
}

extern "C" cudaError_t kvk_quantize_fp8(const void* x, int x_dtype, int64_t L, int64_t T, int64_t H, int64_t D,
                                        int64_t sL, int64_t sT, int64_t sH, uint8_t* codes, float* scale, int scope,
                                        bool compute_scale, uint32_t* workspace, int64_t workspace_words,
                                        cudaStream_t stream) {
  if (!x || !codes || !scale) return cudaErrorInvalidValue;
  if (x_dtype < 0 || x_dtype > 2 || !dims_ok(L, T, H, D) || scope < 0 || scope > 2) return cudaErrorInvalidValue;
  if (compute_scale && scope != 2) {
    cudaError_t err = launch_fp8_resident(x, x_dtype, L, T, H, D, sL, sT, sH, codes, scale, scope, workspace,
                                          workspace_words, stream);
    if (err != cudaErrorNotSupported) return err;
    err = launch_fp8_scale(x, x_dtype, L, T, H, D, sL, sT, sH, scale, scope, stream);
    if (err != cudaSuccess) return err;
  }
  return launch_rows_quant(x, x_dtype, L, T, H, D, sL, sT, sH, codes, scale, nullptr, 0, D, scope,
                           compute_scale && scope == 2, stream);
}

extern "C" cudaError_t kvk_dequantize_fp8(const uint8_t* codes, const float* scale, void* out, int out_dtype,
                                          int64_t L, int64_t T, int64_t H, int64_t D, int64_t osL, int64_t osT,
                                          int64_t osH, int scope, cudaStream_t stream) {
  if (!codes || !scale || !out) return cudaErrorInvalidValue;
  if (out_dtype < 0 || out_dtype > 2 || !dims_ok(L, T, H, D) || scope < 0 || scope > 2) return cudaErrorInvalidValue;
  return launch_rows_dequant(codes, scale, nullptr, out, out_dtype, L, T, H, D, osL, osT, osH, 0, D, scope, stream);
}

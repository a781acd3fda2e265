// quant_rows.cu -- channel groups (int, axis channel) and fp8 rows: quantize / dequantize kernels
// and their launchers (see quant.cu for the kernel families, docs/quant-spec.md for the math).
#include "quant_launch.cuh"

namespace kvk {
namespace {

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
    bool nonfinite = false;  // this thread saw an Inf / NaN in a group (int)
    const bool stats = MODE != 0 || a.fp8_reduce;  // uniform
    if (stats) {
#pragma unroll
      for (int i = 0; i < ITEMS; ++i) {
        if constexpr (MODE == 0) {  // amax of |x|; neutral 0
          smx[i] = amax_finite<E>(v[i]);  // finite values only
          smn[i] = 0.f;
        } else {  // min / max; neutral +-inf for masked slots
          float mn = __int_as_float(0x7f800000), mx = -__int_as_float(0x7f800000);
          if (act[i]) {
#pragma unroll
            for (int j = 0; j < E; ++j) { mn = min_nan(mn, v[i][j]); mx = max_nan(mx, v[i][j]); }
            if (!is_finite2(mn, mx)) {  // an Inf or NaN (rare): the finite values' min / max
              nonfinite = true;
              mn = __int_as_float(0x7f800000), mx = -__int_as_float(0x7f800000);
#pragma unroll
              for (int j = 0; j < E; ++j) { mn = fminf(mn, finite_or_nan(v[i][j])); mx = fmaxf(mx, finite_or_nan(v[i][j])); }
            }
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
    // groups span lanes: any non-finite value in the warp sends its groups down the saturating path
    if constexpr (MODE != 0) nonfinite = __any_sync(__activemask(), nonfinite);
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
        const IntGroup g = make_int_group(smn[i], smx[i], (1 << MODE) - 1, nonfinite);
        if (vin[i] == 0) {  // one writer per group; scale index = unit (U = G)
          a.scale[unit[i]] = g.scale;
          a.zero[unit[i]] = g.mn;
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
        for (int j = 0; j < E; ++j) mn[j] = mx[j] = finite_or_nan(v[i][j]);  // finite values only
        // butterfly over aligned blocks of G elements (G a power of two dividing E)
#pragma unroll
        for (int st = 1; st < E; st <<= 1) {
          if (st < G) {
            float tmn[E], tmx[E];
#pragma unroll
            for (int j = 0; j < E; ++j) { tmn[j] = fminf(mn[j], mn[j ^ st]); tmx[j] = fmaxf(mx[j], mx[j ^ st]); }
#pragma unroll
            for (int j = 0; j < E; ++j) { mn[j] = tmn[j]; mx[j] = tmx[j]; }
          }
        }
        uint32_t q[E];
        const uint32_t gpv = uint32_t(E) >> a.logG;  // groups per vector
#pragma unroll
        for (int j = 0; j < E; ++j) {
          const IntGroup g = make_int_group(mn[j], mx[j], (1 << MODE) - 1, true);
          q[j] = int_quantize(v[i][j], g, kQmax);
          if ((j & (G - 1)) == 0) {
            const uint64_t gi = uint64_t(unit[i]) * gpv + (uint32_t(j) >> a.logG);
            a.scale[gi] = g.scale;
            a.zero[gi] = g.mn;
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
      float m = amax_finite<kCh>(f);  // finite values only
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
    bool nonfinite = false;
#pragma unroll
    for (int g = 0; g < GPC; ++g) {
      if (!is_finite2(mn[g], mx[g])) {  // an Inf or NaN (rare): the finite values' min / max
        nonfinite = true;
        mn[g] = __int_as_float(0x7f800000), mx[g] = -__int_as_float(0x7f800000);
#pragma unroll
        for (int j = 0; j < GE; ++j) { mn[g] = fminf(mn[g], finite_or_nan(f[g * GE + j])); mx[g] = fmaxf(mx[g], finite_or_nan(f[g * GE + j])); }
      }
    }
    nonfinite = __any_sync(__activemask(), nonfinite);  // groups span lanes
    if (GPC == 1 && P > 1) {
      mn[0] = group_min(mn[0], P);
      mx[0] = group_max(mx[0], P);
    }
    IntGroup gr[GPC];
    bool fast = true;
#pragma unroll
    for (int g = 0; g < GPC; ++g) {
      gr[g] = make_int_group(mn[g], mx[g], (1 << BITS) - 1, nonfinite);
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
          a.zero[s >> a.logP] = gr[0].mn;
        }
      } else {
        float sc[GPC], zp[GPC];
#pragma unroll
        for (int g = 0; g < GPC; ++g) { sc[g] = gr[g].scale; zp[g] = gr[g].mn; }
        store_floats<GPC>(a.scale + uint64_t(s) * GPC, true, sc);
        store_floats<GPC>(a.zero + uint64_t(s) * GPC, true, zp);
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

}  // namespace

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

}  // namespace kvk

// quant_token.cu -- int token groups (axis token, KIVI keys): quantize / dequantize kernels and
// launch_tok (see quant.cu for the kernel families, docs/quant-spec.md for the math).
#include "quant_launch.cuh"

namespace kvk {
namespace {

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
// whether every channel can take the clamp-free path. mn / mx are the NaN-propagating min / max
// of the group's nt tokens at xg (token stride sT); where one is not finite (an Inf or NaN: rare)
// the finite values' min / max are taken again from memory and the group saturates.
template <typename Tr, int E, int BITS>
__device__ __forceinline__ bool tok_groups(float (&mn)[E], float (&mx)[E], IntGroup (&g)[E], float* scale, float* zero,
                                           bool s_aligned, const typename Tr::storage* xg, int64_t sT, int nt,
                                           bool x_aligned, bool write = true) {
  bool finite = true;
#pragma unroll
  for (int j = 0; j < E; ++j) finite = finite && is_finite2(mn[j], mx[j]);
  if (!finite) {
#pragma unroll
    for (int j = 0; j < E; ++j) { mn[j] = __int_as_float(0x7f800000); mx[j] = -__int_as_float(0x7f800000); }
#pragma unroll 1
    for (int t = 0; t < nt; ++t) {
      float f[E];
      load_vec<Tr, E>(xg + int64_t(t) * sT, x_aligned, f);
#pragma unroll
      for (int j = 0; j < E; ++j) { mn[j] = fminf(mn[j], finite_or_nan(f[j])); mx[j] = fmaxf(mx[j], finite_or_nan(f[j])); }
    }
  }
  float sc[E], zp[E];
  bool all_fast = true;
#pragma unroll
  for (int j = 0; j < E; ++j) {
    g[j] = make_int_group(mn[j], mx[j], (1 << BITS) - 1, !finite);
    sc[j] = g[j].scale;
    zp[j] = g[j].mn;
    all_fast = all_fast && g[j].fast;
  }
  if (write) {
    store_floats<E>(scale, s_aligned, sc);
    store_floats<E>(zero, s_aligned, zp);
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
      if (t < nt) minmax_update<Tr, E>(raw[t], mn, mx);
    }
    IntGroup g[E];
    const bool all_fast = tok_groups<Tr, E, BITS>(mn, mx, g, a.scale + sidx, a.zero + sidx, AL, xp, a.sT, nt, AL);
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
        if (t0 + u < nt) minmax_update<Tr, E>(raw[u], mn, mx);
      }
    }
    IntGroup g[E];
    const bool all_fast = tok_groups<Tr, E, BITS>(mn, mx, g, a.scale + sidx, a.zero + sidx, AL, xp, a.sT, nt, AL);
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
      minmax_update<Tr, E>(r, mn, mx);
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
  const bool all_fast = tok_groups<Tr, E, BITS>(mn, mx, g, a.scale + sidx, a.zero + sidx, true,
                                                xp - int64_t(t0) * a.sT, a.sT, int(k.nt), true, half == 0);
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
// The launcher takes NP = 4 (experiments/tok_dq_exp.cu runs NP = 1/2/4): shorter-lived blocks (a
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

}  // namespace

// ---- token groups --------------------------------------------------------------------------------
cudaError_t launch_tok(bool quant, const void* x, void* out, int dt, int64_t L, int64_t T, int64_t H, int64_t D,
                       int64_t sL, int64_t sT, int64_t sH, uint8_t* codes, float* scale, float* zero, int bits,
                       int64_t G, cudaStream_t stream) {
  G = std::min(G, T);  // a group longer than T is the one group of all T (same codes and scales)
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

}  // namespace kvk

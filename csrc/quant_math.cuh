// quant_math.cuh -- device building blocks for KV quantization (docs/quant-spec.md).
//
// Everything here is __device__ __forceinline__ (plus a small host helper or two) so that the
// quantize/dequantize kernels in quant.cu and later fused kernels (paged scatter/gather with
// dequant, entropy decode) share ONE implementation of the math. The torch reference
// (kvkernels/reference/quant.py) is the spec: codes and scales must be bit-identical, so the
// quantize path uses explicit round-to-nearest intrinsics (__fsub_rn, __fdiv_rn, __fadd_rn,
// __fmul_rn), which nvcc never contracts into FMAs.
//
// Element types are described by small traits structs (F32 / F16 / BF16) whose `storage` is a
// trivially constructible integer or float, so that E elements can live in a union with one
// vector word (uint4 / uint2 / uint / ushort) and be moved with a single load or store.
#pragma once

#include <cstdint>
#include <type_traits>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

namespace kvk {

// ---- dtype codes shared with the launchers / Python ------------------------------------------
enum DType : int { kF32 = 0, kF16 = 1, kBF16 = 2 };

// ---- element traits --------------------------------------------------------------------------
struct F32 {
  using storage = float;
  static constexpr int kSize = 4;
  __device__ __forceinline__ static float to_float(storage s) { return s; }
  __device__ __forceinline__ static storage from_float(float f) { return f; }
};
struct F16 {
  using storage = unsigned short;
  static constexpr int kSize = 2;
  __device__ __forceinline__ static float to_float(storage s) { return __half2float(__ushort_as_half(s)); }
  // round-to-nearest-even, overflow -> inf (as torch's float -> half cast)
  __device__ __forceinline__ static storage from_float(float f) { return __half_as_ushort(__float2half_rn(f)); }
};
struct BF16 {
  using storage = unsigned short;
  static constexpr int kSize = 2;
  // bf16 -> float is exact: the bf16 bits are the high half of the float.
  __device__ __forceinline__ static float to_float(storage s) { return __uint_as_float(static_cast<unsigned>(s) << 16); }
  // round-to-nearest-even (as torch's float -> bf16 cast)
  __device__ __forceinline__ static storage from_float(float f) { return __bfloat16_as_ushort(__float2bfloat16_rn(f)); }
};

// ---- raw vector words ------------------------------------------------------------------------
template <int NB> struct VecWord;  // an NB-byte word loaded/stored with one instruction
template <> struct VecWord<16> { using type = uint4; };
template <> struct VecWord<8> { using type = uint2; };
template <> struct VecWord<4> { using type = unsigned int; };
template <> struct VecWord<2> { using type = unsigned short; };
template <> struct VecWord<1> { using type = unsigned char; };

// E elements of traits Tr, viewable as one vector word.
template <typename Tr, int E>
union Vec {
  using Word = typename VecWord<E * Tr::kSize>::type;
  Word w;
  typename Tr::storage e[E];
};

// Load E consecutive elements at p (element pointer) as raw storage. `aligned`: p is aligned to
// E * sizeof(element) bytes (one vector load); otherwise E scalar loads (the VEC=1 fallback).
template <typename Tr, int E>
__device__ __forceinline__ Vec<Tr, E> load_raw(const typename Tr::storage* p, bool aligned) {
  Vec<Tr, E> v;
  if (aligned) {
    v.w = __ldg(reinterpret_cast<const typename Vec<Tr, E>::Word*>(p));
  } else {
#pragma unroll
    for (int j = 0; j < E; ++j) v.e[j] = __ldg(p + j);
  }
  return v;
}

template <typename Tr, int E>
__device__ __forceinline__ void raw_to_float(const Vec<Tr, E>& v, float (&f)[E]) {
#pragma unroll
  for (int j = 0; j < E; ++j) f[j] = Tr::to_float(v.e[j]);
}

// Load E consecutive elements at p as float (same alignment contract as load_raw).
template <typename Tr, int E>
__device__ __forceinline__ void load_vec(const typename Tr::storage* p, bool aligned, float (&f)[E]) {
  raw_to_float<Tr, E>(load_raw<Tr, E>(p, aligned), f);
}

// Store E floats to p converted to the element type (RNE); same alignment contract.
template <typename Tr, int E>
__device__ __forceinline__ void store_vec(typename Tr::storage* p, bool aligned, const float (&f)[E]) {
  Vec<Tr, E> v;
#pragma unroll
  for (int j = 0; j < E; ++j) v.e[j] = Tr::from_float(f[j]);
  if (aligned) {
    *reinterpret_cast<typename Vec<Tr, E>::Word*>(p) = v.w;
  } else {
#pragma unroll
    for (int j = 0; j < E; ++j) p[j] = v.e[j];
  }
}

// E contiguous float32 (scales / zero points). `aligned`: p is aligned to min(4E, 16) bytes.
template <int E>
__device__ __forceinline__ void load_floats(const float* p, bool aligned, float (&f)[E]) {
  if constexpr (E % 4 == 0) {
    if (aligned) {
#pragma unroll
      for (int j = 0; j < E; j += 4) {
        const float4 t = __ldg(reinterpret_cast<const float4*>(p + j));
        f[j] = t.x; f[j + 1] = t.y; f[j + 2] = t.z; f[j + 3] = t.w;
      }
      return;
    }
  } else if constexpr (E == 2) {
    if (aligned) {
      const float2 t = __ldg(reinterpret_cast<const float2*>(p));
      f[0] = t.x; f[1] = t.y;
      return;
    }
  }
#pragma unroll
  for (int j = 0; j < E; ++j) f[j] = __ldg(p + j);
}

template <int E>
__device__ __forceinline__ void store_floats(float* p, bool aligned, const float (&f)[E]) {
  if constexpr (E % 4 == 0) {
    if (aligned) {
#pragma unroll
      for (int j = 0; j < E; j += 4) *reinterpret_cast<float4*>(p + j) = make_float4(f[j], f[j + 1], f[j + 2], f[j + 3]);
      return;
    }
  } else if constexpr (E == 2) {
    if (aligned) {
      *reinterpret_cast<float2*>(p) = make_float2(f[0], f[1]);
      return;
    }
  }
#pragma unroll
  for (int j = 0; j < E; ++j) p[j] = f[j];
}

// ---- byte words (packed codes) ---------------------------------------------------------------
// Load/store NB (1, 2, 4 or 8) little-endian bytes as the low bytes of a uint64.
template <int NB>
__device__ __forceinline__ uint64_t load_bytes(const uint8_t* p, bool aligned) {
  static_assert(NB == 1 || NB == 2 || NB == 4 || NB == 8, "NB");
  if (aligned || NB == 1) {
    if constexpr (NB == 8) { uint2 w = __ldg(reinterpret_cast<const uint2*>(p)); return (uint64_t(w.y) << 32) | w.x; }
    if constexpr (NB == 4) return __ldg(reinterpret_cast<const unsigned int*>(p));
    if constexpr (NB == 2) return __ldg(reinterpret_cast<const unsigned short*>(p));
    if constexpr (NB == 1) return __ldg(p);
  }
  uint64_t w = 0;
#pragma unroll
  for (int j = 0; j < NB; ++j) w |= uint64_t(p[j]) << (8 * j);
  return w;
}

template <int NB>
__device__ __forceinline__ void store_bytes(uint8_t* p, uint64_t w, bool aligned) {
  static_assert(NB == 1 || NB == 2 || NB == 4 || NB == 8, "NB");
  if (aligned || NB == 1) {
    if constexpr (NB == 8) { *reinterpret_cast<uint2*>(p) = make_uint2(unsigned(w), unsigned(w >> 32)); return; }
    if constexpr (NB == 4) { *reinterpret_cast<unsigned int*>(p) = unsigned(w); return; }
    if constexpr (NB == 2) { *reinterpret_cast<unsigned short*>(p) = static_cast<unsigned short>(w); return; }
    if constexpr (NB == 1) { *p = static_cast<uint8_t>(w); return; }
  }
#pragma unroll
  for (int j = 0; j < NB; ++j) p[j] = static_cast<uint8_t>(w >> (8 * j));
}

// ---- code packing ----------------------------------------------------------------------------
// k = 8/BITS codes per byte along the channel dim, first channel in the lowest bits: channel j of
// an E-channel chunk lives at bit j*BITS of the little-endian word (byte j/k, bits (j%k)*BITS).
template <int BITS, int E>
__device__ __forceinline__ uint64_t pack_codes(const uint32_t (&q)[E]) {
  static_assert(E * BITS <= 64 && (E * BITS) % 8 == 0, "a chunk must be whole bytes");
  constexpr uint32_t kMask = (1u << BITS) - 1;  // codes are < 2^BITS; the mask lets LOP3 fuse
  if constexpr (E * BITS <= 32) {
    uint32_t w = 0;
#pragma unroll
    for (int j = 0; j < E; ++j) w |= (q[j] & kMask) << (j * BITS);
    return w;
  } else {
    uint32_t lo = 0, hi = 0;
#pragma unroll
    for (int j = 0; j < E; ++j) {
      if (j * BITS < 32) lo |= (q[j] & kMask) << (j * BITS);
      else hi |= (q[j] & kMask) << (j * BITS - 32);
    }
    return (uint64_t(hi) << 32) | lo;
  }
}

template <int BITS, int E>
__device__ __forceinline__ void unpack_codes(uint64_t w, uint32_t (&q)[E]) {
  constexpr uint64_t kMask = (uint64_t(1) << BITS) - 1;
#pragma unroll
  for (int j = 0; j < E; ++j) q[j] = static_cast<uint32_t>((w >> (j * BITS)) & kMask);
}

// As pack_code_bytes for one E-code chunk of E*BITS/8 = 1, 2, 4 or 8 bytes, returned as the low
// bytes of a little-endian word (codes in the low byte of each q, upper bytes ignored).
template <int BITS, int E>
__device__ __forceinline__ uint64_t pack_code_word(const uint32_t (&q)[E]) {
  constexpr int K = 8 / BITS, NBY = E / K;
  static_assert(E % K == 0 && (NBY == 1 || NBY == 2 || NBY == 4 || NBY == 8), "whole bytes");
  uint32_t b[NBY];
#pragma unroll
  for (int i = 0; i < NBY; ++i) {
    uint32_t v = q[i * K];
#pragma unroll
    for (int k = 1; k < K; ++k) v += q[i * K + k] << (k * BITS);
    b[i] = v;
  }
  if constexpr (NBY == 1) return b[0] & 0xffu;
  if constexpr (NBY == 2) return __byte_perm(b[0], b[1], 0x0040) & 0xffffu;
  if constexpr (NBY == 4) return __byte_perm(__byte_perm(b[0], b[1], 0x0040), __byte_perm(b[2], b[3], 0x0040), 0x5410);
  if constexpr (NBY == 8) {
    const uint32_t lo = __byte_perm(__byte_perm(b[0], b[1], 0x0040), __byte_perm(b[2], b[3], 0x0040), 0x5410);
    const uint32_t hi = __byte_perm(__byte_perm(b[4], b[5], 0x0040), __byte_perm(b[6], b[7], 0x0040), 0x5410);
    return (uint64_t(hi) << 32) | lo;
  }
}

// ---- packed min / max of two 16-bit floats (bf16x2 / f16x2 words) ------------------------------
// A running min/max over raw words of two channels: one HMNMX2 instruction per two elements and
// no widening (a min/max picks one of its inputs, so it is exact in the storage type; NaN
// propagates as in min_nan). Words hold the first channel in the low half.
template <typename Tr> struct Half2MinMax {
  static constexpr bool kBf16 = std::is_same<Tr, BF16>::value;
  static constexpr bool kOk = kBf16 || std::is_same<Tr, F16>::value;
  static constexpr uint32_t kPosInf = kBf16 ? 0x7F807F80u : 0x7C007C00u;
  static constexpr uint32_t kNegInf = kBf16 ? 0xFF80FF80u : 0xFC00FC00u;
  // mn = min(mn, a), mx = max(mx, b), per half
  __device__ __forceinline__ static void update(uint32_t& mn, uint32_t& mx, uint32_t a, uint32_t b) {
    if constexpr (kBf16) {
      asm("min.NaN.bf16x2 %0, %0, %2;\n\tmax.NaN.bf16x2 %1, %1, %3;" : "+r"(mn), "+r"(mx) : "r"(a), "r"(b));
    } else {
      asm("min.NaN.f16x2 %0, %0, %2;\n\tmax.NaN.f16x2 %1, %1, %3;" : "+r"(mn), "+r"(mx) : "r"(a), "r"(b));
    }
  }
};

// Word j (channels 2j, 2j+1) of a vector of 16-bit elements.
template <typename Tr, int E>
__device__ __forceinline__ uint32_t half2_word(const Vec<Tr, E>& v, int j) {
  return static_cast<uint32_t>(v.e[2 * j]) | (static_cast<uint32_t>(v.e[2 * j + 1]) << 16);
}

// ---- NaN-propagating min / max (as torch.amin / amax) ------------------------------------------
// One FMNMX.NAN instruction on sm_80+ (PTX min.NaN / max.NaN).
template <bool kMax>
__device__ __forceinline__ float minmax_nan(float a, float b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  float r;
  if constexpr (kMax) {
    asm("max.NaN.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  } else {
    asm("min.NaN.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  }
  return r;
#else
  return ((kMax ? a > b : a < b) || a != a) ? a : b;
#endif
}
__device__ __forceinline__ float min_nan(float a, float b) { return minmax_nan<false>(a, b); }
__device__ __forceinline__ float max_nan(float a, float b) { return minmax_nan<true>(a, b); }

// The NaN-propagating running min / max of each of E channels over one more vector (token groups).
template <typename Tr, int E>
__device__ __forceinline__ void minmax_update(const Vec<Tr, E>& v, float (&mn)[E], float (&mx)[E]) {
  float f[E];
  raw_to_float<Tr, E>(v, f);
#pragma unroll
  for (int j = 0; j < E; ++j) { mn[j] = min_nan(mn[j], f[j]); mx[j] = max_nan(mx[j], f[j]); }
}

// ---- reciprocal of a per-group constant -------------------------------------------------------
// The spec quantizes by multiplying with a reciprocal computed once per group / scale (IEEE
// division), clamped to FLT_MAX so that a zero or subnormal divisor gives finite products:
// inv = min(num / den, FLT_MAX). Per element that leaves one FMUL.
__device__ __forceinline__ float safe_recip(float num, float den) {
  return fminf(__fdiv_rn(num, den), 3.402823466e38f);  // a NaN quotient stays... fminf drops it: den > 0 here
}

constexpr float kFltMin = 1.17549435e-38f;  // 2^-126, the smallest normal float

// ---- integer group quantization (docs/quant-spec.md, "Integer formats") ----------------------
constexpr float kInvMax = 8.50705917e37f;  // 2^126 = 1 / FLT_MIN: the clamp of inv

// scale of a group whose range does not overflow and is not tiny: (mx - mn) / qmax (IEEE).
__device__ __forceinline__ float int_group_scale(float mn, float mx, int qmax) {
  return __fdiv_rn(__fsub_rn(mx, mn), static_cast<float>(qmax));
}

// One group's quantization constants.
struct IntGroup {
  float mn;        // zero point: the finite values' min (0 if the group has none)
  float p, mnp;    // range pre-scale (0.5 where mx - mn overflows, else 1) and mn * p
  float scale;     // (mx p - mn p) / qmax / p, at least FLT_MIN unless 0
  float inv;       // min(qmax / (mx p - mn p), 2^126)
  bool nonzero;    // scale > 0 (else every code is 0)
  bool fast;       // nonzero, p == 1, inv < 2^126 and no non-finite x in the group: no clamp needed
};

// From the group's FINITE values' min / max (mn > mx or NaN: none); nonfinite: the group holds
// an Inf or NaN (its codes then take the saturating path).
__device__ __forceinline__ IntGroup make_int_group(float mn, float mx, int qmax, bool nonfinite = false) {
  IntGroup g;
  if (!(mn <= mx)) mn = mx = 0.f;
  g.mn = mn;
  g.p = fabsf(__fsub_rn(mx, mn)) <= 3.402823466e38f ? 1.f : 0.5f;
  g.mnp = __fmul_rn(mn, g.p);
  const float rng = __fsub_rn(__fmul_rn(mx, g.p), g.mnp);
  float s = __fdiv_rn(__fdiv_rn(rng, static_cast<float>(qmax)), g.p);
  if (s > 0.f && s < kFltMin) s = kFltMin;
  g.scale = s;
  g.nonzero = s > 0.f;
  g.inv = fminf(__fdiv_rn(static_cast<float>(qmax), rng), kInvMax);
  g.fast = g.nonzero && !nonfinite && g.p == 1.f && g.inv < kInvMax;
  return g;
}

// Fast path (g.fast: finite x of the group, p = 1): q = floor((x - mn) * inv + 0.5), IEEE sub /
// mul / add, no FMA contraction. floor(v) is taken from the bits of v + 2^23 rounded down (a
// full-rate FADD instead of FRND + F2I): x - mn >= 0 and (x - mn) * inv <= qmax (1 + 2^-22), so v
// is in [0.5, qmax + 1) and needs no clamp.
__device__ __forceinline__ uint32_t int_quantize_fast(float x, const IntGroup& g) {
  const float v = __fadd_rn(__fmul_rn(__fsub_rn(x, g.mn), g.inv), 0.5f);
  return __float_as_uint(__fadd_rd(v, 0x1p23f)) - 0x4B000000u;
}

// General path: 0 if !(scale > 0), else floor(sat(fma(x, p, -mn p) * inv + 0.5)) with sat the
// clamp to [0, qmax] that takes NaN to 0 (+Inf -> qmax, -Inf -> 0). With p = 1 the FMA is the
// fast path's subtraction.
__device__ __forceinline__ uint32_t int_quantize(float x, const IntGroup& g, float qmax) {
  if (!g.nonzero) return 0u;
  if (g.fast) return int_quantize_fast(x, g);
  float v = __fadd_rn(__fmul_rn(__fmaf_rn(x, g.p, -g.mnp), g.inv), 0.5f);
  v = fminf(fmaxf(v, 0.f), qmax);  // a NaN v becomes 0
  return __float_as_uint(__fadd_rd(v, 0x1p23f)) - 0x4B000000u;
}

// x where finite, else NaN (fminf / fmaxf then skip it): the finite values' min / max.
__device__ __forceinline__ float finite_or_nan(float x) {
  return fabsf(x) <= 3.402823466e38f ? x : __int_as_float(0x7fffffff);
}
__device__ __forceinline__ bool is_finite2(float a, float b) {
  return fabsf(a) <= 3.402823466e38f && fabsf(b) <= 3.402823466e38f;
}

// int_quantize for a single value of a group whose constants are not kept (fused kernels).
__device__ __forceinline__ uint32_t int_quantize_one(float x, float mn, float mx, float qmax) {
  return int_quantize(x, make_int_group(mn, mx, int(qmax), true), qmax);
}

// float(q) for q < 2^23, exact: the bits of 2^23 + q minus 2^23 (LOP3 + FADD at full rate; I2F
// runs on a quarter-rate pipe and was the dequantize kernels' top math stall).
__device__ __forceinline__ float code_to_float(uint32_t q) {
  return __fsub_rn(__uint_as_float(0x4B000000u | q), 0x1p23f);
}

// x_hat = fma(q, scale, zero) in float32, one rounding (the spec; the reference's fma32): a group
// whose range exceeds FLT_MAX decodes without overflow.
__device__ __forceinline__ float int_dequantize(uint32_t q, float scale, float zero) {
  return __fmaf_rn(code_to_float(q), scale, zero);
}

// int_quantize_fast without the final subtraction: the float bits of 2^23 + q, whose low byte is
// the code q (<= 255) and whose upper bytes are those of 2^23. pack_code_bytes ignores them.
__device__ __forceinline__ uint32_t int_code_bits_fast(float x, const IntGroup& g) {
  const float v = __fadd_rn(__fmul_rn(__fsub_rn(x, g.mn), g.inv), 0.5f);
  return __float_as_uint(__fadd_rd(v, 0x1p23f));
}

// Pack 32/BITS... codes held in the LOW BYTE of each word (upper bytes ignored) into 32-bit
// words, first code in the lowest bits: k = 8/BITS codes per byte are combined with shifted adds
// (the upper-byte garbage only carries upward), then four bytes are gathered with PRMT.
template <int BITS, int N>
__device__ __forceinline__ void pack_code_bytes(const uint32_t (&q)[N], uint32_t (&w)[N * BITS / 32]) {
  constexpr int K = 8 / BITS;
  static_assert(N % (4 * K) == 0, "whole words");
#pragma unroll
  for (int o = 0; o < N * BITS / 32; ++o) {
    uint32_t b[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      uint32_t v = q[(o * 4 + i) * K];
#pragma unroll
      for (int k = 1; k < K; ++k) v += q[(o * 4 + i) * K + k] << (k * BITS);
      b[i] = v;
    }
    w[o] = __byte_perm(__byte_perm(b[0], b[1], 0x0040), __byte_perm(b[2], b[3], 0x0040), 0x5410);
  }
}

// ---- fp8 e4m3 --------------------------------------------------------------------------------
constexpr float kFp8Max = 448.f;

// scale from amax over the scope's finite values: amax / 448 (IEEE), at least FLT_MIN (so that
// 1 / scale is finite and tiny normal inputs keep e4m3's relative precision); an amax of 0 (or
// NaN: not produced by the amax helpers) gives 1.
__device__ __forceinline__ float fp8_scale_from_amax(float amax) {
  float s = __fdiv_rn(amax, kFp8Max);
  return s > 0.f ? fmaxf(s, kFltMin) : 1.f;
}

// max |v| over the finite values of v (the spec's amax: +-Inf and NaN do not set a scale). The
// common case is the NaN-propagating max as before (one FMNMX per element); only where that is
// not finite (an Inf or NaN among them: rare) the finite values are reduced again.
template <int E>
__device__ __forceinline__ float amax_finite(const float (&v)[E]) {
  float m = 0.f;
#pragma unroll
  for (int j = 0; j < E; ++j) m = max_nan(m, fabsf(v[j]));
  if (!(m <= 3.402823466e38f)) {
    m = 0.f;
#pragma unroll
    for (int j = 0; j < E; ++j) {
      const float a = fabsf(v[j]);
      if (a <= 3.402823466e38f) m = fmaxf(m, a);
    }
  }
  return m;
}

// clamp(x * inv, -448, 448) with inv = fp8_inv(scale) = min(1 / scale, FLT_MAX) (IEEE); NaN stays
// NaN, as torch.clamp; an overflowing product saturates.
__device__ __forceinline__ float fp8_clamp(float v) { return min_nan(max_nan(v, -kFp8Max), kFp8Max); }
__device__ __forceinline__ float fp8_inv(float scale) { return safe_recip(1.f, scale); }
// The clamp is implied by the encoders below (cvt ... .satfinite: beyond +-448 -> +-448, NaN ->
// NaN), so the quantize kernels multiply and encode; fp8_prescale keeps the spec's form for
// callers that need the clamped float.
__device__ __forceinline__ float fp8_prescale(float x, float inv) { return fp8_clamp(__fmul_rn(x, inv)); }

// e4m3 round-to-nearest-even of an already-clamped value (one byte).
__device__ __forceinline__ uint32_t fp8_encode(float v) {
  return static_cast<uint32_t>(__nv_cvt_float_to_fp8(v, __NV_SATFINITE, __NV_E4M3));
}

// Two at once (one cvt instruction on sm_89+): a in the low byte, b in the high byte.
__device__ __forceinline__ uint32_t fp8_encode2(float a, float b) {
  return static_cast<uint32_t>(__nv_cvt_float2_to_fp8x2(make_float2(a, b), __NV_SATFINITE, __NV_E4M3));
}

// e4m3 byte -> float (exact: e4m3 is a subset of fp16).
__device__ __forceinline__ float fp8_decode(uint32_t byte) {
  __half_raw h = __nv_cvt_fp8_to_halfraw(static_cast<__nv_fp8_storage_t>(byte), __NV_E4M3);
  return __half2float(__half(h));
}

// x_hat = float(q) * scale.
__device__ __forceinline__ float fp8_dequantize(uint32_t byte, float scale) {
  return __fmul_rn(fp8_decode(byte), scale);
}

// Decode a word of E codes that share one scale (and zero point): MODE 0 = fp8 bytes, else
// BITS-bit integer codes, first code in the low bits.
template <int MODE, int E>
__device__ __forceinline__ void decode_codes(uint64_t w, float scale, float zero, float (&f)[E]) {
  if constexpr (MODE == 0) {
#pragma unroll
    for (int j = 0; j < E; ++j) f[j] = fp8_dequantize(uint32_t(w >> (8 * j)) & 0xffu, scale);
  } else {
    uint32_t q[E];
    unpack_codes<MODE, E>(w, q);
#pragma unroll
    for (int j = 0; j < E; ++j) f[j] = int_dequantize(q[j], scale, zero);
  }
}

// Encode E values (already divided+clamped) into E bytes of a little-endian word.
template <int E>
__device__ __forceinline__ uint64_t fp8_pack(const float (&v)[E]) {
  uint64_t w = 0;
  if constexpr (E % 2 == 0) {
#pragma unroll
    for (int j = 0; j < E; j += 2) w |= uint64_t(fp8_encode2(v[j], v[j + 1])) << (8 * j);
  } else {
#pragma unroll
    for (int j = 0; j < E; ++j) w |= uint64_t(fp8_encode(v[j])) << (8 * j);
  }
  return w;
}

// ---- fast unsigned division by a runtime constant (n < 2^31) -------------------------------------
// n / d = (umulhi(n, m) + n) >> s, with s = ceil(log2 d), m = floor(2^32 (2^s - d) / d) + 1.
struct FastDiv {
  uint32_t d = 1, m = 0, s = 0;
  FastDiv() = default;
  __host__ explicit FastDiv(uint32_t div) : d(div) {
    s = 0;
    while ((uint64_t(1) << s) < div) ++s;
    m = static_cast<uint32_t>(((uint64_t(1) << 32) * ((uint64_t(1) << s) - div)) / div + 1);
  }
  __device__ __forceinline__ uint32_t div(uint32_t n) const { return (__umulhi(n, m) + n) >> s; }
  __device__ __forceinline__ void divmod(uint32_t n, uint32_t& q, uint32_t& r) const {
    q = div(n);
    r = n - q * d;
  }
};

// ---- warp reductions over aligned groups of P lanes (P a power of two <= 32) -----------------
// Every lane of the warp must call these (full mask); lanes outside the group's active range
// hold the neutral element (+inf for min, -inf / 0 for max) so padding does not change results.
__device__ __forceinline__ float group_min(float v, int P) {
  for (int off = 1; off < P; off <<= 1) v = min_nan(v, __shfl_xor_sync(0xffffffffu, v, off));
  return v;
}
__device__ __forceinline__ float group_max(float v, int P) {
  for (int off = 1; off < P; off <<= 1) v = max_nan(v, __shfl_xor_sync(0xffffffffu, v, off));
  return v;
}

}  // namespace kvk

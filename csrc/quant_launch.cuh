// quant_launch.cuh -- internal to the quant .cu files (not part of the API, see quant.h): the
// constants, the host-side dispatch helpers and the launchers of each kernel family:
//   quant_rows.cu        channel groups and fp8 rows (launch_rows_quant / launch_rows_dequant)
//   quant_token.cu       int token groups (launch_tok)
//   quant_fp8.cu         fp8 tensor/head amax + finalize (launch_fp8_scale)
//   quant_fp8_onepass.cu fp8 tensor/head in one pass (launch_fp8_resident)
//   quant.cu             the public extern "C" entry points (quant.h), which pick among them
#pragma once

#include "quant.h"
#include "quant_math.cuh"

#include <algorithm>
#include <cstdlib>
#include <type_traits>

namespace kvk {

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
// Host side: dispatch helpers
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

inline int dtype_size(int dt) { return dt == kF32 ? 4 : 2; }
inline bool ptr_aligned(const void* p, int64_t bytes) { return reinterpret_cast<uintptr_t>(p) % uint64_t(bytes) == 0; }
// A stride is irrelevant where its dim has size 1 (its index is always 0).
inline bool stride_ok(int64_t stride, int64_t dim, int64_t e) { return dim == 1 || stride % e == 0; }
inline int ilog2(int64_t v) { int r = 0; while ((int64_t(1) << r) < v) ++r; return r; }  // ceil(log2 v)
inline uint32_t ceil_div_u32(uint64_t a, uint64_t b) { return uint32_t((a + b - 1) / b); }

// Vector width for groups of G channels (G = D for fp8 rows): 16 bytes of input when D and G
// allow it, else 8/bits (whole code bytes per vector); 0 if neither works.
inline int pick_vec(int dt, int64_t D, int64_t G, int mode, bool limit_lanes) {
  const int emax = 16 / dtype_size(dt), k = codes_per_byte(mode);
  for (int e : {emax, k}) {
    if (e < k || D % e || (G % e && e % G)) continue;
    if (limit_lanes && std::max<int64_t>(G, e) / e > kItems * 32) continue;  // <= kItems vectors x 32 lanes
    return e;
  }
  return 0;
}

// Layers per launch so that `per_layer` * layers stays < 2^31; 0 if one layer is too many.
inline int64_t layers_per_launch(int64_t L, int64_t per_layer) {
  if (per_layer > kMaxCount) return 0;
  return std::max<int64_t>(1, std::min<int64_t>(L, kMaxCount / std::max<int64_t>(per_layer, 1)));
}

inline bool dims_ok(int64_t L, int64_t T, int64_t H, int64_t D) {
  return L > 0 && T > 0 && H > 0 && D > 0 && T <= kMaxCount && H <= kMaxCount && D <= 65536;
}

// fp8 scale entries per layer for a scope.
inline int64_t fp8_scale_per_layer(int scope, int64_t T, int64_t H) { return scope == 0 ? 1 : scope == 1 ? H : T * H; }

// ---- fast paths (dense, 16-byte-aligned rows) ---------------------------------------------------
inline bool is_pow2(int64_t v) { return v > 0 && (v & (v - 1)) == 0; }

// Developer A/B switches (bench/perf notes): KVK_FAST=0 disables the dense fast paths,
// KVK_TOK_SPLIT=0 the two-lane token kernel, KVK_FP8_RESIDENT=0 the one-pass fp8 kernel. Read once per
// process.
inline bool kvk_env_off(const char* name) {
  const char* v = std::getenv(name);
  return v && v[0] == '0';
}

// Whether x / out rows are 16-byte aligned (pointer and every stride that matters), and whether
// they are LINEAR (densely packed [L, T, H, D]).
inline bool fast_layout(const void* p, int sz, int64_t L, int64_t T, int64_t H, int64_t D, int64_t sL, int64_t sT,
                 int64_t sH, bool& linear) {
  const int64_t ve = 16 / sz;
  linear = (H == 1 || sH == D) && (T == 1 || sT == H * D) && (L == 1 || sL == T * H * D);
  return ptr_aligned(p, 16) && stride_ok(sL, L, ve) && stride_ok(sT, T, ve) && stride_ok(sH, H, ve);
}

inline bool fast_meta_ok(const uint8_t* codes, const float* scale, const float* zero) {
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

// ================================================================================================
// Launchers (one family per file; cudaErrorNotSupported where the case needs another path)
// ================================================================================================
cudaError_t launch_rows_quant(const void* x, int dt, int64_t L, int64_t T, int64_t H, int64_t D, int64_t sL,
                              int64_t sT, int64_t sH, uint8_t* codes, float* scale, float* zero, int mode,
                              int64_t G, int fp8_scope, bool fp8_reduce, cudaStream_t stream);
cudaError_t launch_rows_dequant(const uint8_t* codes, const float* scale, const float* zero, void* out, int dt,
                                int64_t L, int64_t T, int64_t H, int64_t D, int64_t osL, int64_t osT, int64_t osH,
                                int mode, int64_t G, int fp8_scope, cudaStream_t stream);
cudaError_t launch_tok(bool quant, const void* x, void* out, int dt, int64_t L, int64_t T, int64_t H, int64_t D,
                       int64_t sL, int64_t sT, int64_t sH, uint8_t* codes, float* scale, float* zero, int bits,
                       int64_t G, cudaStream_t stream);
cudaError_t launch_fp8_scale(const void* x, int dt, int64_t L, int64_t T, int64_t H, int64_t D, int64_t sL,
                             int64_t sT, int64_t sH, float* scale, int scope, cudaStream_t stream);
cudaError_t launch_fp8_resident(const void* x, int dt, int64_t L, int64_t T, int64_t H, int64_t D, int64_t sL,
                                int64_t sT, int64_t sH, uint8_t* codes, float* scale, int scope, uint32_t* ws,
                                int64_t ws_words, cudaStream_t stream);

}  // namespace kvk

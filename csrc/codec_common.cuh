// csrc/codec_common.cuh -- shared definitions of the entropy coders (codec_ac.cuh, codec_rans.cuh).
// Written once for the CPU (g++, csrc/codec_cpu.cpp) and the GPU (nvcc, csrc/codec.cu).
#pragma once

#include <stdint.h>

#if defined(__CUDACC__)
#define KVK_HD __host__ __device__ __forceinline__
#else
#define KVK_HD inline
#endif

namespace kvk_codec {

// Status bits (OR-ed into one int32; kvkernels/reference/codec.py ERR_*).
enum : int32_t {
  ERR_OFFSETS = 1,
  ERR_TABLE = 2,
  ERR_TRUNCATED = 4,
  ERR_TRAILING = 8,
  ERR_SYMBOL = 16,
  ERR_CAPACITY = 32,
  ERR_TABLE_ID = 64,
  ERR_SEGMENT = 128,  // decode into pages: a segment descriptor outside the caches / slots
};

constexpr int LANES = 32;

KVK_HD int clz32(uint32_t x) {
#if defined(__CUDA_ARCH__)
  return __clz(x);
#else
  return x ? __builtin_clz(x) : 32;
#endif
}

KVK_HD int popc32(uint32_t x) {
#if defined(__CUDA_ARCH__)
  return __popc(x);
#else
  return __builtin_popcount(x);
#endif
}

KVK_HD uint32_t low_mask(int n) { return (uint32_t)((1ull << n) - 1); }  // n in [0, 32]

KVK_HD uint32_t load_u16le(const uint8_t* p) { return (uint32_t)p[0] | ((uint32_t)p[1] << 8); }
KVK_HD uint32_t load_u32le(const uint8_t* p) { return load_u16le(p) | (load_u16le(p + 2) << 16); }
KVK_HD void store_u16le(uint8_t* p, uint32_t v) { p[0] = (uint8_t)v; p[1] = (uint8_t)(v >> 8); }
KVK_HD void store_u32le(uint8_t* p, uint32_t v) { store_u16le(p, v & 0xFFFF); store_u16le(p + 2, v >> 16); }

// Offsets of stream i: valid when 0 <= lo <= hi <= payload size (offsets[0] must be 0: checked
// by the callers for stream 0).
KVK_HD bool stream_bounds(const int64_t* offsets, int64_t i, int64_t nbytes, int64_t* lo, int64_t* hi) {
  *lo = offsets[i];
  *hi = offsets[i + 1];
  return *lo >= 0 && *lo <= *hi && *hi <= nbytes && (i != 0 || *lo == 0);
}

// Worst-case stream sizes (reference.codec.ac_stream_capacity / rans_block_capacity).
KVK_HD int64_t ac_stream_capacity(int64_t N) { return (17 * N + 2 + 7) / 8 + 1; }
KVK_HD int64_t rans_block_capacity(int64_t N, int64_t n_act) { return 4 * n_act + 2 * N * n_act; }

}  // namespace kvk_codec

namespace kvk_codec {

// ---- float32 -> bf16 / fp16 bits, round to nearest even (the same code on CPU and GPU) ----
KVK_HD uint32_t f32_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  __builtin_memcpy(&u, &f, 4);
  return u;
#endif
}

KVK_HD uint16_t f32_to_bf16(float f) {
  uint32_t x = f32_bits(f);
  if ((x & 0x7FFFFFFFu) > 0x7F800000u) return (uint16_t)((x >> 16) | 0x40);  // NaN stays NaN
  return (uint16_t)((x + 0x7FFFu + ((x >> 16) & 1u)) >> 16);
}

KVK_HD uint16_t f32_to_f16(float f) {
  const uint32_t x = f32_bits(f);
  const uint32_t sign = (x >> 16) & 0x8000u, ax = x & 0x7FFFFFFFu;
  if (ax >= 0x7F800000u) return (uint16_t)(sign | (ax > 0x7F800000u ? 0x7E00u : 0x7C00u));
  if (ax >= 0x477FF000u) return (uint16_t)(sign | 0x7C00u);  // >= 65520: infinity
  if (ax < 0x38800000u) {                                      // half subnormal or zero
    if (ax < 0x33000000u) return (uint16_t)sign;
    const int e = (int)(ax >> 23);
    const uint32_t m = (ax & 0x7FFFFFu) | 0x800000u;
    const int shift = 126 - e;
    uint32_t r = m >> shift;
    const uint32_t rem = m & ((1u << shift) - 1), half = 1u << (shift - 1);
    if (rem > half || (rem == half && (r & 1u))) ++r;
    return (uint16_t)(sign | r);
  }
  const uint32_t v = ax - (112u << 23);
  uint32_t r = v >> 13;
  const uint32_t rem = v & 0x1FFFu;
  if (rem > 0x1000u || (rem == 0x1000u && (r & 1u))) ++r;
  return (uint16_t)(sign | r);
}

// out dtype codes (kvkernels/cuda/quant.py _DTYPE_CODE): 0 float32, 1 float16, 2 bfloat16
KVK_HD void store_out(void* out, int64_t idx, int dtype, float v) {
  if (dtype == 0) {
    static_cast<float*>(out)[idx] = v;
  } else if (dtype == 1) {
    static_cast<uint16_t*>(out)[idx] = f32_to_f16(v);
  } else {
    static_cast<uint16_t*>(out)[idx] = f32_to_bf16(v);
  }
}

KVK_HD float fmul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;  // built with -ffp-contract=off
#endif
}

KVK_HD float fadd_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

// The fused decode's map (docs/codec-spec.md, "Fused decode"); null pointers = absent.
struct DequantArgs {
  const float* lut;   // [K, bins]
  const float* s_tok; // [S, N] or null
  const float* s_ch;  // [S, C] or null
  const float* z_ch;  // [S, C] or null
  void* out;          // element (s, n, c) at s * os_s + n * os_n + c
  int dtype;
  int64_t os_s, os_n;
};

}  // namespace kvk_codec

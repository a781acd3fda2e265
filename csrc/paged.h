// paged.h -- host launchers for paged KV scatter / gather (docs/paged.md; the torch reference
// kvkernels/reference/paged.py is the spec).
//
// Plain CUDA C++: raw pointers, int64 strides in ELEMENTS (bytes for codes), an explicit
// stream, cudaError_t back. No torch, no Python (python/paged.cpp binds these).
//
// The caches: R = num_kv * L per-(kv, layer) caches, base addresses in `ptrs` (a DEVICE array of
// R int64, kv-major), element (block b, token-in-block t, head h, channel d) of cache r at
//   ptrs[r] + b*st[kv][0] + t*st[kv][1] + h*st[kv][2] + (d / x)*st[kv][3] + (d % x)*st[kv][4]
// (kv = r / L), elements of cache_dtype (0 fp32, 1 fp16, 2 bf16, 3 fp8 e4m3 bytes).
// Token i (< T) of the flat side goes to / comes from slot s = slots[i] (int32 or int64):
// s < 0 skips it; s >= NB * BS skips it and adds 1 to *oob_count (int32 or int64, nullable).
//
// The flat side (scatter source / gather destination), of R rows [T_in, H, D]:
//   kind 0: values of flat_dtype (0/1/2) at flat + kv*f_kv + l*f_l + t*f_t + h*f_h + d (elements);
//   kind 1: int codes of `bits` (scatter only): byte (kv*f_kv + l*f_l + t*f_t + h*f_h + d*bits/8),
//           value = code * scale[i] + zero[i];
//   kind 2: fp8 codes (scatter only): byte as kind 0 with 1-byte elements, value = e4m3 * scale[i];
//   with i = r*a_row + (t / tg)*a_t + h*a_h + (d / dg)*a_d (float32 scale / zero).
// fp8 caches: value v is stored as e4m3(clamp(v * min(1/s, FLT_MAX), +-448)) and read back as
// e4m3 * s, with s = k_scale[l*ks_l + h*ks_h] (K) / v_scale[l*vs_l + h*vs_h] (V). Other caches:
// v rounded (RNE) to the destination dtype. The flat side may be pinned host memory (UVA).
//
// Grid: work items (cache r, token i), each a token row of one cache, ROWS per block, the grid
// persistent (the blocks resident at once on the current device, grid-striding); when
// max_blocks > 0 the grid is at most max_blocks blocks (a block sits on one SM: an SM bound
// for the pinned-host path) of 1024 threads, grid-striding over the work.
//
// Returns cudaErrorInvalidValue for arguments outside this contract, cudaErrorNotSupported for
// head_dim not a multiple of E = 16 / max(element sizes) (8 for 16-bit, 4 with fp32); launch
// errors as is. Asynchronous on `stream`, never synchronises, reads no device data on the host
// (CUDA-graph capturable).
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct KvkPagedCaches {
  const int64_t* ptrs;    // device [num_kv * L]
  int64_t num_layers, num_kv, num_blocks, block_size, num_heads, head_dim, x;
  int cache_dtype;        // 0 fp32, 1 fp16, 2 bf16, 3 fp8 e4m3
  int64_t st[2][5];       // (block, token, head, dim_outer, dim_inner) for K and V
  int aligned16;          // every ptrs[r] is 16-byte aligned (host-checked)
  const float* k_scale;   // fp8 caches: [L, H] with strides (ks_l, ks_h); else null
  int64_t ks_l, ks_h;
  const float* v_scale;
  int64_t vs_l, vs_h;
} KvkPagedCaches;

typedef struct KvkPagedFlat {
  int kind;               // 0 values, 1 int codes, 2 fp8 codes
  int dtype;              // kind 0: 0 fp32, 1 fp16, 2 bf16
  void* data;             // device or pinned host pointer
  int64_t f_kv, f_l, f_t, f_h;
  int bits;               // kind 1
  const float* scale;     // kinds 1, 2
  const float* zero;      // kind 1
  int64_t tg, dg, a_row, a_t, a_h, a_d;
} KvkPagedFlat;

cudaError_t kvk_paged_scatter(const KvkPagedCaches* caches, const KvkPagedFlat* src, const void* slots,
                              int slots_int64, int64_t T, void* oob_count, int count_int64, int max_blocks,
                              cudaStream_t stream);

// kind 0 destinations only.
cudaError_t kvk_paged_gather(const KvkPagedCaches* caches, const KvkPagedFlat* dst, const void* slots,
                             int slots_int64, int64_t T, void* oob_count, int count_int64, int max_blocks,
                             cudaStream_t stream);

#ifdef __cplusplus
}
#endif

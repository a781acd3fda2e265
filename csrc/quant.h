// quant.h -- host launchers for KV quantize / dequantize (docs/quant-spec.md).
//
// Plain CUDA C++: raw pointers, int64 strides in ELEMENTS, an explicit stream, cudaError_t back.
// No torch, no Python (python/quant.cpp binds these).
//
// Shapes (4-D view, L layers, T tokens, H KV heads, D head_dim):
//   x / out : [L, T, H, D] of dtype (0 fp32, 1 fp16, 2 bf16); D dense (stride 1), the L/T/H
//             strides sL/sT/sH (osL/osT/osH) arbitrary (int64, elements; a stride is ignored
//             where its dim has size 1).
//   codes   : uint8 [L, T, H, D*bits/8], contiguous (fp8: [L, T, H, D] e4m3 bytes).
//   scale, zero : float32, contiguous:
//             int, axis 0 (channel groups of G channels) : [L, T, H, D/G]
//             int, axis 1 (token groups of G tokens)     : [L, ceil(T/G), H, D] (last group partial)
//             fp8 scope 0 (tensor) [L], 1 (head) [L, H], 2 (token_head) [L, T, H]; no zero.
//
// Return values: cudaSuccess; cudaErrorInvalidValue for arguments outside the contract (null
// pointers, bad dtype/bits/axis/scope, non-positive sizes, D not a multiple of 8/bits, G not
// dividing D for channel groups); cudaErrorNotSupported for valid but unsupported cases:
//   * channel groups (int, axis 0) whose size G cannot be split into whole packed bytes per
//     thread: int4 with odd G > 1, int2 with G % 4 != 0 and G != 2 (G = 1, 2 are fine);
//   * more than 128 vectors per group / row: channel groups with G > 128 * E or fp8 rows with
//     D > 128 * E, where E = 16 / sizeof(dtype) (8 for fp16/bf16, 4 for fp32) when D and G are
//     multiples of it, else 8/bits (so G or fp8 D > 1024 for 16-bit inputs, > 512 for fp32);
//   * a single layer with 2^31 or more rows (T*H) or vectors (T*H*D/E) (larger L is split);
//   any launch error (cudaGetLastError) is returned as is.
// All kernels are asynchronous on `stream`, never synchronise, and never read scales on the
// host (CUDA-graph safe).
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

#ifdef __cplusplus
extern "C" {
#endif

// Integer group quantization. bits in {8, 4, 2}; group_size >= 1; axis 0 channel, 1 token.
// Writes codes, scale and zero.
cudaError_t kvk_quantize_int(const void* x, int x_dtype, int64_t L, int64_t T, int64_t H, int64_t D,
                             int64_t sL, int64_t sT, int64_t sH, uint8_t* codes, float* scale, float* zero,
                             int bits, int group_size, int axis, cudaStream_t stream);

// Inverse: out = q * scale + zero (float32, then rounded to out_dtype).
cudaError_t kvk_dequantize_int(const uint8_t* codes, const float* scale, const float* zero, void* out,
                               int out_dtype, int64_t L, int64_t T, int64_t H, int64_t D, int64_t osL,
                               int64_t osT, int64_t osH, int bits, int group_size, int axis,
                               cudaStream_t stream);

// fp8 e4m3. scope 0 tensor, 1 head, 2 token_head. compute_scale: scale = amax/448 (0 -> 1) is
// computed and written; otherwise it is read (must be > 0).
// workspace: nullable scratch of workspace_words uint32 (any content). With compute_scale and
// scope 0/1 and L*(scope ? H : 1)*4*SMs words, dense layers small enough to stay on chip (up to
// 8 MiB of bf16 per layer on a 132-SM GPU) are quantized in one pass over x (one cooperative
// launch); otherwise an amax pass and a quantize pass.
cudaError_t kvk_quantize_fp8(const void* x, int x_dtype, int64_t L, int64_t T, int64_t H, int64_t D,
                             int64_t sL, int64_t sT, int64_t sH, uint8_t* codes, float* scale, int scope,
                             bool compute_scale, uint32_t* workspace, int64_t workspace_words,
                             cudaStream_t stream);

// Inverse: out = float(e4m3) * scale, rounded to out_dtype.
cudaError_t kvk_dequantize_fp8(const uint8_t* codes, const float* scale, void* out, int out_dtype,
                               int64_t L, int64_t T, int64_t H, int64_t D, int64_t osL, int64_t osT,
                               int64_t osH, int scope, cudaStream_t stream);

#ifdef __cplusplus
}
#endif

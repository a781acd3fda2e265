// csrc/blend.h -- RoPE re-rotation of cached keys (blend family), flat and paged. See
// kvkernels/reference/blend.py for the spec. Raw pointers, int64 strides (elements), explicit
// stream; returns cudaError_t. Asynchronous, never synchronises, reads no device data on the
// host (CUDA-graph capturable).
#pragma once
#include <cstdint>

#include <cuda_runtime.h>

// key: [L, T, H, D] with strides (sL, sT, sH, 1), dtype code 0 fp32 / 1 fp16 / 2 bf16 / 3 fp8 e4m3
// (then k_scale: float32 with strides (ssL, ssT, ssH), may be 0). old_pos/new_pos: int64 [T].
// cos_sin: float32 [max_pos, 2*half] contiguous. Tokens with a position outside [0, max_pos) are
// skipped. is_neox: pairs (i, i+half), else (2i, 2i+1).
cudaError_t kvk_rerotate_keys(void* key, int key_dtype, int64_t L, int64_t T, int64_t H, int64_t D, int64_t sL,
                              int64_t sT, int64_t sH, const float* k_scale, int64_t ssL, int64_t ssT, int64_t ssH,
                              const int64_t* old_pos, const int64_t* new_pos, const float* cos_sin,
                              int64_t max_pos, int64_t half, int is_neox, cudaStream_t stream);

// Paged keys (the K caches of a kvkernels.PagedLayout, csrc/paged.h's addressing): layer l's K
// cache starts at ptrs[l] (a DEVICE array of L int64 addresses); element (block b, token-in-block
// o, head h, channel d) at ptrs[l] + b*sB + o*sT + h*sH + (d / x)*sDX + (d % x)*sDI (elements of
// key_dtype). Token t (< T) lives in slot slots[t] (int64; b = slot / BS, o = slot % BS) and moves
// from old_pos[t] to new_pos[t]; a slot outside [0, NB*BS) or a position outside [0, max_pos)
// skips the token. Slots must be distinct. fp8 (dtype 3): k_scale float32 [L, H] with strides
// (ssL, ssH). aligned16: every ptrs[l] is 16-byte aligned (host-checked by the caller; enables
// 16-byte accesses when the strides allow).
cudaError_t kvk_rerotate_keys_paged(const int64_t* ptrs, int key_dtype, int64_t L, int64_t T, int64_t H, int64_t D,
                                    int64_t NB, int64_t BS, int64_t sB, int64_t sT, int64_t sH, int64_t sDX,
                                    int64_t sDI, int64_t x, int aligned16, const int64_t* slots,
                                    const float* k_scale, int64_t ssL, int64_t ssH, const int64_t* old_pos,
                                    const int64_t* new_pos, const float* cos_sin, int64_t max_pos, int64_t half,
                                    int is_neox, cudaStream_t stream);

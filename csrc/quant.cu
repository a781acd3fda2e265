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
//
// Files: quant_launch.cuh (constants, dispatch helpers, the launchers' declarations),
// quant_rows.cu, quant_token.cu, quant_fp8.cu, quant_fp8_onepass.cu (the kernel families above and
// their launchers); this file holds the public entry points of quant.h, which pick among them.
#include "quant_launch.cuh"

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

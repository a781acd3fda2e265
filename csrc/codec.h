// csrc/codec.h -- GPU launchers of the entropy coders (csrc/codec.cu). Raw device pointers,
// C-contiguous tensors (symbols uint8 [S, N, C], cdf int32 [K, bins+1], freq int32 [K, bins],
// table_id int32 [S, C], offsets int64 [n_streams + 1]), explicit stream, cudaError_t returned.
// Status bits (kvk_codec::ERR_*) are OR-ed into *status (device int32) by the kernels.
//
// Encoding is two launches around a prefix sum the caller runs (kvkernels/cuda/codec.py: torch
// cumsum on the device): *_encode writes each stream into its worst-case slot of `scratch` and
// its length into lens[i]; kvk_codec_pack copies the streams to payload[offsets[i]..].
#pragma once

#include <cuda_runtime.h>
#include <stdint.h>

// ac: stream i = s*C + c in scratch[i*cap_stream ..], cap_stream = ac_stream_capacity(N).
cudaError_t kvk_ac_encode(const uint8_t* sym, int64_t S, int64_t N, int64_t C, const int32_t* cdf, int64_t K,
                          int bins, const int32_t* tid, uint8_t* scratch, int64_t cap_stream, int64_t* lens,
                          int32_t* status, cudaStream_t stream);
// Copies stream i (lens[i] bytes) from scratch[i*cap + (from_end ? cap - lens[i] : 0)] to
// payload[offsets[i]]; offsets[n] bounds the payload (payload_cap bytes).
cudaError_t kvk_codec_pack(const uint8_t* scratch, int64_t n, int64_t cap, bool from_end, const int64_t* lens,
                           const int64_t* offsets, uint8_t* payload, int64_t payload_cap, cudaStream_t stream);
cudaError_t kvk_ac_decode(const uint8_t* payload, int64_t nbytes, const int64_t* offsets, const int32_t* cdf,
                          int64_t K, int bins, const int32_t* tid, int64_t S, int64_t N, int64_t C, uint8_t* out,
                          int32_t* status, cudaStream_t stream);

// rans: row tables first (cum uint16 [K, bins+1], ok uint8 [K]) ...
cudaError_t kvk_rans_prep(const int32_t* freq, int64_t K, int bins, int pb, uint16_t* cum, uint8_t* ok,
                          cudaStream_t stream);
// ... block b = s*G + g in scratch[b*cap_block ..] ending at its end, cap_block =
// rans_block_capacity(N, 32).
cudaError_t kvk_rans_encode(const uint8_t* sym, int64_t S, int64_t N, int64_t C, const uint16_t* cum,
                            const uint8_t* ok, int64_t K, int bins, const int32_t* tid, int pb, uint8_t* scratch,
                            int64_t cap_block, int64_t* lens, int32_t* status, cudaStream_t stream);
// Symbols (lut == nullptr: out uint8 [S, N, C] contiguous) or fused dequantization (then the same
// as kvk_rans_decode_dequant with lut_per_segment = 0).
cudaError_t kvk_rans_decode(const uint8_t* payload, int64_t nbytes, const int64_t* offsets, const uint16_t* cum,
                            const uint8_t* ok, int64_t K, int bins, const int32_t* tid, int pb, int64_t S, int64_t N,
                            int64_t C, void* out, const float* lut, const float* s_tok, const float* s_ch,
                            const float* z_ch, int dtype, int64_t os_s, int64_t os_n, int32_t* status,
                            cudaStream_t stream);

// Fused dequantization (csrc/codec_dequant.cu): out element (s, n, c) at s*os_s + n*os_n + c of
// dtype (0 fp32, 1 fp16, 2 bf16) = lut[row, sym] * s_tok[s, n] * s_ch[s, c] + z_ch[s, c] (null =
// absent; float32, no FMA, one rounding), row = tid[s, c] (lut [K, bins]) or s (lut_per_segment:
// lut [S, bins]).
cudaError_t kvk_rans_decode_dequant(const uint8_t* payload, int64_t nbytes, const int64_t* offsets,
                                    const uint16_t* cum, const uint8_t* ok, int64_t K, int bins, const int32_t* tid,
                                    int pb, int64_t S, int64_t N, int64_t C, void* out, const float* lut,
                                    int lut_per_segment, const float* s_tok, const float* s_ch, const float* z_ch,
                                    int dtype, int64_t os_s, int64_t os_n, int32_t* status, cudaStream_t stream);

// rANS decode fused with dequantization, written into paged caches (csrc/codec_dequant.cu; the
// spec is kvkernels/reference/codec.py rans_decode_pages_into). Blocks and the map as
// kvk_rans_decode (lut [K, bins] by table_id, or [S, bins] by segment when lut_per_segment; s_tok
// [S, N]); segments int64 [S, 3] = (cache r, first flat token t0, tokens ns <= N): token n of
// segment s goes to slot slots[t0 + n] (t0 + ns <= T) of cache r of `caches` (csrc/paged.h:
// element addressing, fp8 e4m3 with per-(layer, head) scales). Slots < 0 or >= NB * BS are
// skipped; a malformed descriptor writes nothing and sets ERR_SEGMENT. C must be H * D.
#include "paged.h"
cudaError_t kvk_rans_decode_pages(const uint8_t* payload, int64_t nbytes, const int64_t* offsets, const uint16_t* cum,
                                  const uint8_t* ok, int64_t K, int bins, const int32_t* tid, int pb, int64_t S,
                                  int64_t N, int64_t C, const float* lut, int lut_per_segment, const float* s_tok,
                                  const float* s_ch, const float* z_ch, const int64_t* segments,
                                  const KvkPagedCaches* caches, const void* slots, int slots_int64, int64_t T,
                                  int32_t* status, cudaStream_t stream);

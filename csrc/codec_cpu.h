// csrc/codec_cpu.h -- CPU launchers of the entropy coders (csrc/codec_cpu.cpp), built without
// CUDA as kvkernels._codec_cpu (python/codec_cpu.cpp). Tensors as raw pointers, C-contiguous:
// symbols uint8 [S, N, C], cdf int32 [K, bins + 1], freq int32 [K, bins], table_id int32 [S, C],
// offsets int64 [n_streams + 1]. Every function returns the status bits (kvk_codec::ERR_*).
#pragma once

#include <stdint.h>

#include "codec_common.cuh"

int32_t kvk_cpu_ac_encode(const uint8_t* sym, int64_t S, int64_t N, int64_t C, const int32_t* cdf, int64_t K,
                          int bins, const int32_t* tid, uint8_t* out, int64_t cap, int64_t* offsets);
int32_t kvk_cpu_ac_decode(const uint8_t* payload, int64_t nbytes, const int64_t* offsets, int64_t n_offsets,
                          const int32_t* cdf, int64_t K, int bins, const int32_t* tid, int64_t S, int64_t N,
                          int64_t C, uint8_t* out);
int32_t kvk_cpu_rans_encode(const uint8_t* sym, int64_t S, int64_t N, int64_t C, const int32_t* freq, int64_t K,
                            int bins, const int32_t* tid, int pb, uint8_t* out, int64_t cap, int64_t* offsets);
// out: symbols uint8 [S, N, C] when dq == nullptr, else the dequantized values through dq.
int32_t kvk_cpu_rans_decode(const uint8_t* payload, int64_t nbytes, const int64_t* offsets, int64_t n_offsets,
                            const int32_t* freq, int64_t K, int bins, const int32_t* tid, int pb, int64_t S,
                            int64_t N, int64_t C, uint8_t* out, const kvk_codec::DequantArgs* dq);

// csrc/codec_cpu.cpp -- CPU launchers of the entropy coders: the __host__ __device__ coders of
// codec_ac.cuh / codec_rans.cuh run over every stream in order (one core). Compiled by g++ (no
// CUDA needed) into kvkernels._codec_cpu; see csrc/codec_cpu.h for the conventions.
#include "codec_cpu.h"

#include <string.h>

#include <vector>

#include "codec_ac.cuh"
#include "codec_rans.cuh"

using namespace kvk_codec;

int32_t kvk_cpu_ac_encode(const uint8_t* sym, int64_t S, int64_t N, int64_t C, const int32_t* cdf, int64_t K,
                          int bins, const int32_t* tid, uint8_t* out, int64_t cap, int64_t* offsets) {
  const int64_t Lp = bins + 1;
  std::vector<uint8_t> ok(K);
  for (int64_t k = 0; k < K; ++k) ok[k] = ac_row_ok(cdf + k * Lp, bins);
  int64_t pos = 0;
  int32_t status = 0;
  offsets[0] = 0;
  for (int64_t s = 0; s < S && !status; ++s) {
    for (int64_t c = 0; c < C; ++c) {
      const int64_t i = s * C + c;
      const int64_t k = tid[i];
      if (k < 0 || k >= K) { status = ERR_TABLE_ID; break; }
      if (!ok[k]) { status = ERR_TABLE; break; }
      int64_t len = 0;
      status = ac_encode_stream(sym + s * N * C + c, N, C, cdf + k * Lp, bins, out + pos, cap - pos, &len);
      if (status) break;
      pos += len;
      offsets[i + 1] = pos;
    }
  }
  if (status) memset(offsets, 0, sizeof(int64_t) * (S * C + 1));
  return status;
}

int32_t kvk_cpu_ac_decode(const uint8_t* payload, int64_t nbytes, const int64_t* offsets, int64_t n_offsets,
                          const int32_t* cdf, int64_t K, int bins, const int32_t* tid, int64_t S, int64_t N,
                          int64_t C, uint8_t* out) {
  memset(out, 0, (size_t)(S * N * C));
  if (n_offsets != S * C + 1) return ERR_OFFSETS;
  const int64_t Lp = bins + 1;
  std::vector<uint8_t> ok(K);
  for (int64_t k = 0; k < K; ++k) ok[k] = ac_row_ok(cdf + k * Lp, bins);
  int32_t status = 0;
  for (int64_t s = 0; s < S; ++s) {
    for (int64_t c = 0; c < C; ++c) {
      const int64_t i = s * C + c;
      int64_t lo, hi;
      if (!stream_bounds(offsets, i, nbytes, &lo, &hi)) { status |= ERR_OFFSETS; continue; }
      const int64_t k = tid[i];
      if (k < 0 || k >= K) { status |= ERR_TABLE_ID; continue; }
      if (!ok[k]) { status |= ERR_TABLE; continue; }
      status |= ac_decode_stream(payload + lo, hi - lo, cdf + k * Lp, bins, out + s * N * C + c, N, C);
    }
  }
  return status;
}

namespace {

struct RansTables {
  std::vector<uint16_t> cum;
  std::vector<uint8_t> ok;
  std::vector<uint32_t> slots;  // [K, 2^pb] slot tables, when built
  int64_t stride, M;
  RansTables(const int32_t* freq, int64_t K, int bins, int pb) : cum(K * (bins + 1)), ok(K), stride(bins + 1),
                                                                 M(int64_t(1) << pb) {
    for (int64_t k = 0; k < K; ++k) ok[k] = rans_prep_row(freq + k * bins, bins, pb, cum.data() + k * stride);
  }
  const uint16_t* row(int64_t k) const { return cum.data() + k * stride; }
  // Slot tables pay when each row decodes more symbols than it has slots (and fit 64 MiB).
  void build_slots(int64_t n_symbols, int bins, int pb) {
    const int64_t K = (int64_t)ok.size();
    if (K * M > n_symbols || K * M > (int64_t(16) << 20)) return;
    slots.assign((size_t)(K * M), 0);
    for (int64_t k = 0; k < K; ++k)
      if (ok[k]) rans_build_slot_table(row(k), bins, pb, slots.data() + k * M);
  }
  const uint32_t* slot_row(int64_t k) const { return slots.data() + k * M; }
  // Otherwise coarse tables (2^qbits entries a row) when they pay.
  std::vector<uint8_t> coarse;
  int qbits = 0;
  void build_coarse(int64_t n_symbols, int bins, int pb) {
    const int64_t K = (int64_t)ok.size();
    qbits = pb < 7 ? pb : 7;
    if (!slots.empty() || K * (int64_t(1) << qbits) > n_symbols) return;
    coarse.assign((size_t)(K << qbits), 0);
    for (int64_t k = 0; k < K; ++k)
      if (ok[k]) rans_build_coarse(row(k), bins, pb, qbits, coarse.data() + (k << qbits));
  }
};

// Row pointers of block (s, g); 0 or the status bits.
int32_t block_rows(const RansTables& t, const int32_t* tid, int64_t K, int64_t s, int64_t C, int64_t c0, int na,
                   const uint16_t** rows) {
  for (int j = 0; j < na; ++j) {
    const int64_t k = tid[s * C + c0 + j];
    if (k < 0 || k >= K) return ERR_TABLE_ID;
    if (!t.ok[k]) return ERR_TABLE;
    rows[j] = t.row(k);
  }
  return 0;
}

struct SymSink {
  uint8_t* base;  // &out[s, 0, c0]
  int64_t C;
  void operator()(int64_t n, int j, int sym) const { base[n * C + j] = (uint8_t)sym; }
};

struct DqSink {
  const float* lut_rows[LANES];
  float sch[LANES], zch[LANES];
  const float* stok;  // [N] or null
  bool has_sch, has_z;
  void* out;
  int dtype;
  int64_t base, os_n;  // element index of (s, 0, c0); token stride
  void operator()(int64_t n, int j, int sym) const {
    float v = lut_rows[j][sym];
    if (stok) v = fmul_rn(v, stok[n]);
    if (has_sch) v = fmul_rn(v, sch[j]);
    if (has_z) v = fadd_rn(v, zch[j]);
    store_out(out, base + n * os_n + j, dtype, v);
  }
};

}  // namespace

int32_t kvk_cpu_rans_encode(const uint8_t* sym, int64_t S, int64_t N, int64_t C, const int32_t* freq, int64_t K,
                            int bins, const int32_t* tid, int pb, uint8_t* out, int64_t cap, int64_t* offsets) {
  const int64_t G = (C + LANES - 1) / LANES;
  RansTables t(freq, K, bins, pb);
  std::vector<uint8_t> scratch((size_t)rans_block_capacity(N, LANES));
  uint8_t* end = scratch.data() + scratch.size();
  int64_t pos = 0;
  int32_t status = 0;
  offsets[0] = 0;
  const uint16_t* rows[LANES];
  for (int64_t s = 0; s < S && !status; ++s) {
    for (int64_t g = 0; g < G; ++g) {
      const int64_t c0 = g * LANES;
      const int na = (int)(C - c0 < LANES ? C - c0 : LANES);
      status = block_rows(t, tid, K, s, C, c0, na, rows);
      if (status) break;
      int64_t size = 0;
      status = rans_encode_block(sym + s * N * C + c0, C, N, na, rows, bins, pb, end, &size);
      if (status) break;
      if (size > cap - pos) { status = ERR_CAPACITY; break; }
      memcpy(out + pos, end - size, (size_t)size);
      pos += size;
      offsets[s * G + g + 1] = pos;
    }
  }
  if (status) memset(offsets, 0, sizeof(int64_t) * (S * G + 1));
  return status;
}

int32_t kvk_cpu_rans_decode(const uint8_t* payload, int64_t nbytes, const int64_t* offsets, int64_t n_offsets,
                            const int32_t* freq, int64_t K, int bins, const int32_t* tid, int pb, int64_t S,
                            int64_t N, int64_t C, uint8_t* out, const DequantArgs* dq) {
  const int64_t G = (C + LANES - 1) / LANES;
  if (dq == nullptr) memset(out, 0, (size_t)(S * N * C));
  if (n_offsets != S * G + 1) {
    if (dq)
      for (int64_t s = 0; s < S; ++s)
        for (int64_t n = 0; n < N; ++n)
          for (int64_t c = 0; c < C; ++c) store_out(dq->out, s * dq->os_s + n * dq->os_n + c, dq->dtype, 0.f);
    return ERR_OFFSETS;
  }
  RansTables t(freq, K, bins, pb);
  t.build_slots(S * N * C, bins, pb);
  t.build_coarse(S * N * C, bins, pb);
  const bool use_slots = !t.slots.empty(), use_coarse = !t.coarse.empty();
  int32_t status = 0;
  const uint16_t* rows[LANES];
  const uint32_t* srows[LANES];
  const RansCumLookup cum_lookup{rows, bins};
  const RansSlotLookup slot_lookup{srows};
  const uint8_t* crows[LANES];
  const RansCoarseLookup coarse_lookup{rows, crows, bins, pb - t.qbits};
  auto decode = [&](const uint8_t* in, int64_t len, int na, auto& sink) -> int32_t {
    if (use_slots) {
      for (int j = 0; j < na; ++j) srows[j] = t.slot_row((rows[j] - t.row(0)) / t.stride);
      return rans_decode_block(in, len, N, na, slot_lookup, pb, sink);
    }
    if (use_coarse) {
      for (int j = 0; j < na; ++j) crows[j] = t.coarse.data() + (((rows[j] - t.row(0)) / t.stride) << t.qbits);
      return rans_decode_block(in, len, N, na, coarse_lookup, pb, sink);
    }
    return rans_decode_block(in, len, N, na, cum_lookup, pb, sink);
  };
  for (int64_t s = 0; s < S; ++s) {
    for (int64_t g = 0; g < G; ++g) {
      const int64_t c0 = g * LANES, b = s * G + g;
      const int na = (int)(C - c0 < LANES ? C - c0 : LANES);
      int64_t lo, hi;
      int32_t st = 0;
      if (!stream_bounds(offsets, b, nbytes, &lo, &hi)) st = ERR_OFFSETS;
      if (!st) st = block_rows(t, tid, K, s, C, c0, na, rows);
      if (!st && dq == nullptr) {
        SymSink sink{out + s * N * C + c0, C};
        st = decode(payload + lo, hi - lo, na, sink);
        if (st)
          for (int64_t n = 0; n < N; ++n) memset(out + (s * N + n) * C + c0, 0, (size_t)na);
      } else if (dq != nullptr) {
        DqSink sink;
        sink.stok = dq->s_tok ? dq->s_tok + s * N : nullptr;
        sink.has_sch = dq->s_ch != nullptr;
        sink.has_z = dq->z_ch != nullptr;
        sink.out = dq->out;
        sink.dtype = dq->dtype;
        sink.base = s * dq->os_s + c0;
        sink.os_n = dq->os_n;
        for (int j = 0; j < na; ++j) {
          int64_t k = tid[s * C + c0 + j];
          k = k < 0 ? 0 : (k >= K ? K - 1 : k);
          sink.lut_rows[j] = dq->lut + k * bins;
          sink.sch[j] = sink.has_sch ? dq->s_ch[s * C + c0 + j] : 1.f;
          sink.zch[j] = sink.has_z ? dq->z_ch[s * C + c0 + j] : 0.f;
        }
        if (!st) st = decode(payload + lo, hi - lo, na, sink);
        if (st)
          for (int64_t n = 0; n < N; ++n)
            for (int j = 0; j < na; ++j) store_out(dq->out, sink.base + n * dq->os_n + j, dq->dtype, 0.f);
      }
      status |= st;
    }
  }
  return status;
}

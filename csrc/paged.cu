// paged.cu -- paged KV scatter / gather between the flat side and engines' caches (paged.h);
// the shared pieces and the design are in paged_common.cuh, gather fused with quantization in
// paged_gather_quant.cu.
#include "paged_common.cuh"

namespace kvk {
namespace paged {

// ---- scatter ----------------------------------------------------------------------------------
// KIND 0: flat values of STr; 1: int codes of BITS (scale, zero); 2: fp8 codes (scale).
template <typename STr, int KIND, int BITS, typename CTr, int E>
__global__ void __launch_bounds__(1024) scatter_kernel(const Args a) {
  constexpr int SB = KIND == 0 ? E * STr::kSize : E * BITS / 8;  // source bytes of a chunk
  constexpr bool kCopy = KIND == 0 && std::is_same<STr, CTr>::value;
  constexpr int U = chunks_per_thread(SB, kCopy, KIND != 1 && CTr::kSize > 1);
  constexpr bool kFp8Cache = std::is_same<CTr, FP8>::value;
  constexpr bool kWide =
      E > emin_for(KIND == 0 ? (STr::kSize > CTr::kSize ? STr::kSize : CTr::kSize) : CTr::kSize);
  for_each_row(a, [&](const Row& row) {
    const int64_t frow = row.kv * a.f.f_kv + row.l * a.f.f_l + row.i * a.f.f_t;  // elements (bytes for codes)
    int64_t sbase = 0;
    if constexpr (KIND != 0) sbase = row.r * a.f.a_row + int64_t(a.tgdiv.div(uint32_t(row.i))) * a.f.a_t;
    for (int c0 = threadIdx.x; c0 < a.chunks; c0 += U * blockDim.x) {
      Words<SB> src[U];
      float sc[U], zp[U], cs[U];
      int hh[U], dd[U];
      // every load first
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int c = c0 + u * blockDim.x;
        chunk_pos<E>(a, c, hh[u], dd[u]);
        sc[u] = 1.f;
        zp[u] = 0.f;
        cs[u] = 1.f;
        if (c < a.chunks) {
          if constexpr (kFp8Cache) cs[u] = cache_scale(a, row.kv, row.l, hh[u]);
          if constexpr (KIND == 0) {
            const auto* p = static_cast<const typename STr::storage*>(a.f.data) + frow + hh[u] * a.f.f_h + dd[u];
            load_flat<SB, kWide>(a, reinterpret_cast<const uint8_t*>(p), src[u]);
          } else {
            const uint8_t* p = static_cast<const uint8_t*>(a.f.data) + frow + hh[u] * a.f.f_h + dd[u] * BITS / 8;
            load_flat<SB, kWide>(a, p, src[u]);
            if (kWide || a.smode == 0) {
              const int64_t si = sbase + hh[u] * a.f.a_h + int64_t(a.dgdiv.div(uint32_t(dd[u]))) * a.f.a_d;
              sc[u] = __ldg(a.f.scale + si);
              if constexpr (KIND == 1) zp[u] = __ldg(a.f.zero + si);
            }
          }
        }
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int c = c0 + u * blockDim.x;
        if (c >= a.chunks) continue;
        Words<E * CTr::kSize> out;
        if constexpr (kCopy) {
#pragma unroll
          for (int j = 0; j < Words<SB>::N; ++j) out.w[j] = src[u].w[j];
        } else {
          float f[E];
          if constexpr (KIND == 0) {
            to_floats<STr, E>(src[u], f);
          } else {
            if constexpr (KIND == 1) codes_to_biased<BITS, E>(src[u], f);
            else fp8_to_floats<E>(src[u], f);
            const int64_t hb = sbase + hh[u] * a.f.a_h;
#pragma unroll
            for (int j = 0; j < E; ++j) {
              float s = sc[u], z = zp[u];
              if (!kWide && a.smode != 0) {  // per channel (token-axis groups) or odd channel groups
                const int64_t si = hb + (a.smode == 1 ? int64_t(dd[u] + j)
                                                      : int64_t(a.dgdiv.div(uint32_t(dd[u] + j))) * a.f.a_d);
                s = __ldg(a.f.scale + si);
                if constexpr (KIND == 1) z = __ldg(a.f.zero + si);
              }
              if constexpr (KIND == 1) f[j] = __fmaf_rn(__fsub_rn(f[j], 0x1p23f), s, z);  // int_dequantize
              else f[j] = __fmul_rn(f[j], s);                                           // fp8_dequantize
            }
          }
          if constexpr (kFp8Cache) {
            const float inv = fp8_inv(cs[u]);
#pragma unroll
            for (int j = 0; j < E; ++j) f[j] = __fmul_rn(f[j], inv);
            floats_to_fp8<E>(f, out);
          } else {
            from_floats<CTr, E>(f, out);
          }
        }
        store_cache<CTr, E, kWide>(a, row, hh[u], dd[u], out);
      }
    }
  });
}

// ---- gather -----------------------------------------------------------------------------------
template <typename CTr, typename DTr, int E>
__global__ void __launch_bounds__(1024) gather_kernel(const Args a) {
  constexpr int CB = E * CTr::kSize;
  constexpr int DB = E * DTr::kSize;
  constexpr bool kCopy = std::is_same<DTr, CTr>::value;
  constexpr int U = chunks_per_thread(CB, kCopy, true);  // 8-byte reads: an fp8 cache
  constexpr bool kFp8Cache = std::is_same<CTr, FP8>::value;
  constexpr bool kWide = E > emin_for(CTr::kSize > DTr::kSize ? CTr::kSize : DTr::kSize);
  for_each_row(a, [&](const Row& row) {
    auto* out = static_cast<typename DTr::storage*>(a.f.data) + row.kv * a.f.f_kv + row.l * a.f.f_l + row.i * a.f.f_t;
    for (int c0 = threadIdx.x; c0 < a.chunks; c0 += U * blockDim.x) {
      Words<CB> src[U];
      float cs[U];
      int hh[U], dd[U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int c = c0 + u * blockDim.x;
        chunk_pos<E>(a, c, hh[u], dd[u]);
        cs[u] = 1.f;
        if (c < a.chunks) {
          load_cache<CTr, E, kWide>(a, row, hh[u], dd[u], src[u]);
          if constexpr (kFp8Cache) cs[u] = cache_scale(a, row.kv, row.l, hh[u]);
        }
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int c = c0 + u * blockDim.x;
        if (c >= a.chunks) continue;
        Words<DB> o;
        if constexpr (kCopy) {
#pragma unroll
          for (int j = 0; j < Words<CB>::N; ++j) o.w[j] = src[u].w[j];
        } else {
          float f[E];
          if constexpr (kFp8Cache) {
            fp8_to_floats<E>(src[u], f);
#pragma unroll
            for (int j = 0; j < E; ++j) f[j] = __fmul_rn(f[j], cs[u]);  // fp8_dequantize
          } else {
            to_floats<CTr, E>(src[u], f);
          }
          from_floats<DTr, E>(f, o);
        }
        store_flat<DB, kWide>(a, reinterpret_cast<uint8_t*>(out + hh[u] * a.f.f_h + dd[u]), o);
      }
    }
  });
}


// The chunk widths pick_e can choose: from emin (16 bytes of the widest element, 8 channels for
// 1-byte sides) to max_e (16 bytes of the narrowest side, at most 16 channels); others are not
// compiled.
constexpr bool e_ok(int E, int wide_bytes, int narrow_bits) {
  const int emin = wide_bytes == 4 ? 4 : 8;
  const int pref = 128 / narrow_bits < 16 ? 128 / narrow_bits : 16;
  return E >= emin && E <= (pref > emin ? pref : emin);  // pref < emin: fp32 with 2-byte codes
}
template <typename STr, int KIND, int BITS, typename CTr, int E>
constexpr bool scatter_e_ok() {
  constexpr int wide = KIND == 0 ? (STr::kSize > CTr::kSize ? STr::kSize : CTr::kSize) : CTr::kSize;
  constexpr int sbits = KIND == 0 ? 8 * STr::kSize : BITS;
  return e_ok(E, wide, sbits < 8 * CTr::kSize ? sbits : 8 * CTr::kSize);
}

template <typename STr, int KIND, int BITS, typename CTr, int E>
cudaError_t run_scatter(Args& a, int max_blocks, cudaStream_t stream) {
  if constexpr (!scatter_e_ok<STr, KIND, BITS, CTr, E>()) {
    return cudaErrorNotSupported;  // never picked (pick_e)
  } else {
    constexpr int SB = KIND == 0 ? E * STr::kSize : E * BITS / 8;
    static int per_sm[kMaxDevices * 33] = {};
    constexpr bool kCopy = KIND == 0 && std::is_same<STr, CTr>::value;
    constexpr int U = chunks_per_thread(SB, kCopy, KIND != 1 && CTr::kSize > 1);
    return launch(a, U, max_blocks, scatter_kernel<STr, KIND, BITS, CTr, E>, per_sm, stream);
  }
}

template <typename STr, int KIND, int BITS, typename CTr>
cudaError_t scatter_by_e(Args& a, int E, int max_blocks, cudaStream_t s) {
  switch (E) {
    case 4: return run_scatter<STr, KIND, BITS, CTr, 4>(a, max_blocks, s);
    case 8: return run_scatter<STr, KIND, BITS, CTr, 8>(a, max_blocks, s);
    case 16: return run_scatter<STr, KIND, BITS, CTr, 16>(a, max_blocks, s);
    case 32: return run_scatter<STr, KIND, BITS, CTr, 32>(a, max_blocks, s);
    default: return cudaErrorNotSupported;
  }
}

template <typename STr, int KIND, int BITS>
cudaError_t scatter_by_cache(Args& a, int cache_dtype, int E, int max_blocks, cudaStream_t s) {
  switch (cache_dtype) {
    case 0: return scatter_by_e<STr, KIND, BITS, F32>(a, E, max_blocks, s);
    case 1: return scatter_by_e<STr, KIND, BITS, F16>(a, E, max_blocks, s);
    case 2: return scatter_by_e<STr, KIND, BITS, BF16>(a, E, max_blocks, s);
    default: return scatter_by_e<STr, KIND, BITS, FP8>(a, E, max_blocks, s);
  }
}

cudaError_t scatter_dispatch(Args& a, const KvkPagedCaches* c, const KvkPagedFlat* f, int E, int max_blocks,
                             cudaStream_t s) {
  if (f->kind == 0) {
    switch (f->dtype) {
      case 0: return scatter_by_cache<F32, 0, 8>(a, c->cache_dtype, E, max_blocks, s);
      case 1: return scatter_by_cache<F16, 0, 8>(a, c->cache_dtype, E, max_blocks, s);
      default: return scatter_by_cache<BF16, 0, 8>(a, c->cache_dtype, E, max_blocks, s);
    }
  }
  if (f->kind == 2) return scatter_by_cache<F32, 2, 8>(a, c->cache_dtype, E, max_blocks, s);
  switch (f->bits) {
    case 8: return scatter_by_cache<F32, 1, 8>(a, c->cache_dtype, E, max_blocks, s);
    case 4: return scatter_by_cache<F32, 1, 4>(a, c->cache_dtype, E, max_blocks, s);
    default: return scatter_by_cache<F32, 1, 2>(a, c->cache_dtype, E, max_blocks, s);
  }
}

template <typename CTr, typename DTr, int E>
cudaError_t run_gather(Args& a, int max_blocks, cudaStream_t s) {
  constexpr int wide = CTr::kSize > DTr::kSize ? CTr::kSize : DTr::kSize;
  constexpr int narrow = CTr::kSize < DTr::kSize ? CTr::kSize : DTr::kSize;
  if constexpr (!e_ok(E, wide, 8 * narrow)) {
    return cudaErrorNotSupported;  // never picked (pick_e)
  } else {
    static int per_sm[kMaxDevices * 33] = {};
    return launch(a, chunks_per_thread(E * CTr::kSize, std::is_same<CTr, DTr>::value, true), max_blocks,
                  gather_kernel<CTr, DTr, E>, per_sm, s);
  }
}

template <typename CTr, typename DTr>
cudaError_t gather_by_e(Args& a, int E, int max_blocks, cudaStream_t s) {
  switch (E) {
    case 4: return run_gather<CTr, DTr, 4>(a, max_blocks, s);
    case 8: return run_gather<CTr, DTr, 8>(a, max_blocks, s);
    case 16: return run_gather<CTr, DTr, 16>(a, max_blocks, s);
    case 32: return run_gather<CTr, DTr, 32>(a, max_blocks, s);
    default: return cudaErrorNotSupported;
  }
}

template <typename CTr>
cudaError_t gather_by_dst(Args& a, int dst_dtype, int E, int max_blocks, cudaStream_t s) {
  switch (dst_dtype) {
    case 0: return gather_by_e<CTr, F32>(a, E, max_blocks, s);
    case 1: return gather_by_e<CTr, F16>(a, E, max_blocks, s);
    default: return gather_by_e<CTr, BF16>(a, E, max_blocks, s);
  }
}

cudaError_t gather_dispatch(Args& a, const KvkPagedCaches* c, const KvkPagedFlat* f, int E, int max_blocks,
                            cudaStream_t s) {
  switch (c->cache_dtype) {
    case 0: return gather_by_dst<F32>(a, f->dtype, E, max_blocks, s);
    case 1: return gather_by_dst<F16>(a, f->dtype, E, max_blocks, s);
    case 2: return gather_by_dst<BF16>(a, f->dtype, E, max_blocks, s);
    default: return gather_by_dst<FP8>(a, f->dtype, E, max_blocks, s);
  }
}

}  // namespace paged
}  // namespace kvk

using namespace kvk::paged;

extern "C" cudaError_t kvk_paged_scatter(const KvkPagedCaches* caches, const KvkPagedFlat* src, const void* slots,
                                         int slots_int64, int64_t T, void* oob_count, int count_int64, int max_blocks,
                                         cudaStream_t stream) {
  if (!valid_caches(caches) || !src || !src->data || T < 0 || (T > 0 && !slots) || max_blocks < 0)
    return cudaErrorInvalidValue;
  if (src->kind < 0 || src->kind > 2 || (src->kind == 0 && (src->dtype < 0 || src->dtype > 2)))
    return cudaErrorInvalidValue;
  if (src->kind == 1 && ((src->bits != 8 && src->bits != 4 && src->bits != 2) || !src->scale || !src->zero))
    return cudaErrorInvalidValue;
  if (src->kind == 2 && !src->scale) return cudaErrorInvalidValue;
  if (src->kind != 0 && (src->tg < 1 || src->dg < 1)) return cudaErrorInvalidValue;
  if (T == 0) return cudaSuccess;
  Args a;
  const int E = pick_e(caches, src, true);
  cudaError_t err = prepare(a, caches, src, slots, slots_int64, T, oob_count, count_int64, E);
  if (err != cudaSuccess) return err;
  return scatter_dispatch(a, caches, src, E, max_blocks, stream);
}

extern "C" cudaError_t kvk_paged_gather(const KvkPagedCaches* caches, const KvkPagedFlat* dst, const void* slots,
                                        int slots_int64, int64_t T, void* oob_count, int count_int64, int max_blocks,
                                        cudaStream_t stream) {
  if (!valid_caches(caches) || !dst || !dst->data || T < 0 || (T > 0 && !slots) || max_blocks < 0)
    return cudaErrorInvalidValue;
  if (dst->kind < 0 || dst->kind > 2 || (dst->kind == 0 && (dst->dtype < 0 || dst->dtype > 2)))
    return cudaErrorInvalidValue;
  if (dst->kind != 0) {  // quantize: int channel groups of dg (bits, scale, zero) or fp8 per token-head
    if (!dst->scale || (dst->kind == 1 && (!dst->zero || (dst->bits != 8 && dst->bits != 4 && dst->bits != 2))))
      return cudaErrorInvalidValue;
    if (dst->dg < 1 || caches->head_dim % dst->dg || (dst->kind == 2 && dst->dg != caches->head_dim))
      return cudaErrorInvalidValue;
    if (T == 0) return cudaSuccess;
    return gather_quant(caches, dst, slots, slots_int64, T, oob_count, count_int64, max_blocks, stream);
  }
  if (T == 0) return cudaSuccess;
  Args a;
  const int E = pick_e(caches, dst, false);
  cudaError_t err = prepare(a, caches, dst, slots, slots_int64, T, oob_count, count_int64, E);
  if (err != cudaSuccess) return err;
  return gather_dispatch(a, caches, dst, E, max_blocks, stream);
}

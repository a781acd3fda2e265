// paged_gather_quant.cu -- paged gather fused with quantization into int `channel` groups or fp8
// `token_head` (paged.h: kvk_paged_gather with dst->kind != 0); shared pieces in paged_common.cuh.
#include "paged_common.cuh"

namespace kvk {
namespace paged {

// ---- gather + quantize -------------------------------------------------------------------------
// A thread quantizes one group of G channels of one head of one token row (int `channel` groups,
// G = group size; fp8 `token_head`, G = head_dim): pass 1 reads the group in pieces of E channels
// (16-byte vector loads of the cache) for the finite min / max (int) or amax (fp8); pass 2 reads
// it again (the lines this thread just loaded: L1 hits) and writes the codes, then the scale
// (and zero point). The math is quant_math.cuh's (make_int_group / int_quantize,
// fp8_scale_from_amax / fp8_inv / satfinite encode): the codes and scales of kvkernels.quantize.
// Skipped tokens are quantized as zeros (as the reference). Codes [R, T, H, D*bits/8] (bytes),
// scale / zero [R, T, H, D/G] (fp8: [R, T, H]), contiguous, R = num_kv * L.
template <typename CTr, int E>
__device__ __forceinline__ void load_piece(const Args& a, const Row& row, int h, int d, float (&f)[E], float cs) {
  Words<E * CTr::kSize> x;
  load_cache<CTr, E, false>(a, row, h, d, x);
  if constexpr (std::is_same<CTr, FP8>::value) {
    fp8_to_floats<E>(x, f);
#pragma unroll
    for (int j = 0; j < E; ++j) f[j] = __fmul_rn(f[j], cs);  // fp8_dequantize
  } else {
    to_floats<CTr, E>(x, f);
  }
}

template <typename CTr, int KIND, int BITS, int E>
__global__ void __launch_bounds__(256) gather_quant_kernel(const Args a) {
  constexpr bool kFp8Cache = std::is_same<CTr, FP8>::value;
  constexpr int qmax = (1 << BITS) - 1;
  constexpr int CB = KIND == 1 ? E * BITS / 8 : E;  // code bytes of a piece
  const int G = int(a.f.dg);
  const int groups = a.chunks;  // H * D / G
  uint8_t* codes = static_cast<uint8_t*>(a.f.data);
  for_each_row<true>(a, [&](const Row& row) {
    const int64_t rowi = row.r * a.T + row.i;  // (r, token) row of the quantized output
    for (int gi = threadIdx.x; gi < groups; gi += blockDim.x) {
      uint32_t hq, gq;
      a.cph.divmod(uint32_t(gi), hq, gq);  // groups per head
      const int h = int(hq), d0 = int(gq) * G;
      const float cs = (kFp8Cache && row.valid) ? cache_scale(a, row.kv, row.l, h) : 1.f;
      // pass 1: the group's finite min / max or amax
      float mn = __int_as_float(0x7fffffff), mx = mn, amax = 0.f;
      bool nonfinite = false;
      if (row.valid) {
#pragma unroll 4
        for (int d = d0; d < d0 + G; d += E) {
          float f[E];
          load_piece<CTr, E>(a, row, h, d, f, cs);
#pragma unroll
          for (int j = 0; j < E; ++j) {
            if constexpr (KIND == 1) {
              const float v = finite_or_nan(f[j]);
              nonfinite |= v != v;
              mn = fminf(mn, v);
              mx = fmaxf(mx, v);
            } else {
              const float m = fabsf(f[j]);
              if (m <= 3.402823466e38f) amax = fmaxf(amax, m);
            }
          }
        }
      }
      const int64_t gidx = rowi * groups + gi;  // scale / zero index: [R, T, H, NG] or [R, T, H]
      uint8_t* cp = codes + (rowi * a.c.num_heads + h) * a.f.f_h + int64_t(d0) * BITS / 8;
      if constexpr (KIND == 1) {
        const IntGroup grp = make_int_group(mn, mx, qmax, nonfinite);
#pragma unroll 4
        for (int d = d0; d < d0 + G; d += E) {
          float f[E];
          if (row.valid) load_piece<CTr, E>(a, row, h, d, f, cs);
          else {
#pragma unroll
            for (int j = 0; j < E; ++j) f[j] = 0.f;
          }
          uint32_t q[E];
#pragma unroll
          for (int j = 0; j < E; ++j) q[j] = int_quantize(f[j], grp, float(qmax));
          Words<CB> w;
          if constexpr (CB <= 8) {
            const uint64_t word = pack_code_word<BITS, E>(q);
            w.w[0] = uint32_t(word);
            if constexpr (CB == 8) w.w[1] = uint32_t(word >> 32);
          } else {  // 16 int8 codes: two 8-byte words
            uint32_t lo[E / 2], hi[E / 2];
#pragma unroll
            for (int j = 0; j < E / 2; ++j) { lo[j] = q[j]; hi[j] = q[E / 2 + j]; }
            const uint64_t a0 = pack_code_word<BITS, E / 2>(lo), a1 = pack_code_word<BITS, E / 2>(hi);
            w.w[0] = uint32_t(a0); w.w[1] = uint32_t(a0 >> 32); w.w[2] = uint32_t(a1); w.w[3] = uint32_t(a1 >> 32);
          }
          store_flat<CB, false>(a, cp + int64_t(d - d0) * BITS / 8, w);
        }
        const_cast<float*>(a.f.scale)[gidx] = grp.scale;
        const_cast<float*>(a.f.zero)[gidx] = grp.mn;
      } else {
        const float scale = fp8_scale_from_amax(amax);
        const float inv = fp8_inv(scale);
#pragma unroll 4
        for (int d = d0; d < d0 + G; d += E) {
          float f[E];
          if (row.valid) load_piece<CTr, E>(a, row, h, d, f, cs);
          else {
#pragma unroll
            for (int j = 0; j < E; ++j) f[j] = 0.f;
          }
#pragma unroll
          for (int j = 0; j < E; ++j) f[j] = __fmul_rn(f[j], inv);
          Words<E> w;
          floats_to_fp8<E>(f, w);
          store_flat<E, false>(a, cp + (d - d0), w);
        }
        const_cast<float*>(a.f.scale)[gidx] = scale;
      }
    }
  });
}

// ---- gather + quantize fp8 token_head over lanes ----------------------------------------------
// Where a head is GL = D / E pieces of E channels with GL a power of two <= 32 (D = 128 from
// bf16: 16 lanes), a thread takes one piece (16 bytes of the cache) of U heads, the GL lanes of a
// head combine their finite amax by an xor butterfly of shuffles (every lane ends with the
// head's), and each lane scales and encodes its piece from registers and stores its codes; lane 0
// of the head stores the scale. One pass over the cache, and every warp access is one contiguous
// span (the per-thread kernel above strides a warp's loads over a whole head). Pieces of a row are
// c0 + u * TPR + x with TPR a multiple of 32, so a warp is one row, a head's lanes never straddle
// rows or rounds, and lanes past the row's pieces join the shuffles with neutral values: every
// shuffle is warp-uniform. The amax is the same value as the per-thread kernel's (a max picks one
// of its inputs, in any order), so the codes and scales are too. fp8 only: for int channel groups
// the same scheme measured slower than the per-thread kernel on an H100 (40% against 46% of copy,
// docs/perf-notes.md).
template <typename CTr, int E, int U>
__global__ void __launch_bounds__(256) gather_fp8_lanes_kernel(const Args a) {
  constexpr bool kFp8Cache = std::is_same<CTr, FP8>::value;
  const int GL = a.gl;
  const int pieces = a.chunks;  // H * D / E
  uint8_t* codes = static_cast<uint8_t*>(a.f.data);
  for_each_row<true>(a, [&](const Row& row) {
    const int64_t rowi = row.r * a.T + row.i;  // (r, token) row of the quantized output
    for (int c0 = 0; c0 < pieces; c0 += U * int(blockDim.x)) {
      float f[U][E], amax[U];
      int hh[U], dd[U];
      bool on[U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int c = c0 + u * int(blockDim.x) + int(threadIdx.x);
        on[u] = c < pieces;
        chunk_pos<E>(a, on[u] ? c : 0, hh[u], dd[u]);
        amax[u] = 0.f;  // a skipped row stays at 0: zeros
        if (on[u] && row.valid) {
          load_piece<CTr, E>(a, row, hh[u], dd[u], f[u], kFp8Cache ? cache_scale(a, row.kv, row.l, hh[u]) : 1.f);
#pragma unroll
          for (int j = 0; j < E; ++j) {
            const float m = fabsf(f[u][j]);
            if (m <= 3.402823466e38f) amax[u] = fmaxf(amax[u], m);
          }
        } else {
#pragma unroll
          for (int j = 0; j < E; ++j) f[u][j] = 0.f;
        }
      }
      for (int o = 1; o < GL; o <<= 1) {
#pragma unroll
        for (int u = 0; u < U; ++u) amax[u] = fmaxf(amax[u], __shfl_xor_sync(0xffffffffu, amax[u], o));
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        if (!on[u]) continue;
        const float scale = fp8_scale_from_amax(amax[u]);
        const float inv = fp8_inv(scale);
#pragma unroll
        for (int j = 0; j < E; ++j) f[u][j] = __fmul_rn(f[u][j], inv);
        Words<E> w;
        floats_to_fp8<E>(f[u], w);
        store_flat<E, false>(a, codes + (rowi * a.c.num_heads + hh[u]) * a.f.f_h + dd[u], w);
        if ((threadIdx.x & (GL - 1)) == 0) const_cast<float*>(a.f.scale)[rowi * a.c.num_heads + hh[u]] = scale;
      }
    }
  });
}

// ---- gather + quantize: host ----------------------------------------------------------------
// Pieces of E channels: 16 bytes of the cache element where the group and the layout allow.
int pick_e_quant(const KvkPagedCaches* c, int G) {
  for (int e = 16 / esize_of(c->cache_dtype); e > 4; e /= 2)
    if (G % e == 0 && cache_vec_ok(c, e)) return e;
  return 4;
}

cudaError_t prepare_quant(Args& a, const KvkPagedCaches* c, const KvkPagedFlat* f, const void* slots, int slots64,
                          int64_t T, void* cnt, int cnt64, int E) {
  cudaError_t err = prepare(a, c, f, slots, slots64, T, cnt, cnt64, 4);  // rows, slots, divisors
  if (err != cudaSuccess) return err;
  const int64_t G = f->dg, D = c->head_dim;
  if (G < 4 || G % E || D % G) return cudaErrorNotSupported;
  a.chunks = int(c->num_heads * (D / G));
  a.cph = FastDiv(uint32_t(D / G));
  a.cache_vec = cache_vec_ok(c, E);
  const int cb = f->kind == 1 ? E * f->bits / 8 : E;  // code bytes of a piece
  const int al = std::min(cb, 16);
  a.flat_vec = reinterpret_cast<uintptr_t>(f->data) % al == 0 && f->f_h % al == 0;
  return cudaSuccess;
}

// Lanes per head for the fp8 lanes kernel: G / E when that is a power of two <= 32, else 0 (the
// per-thread kernel).
int lanes_per_group(int64_t G, int E) {
  const int64_t gl = G / E;
  return (G % E == 0 && gl <= 32 && (gl & (gl - 1)) == 0) ? int(gl) : 0;
}

// The lanes kernel's pieces: chunks of E channels over the row (prepare's), one head per GL
// lanes; the per-thread kernel's: one group per thread.
void lanes_geometry(Args& a, const KvkPagedCaches* c, int E, int gl) {
  a.gl = gl;
  a.chunks = int(c->num_heads * (c->head_dim / E));
  a.cph = FastDiv(uint32_t(c->head_dim / E));
}

template <typename CTr, int KIND, int BITS, int E>
cudaError_t run_gather_quant(Args& a, int max_blocks, cudaStream_t s) {
  if constexpr (E > 16 / CTr::kSize) {
    return cudaErrorNotSupported;  // never picked (pick_e_quant)
  } else if (KIND == 2 && a.gl > 0) {
    static int per_sm[kMaxDevices * 33] = {};
    constexpr int U = 2;  // two 16-byte pieces in flight per thread
    return launch(a, U, max_blocks, gather_fp8_lanes_kernel<CTr, E, U>, per_sm, s, 256, 32);
  } else {
    static int per_sm[kMaxDevices * 33] = {};
    return launch(a, 1, max_blocks, gather_quant_kernel<CTr, KIND, BITS, E>, per_sm, s, 256);
  }
}

template <typename CTr, int KIND, int BITS>
cudaError_t gather_quant_by_e(Args& a, int E, int max_blocks, cudaStream_t s) {
  switch (E) {
    case 4: return run_gather_quant<CTr, KIND, BITS, 4>(a, max_blocks, s);
    case 8: return run_gather_quant<CTr, KIND, BITS, 8>(a, max_blocks, s);
    case 16: return run_gather_quant<CTr, KIND, BITS, 16>(a, max_blocks, s);
    default: return cudaErrorNotSupported;
  }
}

template <typename CTr>
cudaError_t gather_quant_by_fmt(Args& a, const KvkPagedFlat* f, int E, int max_blocks, cudaStream_t s) {
  if (f->kind == 2) return gather_quant_by_e<CTr, 2, 8>(a, E, max_blocks, s);
  switch (f->bits) {
    case 8: return gather_quant_by_e<CTr, 1, 8>(a, E, max_blocks, s);
    case 4: return gather_quant_by_e<CTr, 1, 4>(a, E, max_blocks, s);
    default: return gather_quant_by_e<CTr, 1, 2>(a, E, max_blocks, s);
  }
}

cudaError_t gather_quant_dispatch(Args& a, const KvkPagedCaches* c, const KvkPagedFlat* f, int E, int max_blocks,
                                  cudaStream_t s) {
  switch (c->cache_dtype) {
    case 0: return gather_quant_by_fmt<F32>(a, f, E, max_blocks, s);
    case 1: return gather_quant_by_fmt<F16>(a, f, E, max_blocks, s);
    case 2: return gather_quant_by_fmt<BF16>(a, f, E, max_blocks, s);
    default: return gather_quant_by_fmt<FP8>(a, f, E, max_blocks, s);
  }
}

cudaError_t gather_quant(const KvkPagedCaches* c, const KvkPagedFlat* f, const void* slots, int slots64, int64_t T,
                         void* cnt, int cnt64, int max_blocks, cudaStream_t stream) {
  Args a;
  const int E = pick_e_quant(c, int(f->dg));
  cudaError_t err = prepare_quant(a, c, f, slots, slots64, T, cnt, cnt64, E);
  if (err != cudaSuccess) return err;
  const int gl = f->kind == 2 ? lanes_per_group(f->dg, E) : 0;  // fp8 token_head: the lanes kernel
  if (gl > 0) lanes_geometry(a, c, E, gl);
  return gather_quant_dispatch(a, c, f, E, max_blocks, stream);
}

}  // namespace paged
}  // namespace kvk

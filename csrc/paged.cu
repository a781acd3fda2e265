// paged.cu -- paged KV scatter / gather between the flat side and engines' caches (paged.h).
//
// One launch for all layers: a work item is (cache r = kv*L + layer, flat token i), one token row
// of H heads x D channels of one cache; a block holds ROWS work items (threadIdx.y), each done by
// TPR threads (threadIdx.x) in groups of E consecutive channels of one head (E = 16 bytes of the
// widest element: a 16-byte vector for the widest side). The layout is read as numbers only
// (base pointer per cache from a device array, int64 strides at run time), so every layout runs
// the same code; vector loads / stores are used where the host found them legal (dense inner
// dim, aligned bases and strides), element-wise addressing otherwise (legacy V [NB, H, D, BS]).
// Dequantization (scatter from int / fp8 codes) and fp8 cache (de)quantization use the shared
// device functions of quant_math.cuh: bit-identical to the torch reference.
#include "paged.h"

#include <algorithm>
#include <initializer_list>
#include <type_traits>

#include "quant_math.cuh"

namespace kvk {
namespace paged {

struct FP8 {  // e4m3 cache elements (bytes)
  using storage = uint8_t;
  static constexpr int kSize = 1;
};

struct Args {
  KvkPagedCaches c;
  KvkPagedFlat f;
  const void* slots;
  int slots64;
  int64_t T, R, nslots;
  int groups;           // H * D / E per token row
  int groups_per_head;  // D / E
  int cache_vec;        // E consecutive channels of a cache row are contiguous and aligned
  int flat_vec;         // E consecutive flat channels are aligned to E * element size
  void* cnt;
  int cnt64;
};

__device__ __forceinline__ int64_t load_slot(const Args& a, int64_t i) {
  return a.slots64 ? static_cast<const int64_t*>(a.slots)[i] : int64_t(static_cast<const int32_t*>(a.slots)[i]);
}

__device__ __forceinline__ void count_oob(const Args& a) {
  if (a.cnt == nullptr) return;
  if (a.cnt64) atomicAdd(static_cast<unsigned long long*>(a.cnt), 1ull);
  else atomicAdd(static_cast<int*>(a.cnt), 1);
}

__device__ __forceinline__ int64_t chan_off(const int64_t* st, int64_t d, int64_t x) {
  return (d / x) * st[3] + (d % x) * st[4];
}

__device__ __forceinline__ float cache_scale(const Args& a, int kv, int64_t l, int64_t h) {
  return kv ? a.c.v_scale[l * a.c.vs_l + h * a.c.vs_h] : a.c.k_scale[l * a.c.ks_l + h * a.c.ks_h];
}

// Work-item loop shared by both directions: calls body(r, kv, l, i, row offset in the cache).
template <typename Body>
__device__ __forceinline__ void for_each_row(const Args& a, Body&& body) {
  const int64_t work = a.R * a.T;
  const int64_t rows = blockDim.y;
  for (int64_t w = int64_t(blockIdx.x) * rows + threadIdx.y; w < work; w += int64_t(gridDim.x) * rows) {
    const int64_t r = w / a.T;
    const int64_t i = w - r * a.T;
    const int64_t s = load_slot(a, i);
    if (s < 0) continue;
    if (s >= a.nslots) {
      if (r == 0 && threadIdx.x == 0) count_oob(a);
      continue;
    }
    const int64_t blk = s / a.c.block_size;
    const int64_t off = s - blk * a.c.block_size;
    const int kv = r >= a.c.num_layers;
    const int64_t l = r - kv * a.c.num_layers;
    const int64_t* st = a.c.st[kv];
    body(r, kv, l, i, blk * st[0] + off * st[1], st);
  }
}

// Source values of E channels (d .. d+E-1) of head h of flat token i of cache r, as float.
template <typename STr, int KIND, int BITS, int E>
__device__ __forceinline__ void load_source(const Args& a, int64_t r, int64_t frow, int64_t i, int64_t h, int64_t d,
                                            float (&f)[E]) {
  if constexpr (KIND == 0) {
    const auto* p = static_cast<const typename STr::storage*>(a.f.data) + frow + h * a.f.f_h + d;
    load_vec<STr, E>(p, a.flat_vec, f);
  } else {
    constexpr int NB = KIND == 1 ? E * BITS / 8 : E;
    const uint8_t* p = static_cast<const uint8_t*>(a.f.data) + frow + h * a.f.f_h + (KIND == 1 ? d * BITS / 8 : d);
    const uint64_t w = load_bytes<NB>(p, false);
    const int64_t sbase = r * a.f.a_row + (i / a.f.tg) * a.f.a_t + h * a.f.a_h;
#pragma unroll
    for (int j = 0; j < E; ++j) {
      const int64_t si = sbase + ((d + j) / a.f.dg) * a.f.a_d;
      if constexpr (KIND == 1) {
        const uint32_t q = uint32_t(w >> (j * BITS)) & ((1u << BITS) - 1);
        f[j] = int_dequantize(q, __ldg(a.f.scale + si), __ldg(a.f.zero + si));
      } else {
        f[j] = fp8_dequantize(uint32_t(w >> (8 * j)) & 0xffu, __ldg(a.f.scale + si));
      }
    }
  }
}

template <typename STr, int KIND, int BITS, typename CTr, int E>
__global__ void __launch_bounds__(1024) scatter_kernel(Args a) {
  constexpr bool kCopy = KIND == 0 && std::is_same<STr, CTr>::value;
  for_each_row(a, [&](int64_t r, int kv, int64_t l, int64_t i, int64_t crow, const int64_t* st) {
    auto* base = reinterpret_cast<typename CTr::storage*>(a.c.ptrs[r]) + crow;
    const int64_t frow = kv * a.f.f_kv + l * a.f.f_l + i * a.f.f_t;
    if constexpr (kCopy) {
      // two groups per step, both loads issued before the stores (more bytes in flight)
      const auto* src = static_cast<const typename STr::storage*>(a.f.data) + frow;
      for (int g0 = threadIdx.x; g0 < a.groups; g0 += 2 * blockDim.x) {
        const int g1 = g0 + blockDim.x;
        const bool two = g1 < a.groups;
        const int64_t h0 = g0 / a.groups_per_head, d0 = int64_t(g0 - h0 * a.groups_per_head) * E;
        const int64_t h1 = two ? g1 / a.groups_per_head : h0;
        const int64_t d1 = two ? int64_t(g1 - h1 * a.groups_per_head) * E : d0;
        const auto v0 = load_raw<STr, E>(src + h0 * a.f.f_h + d0, a.flat_vec);
        const auto v1 = load_raw<STr, E>(src + h1 * a.f.f_h + d1, a.flat_vec);
        auto* p0 = base + h0 * st[2];
        auto* p1 = base + h1 * st[2];
        if (a.cache_vec) {
          *reinterpret_cast<typename Vec<CTr, E>::Word*>(p0 + chan_off(st, d0, a.c.x)) = v0.w;
          if (two) *reinterpret_cast<typename Vec<CTr, E>::Word*>(p1 + chan_off(st, d1, a.c.x)) = v1.w;
        } else {
#pragma unroll
          for (int j = 0; j < E; ++j) p0[chan_off(st, d0 + j, a.c.x)] = v0.e[j];
          if (two) {
#pragma unroll
            for (int j = 0; j < E; ++j) p1[chan_off(st, d1 + j, a.c.x)] = v1.e[j];
          }
        }
      }
    } else {
    for (int g = threadIdx.x; g < a.groups; g += blockDim.x) {
      const int64_t h = g / a.groups_per_head;
      const int64_t d = int64_t(g - h * a.groups_per_head) * E;
      auto* p = base + h * st[2];
      {
        float f[E];
        load_source<STr, KIND, BITS, E>(a, r, frow, i, h, d, f);
        if constexpr (std::is_same<CTr, FP8>::value) {
          const float inv = fp8_inv(cache_scale(a, kv, l, h));
#pragma unroll
          for (int j = 0; j < E; ++j) f[j] = fp8_prescale(f[j], inv);
          const uint64_t w = fp8_pack<E>(f);
          if (a.cache_vec) {
            store_bytes<E>(p + chan_off(st, d, a.c.x), w, true);
          } else {
#pragma unroll
            for (int j = 0; j < E; ++j) p[chan_off(st, d + j, a.c.x)] = uint8_t(w >> (8 * j));
          }
        } else if (a.cache_vec) {
          store_vec<CTr, E>(p + chan_off(st, d, a.c.x), true, f);
        } else {
#pragma unroll
          for (int j = 0; j < E; ++j) p[chan_off(st, d + j, a.c.x)] = CTr::from_float(f[j]);
        }
      }
    }
    }  // kCopy
  });
}

template <typename CTr, typename DTr, int E>
__global__ void __launch_bounds__(1024) gather_kernel(Args a) {
  constexpr bool kCopy = std::is_same<DTr, CTr>::value;
  for_each_row(a, [&](int64_t r, int kv, int64_t l, int64_t i, int64_t crow, const int64_t* st) {
    const auto* base = reinterpret_cast<const typename CTr::storage*>(a.c.ptrs[r]) + crow;
    auto* out = static_cast<typename DTr::storage*>(a.f.data) + kv * a.f.f_kv + l * a.f.f_l + i * a.f.f_t;
    if constexpr (kCopy) {
      // two groups per step, both loads issued before the stores
      for (int g0 = threadIdx.x; g0 < a.groups; g0 += 2 * blockDim.x) {
        const int g1 = g0 + blockDim.x;
        const bool two = g1 < a.groups;
        const int64_t h0 = g0 / a.groups_per_head, d0 = int64_t(g0 - h0 * a.groups_per_head) * E;
        const int64_t h1 = two ? g1 / a.groups_per_head : h0;
        const int64_t d1 = two ? int64_t(g1 - h1 * a.groups_per_head) * E : d0;
        const auto* p0 = base + h0 * st[2] + chan_off(st, d0, a.c.x);
        const auto* p1 = base + h1 * st[2] + chan_off(st, d1, a.c.x);
        Vec<CTr, E> v0, v1;
        if (a.cache_vec) {
          v0.w = *reinterpret_cast<const typename Vec<CTr, E>::Word*>(p0);
          v1.w = *reinterpret_cast<const typename Vec<CTr, E>::Word*>(p1);
        } else {
#pragma unroll
          for (int j = 0; j < E; ++j) {
            v0.e[j] = base[h0 * st[2] + chan_off(st, d0 + j, a.c.x)];
            v1.e[j] = base[h1 * st[2] + chan_off(st, d1 + j, a.c.x)];
          }
        }
        auto* o0 = out + h0 * a.f.f_h + d0;
        auto* o1 = out + h1 * a.f.f_h + d1;
        if (a.flat_vec) {
          *reinterpret_cast<typename Vec<CTr, E>::Word*>(o0) = v0.w;
          if (two) *reinterpret_cast<typename Vec<CTr, E>::Word*>(o1) = v1.w;
        } else {
#pragma unroll
          for (int j = 0; j < E; ++j) o0[j] = v0.e[j];
          if (two) {
#pragma unroll
            for (int j = 0; j < E; ++j) o1[j] = v1.e[j];
          }
        }
      }
    } else {
    for (int g = threadIdx.x; g < a.groups; g += blockDim.x) {
      const int64_t h = g / a.groups_per_head;
      const int64_t d = int64_t(g - h * a.groups_per_head) * E;
      const auto* p = base + h * st[2];
      auto* o = out + h * a.f.f_h + d;
      {
        float f[E];
        if constexpr (std::is_same<CTr, FP8>::value) {
          uint64_t w = 0;
          if (a.cache_vec) {
            w = load_bytes<E>(p + chan_off(st, d, a.c.x), true);
          } else {
#pragma unroll
            for (int j = 0; j < E; ++j) w |= uint64_t(p[chan_off(st, d + j, a.c.x)]) << (8 * j);
          }
          const float s = cache_scale(a, kv, l, h);
#pragma unroll
          for (int j = 0; j < E; ++j) f[j] = fp8_dequantize(uint32_t(w >> (8 * j)) & 0xffu, s);
        } else {
          Vec<CTr, E> v;
          if (a.cache_vec) {
            v.w = *reinterpret_cast<const typename Vec<CTr, E>::Word*>(p + chan_off(st, d, a.c.x));
          } else {
#pragma unroll
            for (int j = 0; j < E; ++j) v.e[j] = p[chan_off(st, d + j, a.c.x)];
          }
          raw_to_float<CTr, E>(v, f);
        }
        store_vec<DTr, E>(o, a.flat_vec, f);
      }
    }
    }  // kCopy
  });
}

// ---- host side --------------------------------------------------------------------------------
int esize_of(int code) { return code == 0 ? 4 : code == 3 ? 1 : 2; }

bool valid_caches(const KvkPagedCaches* c) {
  return c && c->ptrs && c->num_layers > 0 && (c->num_kv == 1 || c->num_kv == 2) && c->num_blocks > 0 &&
         c->block_size > 0 && c->num_heads > 0 && c->head_dim > 0 && c->x > 0 && c->head_dim % c->x == 0 &&
         c->cache_dtype >= 0 && c->cache_dtype <= 3 &&
         (c->cache_dtype != 3 || (c->k_scale && (c->num_kv == 1 || c->v_scale)));
}

// Fill the launch geometry; E is elements per thread group.
cudaError_t prepare(Args& a, const KvkPagedCaches* c, const KvkPagedFlat* f, const void* slots, int slots64, int64_t T,
                    void* cnt, int cnt64, int E) {
  a.c = *c;
  a.f = *f;
  a.slots = slots;
  a.slots64 = slots64;
  a.T = T;
  a.R = c->num_kv * c->num_layers;
  a.nslots = c->num_blocks * c->block_size;
  a.cnt = cnt;
  a.cnt64 = cnt64;
  if (c->head_dim % E) return cudaErrorNotSupported;
  const int64_t groups = c->num_heads * (c->head_dim / E);
  if (groups > (int64_t(1) << 30)) return cudaErrorNotSupported;
  a.groups = int(groups);
  a.groups_per_head = int(c->head_dim / E);
  // vector access of a cache row: E consecutive channels contiguous (inner stride 1, no x split
  // inside the group), every base and every stride a multiple of the vector
  const int cbytes = E * esize_of(c->cache_dtype);
  bool cv = c->aligned16 && (c->x % E == 0);
  for (int k = 0; k < c->num_kv; ++k) {
    cv = cv && c->st[k][4] == 1;
    for (int j = 0; j < 4; ++j) cv = cv && (c->st[k][j] * esize_of(c->cache_dtype)) % cbytes == 0;
  }
  a.cache_vec = cv && (16 % cbytes == 0);
  if (f->kind == 0) {
    const int fb = E * esize_of(f->dtype);
    bool fv = reinterpret_cast<uintptr_t>(f->data) % fb == 0;
    for (int64_t s : {f->f_kv, f->f_l, f->f_t, f->f_h}) fv = fv && (s * esize_of(f->dtype)) % fb == 0;
    a.flat_vec = fv;
  } else {
    a.flat_vec = 0;
  }
  return cudaSuccess;
}

// Block shape: TPR threads per row (whole groups of a row), ROWS rows per block. Grid: persistent
// (at most the blocks that fit on the GPU at once, from the occupancy API: each block then
// grid-strides over the work with no block-scheduling overhead between rows), or max_blocks
// 1024-thread blocks for the SM-bounded path.
constexpr int kMaxDevices = 64;

// `per_sm_cache`: this kernel's resident blocks per SM by device (0: not yet asked), so that the
// occupancy API runs once per kernel and device, not inside a CUDA-graph capture later.
template <typename Kernel>
cudaError_t launch_geometry(const Args& a, int max_blocks, Kernel kernel, int* per_sm_cache, dim3& grid,
                            dim3& block) {
  // threads per row: half the groups (the copy paths take two groups a step), whole warps
  const int tpr = std::min(256, (((a.groups + 1) / 2 + 31) / 32) * 32);
  const int rows = std::max(1, (max_blocks > 0 ? 1024 : 256) / tpr);
  const int64_t work = a.R * a.T;
  int64_t nb = (work + rows - 1) / rows;
  if (max_blocks > 0) {
    nb = std::min<int64_t>(nb, max_blocks);
  } else {
    int dev = 0, sms = 0, per_sm = 0;
    cudaError_t e = cudaGetDevice(&dev);
    if (e == cudaSuccess) e = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
    if (e != cudaSuccess) return e;
    const int slot = (dev >= 0 && dev < kMaxDevices) ? dev : -1;
    // the block shape depends on the case: cache per (device, threads per block / 32)
    const int key = slot * 33 + (tpr * rows) / 32;
    per_sm = slot >= 0 ? per_sm_cache[key] : 0;
    if (per_sm == 0) {
      e = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, tpr * rows, 0);
      if (e != cudaSuccess) return e;
      per_sm = std::max(per_sm, 1);
      if (slot >= 0) per_sm_cache[key] = per_sm;
    }
    nb = std::min<int64_t>(nb, int64_t(sms) * std::max(per_sm, 1));
  }
  nb = std::min<int64_t>(nb, 0x7fffffff);
  grid = dim3(unsigned(nb));
  block = dim3(tpr, rows);
  return cudaSuccess;
}

template <typename STr, int KIND, int BITS, typename CTr, int E>
cudaError_t run_scatter(Args& a, int max_blocks, cudaStream_t stream) {
  if constexpr (E * CTr::kSize > 16 || (KIND == 0 && E * STr::kSize > 16)) {
    return cudaErrorNotSupported;  // never picked (pick_e); keeps vectors <= 16 bytes
  } else {
    dim3 grid, block;
    auto kernel = scatter_kernel<STr, KIND, BITS, CTr, E>;
    static int per_sm[kMaxDevices * 33] = {};
    cudaError_t err = launch_geometry(a, max_blocks, kernel, per_sm, grid, block);
    if (err != cudaSuccess) return err;
    kernel<<<grid, block, 0, stream>>>(a);
    return cudaGetLastError();
  }
}

template <typename STr, int KIND, int BITS, int E>
cudaError_t scatter_by_cache(Args& a, int cache_dtype, int max_blocks, cudaStream_t s) {
  switch (cache_dtype) {
    case 0: return run_scatter<STr, KIND, BITS, F32, E>(a, max_blocks, s);
    case 1: return run_scatter<STr, KIND, BITS, F16, E>(a, max_blocks, s);
    case 2: return run_scatter<STr, KIND, BITS, BF16, E>(a, max_blocks, s);
    default: return run_scatter<STr, KIND, BITS, FP8, E>(a, max_blocks, s);
  }
}

template <int E>
cudaError_t scatter_dispatch(Args& a, const KvkPagedCaches* c, const KvkPagedFlat* f, int max_blocks, cudaStream_t s) {
  if (f->kind == 0) {
    switch (f->dtype) {
      case 0: return scatter_by_cache<F32, 0, 8, E>(a, c->cache_dtype, max_blocks, s);
      case 1: return scatter_by_cache<F16, 0, 8, E>(a, c->cache_dtype, max_blocks, s);
      default: return scatter_by_cache<BF16, 0, 8, E>(a, c->cache_dtype, max_blocks, s);
    }
  }
  if (f->kind == 2) return scatter_by_cache<F32, 2, 8, E>(a, c->cache_dtype, max_blocks, s);
  switch (f->bits) {
    case 8: return scatter_by_cache<F32, 1, 8, E>(a, c->cache_dtype, max_blocks, s);
    case 4: return scatter_by_cache<F32, 1, 4, E>(a, c->cache_dtype, max_blocks, s);
    default: return scatter_by_cache<F32, 1, 2, E>(a, c->cache_dtype, max_blocks, s);
  }
}

template <typename CTr, typename DTr, int E>
cudaError_t run_gather(Args& a, int max_blocks, cudaStream_t s) {
  if constexpr (E * CTr::kSize > 16 || E * DTr::kSize > 16) {
    return cudaErrorNotSupported;  // never picked (pick_e)
  } else {
    dim3 grid, block;
    auto kernel = gather_kernel<CTr, DTr, E>;
    static int per_sm[kMaxDevices * 33] = {};
    cudaError_t err = launch_geometry(a, max_blocks, kernel, per_sm, grid, block);
    if (err != cudaSuccess) return err;
    kernel<<<grid, block, 0, s>>>(a);
    return cudaGetLastError();
  }
}

template <typename CTr, int E>
cudaError_t gather_by_dst(Args& a, int dst_dtype, int max_blocks, cudaStream_t s) {
  switch (dst_dtype) {
    case 0: return run_gather<CTr, F32, E>(a, max_blocks, s);
    case 1: return run_gather<CTr, F16, E>(a, max_blocks, s);
    default: return run_gather<CTr, BF16, E>(a, max_blocks, s);
  }
}

template <int E>
cudaError_t gather_dispatch(Args& a, const KvkPagedCaches* c, const KvkPagedFlat* f, int max_blocks, cudaStream_t s) {
  switch (c->cache_dtype) {
    case 0: return gather_by_dst<F32, E>(a, f->dtype, max_blocks, s);
    case 1: return gather_by_dst<F16, E>(a, f->dtype, max_blocks, s);
    case 2: return gather_by_dst<BF16, E>(a, f->dtype, max_blocks, s);
    default: return gather_by_dst<FP8, E>(a, f->dtype, max_blocks, s);
  }
}

int pick_e(const KvkPagedCaches* c, const KvkPagedFlat* f) {
  const int widest = std::max(esize_of(c->cache_dtype), f->kind == 0 ? esize_of(f->dtype) : 1);
  return widest == 4 ? 4 : 8;  // 16 bytes of the widest element (fp8 / codes: 8 channels)
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
  const int E = pick_e(caches, src);
  cudaError_t err = prepare(a, caches, src, slots, slots_int64, T, oob_count, count_int64, E);
  if (err != cudaSuccess) return err;
  return E == 4 ? scatter_dispatch<4>(a, caches, src, max_blocks, stream)
                : scatter_dispatch<8>(a, caches, src, max_blocks, stream);
}

extern "C" cudaError_t kvk_paged_gather(const KvkPagedCaches* caches, const KvkPagedFlat* dst, const void* slots,
                                        int slots_int64, int64_t T, void* oob_count, int count_int64, int max_blocks,
                                        cudaStream_t stream) {
  if (!valid_caches(caches) || !dst || !dst->data || T < 0 || (T > 0 && !slots) || max_blocks < 0)
    return cudaErrorInvalidValue;
  if (dst->kind != 0 || dst->dtype < 0 || dst->dtype > 2) return cudaErrorInvalidValue;
  if (T == 0) return cudaSuccess;
  Args a;
  const int E = pick_e(caches, dst);
  cudaError_t err = prepare(a, caches, dst, slots, slots_int64, T, oob_count, count_int64, E);
  if (err != cudaSuccess) return err;
  return E == 4 ? gather_dispatch<4>(a, caches, dst, max_blocks, stream)
                : gather_dispatch<8>(a, caches, dst, max_blocks, stream);
}

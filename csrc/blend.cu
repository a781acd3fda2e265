// csrc/blend.cu -- RoPE re-rotation of cached keys in place, flat and paged (spec:
// kvkernels/reference/blend.py).
//
// It is a read-modify-write of the rotary channels of every key: 2 * L*T*H*rot * esize bytes.
// Thread (token t, channel group g) owns VEC consecutive pairs (NeoX: channels [g*VEC, +VEC) and
// [half + g*VEC, +VEC), two 16-byte words; GPT-J: channels [g*VEC, +VEC), one word holding VEC/2
// pairs). It reads the cos/sin rows of both positions for its pairs ONCE, composes the rotation
// by new - old in registers (float32), then walks `layers_per_block` layers x H heads of that
// token, loading HB heads' words before rotating and storing them (HB independent 16-byte loads
// in flight per thread). No integer division per element: the token's block/offset (paged) and
// the group's channel offsets are computed once per thread. A block is (groups, 256 / groups)
// threads: consecutive threads.x cover one token-head row, so a warp reads whole rows.
//
// When the 16-byte path is not possible (rot_dim, strides or the base not multiples of 16
// bytes, a paged x-split that cuts a word) the same kernel runs with scalar accesses (VEC = 1
// NeoX, 2 GPT-J). Rounding is the spec's: __fmul_rn / __fadd_rn (no FMA contraction), one
// rounding to the key's dtype; fp8 codes are decoded as e4m3 * scale and re-encoded as
// e4m3(clamp(x * (1 / scale), +-448)).
#include "blend.h"

#include "quant_math.cuh"

namespace kvk {
namespace {

struct FP8 {
  using storage = uint8_t;
  static constexpr int kSize = 1;
};

template <typename Tr>
struct KeyIO {
  using S = typename Tr::storage;
  static constexpr bool kFp8 = false;
  __device__ __forceinline__ static float load(S s, float) { return Tr::to_float(s); }
  __device__ __forceinline__ static S store(float v, float) { return Tr::from_float(v); }
};
template <>
struct KeyIO<FP8> {
  using S = uint8_t;
  static constexpr bool kFp8 = true;
  __device__ __forceinline__ static float load(S s, float scale) { return __fmul_rn(fp8_decode(s), scale); }
  __device__ __forceinline__ static S store(float v, float inv) {
    return static_cast<uint8_t>(fp8_encode(fp8_prescale(v, inv)));
  }
};

template <typename S, int E>
union Pack {
  typename VecWord<E * static_cast<int>(sizeof(S))>::type w;
  S e[E];
};

constexpr int kMaxHalf = 256;  // head_dim up to 512
constexpr int kThreads = 256;
constexpr int kHB = 4;         // heads loaded before rotating (independent loads in flight)

struct RotArgs {
  void* key;             // flat: element (0, 0, 0, 0)
  const int64_t* ptrs;   // paged: per-layer base addresses (device)
  const int64_t* slots;  // paged: slot of each token
  int64_t L, T, H;
  int64_t sL, sT, sH;    // flat strides; paged: sT = token-in-block stride, sL unused
  int64_t sB, BS, nslots, sDX, sDI, x;
  const float* k_scale;
  int64_t ssL, ssT, ssH;
  const int64_t* old_pos;
  const int64_t* new_pos;
  const float* cos_sin;
  int64_t max_pos;
  int half, groups, layers_per_block;
};

template <typename Tr, int VEC, bool NEOX, bool ALIGNED, bool PAGED>
__global__ void __launch_bounds__(kThreads) rerotate_kernel(const RotArgs a) {
  using IO = KeyIO<Tr>;
  using S = typename Tr::storage;
  constexpr int P = NEOX ? VEC : VEC / 2;  // pairs per thread
  constexpr int NW = NEOX ? 2 : 1;         // words (of VEC elements) per head
  const int g = threadIdx.x;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  if (g >= a.groups || t >= a.T) return;
  const int64_t po = a.old_pos[t], pn = a.new_pos[t];
  if (po < 0 || po >= a.max_pos || pn < 0 || pn >= a.max_pos) return;
  int64_t tok;
  if constexpr (PAGED) {
    const int64_t slot = a.slots[t];
    if (slot < 0 || slot >= a.nslots) return;
    const int64_t b = slot / a.BS;
    tok = b * a.sB + (slot - b * a.BS) * a.sT;
  } else {
    tok = t * a.sT;
  }
  const int half = a.half;
  // the rotation by (new - old) of this thread's pairs, once
  const int i0 = NEOX ? g * VEC : g * (VEC / 2);
  const float* ro = a.cos_sin + po * 2 * half;
  const float* rn = a.cos_sin + pn * 2 * half;
  float cd[P], sd[P];
#pragma unroll
  for (int j = 0; j < P; ++j) {
    const float co = ro[i0 + j], so = ro[half + i0 + j], cn = rn[i0 + j], sn = rn[half + i0 + j];
    cd[j] = __fadd_rn(__fmul_rn(cn, co), __fmul_rn(sn, so));
    sd[j] = __fsub_rn(__fmul_rn(sn, co), __fmul_rn(cn, so));
  }
  // channel offsets of this thread's elements (word starts on the 16-byte path), once
  int64_t off[NW][VEC];
#pragma unroll
  for (int w = 0; w < NW; ++w) {
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      const int64_t d = NEOX ? (w ? half : 0) + i0 + e : 2 * i0 + e;
      if constexpr (PAGED) {
        off[w][e] = (ALIGNED && e) ? off[w][0] + e : (d / a.x) * a.sDX + (d % a.x) * a.sDI;
      } else {
        off[w][e] = d;
      }
    }
  }
  const int64_t l0 = static_cast<int64_t>(blockIdx.y) * a.layers_per_block;
  const int64_t l1 = l0 + a.layers_per_block < a.L ? l0 + a.layers_per_block : a.L;
  for (int64_t l = l0; l < l1; ++l) {
    S* base = PAGED ? reinterpret_cast<S*>(a.ptrs[l]) + tok : static_cast<S*>(a.key) + l * a.sL + tok;
    for (int64_t h0 = 0; h0 < a.H; h0 += kHB) {
      Pack<S, VEC> v[kHB][NW];
      float sc[kHB];
#pragma unroll
      for (int hb = 0; hb < kHB; ++hb) {
        if (h0 + hb < a.H) {
          const S* p = base + (h0 + hb) * a.sH;
#pragma unroll
          for (int w = 0; w < NW; ++w) {
            if constexpr (ALIGNED) {
              v[hb][w].w = *reinterpret_cast<const decltype(v[hb][w].w)*>(p + off[w][0]);
            } else {
#pragma unroll
              for (int e = 0; e < VEC; ++e) v[hb][w].e[e] = p[off[w][e]];
            }
          }
          sc[hb] = IO::kFp8 ? a.k_scale[l * a.ssL + t * a.ssT + (h0 + hb) * a.ssH] : 1.f;
        }
      }
#pragma unroll
      for (int hb = 0; hb < kHB; ++hb) {
        if (h0 + hb < a.H) {
          const float s = sc[hb];
          const float inv = IO::kFp8 ? fp8_inv(s) : 1.f;
#pragma unroll
          for (int j = 0; j < P; ++j) {
            S& e1 = NEOX ? v[hb][0].e[j] : v[hb][0].e[2 * j];
            S& e2 = NEOX ? v[hb][NW - 1].e[j] : v[hb][0].e[2 * j + 1];
            const float x1 = IO::load(e1, s), x2 = IO::load(e2, s);
            const float c = cd[j], sn = sd[j];
            e1 = IO::store(__fsub_rn(__fmul_rn(x1, c), __fmul_rn(x2, sn)), inv);
            e2 = IO::store(__fadd_rn(__fmul_rn(x2, c), __fmul_rn(x1, sn)), inv);
          }
          S* p = base + (h0 + hb) * a.sH;
#pragma unroll
          for (int w = 0; w < NW; ++w) {
            if constexpr (ALIGNED) {
              *reinterpret_cast<decltype(v[hb][w].w)*>(p + off[w][0]) = v[hb][w].w;
            } else {
#pragma unroll
              for (int e = 0; e < VEC; ++e) p[off[w][e]] = v[hb][w].e[e];
            }
          }
        }
      }
    }
  }
}

template <typename Tr, int VEC, bool NEOX, bool ALIGNED>
cudaError_t launch_vec(RotArgs a, bool paged, cudaStream_t stream) {
  a.groups = NEOX ? a.half / VEC : 2 * a.half / VEC;
  const int ty = kThreads / a.groups > 0 ? kThreads / a.groups : 1;
  // layers per thread: amortise the cos/sin rows over several layers while keeping >= ~2^19
  // threads (about 2 waves of an H100 at full occupancy) in the grid
  const int64_t work = a.T * a.groups * a.L;
  int64_t lpb = work >> 19;
  lpb = lpb < 1 ? 1 : (lpb > 8 ? 8 : lpb);
  if (lpb > a.L) lpb = a.L;
  if ((a.L + lpb - 1) / lpb > 65535) lpb = (a.L + 65534) / 65535;
  a.layers_per_block = static_cast<int>(lpb);
  const int64_t gx = (a.T + ty - 1) / ty;
  if (gx > 0x7fffffffLL) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>(gx), static_cast<unsigned>((a.L + lpb - 1) / lpb));
  const dim3 block(static_cast<unsigned>(a.groups), static_cast<unsigned>(ty));
  if (paged) {
    rerotate_kernel<Tr, VEC, NEOX, ALIGNED, true><<<grid, block, 0, stream>>>(a);
  } else {
    rerotate_kernel<Tr, VEC, NEOX, ALIGNED, false><<<grid, block, 0, stream>>>(a);
  }
  return cudaGetLastError();
}

// vec_ok: the caller checked that every word start is 16-byte aligned for VEC = 16 / esize.
template <typename Tr>
cudaError_t launch(const RotArgs& a, bool neox, bool paged, bool vec_ok, cudaStream_t stream) {
  constexpr int V = 16 / Tr::kSize;
  if (neox) {
    return vec_ok ? launch_vec<Tr, V, true, true>(a, paged, stream) : launch_vec<Tr, 1, true, false>(a, paged, stream);
  }
  return vec_ok ? launch_vec<Tr, V, false, true>(a, paged, stream) : launch_vec<Tr, 2, false, false>(a, paged, stream);
}

cudaError_t dispatch(const RotArgs& a, int key_dtype, bool neox, bool paged, bool vec_ok, cudaStream_t stream) {
  switch (key_dtype) {
    case 0: return launch<F32>(a, neox, paged, vec_ok, stream);
    case 1: return launch<F16>(a, neox, paged, vec_ok, stream);
    case 2: return launch<BF16>(a, neox, paged, vec_ok, stream);
    case 3:
      if (!a.k_scale) return cudaErrorInvalidValue;
      return launch<FP8>(a, neox, paged, vec_ok, stream);
    default: return cudaErrorInvalidValue;
  }
}

int esize_of(int key_dtype) { return key_dtype == 0 ? 4 : (key_dtype == 3 ? 1 : 2); }

bool mult(int64_t v, int64_t m) { return v % m == 0; }

}  // namespace
}  // namespace kvk

cudaError_t kvk_rerotate_keys(void* key, int key_dtype, int64_t L, int64_t T, int64_t H, int64_t D, int64_t sL,
                              int64_t sT, int64_t sH, const float* k_scale, int64_t ssL, int64_t ssT, int64_t ssH,
                              const int64_t* old_pos, const int64_t* new_pos, const float* cos_sin,
                              int64_t max_pos, int64_t half, int is_neox, cudaStream_t stream) {
  if (L <= 0 || T <= 0 || H <= 0) return cudaSuccess;
  if (half <= 0 || half > kvk::kMaxHalf || 2 * half > D || key_dtype < 0 || key_dtype > 3) return cudaErrorInvalidValue;
  const int es = kvk::esize_of(key_dtype);
  const int64_t V = 16 / es;
  const bool vec_ok = reinterpret_cast<uintptr_t>(key) % 16 == 0 && kvk::mult(sL, V) && kvk::mult(sT, V) &&
                      kvk::mult(sH, V) && (is_neox ? kvk::mult(half, V) : kvk::mult(2 * half, V));
  kvk::RotArgs a{};
  a.key = key;
  a.L = L, a.T = T, a.H = H, a.sL = sL, a.sT = sT, a.sH = sH;
  a.x = D, a.sDI = 1;
  a.k_scale = key_dtype == 3 ? k_scale : nullptr;
  a.ssL = ssL, a.ssT = ssT, a.ssH = ssH;
  a.old_pos = old_pos, a.new_pos = new_pos, a.cos_sin = cos_sin, a.max_pos = max_pos;
  a.half = static_cast<int>(half);
  return kvk::dispatch(a, key_dtype, is_neox != 0, false, vec_ok, stream);
}

cudaError_t kvk_rerotate_keys_paged(const int64_t* ptrs, int key_dtype, int64_t L, int64_t T, int64_t H, int64_t D,
                                    int64_t NB, int64_t BS, int64_t sB, int64_t sT, int64_t sH, int64_t sDX,
                                    int64_t sDI, int64_t x, int aligned16, const int64_t* slots,
                                    const float* k_scale, int64_t ssL, int64_t ssH, const int64_t* old_pos,
                                    const int64_t* new_pos, const float* cos_sin, int64_t max_pos, int64_t half,
                                    int is_neox, cudaStream_t stream) {
  if (L <= 0 || T <= 0 || H <= 0) return cudaSuccess;
  if (!ptrs || !slots || NB <= 0 || BS <= 0 || x <= 0 || D % x) return cudaErrorInvalidValue;
  if (half <= 0 || half > kvk::kMaxHalf || 2 * half > D || key_dtype < 0 || key_dtype > 3) return cudaErrorInvalidValue;
  const int es = kvk::esize_of(key_dtype);
  const int64_t V = 16 / es;
  // a word of V channels must be V consecutive elements: dense inner dim, x-split not cutting it
  const bool vec_ok = aligned16 && sDI == 1 && kvk::mult(x, V) && kvk::mult(sB, V) && kvk::mult(sT, V) &&
                      kvk::mult(sH, V) && (x == D || kvk::mult(sDX, V)) &&
                      (is_neox ? kvk::mult(half, V) : kvk::mult(2 * half, V));
  kvk::RotArgs a{};
  a.ptrs = ptrs, a.slots = slots;
  a.L = L, a.T = T, a.H = H, a.sT = sT, a.sH = sH;
  a.sB = sB, a.BS = BS, a.nslots = NB * BS, a.sDX = sDX, a.sDI = sDI, a.x = x;
  a.k_scale = key_dtype == 3 ? k_scale : nullptr;
  a.ssL = ssL, a.ssT = 0, a.ssH = ssH;
  a.old_pos = old_pos, a.new_pos = new_pos, a.cos_sin = cos_sin, a.max_pos = max_pos;
  a.half = static_cast<int>(half);
  return kvk::dispatch(a, key_dtype, is_neox != 0, true, vec_ok, stream);
}

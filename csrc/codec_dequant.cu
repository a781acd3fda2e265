// csrc/codec_dequant.cu -- rANS decode fused with dequantization (docs/codec-spec.md "Fused
// decode", docs/codec.md "Decode into pages"): the kernel behind kvk_rans_decode's fused mode
// (a dense [S, N, C] output) and kvk_rans_decode_pages (straight into an engine's paged caches).
//
// A warp decodes one 32-lane block (segment s, channels c0..c0+31; csrc/codec_gpu.cuh),
// dequantizes each symbol by the generic map and writes it, with no intermediate buffer:
// * dense: token n of segment s at out + s*os_s + n*os_n + c;
// * paged: segments[s] = (cache r, first flat token t0, tokens ns): token n goes to slot
//   slots[t0 + n] of cache r (kv = r / L, layer = r % L) through the layout's strides (csrc/paged.h
//   addressing, fp8 e4m3 with per-(layer, head) scales); one launch for every layer.
// Stores: the values go from registers into a 512-byte per-warp tile in shared memory (TOK = 16 /
// element-size tokens x 32 channels), then each lane writes one 16-byte word (a token's 32 bf16
// channels are 4 lanes' words) where the destination allows (32 dense, aligned channels a
// token); otherwise each lane stores its element from the tile. Per-token inputs (s_tok, the
// slot) are loaded once per tile, one lane a token, and shuffled. Level rows: per table (the
// 32 lanes' rows in shared memory, odd row stride: no bank conflicts when lanes share a symbol)
// or per segment (one row, read through L1: no shared memory, so occupancy as the plain decode).
// Reads are bounded by the offsets (checked against the payload size), writes by the
// destination: slots < 0 or >= NB * BS are skipped, a malformed segment descriptor writes
// nothing (ERR_SEGMENT), a block that fails to decode writes zeros at its addressed elements,
// and *status gets the bits.
#include "codec.h"

#include <type_traits>

#include "codec_gpu.cuh"
#include "quant_math.cuh"

using namespace kvk_codec;
using kvk_codec::gpu::kFull;

namespace {

constexpr int kWarps = 4;

template <int DT> struct Out;
template <> struct Out<0> { using T = float; };
template <> struct Out<1> { using T = uint16_t; };
template <> struct Out<2> { using T = uint16_t; };
template <> struct Out<3> { using T = uint8_t; };

// float32 -> the cache element (fp8: e4m3 of clamp(v * inv), inv = min(1 / scale, FLT_MAX)).
// fp16 / bf16: the hardware's round-to-nearest-even conversion, equal to codec_common.cuh's
// integer f32_to_f16 / f32_to_bf16 (the CPU's) for every value but NaN (a NaN either way).
template <int DT>
__device__ __forceinline__ typename Out<DT>::T convert(float v, float inv) {
  if constexpr (DT == 0) return v;
  else if constexpr (DT == 1) return __half_as_ushort(__float2half_rn(v));
  else if constexpr (DT == 2) return __bfloat16_as_ushort(__float2bfloat16_rn(v));
  else return (uint8_t)kvk::fp8_encode(kvk::fp8_prescale(v, inv));
}

struct PagesArgs {
  const uint8_t* payload;
  int64_t nbytes;
  const int64_t* offsets;
  const uint16_t* cum;
  const uint8_t* ok;
  int64_t K;
  int bins, pb;
  const int32_t* tid;
  int64_t S, N, C;
  const float* lut;  // [K, bins] (per table) or [S, bins] (per segment)
  const float* s_tok;
  const float* s_ch;
  const float* z_ch;
  const int64_t* seg;  // [S, 3]
  const void* slots;
  int slots64;
  int64_t T;
  KvkPagedCaches c;  // paged destination
  void* out;         // dense destination
  int64_t os_s, os_n;
  int32_t* status;
};

__device__ __forceinline__ int64_t load_slot(const PagesArgs& a, int64_t i) {
  return a.slots64 ? static_cast<const int64_t*>(a.slots)[i] : int64_t(static_cast<const int32_t*>(a.slots)[i]);
}

template <int DT, bool VEC, bool LSEG, bool DENSE, bool SMALL>
// At most 48 registers (40 warps an SM) for the dense output (no spills on sm_90) and the paged
// 16-byte path with per-segment levels (12 bytes spilled once, outside the token loop); the
// other paged variants keep the compiler's choice (a bound spills their addressing state).
__global__ void __launch_bounds__(kWarps * 32, (DENSE || (VEC && LSEG && DT != 3)) ? 10 : 1) rans_dequant_kernel(const PagesArgs a) {
  using E = typename Out<DT>::T;
  constexpr int ES = sizeof(E);
  constexpr int TOK = 16 / ES;  // tokens per tile: 32 lanes x 16 bytes = TOK tokens x 32 channels
  constexpr int CPT = 32 / TOK;  // 16-byte words per token row of 32 channels
  extern __shared__ __align__(16) unsigned char smem[];
  const int warp = threadIdx.x / 32, lane = threadIdx.x & 31;
  const gpu::WarpSmem lay(a.bins, LSEG ? 1 : LANES, true);
  unsigned char* mine = smem + warp * lay.bytes();
  uint16_t* sh_cum = reinterpret_cast<uint16_t*>(mine);
  float* sh_lut = reinterpret_cast<float*>(mine + lay.cum_bytes);
  E* tile = reinterpret_cast<E*>(mine + lay.cum_bytes + lay.lut_bytes);

  gpu::WarpBlock wb;
  if (!wb.init((int64_t)blockIdx.x * (blockDim.x / 32) + warp, a.S, a.C, lane)) return;  // warp-uniform
  const int64_t b = wb.b, s = wb.s, c0 = wb.c0;
  const int na = wb.na;
  const bool active = VEC || wb.active;  // VEC: C % 32 == 0, every lane active

  // the segment's destination (paged: untrusted, checked; never written when malformed)
  int64_t r = 0, t0 = 0, ns = a.N;
  if constexpr (!DENSE) {
    r = a.seg[3 * s];
    t0 = a.seg[3 * s + 1];
    ns = a.seg[3 * s + 2];
    if (r < 0 || r >= a.c.num_kv * a.c.num_layers || ns < 0 || ns > a.N || t0 < 0 || t0 > a.T - ns) {
      if (lane == 0) atomicOr(a.status, ERR_SEGMENT);
      return;
    }
  }
  const int kv = DENSE ? 0 : r >= a.c.num_layers;
  const int64_t l = r - kv * a.c.num_layers;
  // strides of this cache (selected, not indexed: the parameter block stays in constant space)
  const int64_t sB = kv ? a.c.st[1][0] : a.c.st[0][0], sT = kv ? a.c.st[1][1] : a.c.st[0][1];
  const int64_t sH = kv ? a.c.st[1][2] : a.c.st[0][2], sDX = kv ? a.c.st[1][3] : a.c.st[0][3];
  const int64_t sDI = kv ? a.c.st[1][4] : a.c.st[0][4];
  E* base = DENSE ? static_cast<E*>(a.out) + s * a.os_s : reinterpret_cast<E*>(a.c.ptrs[r]);
  const int64_t D = DENSE ? a.C : a.c.head_dim, X = DENSE ? a.C : a.c.x, BS = DENSE ? 1 : a.c.block_size;
  const int64_t nslots = DENSE ? a.N : a.c.num_blocks * a.c.block_size;
  // this lane's element offset within a token row (generic path) / its 16-byte word's (VEC)
  const int64_t c = c0 + (VEC ? (lane % CPT) * TOK : lane);
  const int64_t h = c / D, d = c - h * D;
  const int64_t coff = DENSE ? c : h * sH + (d / X) * sDX + (d % X) * sDI;
  E* const dst = base + coff;
  // row offset of a token's slot (dense: the token index); 32-bit division when the slots fit
  const bool slots32 = nslots <= 0x7FFFFFFF;
  auto row_of = [&](int64_t sl) -> int64_t {
    if constexpr (DENSE) return sl * a.os_n;
    if (slots32) {
      const uint32_t u = (uint32_t)sl, bs = (uint32_t)BS, blk = u / bs;
      return (int64_t)blk * sB + (int64_t)(u - blk * bs) * sT;
    }
    const int64_t blk = sl / BS;
    return blk * sB + (sl - blk * BS) * sT;
  };
  float inv = 1.f;
  if constexpr (DT == 3 && !DENSE) {
    const int64_t hl = (c0 + lane) / D;  // the head of this lane's channel
    if (active)
      inv = kvk::fp8_inv(kv ? a.c.v_scale[l * a.c.vs_l + hl * a.c.vs_h] : a.c.k_scale[l * a.c.ks_l + hl * a.c.ks_h]);
  }

  int64_t k;
  int32_t st = gpu::warp_rows(a.tid, a.ok, a.K, s, a.C, c0, lane, active, &k);
  gpu::load_rows(a.cum, LSEG ? nullptr : a.lut, a.bins, k, na, lane, sh_cum, LSEG ? nullptr : sh_lut,
                 lay.lut_stride);
  if constexpr (LSEG) {  // the segment's one level row
    for (int e = lane; e < a.bins; e += 32) sh_lut[e] = a.lut[s * a.bins + e];
    __syncwarp();
  }
  gpu::WarpDecoder dec;
  st = dec.begin(a.payload, a.nbytes, a.offsets, b, na, lane, sh_cum + lane * gpu::cum_stride(a.bins), a.bins, a.pb,
                 active, st);

  float sch = 1.f, zch = -0.f;  // the identities of an absent factor
  if (active) {
    if (a.s_ch) sch = a.s_ch[s * a.C + c0 + lane];
    if (a.z_ch) zch = a.z_ch[s * a.C + c0 + lane];
  }
  const float* lrow = sh_lut + lane * lay.lut_stride;  // per segment: stride 0, one row
  const float* stok = a.s_tok ? a.s_tok + s * a.N : nullptr;

  // Stores of tile [n0, n0 + cnt): VEC: lane's word (token lane / CPT) from the tile, or zeros.
  auto flush = [&](int cnt, int64_t slot_j, bool zero) {
    if constexpr (VEC) {
      __syncwarp();
      const int j = lane / CPT;
      const int64_t sl = __shfl_sync(kFull, slot_j, j);
      if (j < cnt && sl >= 0 && sl < nslots) {
        const uint4 v = zero ? make_uint4(0, 0, 0, 0) : reinterpret_cast<const uint4*>(tile)[lane];
        *reinterpret_cast<uint4*>(dst + row_of(sl)) = v;
      }
      __syncwarp();
    } else {
      for (int j = 0; j < cnt; ++j) {
        const int64_t sl = __shfl_sync(kFull, slot_j, j);
        if (active && sl >= 0 && sl < nslots) dst[row_of(sl)] = zero ? E(0) : tile[j * 32 + lane];
      }
    }
  };

  const int nt = (int)ns;  // <= N < 2^31
  auto run = [&](auto w16) {
    for (int n0 = 0; n0 < nt && !st; n0 += TOK) {
      const int cnt = nt - n0 < TOK ? nt - n0 : TOK;
      // per-token loads of the tile, one lane each (then shuffled): the token scale and the slot
      float stok_j = 1.f;
      int64_t slot_j = -1;
      if (lane < cnt) {
        if (stok) stok_j = stok[n0 + lane];
        slot_j = DENSE ? n0 + lane : load_slot(a, t0 + n0 + lane);
      }
      for (int j = 0; j < cnt; ++j) {
        int sy;
        if (!dec.template step<SMALL, decltype(w16)::value>(&sy)) { st = ERR_TRUNCATED; break; }
        const float stk = __shfl_sync(kFull, stok_j, j);
        if (active) {
          // absent factors are exact identities (x * 1 = x, x + -0 = x): no per-token tests
          const float val = fadd_rn(fmul_rn(fmul_rn(lrow[sy], stk), sch), zch);
          tile[j * 32 + lane] = convert<DT>(val, inv);
        }
      }
      if (st) break;
      flush(cnt, slot_j, false);
    }
  };
  if (dec.w16) run(std::true_type{});  // warp-uniform: one loop per word alignment
  else run(std::false_type{});
  if (!st && !dec.finished_ok()) st = ERR_TRAILING;
  if (st) {  // the whole block as zeros at its addressed slots (as the dense decoder)
    for (int n0 = 0; n0 < nt; n0 += TOK) {
      const int cnt = nt - n0 < TOK ? nt - n0 : TOK;
      const int64_t slot_j = lane >= cnt ? -1 : DENSE ? n0 + lane : load_slot(a, t0 + n0 + lane);
      flush(cnt, slot_j, true);
    }
    if (lane == 0) atomicOr(a.status, st);
  }
}

template <int DT, bool VEC, bool DENSE>
cudaError_t launch_dt(const PagesArgs& a, bool lseg, cudaStream_t stream) {
  const int64_t nb = a.S * ((a.C + LANES - 1) / LANES);
  const gpu::WarpSmem lay(a.bins, lseg ? 1 : LANES, true);
  int warps = kWarps;  // fewer warps a block when the tables are wide (bins up to 256)
  while (warps > 1 && warps * lay.bytes() > 48 * 1024) warps >>= 1;
  const size_t smem = (size_t)warps * lay.bytes();
  const bool small = a.bins <= gpu::kSmallBins;
  auto kern = lseg ? (small ? rans_dequant_kernel<DT, VEC, true, DENSE, true> : rans_dequant_kernel<DT, VEC, true, DENSE, false>)
                   : (small ? rans_dequant_kernel<DT, VEC, false, DENSE, true> : rans_dequant_kernel<DT, VEC, false, DENSE, false>);
  if (smem > 48 * 1024) {
    cudaError_t e = cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
    if (e != cudaSuccess) return e;
  }
  kern<<<(unsigned)((nb + warps - 1) / warps), warps * 32, smem, stream>>>(a);
  return cudaGetLastError();
}

template <int DT, bool DENSE>
cudaError_t launch_vec(const PagesArgs& a, bool vec, bool lseg, cudaStream_t stream) {
  return vec ? launch_dt<DT, true, DENSE>(a, lseg, stream) : launch_dt<DT, false, DENSE>(a, lseg, stream);
}

template <bool DENSE>
cudaError_t launch(const PagesArgs& a, int dtype, bool vec, bool lseg, cudaStream_t stream) {
  switch (dtype) {
    case 0: return launch_vec<0, DENSE>(a, vec, lseg, stream);
    case 1: return launch_vec<1, DENSE>(a, vec, lseg, stream);
    case 2: return launch_vec<2, DENSE>(a, vec, lseg, stream);
    default:
      if constexpr (DENSE) return cudaErrorInvalidValue;  // no fp8 dense output
      else return launch_vec<3, DENSE>(a, vec, lseg, stream);
  }
}

constexpr int elem_size(int dtype) { return dtype == 0 ? 4 : dtype == 3 ? 1 : 2; }

// 16-byte stores are legal: a warp's 32 channels lie in one head (D % 32 == 0), each 16-byte
// word of channels is contiguous (dim_inner stride 1, the head_dim split x a multiple of the
// word) and every base and stride is 16-byte aligned.
bool vec_ok(const KvkPagedCaches& c, int es) {
  const int64_t e = 16 / es;
  if (!c.aligned16 || c.head_dim % 32 || c.x % e) return false;
  for (int kv = 0; kv < c.num_kv; ++kv) {
    if (c.st[kv][4] != 1) return false;
    for (int j = 0; j < 4; ++j)
      if ((c.st[kv][j] * es) % 16) return false;
  }
  return true;
}

}  // namespace

cudaError_t kvk_rans_decode_pages(const uint8_t* payload, int64_t nbytes, const int64_t* offsets, const uint16_t* cum,
                                  const uint8_t* ok, int64_t K, int bins, const int32_t* tid, int pb, int64_t S,
                                  int64_t N, int64_t C, const float* lut, int lut_per_segment, const float* s_tok,
                                  const float* s_ch, const float* z_ch, const int64_t* segments,
                                  const KvkPagedCaches* caches, const void* slots, int slots_int64, int64_t T,
                                  int32_t* status, cudaStream_t stream) {
  if (caches == nullptr || lut == nullptr || segments == nullptr || status == nullptr) return cudaErrorInvalidValue;
  const KvkPagedCaches& c = *caches;
  if (c.num_heads * c.head_dim != C || bins < 1 || bins > 256 || pb < 1 || pb > 12 || N < 0 || T < 0 ||
      c.num_kv < 1 || c.num_kv > 2 || c.x < 1 || c.block_size < 1 || c.cache_dtype < 0 || c.cache_dtype > 3 ||
      (c.cache_dtype == 3 && c.k_scale == nullptr) || (c.cache_dtype == 3 && c.num_kv == 2 && c.v_scale == nullptr))
    return cudaErrorInvalidValue;
  if (S <= 0 || C <= 0) return cudaSuccess;
  PagesArgs a{payload, nbytes, offsets, cum, ok, K, bins, pb, tid, S, N, C, lut, s_tok, s_ch, z_ch, segments,
              slots, slots_int64, T, c, nullptr, 0, 0, status};
  return launch<false>(a, c.cache_dtype, vec_ok(c, elem_size(c.cache_dtype)), lut_per_segment != 0, stream);
}

cudaError_t kvk_rans_decode_dequant(const uint8_t* payload, int64_t nbytes, const int64_t* offsets,
                                    const uint16_t* cum, const uint8_t* ok, int64_t K, int bins, const int32_t* tid,
                                    int pb, int64_t S, int64_t N, int64_t C, void* out, const float* lut,
                                    int lut_per_segment, const float* s_tok, const float* s_ch, const float* z_ch,
                                    int dtype, int64_t os_s, int64_t os_n, int32_t* status, cudaStream_t stream) {
  if (lut == nullptr || out == nullptr || status == nullptr || dtype < 0 || dtype > 2 || bins < 1 || bins > 256 ||
      pb < 1 || pb > 12 || N < 0)
    return cudaErrorInvalidValue;
  if (S <= 0 || C <= 0 || N == 0) return cudaSuccess;
  KvkPagedCaches none{};
  PagesArgs a{payload, nbytes, offsets, cum, ok, K, bins, pb, tid, S, N, C, lut, s_tok, s_ch, z_ch, nullptr,
              nullptr, 0, 0, none, out, os_s, os_n, status};
  const int es = elem_size(dtype);
  const bool vec = C % 32 == 0 && reinterpret_cast<uintptr_t>(out) % 16 == 0 && (os_s * es) % 16 == 0 &&
                   (os_n * es) % 16 == 0;
  return launch<true>(a, dtype, vec, lut_per_segment != 0, stream);
}

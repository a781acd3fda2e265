// quant_fp8_onepass.cu -- fp8 tensor / head scopes with computed scales in one pass over x:
// quant_fp8_resident_kernel (cooperative grid or thread-block clusters) and launch_fp8_resident.
#include "quant_launch.cuh"

#include <cooperative_groups.h>

namespace kvk {
namespace {

// ================================================================================================
// fp8 tensor / head scopes with computed scales, one pass: quant_fp8_resident_kernel
// ================================================================================================
// The two-kernel path above reads x twice (amax, then quantize). Here the grid is co-resident
// (cooperative launch, one block of 1024 threads per SM) and x is read from HBM once: a step (B
// whole layers, <= 8 MiB of input) is copied into shared memory (cp.async), where it stays until
// every block has reduced its amax. Three steps are on chip at a time; at iteration s:
//
//   step s has landed: its amax per key -> this block's slots (publish)
//   step s-1 (published one iteration ago): wait for every block's slots, scale, quantize, store
//   step s+2: loads start into the stage step s-1 held (two iterations to land)
//
// The barrier is the data: workspace slot (key, block) (key = layer, or (layer, head); uint32)
// receives block b's amax for the key with bit 31 set, in one store; a block waiting for step s
// polls the step's slots until all are set and reduces them. No fence, no counter (an arrival
// counter behind a fence cost two more L2 round trips per step). The first poll load of step s-1
// is issued before step s's publish, so its L2 round trip (~0.6 us under load) overlaps it. Each
// block clears its own slot column at the start, behind one grid barrier before the first loads
// (a memset node before the kernel cost 2-3 us).
// Measured (H200, bench/results/fp8-resident-h200-2026-11-27.txt, per-block %globaltimer traces
// by the fifth session's harness, git show 15bb67d:scripts/exp/fp8_resident_exp.cu, of this
// pipeline with the early poll): a step costs ~3.3 us for ~2.6 us of HBM time: landing wait
// ~0.7, publish ~1.1, barrier wait ~0.5, quantize + store ~1.1, phases that all 32 warps of an
// SM go through together, so a step's instructions and block barriers are on the critical path.
// With one layer per step the UNI variant (below) cuts both: bench (5867c14,
// bench/results/fp8-uni-h200-2026-11-27.txt) 91.1% of copy for fp8:tensor on Llama-3-8B T=4096
// (was 85.5%), head 81.3% (79.1%); SmolLM2 (5 layers a step, generic variant) 73% / 61%, where
// the two kernels reach 49-57%. Larger layers take the two-kernel path,
// except for the head scope where one head's [T, D] fits: it runs as the tensor scope over L * H
// pseudo-layers (ResidentArgs: Hsub > 1), fp8:head on Llama-3-8B T=32768 58 -> 89.5-90.0% of copy
// (ninth session, bench/results/fp8-head-split-h200-2026-11-27.txt; KVK_FP8_HEAD_SPLIT=0: off).
// Block groups (tenth session, bench/results/fp8-groups-h200-2026-11-27.txt; KVK_FP8_GROUPS=0:
// off): wherever a (pseudo-)layer has >= kGroupMinVectors vectors, the grid is NG groups of gpb
// blocks and group g holds (pseudo-)layer s * NG + g at step s, whole, so every block has one key
// and runs the UNI tensor-scope variant, and each layer's barrier involves its own group only.
// The head scope then always runs as pseudo-layers. Llama-3-8B fp8:head T=4096 80 -> 88-89%,
// SmolLM2 tensor / head T=4096 70 / 58 -> 79-81 / 74-76%, SmolLM2 head T=32768 70 -> 89-90%.
// The first grid barrier moved before the first loads (same session, same record): 88-89 -> 90%
// (Llama tensor and head), SmolLM2 79 / 74 -> 83-84 / 80%.
// Clusters (fifteenth session, bench/results/fp8-onepass-15th-h100-2026-12-06.txt;
// KVK_FP8_CLUSTER=0: off): groups of <= 16 blocks on sm_90 are thread-block clusters (CL
// variant). Each block sends its amax of a step to every peer with st.async, which completes the
// peer's mbarrier; no L2 slots, no polling, no clearing, no grid barrier, no cooperative launch.
// H100, two calls of two alternating A/B runs: SmolLM2 fp8:head T=4096 (15 clusters of 8)
// 84.7-86.2 -> 93.8-95.5% of copy; Llama-3-8B fp8:head T=4096 (7 clusters of 16 instead of 8
// cooperative groups) 96.2-96.5 -> 96.0-96.1. Two first versions (a red from every warp, or one a
// block, into each peer, and one cluster barrier a step) ran at 78-82%: the trace's publish phase,
// which holds the barrier's wait, took ~2 us a step (presumably the arrive's release waiting for
// the thread's copies and stores in flight, as the grid barrier did in the fourteenth session).
constexpr int kResBlock = 1024;   // 32 warps per SM
constexpr int kResStages = 3;     // steps held in shared memory
constexpr uint32_t kSlotFull = 0x80000000u;
constexpr int kResMaxKeys = 256;  // amax entries per step (B * Hs)
constexpr int64_t kGroupMinVectors = 4 * kResBlock;  // block groups: layers of at least 4 blocks' vectors (K = 1)

// "Layer" below is a layer of x, or with Hsub > 1 one head of one (the head scope of a layer too
// big for the chip whose heads fit, run as the tensor scope over L * H pseudo-layers [T, D]):
// pseudo-layer p = l * Hsub + h starts at x + l * sL + h * D (codes: l * N * Hsub + h * D), and
// its rows of C vectors are Hsub * C vectors apart in x and codes.
struct ResidentArgs {
  const void* x;       // layer l: N = T*H*D dense elements at x + l * sL
  int64_t sL;
  uint8_t* codes;      // [L, N] e4m3
  float* scale;        // [L * Hs]
  uint32_t* slots;     // workspace [L * Hs, gpb]: block bl's (of the key's group) amax of a key, kSlotFull | float bits
  uint32_t L, B, Hs, nsteps, Nv;  // Nv: 16-byte vectors per layer
  uint32_t Hsub;                  // pseudo-layers (above); 1 for whole layers
  uint32_t NG;                    // UNI variant: block groups (below); 1 otherwise
  FastDiv divNv, divC, divH, divHsub;  // C = D / VE vectors per (token, head) row
};

// max |x| of 16-byte vectors, in the element type's bit format (|x| bits order like the values
// for fp32/fp16/bf16, NaN above inf). For 16-bit types a word holds two running maxima (packed
// max; unpack with abs_acc_finish): abs_acc accumulates vectors without unpacking each.
template <typename Tr>
__device__ __forceinline__ uint32_t abs_vmax(uint32_t a, uint32_t b) {  // max of (packed) |x| bits
  if constexpr (Tr::kSize == 4) return max(a, b);
  else return __vmaxu2(a, b);
}
template <typename Tr>
__device__ __forceinline__ uint32_t abs_pair(uint32_t a, uint32_t b) {  // of two raw words
  constexpr uint32_t M = Tr::kSize == 4 ? 0x7fffffffu : 0x7fff7fffu;
  return abs_vmax<Tr>(a & M, b & M);
}
template <typename Tr>
__device__ __forceinline__ uint32_t abs_acc_finish(uint32_t acc) {
  if constexpr (Tr::kSize == 4) return acc;
  else return max(acc & 0xffffu, acc >> 16);
}
template <typename Tr>
__device__ __forceinline__ uint32_t abs_vec(const uint4& w) {  // one vector, packed for 16-bit types
  return abs_vmax<Tr>(abs_pair<Tr>(w.x, w.y), abs_pair<Tr>(w.z, w.w));
}
template <typename Tr>
__device__ __forceinline__ uint32_t abs_acc(uint32_t acc, const uint4& w) {
  // (the association that compiles to 3-input max instructions in both cases)
  if constexpr (Tr::kSize == 4) return abs_vmax<Tr>(acc, abs_vec<Tr>(w));
  else return abs_vmax<Tr>(abs_vmax<Tr>(acc, abs_pair<Tr>(w.x, w.y)), abs_pair<Tr>(w.z, w.w));
}
template <typename Tr>
__device__ __forceinline__ uint32_t abs_max_bits(const uint4& w) { return abs_acc_finish<Tr>(abs_vec<Tr>(w)); }
// The spec's amax is over finite values. The packed maxima above include Inf / NaN (their |x|
// bits are the largest); a thread whose maximum is not finite (rare) reduces its vectors again
// with the non-finite elements left out (abs_max_bits_finite): the common path gains one compare.
template <typename Tr>
constexpr uint32_t kAbsInf = Tr::kSize == 4 ? 0x7f800000u : std::is_same<Tr, BF16>::value ? 0x7f80u : 0x7c00u;
template <typename Tr>
__device__ __noinline__ uint32_t abs_max_bits_finite(const uint4& w) {
  const uint32_t ws[4] = {w.x, w.y, w.z, w.w};
  uint32_t m = 0;
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    if constexpr (Tr::kSize == 4) {
      const uint32_t b = ws[k] & 0x7fffffffu;
      if (b < kAbsInf<Tr>) m = max(m, b);
    } else {
      const uint32_t lo = ws[k] & 0x7fffu, hi = (ws[k] >> 16) & 0x7fffu;
      if (lo < kAbsInf<Tr>) m = max(m, lo);
      if (hi < kAbsInf<Tr>) m = max(m, hi);
    }
  }
  return m;
}
template <typename Tr>
__device__ __forceinline__ uint32_t abs_max_bits_checked(const uint4& w) {
  const uint32_t m = abs_max_bits<Tr>(w);
  return m < kAbsInf<Tr> ? m : abs_max_bits_finite<Tr>(w);
}
template <typename Tr>
__device__ __forceinline__ float abs_bits_to_float(uint32_t b) {
  if constexpr (Tr::kSize == 4) return __uint_as_float(b);
  else return Tr::to_float(static_cast<typename Tr::storage>(b));
}

// A 16-byte vector as floats. bf16 straight from the 32-bit words (low element: w << 16, high: the
// word with its low half cleared), one instruction per element.
template <typename Tr, int VE>
__device__ __forceinline__ void vec16_to_float(const uint4& w, float (&f)[VE]) {
  if constexpr (std::is_same<Tr, BF16>::value) {
    const uint32_t u[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      f[2 * j] = __uint_as_float(u[j] << 16);
      f[2 * j + 1] = __uint_as_float(u[j] & 0xffff0000u);
    }
  } else {
    Vec<Tr, VE> raw;
    raw.w = w;
    raw_to_float<Tr, VE>(raw, f);
  }
}

__device__ __forceinline__ uint32_t ld_relaxed_gpu(const uint32_t* p) {  // from L2, never a stale L1 line
  uint32_t v;
  asm volatile("ld.relaxed.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}
__device__ __forceinline__ void st_relaxed_gpu(uint32_t* p, uint32_t v) {
  asm volatile("st.relaxed.gpu.global.u32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
  const uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(valid ? 16 : 0)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory"); }

// Thread-block clusters (sm_90) for the one-pass kernel's CL variant: the cluster barrier, split
// into arrive (release) and wait (acquire), and shared-memory mbarriers with transaction counts:
// st_async_cluster stores 4 bytes into a peer block's shared memory and completes 4 bytes of its
// mbarrier's transaction count, with no fence on the sender (a release -- a fence, or a
// barrier.cluster.arrive -- waits for the thread's copies and stores in flight: ~2 us a step,
// fifteenth session). The PTX needs CUDA 12.1 (st.async); with an older toolkit the helpers are
// empty and the launcher never picks the variant. Thread 0's arrival on its own mbarrier is
// relaxed from CUDA 12.8 on (PTX ISA 8.6) and a release before it.
#if defined(__CUDACC_VER_MAJOR__) && (__CUDACC_VER_MAJOR__ > 12 || (__CUDACC_VER_MAJOR__ == 12 && __CUDACC_VER_MINOR__ >= 1))
#define KVK_CLUSTER_PTX 1
#else
#define KVK_CLUSTER_PTX 0
#endif
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900 && KVK_CLUSTER_PTX
#define KVK_CLUSTER_DEVICE 1
#else
#define KVK_CLUSTER_DEVICE 0
#endif
__device__ __forceinline__ void cluster_arrive() {
#if KVK_CLUSTER_DEVICE
  asm volatile("barrier.cluster.arrive.release.aligned;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void cluster_wait() {
#if KVK_CLUSTER_DEVICE
  asm volatile("barrier.cluster.wait.acquire.aligned;\n" ::: "memory");
#endif
}
#if !defined(__CUDA_ARCH__) || KVK_CLUSTER_DEVICE
__device__ __forceinline__ uint32_t smem_u32(const void* p) { return static_cast<uint32_t>(__cvta_generic_to_shared(p)); }
#endif
__device__ __forceinline__ void mbar_init(uint64_t* bar, uint32_t count) {
#if KVK_CLUSTER_DEVICE
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_u32(bar)), "r"(count) : "memory");
#endif
}
__device__ __forceinline__ void mbar_init_fence() {
#if KVK_CLUSTER_DEVICE
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void mbar_arrive_expect_tx(uint64_t* bar, uint32_t bytes) {
#if KVK_CLUSTER_DEVICE
#if __CUDACC_VER_MAJOR__ > 12 || __CUDACC_VER_MINOR__ >= 8
  asm volatile("mbarrier.arrive.expect_tx.relaxed.cta.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_u32(bar)), "r"(bytes)
               : "memory");
#else
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_u32(bar)), "r"(bytes) : "memory");
#endif
#endif
}
__device__ __forceinline__ void mbar_wait_parity(uint64_t* bar, uint32_t parity) {
#if KVK_CLUSTER_DEVICE
  asm volatile(
      "{\n .reg .pred p;\n"
      "W: mbarrier.try_wait.parity.acquire.cluster.shared::cta.b64 p, [%0], %1;\n"
      " @!p bra W;\n}\n" ::"r"(smem_u32(bar)), "r"(parity) : "memory");
#endif
}
__device__ __forceinline__ void st_async_cluster(uint32_t* local_dst, uint64_t* local_bar, uint32_t rank, uint32_t v) {
#if KVK_CLUSTER_DEVICE
  uint32_t rd, rb;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;\n" : "=r"(rd) : "r"(smem_u32(local_dst)), "r"(rank));
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;\n" : "=r"(rb) : "r"(smem_u32(local_bar)), "r"(rank));
  asm volatile("st.async.shared::cluster.mbarrier::complete_tx::bytes.u32 [%0], %1, [%2];\n" ::"r"(rd), "r"(v), "r"(rb)
               : "memory");
#endif
}

// Developer trace (experiments/fp8_trace_exp.cu compiles this file with KVK_FP8_TRACE): thread 0
// of each block stores %globaltimer at four points of each of the first 64 steps into
// g_kvk_fp8_trace[grid][64][4]: 0 landed, 1 published, 2 scale known (grid barrier passed),
// 3 quantized (and per block its start and the time past the first grid barrier -- in the CL
// variant, past its first cluster arrive). Without the macro the hooks are empty.
#ifdef KVK_FP8_TRACE
__device__ uint64_t* g_kvk_fp8_trace;
__device__ __forceinline__ void fp8_trace(uint32_t s, int phase) {
  if (threadIdx.x == 0 && g_kvk_fp8_trace && s < 64) {
    uint64_t t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    g_kvk_fp8_trace[(uint64_t(blockIdx.x) * 64 + s) * 4 + phase] = t;
  }
}
#define KVK_FP8_TRACE_AT(s, phase) fp8_trace((s), (phase))
__device__ uint64_t* g_kvk_fp8_start;  // [grid][2]: when each block started, passed the first grid barrier
__device__ __forceinline__ void fp8_trace_start(int i) {
  if (threadIdx.x == 0 && g_kvk_fp8_start) {
    uint64_t t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    g_kvk_fp8_start[blockIdx.x * 2 + i] = t;
  }
}
#define KVK_FP8_TRACE_START(i) fp8_trace_start(i)
#else
#define KVK_FP8_TRACE_AT(s, phase)
#define KVK_FP8_TRACE_START(i)
#endif

// UNI (tensor scope, one (pseudo-)layer per block a step: block groups, or one layer a step; the
// launcher checks the layout): all K slots of a thread, and all threads of a block, have one key.
// A thread reduces its slots in packed registers and the warp with one instruction, with no
// per-slot key bookkeeping: fewer instructions in the publish and quantize phases, which all warps
// of an SM go through together. (A head-scope UNI variant, keys uniform over lane groups of a head
// row, was replaced by block groups over pseudo-layers: 80% against 88-90% of copy.)
//
// CL (UNI with block groups of <= 16 blocks, sm_90): a group is a thread-block cluster and the
// amax exchange stays on chip: each block sends its amax of a step into every peer's shared
// memory (st.async, completing the peer's mbarrier for that step) and waits on its own
// mbarrier. That replaces the L2 slots, their polling, one of the two block barriers a step, the
// slot clearing and its grid barrier; groups never wait for each other, so the launch is not
// cooperative.
template <typename Tr, int K, bool HEAD, bool UNI, bool CL = false>
__global__ void __launch_bounds__(kResBlock, 1) quant_fp8_resident_kernel(const ResidentArgs a) {
  static_assert(!(HEAD && UNI), "the UNI variant is tensor-scope only");
  static_assert(UNI || !CL, "the cluster variant is a UNI variant");
  // UNI: two block barriers per step instead of five. Warp 0 alone polls the step's slots and
  // computes the scale; a thread touches only its own slots of a stage, so no barrier guards the
  // stages; s_amax and s_inv alternate by step parity.
  KVK_FP8_TRACE_START(0);
  constexpr int kPollEarly = UNI ? 5 : 1;  // UNI: slots lane + 32 j loaded early (grids <= 160)
  const uint32_t warp = threadIdx.x >> 5;
  using S = typename Tr::storage;
  constexpr int VE = 16 / Tr::kSize;
  constexpr int kStage = kResBlock * K;  // 16-byte vectors per stage
  extern __shared__ uint4 stages[];      // kResStages x kStage vectors; slot k of thread i at k*kResBlock + i
  __shared__ uint32_t s_amax[kResMaxKeys];
  __shared__ uint32_t s_red[kResMaxKeys];
  __shared__ float s_inv[kResMaxKeys];
  // CL: block r's amax of step s (|x| bits of Tr) in s_cl[s % 4][r], complete when s_bar[s % 4]
  // has passed phase s / 4
  __shared__ uint32_t s_cl[4][16];
  __shared__ __align__(8) uint64_t s_bar[4];
  const uint32_t lane = threadIdx.x & 31;
  // UNI: the grid is NG groups of gpb blocks; group grp takes (pseudo-)layer s * NG + grp at step
  // s, so a step holds NG layers, each with a grid barrier of its own group's gpb blocks. The
  // other variants: one group (gpb = gridDim.x, bl = blockIdx.x).
  const uint32_t gpb = gridDim.x / a.NG, grp = blockIdx.x / gpb, bl = blockIdx.x - grp * gpb;
  const uint32_t g = bl * kResBlock + threadIdx.x, P = gpb * kResBlock;
  auto layer_of = [&](uint32_t s) { return s * a.NG + grp; };  // UNI: this block's layer of step s
  const uint64_t N = uint64_t(a.Nv) * VE;
  for (uint32_t i = threadIdx.x; i < kResMaxKeys; i += kResBlock) s_amax[i] = s_red[i] = 0;

  // Slot k of this thread in a step: vector v = k * P + g of the step's B layers, i.e. layer lb of
  // the step, vector off in it, amax key. The same in every step (decomposed once; only the last
  // step can have fewer layers).
  uint32_t soff[K], slk[K];  // slk: lb | key << 16, or ~0 past a full step
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const uint32_t v = uint32_t(k) * P + g;
    uint32_t lb = 0, off = 0, key = 0;
    if (v < a.B * a.Nv) {
      a.divNv.divmod(v, lb, off);
      if constexpr (HEAD) {
        const uint32_t row = a.divC.div(off);
        key = lb * a.Hs + (row - a.divH.div(row) * a.Hs);
      } else {
        key = lb;
        if (a.Hsub > 1) {  // a head's row: C vectors, then the next token's row of that head
          const uint32_t row = a.divC.div(off);
          off = row * (a.Hsub * a.divC.d) + (off - row * a.divC.d);
        }
      }
      slk[k] = lb | (key << 16);
    } else {
      slk[k] = 0xffffffffu;
    }
    soff[k] = off;
  }
  auto locate = [&](uint32_t s, int k, uint32_t& lb, uint32_t& off, uint32_t& key) -> bool {
    if (slk[k] == 0xffffffffu) return false;
    lb = slk[k] & 0xffffu;
    if (uint64_t(s) * a.B * a.NG + grp + lb >= a.L) return false;  // past the last layer (last step)
    off = soff[k];
    key = slk[k] >> 16;
    return true;
  };
  // where (pseudo-)layer p starts in x and in codes (elements)
  auto x_base = [&](uint32_t p) -> int64_t {
    if (a.Hsub == 1) return int64_t(p) * a.sL;
    uint32_t l, h;
    a.divHsub.divmod(p, l, h);
    return int64_t(l) * a.sL + int64_t(h) * a.divC.d * VE;  // head h: h * D elements in
  };
  auto codes_base = [&](uint32_t p) -> uint64_t {
    if (a.Hsub == 1) return uint64_t(p) * N;
    uint32_t l, h;
    a.divHsub.divmod(p, l, h);
    return uint64_t(l) * N * a.Hsub + uint64_t(h) * a.divC.d * VE;
  };
  // step s's vectors -> stage s % kResStages, asynchronously (invalid slots are zero-filled)
  auto issue = [&](uint32_t s) {
    uint4* st = stages + (s % kResStages) * kStage;
    const int64_t xb = UNI && s < a.nsteps && layer_of(s) < a.L ? x_base(layer_of(s)) : 0;  // UNI: one layer a step
#pragma unroll
    for (int k = 0; k < K; ++k) {
      uint32_t lb = 0, off = 0, key;
      const bool ok = s < a.nsteps && locate(s, k, lb, off, key);
      const S* src = static_cast<const S*>(a.x) + (ok ? (UNI ? xb : x_base(s * a.B + lb)) + int64_t(off) * VE : 0);
      cp_async16(st + k * kResBlock + threadIdx.x, src, ok);
    }
    cp_async_commit();  // one group per step, empty ones too: wait_group counts stay uniform
  };
  // This block's amax per key of step s -> its slots (flag bit | float bits): one store each.
  // max of m per key over the block's warps into red[key] (key ~0: nothing); every lane calls it
  auto warp_max_into = [&](uint32_t* red, uint32_t key, uint32_t m) {
    const uint32_t key0 = __shfl_sync(0xffffffffu, key, 0);
    if (__all_sync(0xffffffffu, key == key0)) {  // the common case: one key per warp
      const uint32_t r = __reduce_max_sync(0xffffffffu, m);
      if (lane == 0 && key0 != 0xffffffffu && r) atomicMax(&red[key0], r);
    } else if (key != 0xffffffffu && m) {
      atomicMax(&red[key], m);
    }
  };
  // UNI: the amax of this warp's slots of step s (packed for 16-bit types) -> s_amax[s & 1]
  // (slots past the layer: 0)
  auto uni_amax_into = [&](uint32_t s) {
    const uint4* st = stages + (s % kResStages) * kStage;
    uint32_t acc = 0;
#pragma unroll
    for (int k = 0; k < K; ++k)
      if (slk[k] != 0xffffffffu) acc = abs_acc<Tr>(acc, st[k * kResBlock + threadIdx.x]);
    uint32_t t = abs_acc_finish<Tr>(acc);
    if (t >= kAbsInf<Tr>) {  // an Inf or NaN among this thread's vectors: the finite values only
      t = 0;
#pragma unroll
      for (int k = 0; k < K; ++k)
        if (slk[k] != 0xffffffffu) t = max(t, abs_max_bits_finite<Tr>(st[k * kResBlock + threadIdx.x]));
    }
    const uint32_t r = __reduce_max_sync(0xffffffffu, t);
    if (lane == 0 && r) atomicMax(&s_amax[s & 1], r);
  };
  // CL: this block's amax of step s (warps -> s_amax[s & 1], one block barrier) -> slot bl of
  // every peer's s_cl[s % 4], by lanes of warp 0 (st.async, completing the peer's s_bar[s % 4]).
  // s_cl[s % 4] is next written at step s + 4, by peers that have received step s + 2 from this
  // block, which it sends after the block barrier of step s + 2, when its threads have read step s.
  auto publish_cl = [&](uint32_t s) {
    uni_amax_into(s);
    __syncthreads();
    if (warp == 0) {
      const uint32_t m = s_amax[s & 1];
      __syncwarp();
      if (lane == 0) s_amax[s & 1] = 0u;  // reused at step s + 2, behind the barrier of step s + 1
      if (lane < gpb) st_async_cluster(&s_cl[s % 4][bl], &s_bar[s % 4], lane, m);
    }
  };
  auto publish = [&](uint32_t s) {
    const uint4* st = stages + (s % kResStages) * kStage;
    if constexpr (UNI) {
      uni_amax_into(s);
    } else {
    // A thread's slots of one key are reduced before the warp's; the warp flushes when any lane's
    // key changes (the decision is warp-uniform: warp_max_into needs every lane).
    uint32_t akey = 0xffffffffu, am = 0;
#pragma unroll
    for (int k = 0; k < K; ++k) {
      uint32_t lb, off, key = 0xffffffffu;
      const uint32_t m = locate(s, k, lb, off, key) ? abs_max_bits_checked<Tr>(st[k * kResBlock + threadIdx.x]) : 0u;
      if (__all_sync(0xffffffffu, k == 0 || key == akey)) {
        akey = key;
        am = max(am, m);
      } else {
        warp_max_into(s_amax, akey, am);
        akey = key;
        am = m;
      }
    }
    warp_max_into(s_amax, akey, am);
    }
    __syncthreads();
    if constexpr (UNI) {  // s_amax by step parity: warps run up to one publish ahead of thread 0
      if (threadIdx.x == 0) {
        const uint32_t m = s_amax[s & 1];
        s_amax[s & 1] = 0;  // reused at step s + 2, behind the barrier of step s + 1
        if (layer_of(s) < a.L)
          st_relaxed_gpu(a.slots + (uint64_t(layer_of(s)) * gpb + bl),
                         kSlotFull | __float_as_uint(abs_bits_to_float<Tr>(m)));
      }
      return;
    }
    const uint32_t l0 = s * a.B, nkeys = min(a.B, a.L - l0) * a.Hs;
    for (uint32_t i = threadIdx.x; i < nkeys; i += kResBlock) {
      const uint32_t m = s_amax[i];
      s_amax[i] = 0;  // the next publish is behind at least one more barrier
      // |x| as float: non-negative and finite, below 0x7f800000: bit 31 is free
      st_relaxed_gpu(a.slots + (uint64_t(l0 * a.Hs + i) * gridDim.x + blockIdx.x),
                     kSlotFull | __float_as_uint(abs_bits_to_float<Tr>(m)));
    }
  };
  // Slot *p's value once its full bit is set; v: a first load of it.
  auto wait_full = [](const uint32_t* p, uint32_t v) -> uint32_t {
    while (!(v & kSlotFull)) {  // back-off 0, 32 or 200 ns: the same time (measured)
      __nanosleep(32);
      v = ld_relaxed_gpu(p);
    }
    return v & ~kSlotFull;
  };
  // The first slots a thread reads for step s, loaded early (their latency then overlaps a
  // publish): slot threadIdx.x, or with UNI slots lane + 32 j of the step.
  auto poll_first = [&](uint32_t s, uint32_t (&e)[kPollEarly]) {
    if constexpr (UNI) {
      if (warp != 0 || layer_of(s) >= a.L) return;
      const uint32_t* slots = a.slots + uint64_t(layer_of(s)) * gpb;
#pragma unroll
      for (int j = 0; j < kPollEarly; ++j) {
        const uint32_t i = lane + 32u * j;
        e[j] = i < gpb ? ld_relaxed_gpu(slots + i) : kSlotFull;
      }
    } else {
      const uint32_t l0 = s * a.B, nslots = min(a.B, a.L - l0) * a.Hs * gridDim.x;
      e[0] = threadIdx.x < nslots ? ld_relaxed_gpu(a.slots + uint64_t(l0 * a.Hs) * gridDim.x + threadIdx.x) : 0u;
    }
  };
  // UNI, warp 0: wait for the group's slots of the step's layer, reduce them, scale ->
  // s_inv[s & 1] (and a.scale).
  auto warp_scale_inv = [&](uint32_t s, const uint32_t (&e)[kPollEarly]) {
    const uint32_t p = layer_of(s);
    if (p >= a.L) return;  // no layer for this group in the last step
    const uint32_t* slots = a.slots + uint64_t(p) * gpb;
    // Each round reloads every slot of the lane not yet full, without a sleep, until all of
    // the warp's are (twelfth session: +0.5-1.5% of copy on every fp8 tensor/head row against
    // waiting on each slot in turn with a 32 ns back-off; bench/results/fp8-onepass-12th-h200-
    // 2026-11-27.txt)
    uint32_t v[kPollEarly];
#pragma unroll
    for (int j = 0; j < kPollEarly; ++j) v[j] = e[j];  // past the group: preset full, value 0
    while (true) {
      bool mine = true;
#pragma unroll
      for (int j = 0; j < kPollEarly; ++j) mine = mine && (v[j] & kSlotFull);
      if (__all_sync(0xffffffffu, mine)) break;
#pragma unroll
      for (int j = 0; j < kPollEarly; ++j)
        if (!(v[j] & kSlotFull)) v[j] = ld_relaxed_gpu(slots + lane + 32u * j);
    }
    uint32_t m = 0;
#pragma unroll
    for (int j = 0; j < kPollEarly; ++j) m = max(m, v[j] & ~kSlotFull);
    for (uint32_t i = lane + 32u * kPollEarly; i < gpb; i += 32)
      m = max(m, wait_full(slots + i, ld_relaxed_gpu(slots + i)));
    const float sc = fp8_scale_from_amax(__uint_as_float(__reduce_max_sync(0xffffffffu, m)));
    if (lane == 0) {
      s_inv[s & 1] = fp8_inv(sc);  // rewritten at step s + 2, behind the barrier of step s + 1
      if (bl == 0) a.scale[p] = sc;
    }
  };
  // UNI: quantize + store this thread's slots of step s (its layer), all with one inverse scale.
  auto quantize_own = [&](const uint4* st, uint32_t s, float inv) {
    if (layer_of(s) >= a.L) return;
    uint8_t* __restrict__ cb = a.codes + codes_base(layer_of(s));
#pragma unroll
    for (int k = 0; k < K; ++k) {
      if (slk[k] == 0xffffffffu) continue;
      float f[VE];
      vec16_to_float<Tr, VE>(st[k * kResBlock + threadIdx.x], f);
#pragma unroll
      for (int j = 0; j < VE; ++j) f[j] = __fmul_rn(f[j], inv);  // the encoder saturates (fp8_prescale)
      store_bytes<VE>(cb + uint64_t(soff[k]) * VE, fp8_pack<VE>(f), true);
    }
  };
  // Wait for every block's slots of step s (grid barrier), reduce them, quantize + store.
  // e: poll_first(s) of this thread.
  auto quantize_step = [&](uint32_t s, const uint32_t (&e)[kPollEarly]) {
    const uint4* st = stages + (s % kResStages) * kStage;
    if constexpr (UNI) {
      if (warp == 0) warp_scale_inv(s, e);
      __syncthreads();
      KVK_FP8_TRACE_AT(s, 2);
      quantize_own(st, s, s_inv[s & 1]);
      KVK_FP8_TRACE_AT(s, 3);
      return;
    }
    const uint32_t first = e[0];
    const uint32_t l0 = s * a.B, nkeys = min(a.B, a.L - l0) * a.Hs;
    const uint32_t nslots = nkeys * gridDim.x;
    const uint32_t* slots = a.slots + uint64_t(l0 * a.Hs) * gridDim.x;
    for (uint32_t i0 = 0; i0 < nslots; i0 += kResBlock) {  // uniform: warp_max_into needs every lane
      const uint32_t i = i0 + threadIdx.x;
      uint32_t v = 0, key = 0xffffffffu;
      if (i < nslots) {
        v = wait_full(slots + i, i0 == 0 ? first : ld_relaxed_gpu(slots + i));
        key = i / gridDim.x;  // (UNI has its own poll)
      }
      warp_max_into(s_red, key, v);
    }
    __syncthreads();
    for (uint32_t i = threadIdx.x; i < nkeys; i += kResBlock) {
      const float sc = fp8_scale_from_amax(__uint_as_float(s_red[i]));
      s_red[i] = 0;
      s_inv[i] = fp8_inv(sc);
      if (blockIdx.x == 0) a.scale[l0 * a.Hs + i] = sc;
    }
    __syncthreads();
    KVK_FP8_TRACE_AT(s, 2);
#pragma unroll
    for (int k = 0; k < K; ++k) {
      uint32_t lb, off, key;
      if (!locate(s, k, lb, off, key)) continue;
      float f[VE];
      vec16_to_float<Tr, VE>(st[k * kResBlock + threadIdx.x], f);
      const float inv = s_inv[key];
#pragma unroll
      for (int j = 0; j < VE; ++j) f[j] = __fmul_rn(f[j], inv);
      store_bytes<VE>(a.codes + codes_base(l0 + lb) + uint64_t(off) * VE, fp8_pack<VE>(f), true);
    }
    __syncthreads();  // the stage and s_inv are rewritten next
    KVK_FP8_TRACE_AT(s, 3);
  };

  if constexpr (CL) {
    // mbarrier i takes steps i, i + 4, ...: one arrival (thread 0's, with the expected bytes)
    // and gpb 4-byte st.async a phase. The cluster barrier makes every block's mbarriers ready
    // before any peer stores into them (its arrive comes before this block's first loads).
    if (threadIdx.x == 0) {
      for (int i = 0; i < 4; ++i) mbar_init(&s_bar[i], 1);
      mbar_init_fence();
      for (uint32_t i = 0; i < 4 && i < a.nsteps; ++i) mbar_arrive_expect_tx(&s_bar[i], 4 * gpb);
    }
    cluster_arrive();
    KVK_FP8_TRACE_START(1);
    issue(0);
    issue(1);
    // wait for the group's slots of step s, scale, quantize + store this thread's slots
    auto quantize_cl = [&](uint32_t s) {
      mbar_wait_parity(&s_bar[s % 4], (s / 4) & 1);
      uint32_t m = 0;
      for (uint32_t i = 0; i < gpb; ++i) m = max(m, s_cl[s % 4][i]);
      if (threadIdx.x == 0 && s + 4 < a.nsteps) mbar_arrive_expect_tx(&s_bar[s % 4], 4 * gpb);  // step s + 4
      const uint32_t p = layer_of(s);
      if (p >= a.L) return;
      const float sc = fp8_scale_from_amax(abs_bits_to_float<Tr>(m));
      if (bl == 0 && threadIdx.x == 0) a.scale[p] = sc;
      KVK_FP8_TRACE_AT(s, 2);
      quantize_own(stages + (s % kResStages) * kStage, s, fp8_inv(sc));
      KVK_FP8_TRACE_AT(s, 3);
    };
    for (uint32_t s = 0; s < a.nsteps; ++s) {
      cp_async_wait<1>();  // this thread's vectors of step s have landed (it reads only its own)
      KVK_FP8_TRACE_AT(s, 0);
      if (s == 0) cluster_wait();  // the peers' mbarriers are ready
      publish_cl(s);
      KVK_FP8_TRACE_AT(s, 1);
      if (s > 0) quantize_cl(s - 1);
      issue(s + 2);  // into the stage of step s - 1, quantized above by this thread
    }
    quantize_cl(a.nsteps - 1);  // (every peer's stores into this block have landed after it)
  } else {
    // The workspace holds garbage (it is not zeroed by the launcher: a memset node cost 2-3 us):
    // each block clears its own slot column (UNI: key = layer, the group's layers only), then one
    // grid barrier, 2.3-3 us. It comes before the first loads: behind 16 MiB of them (two steps on
    // every SM) its L2 round trips queue and it took ~7 us (trace, tenth session; splitting it
    // into arrive / loads / wait did not help, the wait queues the same way).
    for (uint32_t key = threadIdx.x * a.NG + grp; key < a.L * a.Hs; key += kResBlock * a.NG)
      a.slots[uint64_t(key) * gpb + bl] = 0u;
    cooperative_groups::this_grid().sync();
    KVK_FP8_TRACE_START(1);
    // Pipeline, kResStages = 3 steps on chip: at iteration s, step s lands and is published, step
    // s-1 (published one iteration ago) is quantized, and step s+2's loads start into its stage.
    // Loads get two iterations to land; a barrier gets the publish of the next step.
    issue(0);
    issue(1);
    uint32_t e[kPollEarly];
    for (uint32_t s = 0; s < a.nsteps; ++s) {
      cp_async_wait<1>();  // all but the newest group: step s has landed
      if (!UNI) __syncthreads();
      KVK_FP8_TRACE_AT(s, 0);
      if (s > 0) poll_first(s - 1, e);
      publish(s);
      KVK_FP8_TRACE_AT(s, 1);
      if (s > 0) quantize_step(s - 1, e);
      issue(s + 2);
    }
    poll_first(a.nsteps - 1, e);
    quantize_step(a.nsteps - 1, e);
  }
}

// ---- fp8 tensor/head, one pass (quant_fp8_resident_kernel) -------------------------------------
struct DeviceInfo {
  int sms = 0;
  bool coop = false;
  int major = 0;  // compute capability
};
DeviceInfo device_info() {
  static DeviceInfo cache[64];
  static bool known[64] = {};
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= 64) return {};
  if (!known[dev]) {
    int sms = 0, coop = 0, major = 0;
    cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
    cudaDeviceGetAttribute(&coop, cudaDevAttrCooperativeLaunch, dev);
    cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev);
    cache[dev] = DeviceInfo{sms, coop != 0, major};
    known[dev] = true;
  }
  return cache[dev];
}

constexpr int resident_smem_bytes(int K) { return kResStages * kResBlock * K * 16; }

// Resident blocks per SM of quant_fp8_resident_kernel<Tr, K, HEAD, UNI> (0 if unknown or it does not fit).
template <typename Tr, int K, bool HEAD, bool UNI>
int resident_blocks_per_sm() {
  static int cache[64] = {};
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= 64) return 0;
  if (!cache[dev]) {
    int n = 0;
    const int smem = resident_smem_bytes(K);
    if (cudaFuncSetAttribute(quant_fp8_resident_kernel<Tr, K, HEAD, UNI>,
                             cudaFuncAttributeMaxDynamicSharedMemorySize, smem) != cudaSuccess ||
        cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, quant_fp8_resident_kernel<Tr, K, HEAD, UNI>, kResBlock,
                                                      smem) !=
            cudaSuccess) {
      cudaGetLastError();  // clear: the caller falls back to the two-kernel path
      n = 0;
    }
    cache[dev] = n > 0 ? n : -1;
  }
  return std::max(cache[dev], 0);
}

// Clusters of gpb (<= 16) blocks of the cluster variant quant_fp8_resident_kernel<Tr, K, false,
// true, true> that the GPU runs at once (0 if none, or the query fails).
template <typename Tr, int K>
int resident_clusters(int gpb) {
  static int cache[64][17] = {};
  int dev = 0;
  if (gpb < 1 || gpb > 16 || cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= 64) return 0;
  if (!cache[dev][gpb]) {
    auto kern = quant_fp8_resident_kernel<Tr, K, false, true, true>;
    int n = 0;
    const int smem = resident_smem_bytes(K);
    cudaLaunchConfig_t cfg{};
    cfg.gridDim = dim3(gpb);
    cfg.blockDim = dim3(kResBlock);
    cfg.dynamicSmemBytes = smem;
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeClusterDimension;
    attr[0].val.clusterDim.x = gpb;
    attr[0].val.clusterDim.y = 1;
    attr[0].val.clusterDim.z = 1;
    cfg.attrs = attr;
    cfg.numAttrs = 1;
    if (cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, smem) != cudaSuccess ||
        (gpb > 8 && cudaFuncSetAttribute(kern, cudaFuncAttributeNonPortableClusterSizeAllowed, 1) != cudaSuccess) ||
        cudaOccupancyMaxActiveClusters(&n, kern, &cfg) != cudaSuccess) {
      cudaGetLastError();  // clear: the caller takes the cooperative variant
      n = 0;
    }
    cache[dev][gpb] = n > 0 ? n : -1;
  }
  return std::max(cache[dev][gpb], 0);
}

// Bytes of input per step (B layers): big enough that a step's loads cover the barrier's latency,
// small enough that the first load and the last store (not overlapped) stay short. Developer
// knob KVK_FP8_STEP_KB for the bench.
int64_t resident_step_bytes() {
  static const int64_t v = [] {
    const char* e = std::getenv("KVK_FP8_STEP_KB");
    const long long kb = e ? std::atoll(e) : 0;
    return kb > 0 ? int64_t(kb) * 1024 : int64_t(8) << 20;
  }();
  return v;
}

// Returns cudaErrorNotSupported (nothing launched) when the layers don't fit the resident grid or

}  // namespace

// the layout isn't dense; the caller then takes the two-kernel path.
cudaError_t launch_fp8_resident(const void* x, int dt, int64_t L, int64_t T, int64_t H, int64_t D, int64_t sL,
                                int64_t sT, int64_t sH, uint8_t* codes, float* scale, int scope, uint32_t* ws,
                                int64_t ws_words, cudaStream_t stream) {
  static const bool off = kvk_env_off("KVK_FP8_RESIDENT");
  if (off || !ws || scope > 1 || ws_words <= 0) return cudaErrorNotSupported;
  const int sz = dtype_size(dt), VE = 16 / sz;
  const bool dense = (T == 1 || sT == H * D) && (H == 1 || sH == D);
  if (!dense || D % VE || !ptr_aligned(x, 16) || !stride_ok(sL, L, VE) || !ptr_aligned(codes, VE))
    return cudaErrorNotSupported;
  const DeviceInfo dev = device_info();
  if (!dev.coop || dev.sms <= 0) return cudaErrorNotSupported;
  if ((scope == 1 ? H : 1) > kResMaxKeys || T * H * D / VE > kMaxCount) return cudaErrorNotSupported;
  static const bool split_off = kvk_env_off("KVK_FP8_HEAD_SPLIT");  // developer A/B switches
  static const bool groups_off = kvk_env_off("KVK_FP8_GROUPS");
  // capacity in vectors with K vectors per thread; the smallest K that holds a step wins (more
  // blocks per SM, fewer registers per thread)
  auto cap = [&](int bps, int k) { return int64_t(bps) * dev.sms * kResBlock * k; };
  return with_dtype(dt, [&](auto tr) {
    using Tr = decltype(tr);
    // The head scope where a head's [T, D] fits (bf16: up to T = 33792 on 132 SMs): the
    // tensor-scope kernel over L * H pseudo-layers, one per (layer, head), whose scales [L * H]
    // are the head scope's [L, H]. Taken for layers too big for the chip (bf16 Llama-3-8B beyond
    // T = 4224), and for heads big enough for block groups (below); the HEAD variant takes the
    // others.
    const int64_t head_v = T * D / VE;
    const bool split = !split_off && scope == 1 && H > 1 &&
                       ((!groups_off && head_v >= kGroupMinVectors) ||
                        T * H * D / VE > cap(resident_blocks_per_sm<Tr, 4, true, false>(), 4)) &&
                       head_v <= cap(resident_blocks_per_sm<Tr, 4, false, false>(), 4);
    const int64_t Hsub = split ? H : 1;
    return with_bool(scope == 1 && !split, [&](auto hc) -> cudaError_t {
      constexpr bool HEAD = decltype(hc)::value;
      // from here on, layers are pseudo-layers where split
      const int64_t nL = L * Hsub, Hs = HEAD ? H : 1, Nv = T * H * D / VE / Hsub;
      constexpr int kK[3] = {1, 2, 4};  // 4: an 8 MiB bf16 layer on 132 SMs (one block each)
      const int bps[3] = {resident_blocks_per_sm<Tr, 1, HEAD, false>(), resident_blocks_per_sm<Tr, 2, HEAD, false>(),
                          resident_blocks_per_sm<Tr, 4, HEAD, false>()};
      const int64_t cap_max = cap(bps[2], kK[2]);
      if (Nv > cap_max) return cudaErrorNotSupported;
      int64_t B = std::max<int64_t>(1, resident_step_bytes() / (Nv * 16));
      B = std::min({B, nL, cap_max / Nv, int64_t(kResMaxKeys) / Hs});
      const int64_t stepv = B * Nv;
      int ki = 0;
      while (cap(bps[ki], kK[ki]) < stepv) ++ki;  // terminates: cap(bps[2], kK[2]) >= stepv
      int64_t nsteps = (nL + B - 1) / B;
      uint32_t grid = ceil_div_u32(stepv, uint64_t(kResBlock) * kK[ki]), NG = 1;
      // Block groups (tensor scope, UNI variant): NG groups of gpb = ceil(Nv / (1024 K)) blocks,
      // each holding one whole (pseudo-)layer a step: B = 1, a step of NG layers, every block
      // with one amax key, each layer's grid barrier among its own group. NG from the step bytes,
      // evened over the steps; the smallest K whose groups fit the chip. Layers of fewer than
      // kGroupMinVectors vectors would leave too many threads of a group idle: steps of several
      // layers (generic variant) instead.
      const bool grouped = !groups_off && !HEAD && Nv >= kGroupMinVectors;
      if (grouped) {
        const int64_t want = std::min<int64_t>(B, nL);
        nsteps = (nL + want - 1) / want;
        int64_t ng = (nL + nsteps - 1) / nsteps;
        auto gpb_of = [&](int i) { return (Nv + int64_t(kResBlock) * kK[i] - 1) / (int64_t(kResBlock) * kK[i]); };
        ki = 0;
        while (ki < 2 && int64_t(bps[ki]) * dev.sms / gpb_of(ki) < ng) ++ki;
        ng = std::min<int64_t>(ng, int64_t(bps[ki]) * dev.sms / gpb_of(ki));  // >= 1: Nv <= cap_max
        nsteps = (nL + ng - 1) / ng;
        B = 1;
        NG = uint32_t(ng);
        grid = uint32_t(ng * gpb_of(ki));
      }
      const int K = kK[ki];
      // Groups of <= 16 blocks on sm_90 run as thread-block clusters (the CL variant) when the GPU
      // runs at least 7/8 of the NG clusters at once (NG is then capped at that); clusters never
      // wait for each other, so more would still be correct, only slower.
      static const bool cl_off = kvk_env_off("KVK_FP8_CLUSTER");  // developer A/B switch
      bool cl = false;
      if (KVK_CLUSTER_PTX && grouped && !cl_off && dev.major >= 9 && grid / NG <= 16) {
        const int g = int(grid / NG);
        const int ncl = K == 1 ? resident_clusters<Tr, 1>(g) : K == 2 ? resident_clusters<Tr, 2>(g)
                                                                       : resident_clusters<Tr, 4>(g);
        if (ncl >= 1 && int64_t(ncl) >= int64_t(NG) - NG / 8) {
          NG = std::min<uint32_t>(NG, uint32_t(ncl));
          nsteps = (nL + NG - 1) / NG;
          grid = NG * uint32_t(g);
          cl = true;
        }
      }
      // workspace words: UNI, key = layer, gpb per key; otherwise grid per key (the kernel clears
      // what it uses)
      if (nL * Hs * (grid / NG) > ws_words) return cudaErrorNotSupported;
      ResidentArgs a{};
      a.x = x;
      a.sL = sL;
      a.codes = codes;
      a.scale = scale;
      a.slots = ws;
      a.L = uint32_t(nL); a.B = uint32_t(B); a.Hs = uint32_t(Hs); a.nsteps = uint32_t(nsteps); a.Nv = uint32_t(Nv);
      a.Hsub = uint32_t(Hsub);
      a.divNv = FastDiv(uint32_t(Nv));
      a.divC = FastDiv(uint32_t(D / VE));
      a.divH = FastDiv(uint32_t(H));
      a.divHsub = FastDiv(uint32_t(Hsub));
      a.NG = NG;
      cudaLaunchConfig_t cfg{};
      cfg.gridDim = dim3(grid);
      cfg.blockDim = dim3(kResBlock);
      cfg.dynamicSmemBytes = resident_smem_bytes(K);
      cfg.stream = stream;
      cudaLaunchAttribute attr[1];
      attr[0].id = cudaLaunchAttributeCooperative;
      attr[0].val.cooperative = 1;
      cfg.attrs = attr;
      cfg.numAttrs = 1;
      // The UNI variant (tensor scope): block groups, or without them one layer a step.
      static const bool uni_off = kvk_env_off("KVK_FP8_UNI");  // developer A/B switch
      [[maybe_unused]] const bool uni = !HEAD && (grouped || (!uni_off && B == 1));
      return with_int<1, 2, 4>(K, cudaErrorNotSupported, [&](auto kc) -> cudaError_t {
        constexpr int KC = decltype(kc)::value;
        // same shared memory; the occupancy is checked, as the grid must be co-resident
        if constexpr (!HEAD) {
          if (cl) {
            attr[0].id = cudaLaunchAttributeClusterDimension;
            attr[0].val.clusterDim.x = grid / NG;
            attr[0].val.clusterDim.y = 1;
            attr[0].val.clusterDim.z = 1;
            return cudaLaunchKernelEx(&cfg, quant_fp8_resident_kernel<Tr, KC, false, true, true>, a);
          }
          if (uni && resident_blocks_per_sm<Tr, KC, false, true>() >= bps[ki])
            return cudaLaunchKernelEx(&cfg, quant_fp8_resident_kernel<Tr, KC, false, true>, a);
        }
        if (NG > 1) return cudaErrorNotSupported;  // groups need the UNI variant: two kernels
        return cudaLaunchKernelEx(&cfg, quant_fp8_resident_kernel<Tr, KC, HEAD, false>, a);
      });
    });
  });
}

}  // namespace kvk

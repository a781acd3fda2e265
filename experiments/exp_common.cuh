// Helpers shared by the private experiment harnesses in experiments/ (each is one translation unit
// that #includes quant_all.cuh (the csrc/quant*.cu files), then this file): the error check, a pseudo-random bf16 fill, and a
// timer (events after warm-up, L2 flushed by a 128 MiB read before each run, median).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include <cuda_runtime.h>

#define CK(x) do { cudaError_t e_ = (x); if (e_ != cudaSuccess) { printf("CUDA %s at %d: %s\n", #x, __LINE__, cudaGetErrorString(e_)); exit(1); } } while (0)

namespace kvkexp {

// bf16 values in [-2.5, 3.5) from a hash of the index (the same data in every harness and run)
__global__ void fill_kernel(uint16_t* x, uint64_t n) {
  for (uint64_t i = blockIdx.x * uint64_t(blockDim.x) + threadIdx.x; i < n; i += uint64_t(gridDim.x) * blockDim.x) {
    uint32_t h = uint32_t(i * 2654435761ull) ^ uint32_t(i >> 13);
    h ^= h >> 15; h *= 0x2c1b3c6du; h ^= h >> 12;
    const float f = (float(h & 0xffff) / 65536.f - 0.5f) * 6.f + 0.5f;
    x[i] = uint16_t(__float_as_uint(f) >> 16);
  }
}
__global__ void flush_kernel(const uint4* p, uint64_t n, uint32_t* sink) {
  uint32_t acc = 0;
  for (uint64_t i = blockIdx.x * uint64_t(blockDim.x) + threadIdx.x; i < n; i += uint64_t(gridDim.x) * blockDim.x)
    acc ^= p[i].x;
  if (acc == 0x12345678u) *sink = acc;
}

// Line-buffered stdout, a non-blocking stream, the device's properties printed once.
inline cudaStream_t start(cudaDeviceProp& prop) {
  setvbuf(stdout, nullptr, _IOLBF, 0);
  cudaStream_t st;
  CK(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
  CK(cudaGetDeviceProperties(&prop, 0));
  printf("%s, %d SMs, L2 %d MiB\n", prop.name, prop.multiProcessorCount, prop.l2CacheSize >> 20);
  return st;
}

struct Timer {
  cudaStream_t st;
  uint4* fl; uint64_t fln; uint32_t* sink;
  cudaEvent_t e0, e1;
  explicit Timer(cudaStream_t s) : st(s) {
    fln = (uint64_t(128) << 20) / 16;
    CK(cudaMalloc(&fl, fln * 16)); CK(cudaMemset(fl, 1, fln * 16)); CK(cudaMalloc(&sink, 4));
    CK(cudaEventCreate(&e0)); CK(cudaEventCreate(&e1));
  }
  void flush() { flush_kernel<<<264, 1024, 0, st>>>(fl, fln, sink); }
  template <typename F> float median_us(F&& f, int reps = 40) {
    for (int i = 0; i < 5; ++i) f();
    std::vector<float> v;
    for (int i = 0; i < reps; ++i) {
      flush();
      CK(cudaEventRecord(e0, st)); f(); CK(cudaEventRecord(e1, st));
      CK(cudaEventSynchronize(e1));
      float ms; CK(cudaEventElapsedTime(&ms, e0, e1)); v.push_back(ms * 1e3f);
    }
    std::sort(v.begin(), v.end());
    return v[v.size() / 2];
  }
};

}  // namespace kvkexp

// python/codec.cpp -- pybind11 bindings of the GPU entropy-coder launchers (csrc/codec.h).
// Raw device pointers (tensor.data_ptr()), sizes as ints, device index and stream handle;
// kvkernels/cuda/codec.py owns the tensor checks. Errors raise RuntimeError.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include <cuda_runtime.h>

#include "codec.h"

namespace py = pybind11;

namespace {

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    cudaGetLastError();
    throw std::runtime_error(std::string("kvkernels._C.") + what + ": " + cudaGetErrorName(err) + ": " +
                             cudaGetErrorString(err));
  }
}

template <typename T>
T* ptr(std::uintptr_t p) { return reinterpret_cast<T*>(p); }

cudaStream_t strm(std::uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }

// The caches of a PagedLayout: spec() (18 ints), the device array of base pointers, whether every
// base is 16-byte aligned, fp8 scales (pointer, layer stride, head stride) or zeros.
KvkPagedCaches layout_caches(const std::vector<int64_t>& spec, std::uintptr_t ptrs, bool aligned16,
                             const std::vector<int64_t>& scales) {
  if (spec.size() != 18 || scales.size() != 6)
    throw std::invalid_argument("codec_rans_decode_pages: spec needs 18 ints, scales 6");
  KvkPagedCaches c{};
  c.ptrs = ptr<const int64_t>(ptrs);
  int64_t* dims[] = {&c.num_layers, &c.num_kv, &c.num_blocks, &c.block_size, &c.num_heads, &c.head_dim, &c.x};
  for (int i = 0; i < 7; ++i) *dims[i] = spec[i];
  c.cache_dtype = int(spec[7]);
  for (int i = 0; i < 10; ++i) c.st[i / 5][i % 5] = spec[8 + i];
  c.aligned16 = aligned16 ? 1 : 0;
  c.k_scale = ptr<const float>(std::uintptr_t(scales[0]));
  c.ks_l = scales[1];
  c.ks_h = scales[2];
  c.v_scale = ptr<const float>(std::uintptr_t(scales[3]));
  c.vs_l = scales[4];
  c.vs_h = scales[5];
  return c;
}

}  // namespace

void register_codec(py::module_& m) {
  m.def("codec_ac_encode", [](std::uintptr_t sym, int64_t S, int64_t N, int64_t C, std::uintptr_t cdf, int64_t K,
                              int bins, std::uintptr_t tid, std::uintptr_t scratch, int64_t cap, std::uintptr_t lens,
                              std::uintptr_t status, int device, std::uintptr_t stream) {
    check(cudaSetDevice(device), "codec_ac_encode");
    check(kvk_ac_encode(ptr<const uint8_t>(sym), S, N, C, ptr<const int32_t>(cdf), K, bins, ptr<const int32_t>(tid),
                        ptr<uint8_t>(scratch), cap, ptr<int64_t>(lens), ptr<int32_t>(status), strm(stream)),
          "codec_ac_encode");
  });
  m.def("codec_pack", [](std::uintptr_t scratch, int64_t n, int64_t cap, bool from_end, std::uintptr_t lens,
                         std::uintptr_t offsets, std::uintptr_t payload, int64_t payload_cap, int device,
                         std::uintptr_t stream) {
    check(cudaSetDevice(device), "codec_pack");
    check(kvk_codec_pack(ptr<const uint8_t>(scratch), n, cap, from_end, ptr<const int64_t>(lens),
                         ptr<const int64_t>(offsets), ptr<uint8_t>(payload), payload_cap, strm(stream)),
          "codec_pack");
  });
  m.def("codec_ac_decode", [](std::uintptr_t payload, int64_t nbytes, std::uintptr_t offsets, std::uintptr_t cdf,
                              int64_t K, int bins, std::uintptr_t tid, int64_t S, int64_t N, int64_t C,
                              std::uintptr_t out, std::uintptr_t status, int device, std::uintptr_t stream) {
    check(cudaSetDevice(device), "codec_ac_decode");
    check(kvk_ac_decode(ptr<const uint8_t>(payload), nbytes, ptr<const int64_t>(offsets), ptr<const int32_t>(cdf), K,
                        bins, ptr<const int32_t>(tid), S, N, C, ptr<uint8_t>(out), ptr<int32_t>(status),
                        strm(stream)),
          "codec_ac_decode");
  });
  m.def("codec_rans_prep", [](std::uintptr_t freq, int64_t K, int bins, int pb, std::uintptr_t cum,
                              std::uintptr_t ok, int device, std::uintptr_t stream) {
    check(cudaSetDevice(device), "codec_rans_prep");
    check(kvk_rans_prep(ptr<const int32_t>(freq), K, bins, pb, ptr<uint16_t>(cum), ptr<uint8_t>(ok), strm(stream)),
          "codec_rans_prep");
  });
  m.def("codec_rans_encode", [](std::uintptr_t sym, int64_t S, int64_t N, int64_t C, std::uintptr_t cum,
                                std::uintptr_t ok, int64_t K, int bins, std::uintptr_t tid, int pb,
                                std::uintptr_t scratch, int64_t cap, std::uintptr_t lens, std::uintptr_t status,
                                int device, std::uintptr_t stream) {
    check(cudaSetDevice(device), "codec_rans_encode");
    check(kvk_rans_encode(ptr<const uint8_t>(sym), S, N, C, ptr<const uint16_t>(cum), ptr<const uint8_t>(ok), K,
                          bins, ptr<const int32_t>(tid), pb, ptr<uint8_t>(scratch), cap, ptr<int64_t>(lens),
                          ptr<int32_t>(status), strm(stream)),
          "codec_rans_encode");
  });
  m.def("codec_rans_decode", [](std::uintptr_t payload, int64_t nbytes, std::uintptr_t offsets, std::uintptr_t cum,
                                std::uintptr_t ok, int64_t K, int bins, std::uintptr_t tid, int pb, int64_t S,
                                int64_t N, int64_t C, std::uintptr_t out, std::uintptr_t lut, std::uintptr_t s_tok,
                                std::uintptr_t s_ch, std::uintptr_t z_ch, int dtype, int64_t os_s, int64_t os_n,
                                std::uintptr_t status, int device, std::uintptr_t stream) {
    check(cudaSetDevice(device), "codec_rans_decode");
    check(kvk_rans_decode(ptr<const uint8_t>(payload), nbytes, ptr<const int64_t>(offsets), ptr<const uint16_t>(cum),
                          ptr<const uint8_t>(ok), K, bins, ptr<const int32_t>(tid), pb, S, N, C, ptr<void>(out),
                          ptr<const float>(lut), ptr<const float>(s_tok), ptr<const float>(s_ch),
                          ptr<const float>(z_ch), dtype, os_s, os_n, ptr<int32_t>(status), strm(stream)),
          "codec_rans_decode");
  });
  m.def("codec_rans_decode_pages", [](std::uintptr_t payload, int64_t nbytes, std::uintptr_t offsets,
                                      std::uintptr_t cum, std::uintptr_t ok, int64_t K, int bins, std::uintptr_t tid,
                                      int pb, int64_t S, int64_t N, int64_t C, std::uintptr_t lut, bool lut_per_segment,
                                      std::uintptr_t s_tok, std::uintptr_t s_ch, std::uintptr_t z_ch,
                                      std::uintptr_t segments, const std::vector<int64_t>& spec, std::uintptr_t ptrs,
                                      bool aligned16, const std::vector<int64_t>& scales, std::uintptr_t slots,
                                      bool slots64, int64_t T, std::uintptr_t status, int device,
                                      std::uintptr_t stream) {
    const KvkPagedCaches c = layout_caches(spec, ptrs, aligned16, scales);
    check(cudaSetDevice(device), "codec_rans_decode_pages");
    check(kvk_rans_decode_pages(ptr<const uint8_t>(payload), nbytes, ptr<const int64_t>(offsets),
                                ptr<const uint16_t>(cum), ptr<const uint8_t>(ok), K, bins, ptr<const int32_t>(tid), pb,
                                S, N, C, ptr<const float>(lut), lut_per_segment ? 1 : 0, ptr<const float>(s_tok),
                                ptr<const float>(s_ch), ptr<const float>(z_ch), ptr<const int64_t>(segments), &c,
                                ptr<const void>(slots), slots64 ? 1 : 0, T, ptr<int32_t>(status), strm(stream)),
          "codec_rans_decode_pages");
  });
  m.def("codec_rans_decode_dequant", [](std::uintptr_t payload, int64_t nbytes, std::uintptr_t offsets,
                                        std::uintptr_t cum, std::uintptr_t ok, int64_t K, int bins, std::uintptr_t tid,
                                        int pb, int64_t S, int64_t N, int64_t C, std::uintptr_t out, std::uintptr_t lut,
                                        bool lut_per_segment, std::uintptr_t s_tok, std::uintptr_t s_ch,
                                        std::uintptr_t z_ch, int dtype, int64_t os_s, int64_t os_n,
                                        std::uintptr_t status, int device, std::uintptr_t stream) {
    check(cudaSetDevice(device), "codec_rans_decode_dequant");
    check(kvk_rans_decode_dequant(ptr<const uint8_t>(payload), nbytes, ptr<const int64_t>(offsets),
                                  ptr<const uint16_t>(cum), ptr<const uint8_t>(ok), K, bins, ptr<const int32_t>(tid),
                                  pb, S, N, C, ptr<void>(out), ptr<const float>(lut), lut_per_segment ? 1 : 0,
                                  ptr<const float>(s_tok), ptr<const float>(s_ch), ptr<const float>(z_ch), dtype,
                                  os_s, os_n, ptr<int32_t>(status), strm(stream)),
          "codec_rans_decode_dequant");
  });
}

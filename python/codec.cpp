// python/codec.cpp -- pybind11 bindings of the GPU entropy-coder launchers (csrc/codec.h).
// Raw device pointers (tensor.data_ptr()), sizes as ints, device index and stream handle;
// kvkernels/cuda/codec.py owns the tensor checks. Errors raise RuntimeError.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

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
}

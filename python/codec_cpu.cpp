// python/codec_cpu.cpp -- pybind11 module kvkernels._codec_cpu: the CPU entropy coders
// (csrc/codec_cpu.{h,cpp}), built with g++ only (no CUDA, no libtorch). Tensors cross as raw
// host pointers (tensor.data_ptr()); kvkernels/reference/codec.py owns the checks. Each function
// returns the status bits; the GIL is released while coding.
#include <pybind11/pybind11.h>

#include <cstdint>

#include "codec_cpu.h"

namespace py = pybind11;

namespace {

template <typename T>
T* ptr(std::uintptr_t p) { return reinterpret_cast<T*>(p); }

int32_t ac_encode(std::uintptr_t sym, int64_t S, int64_t N, int64_t C, std::uintptr_t cdf, int64_t K, int bins,
                  std::uintptr_t tid, std::uintptr_t out, int64_t cap, std::uintptr_t offsets) {
  py::gil_scoped_release nogil;
  return kvk_cpu_ac_encode(ptr<const uint8_t>(sym), S, N, C, ptr<const int32_t>(cdf), K, bins,
                           ptr<const int32_t>(tid), ptr<uint8_t>(out), cap, ptr<int64_t>(offsets));
}

int32_t ac_decode(std::uintptr_t payload, int64_t nbytes, std::uintptr_t offsets, int64_t n_off, std::uintptr_t cdf,
                  int64_t K, int bins, std::uintptr_t tid, int64_t S, int64_t N, int64_t C, std::uintptr_t out) {
  py::gil_scoped_release nogil;
  return kvk_cpu_ac_decode(ptr<const uint8_t>(payload), nbytes, ptr<const int64_t>(offsets), n_off,
                           ptr<const int32_t>(cdf), K, bins, ptr<const int32_t>(tid), S, N, C, ptr<uint8_t>(out));
}

int32_t rans_encode(std::uintptr_t sym, int64_t S, int64_t N, int64_t C, std::uintptr_t freq, int64_t K, int bins,
                    std::uintptr_t tid, int pb, std::uintptr_t out, int64_t cap, std::uintptr_t offsets) {
  py::gil_scoped_release nogil;
  return kvk_cpu_rans_encode(ptr<const uint8_t>(sym), S, N, C, ptr<const int32_t>(freq), K, bins,
                             ptr<const int32_t>(tid), pb, ptr<uint8_t>(out), cap, ptr<int64_t>(offsets));
}

int32_t rans_decode(std::uintptr_t payload, int64_t nbytes, std::uintptr_t offsets, int64_t n_off,
                    std::uintptr_t freq, int64_t K, int bins, std::uintptr_t tid, int pb, int64_t S, int64_t N,
                    int64_t C, std::uintptr_t out) {
  py::gil_scoped_release nogil;
  return kvk_cpu_rans_decode(ptr<const uint8_t>(payload), nbytes, ptr<const int64_t>(offsets), n_off,
                             ptr<const int32_t>(freq), K, bins, ptr<const int32_t>(tid), pb, S, N, C,
                             ptr<uint8_t>(out), nullptr);
}

int32_t rans_decode_dequant(std::uintptr_t payload, int64_t nbytes, std::uintptr_t offsets, int64_t n_off,
                            std::uintptr_t freq, int64_t K, int bins, std::uintptr_t tid, int pb, int64_t S,
                            int64_t N, int64_t C, std::uintptr_t lut, std::uintptr_t s_tok, std::uintptr_t s_ch,
                            std::uintptr_t z_ch, std::uintptr_t out, int dtype, int64_t os_s, int64_t os_n) {
  kvk_codec::DequantArgs dq{ptr<const float>(lut), ptr<const float>(s_tok), ptr<const float>(s_ch),
                            ptr<const float>(z_ch), ptr<void>(out), dtype, os_s, os_n};
  py::gil_scoped_release nogil;
  return kvk_cpu_rans_decode(ptr<const uint8_t>(payload), nbytes, ptr<const int64_t>(offsets), n_off,
                             ptr<const int32_t>(freq), K, bins, ptr<const int32_t>(tid), pb, S, N, C, nullptr, &dq);
}

}  // namespace

PYBIND11_MODULE(_codec_cpu, m) {
  m.doc() = "kvkernels CPU entropy coders (csrc/codec_cpu.cpp; see kvkernels/reference/codec.py)";
  m.def("ac_encode", &ac_encode);
  m.def("ac_decode", &ac_decode);
  m.def("rans_encode", &rans_encode);
  m.def("rans_decode", &rans_decode);
  m.def("rans_decode_dequant", &rans_decode_dequant);
}

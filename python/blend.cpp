// python/blend.cpp -- pybind11 binding of the re-rotation launcher (csrc/blend.h). Raw pointers
// as Python ints, sizes/strides in elements, device index and stream handle; the Python launcher
// (kvkernels/cuda/blend.py) owns all tensor checks. Errors raise RuntimeError.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include <cuda_runtime.h>

#include "blend.h"

namespace py = pybind11;
using namespace pybind11::literals;

namespace {

void rerotate_keys(std::uintptr_t key, int key_dtype, int64_t L, int64_t T, int64_t H, int64_t D, int64_t sL,
                   int64_t sT, int64_t sH, std::uintptr_t k_scale, int64_t ssL, int64_t ssT, int64_t ssH,
                   std::uintptr_t old_pos, std::uintptr_t new_pos, std::uintptr_t cos_sin, int64_t max_pos,
                   int64_t half, int is_neox, int device, std::uintptr_t stream) {
  cudaError_t err = cudaSetDevice(device);
  if (err == cudaSuccess) {
    py::gil_scoped_release nogil;
    err = kvk_rerotate_keys(reinterpret_cast<void*>(key), key_dtype, L, T, H, D, sL, sT, sH,
                            reinterpret_cast<const float*>(k_scale), ssL, ssT, ssH,
                            reinterpret_cast<const int64_t*>(old_pos), reinterpret_cast<const int64_t*>(new_pos),
                            reinterpret_cast<const float*>(cos_sin), max_pos, half, is_neox,
                            reinterpret_cast<cudaStream_t>(stream));
  }
  if (err != cudaSuccess) {
    cudaGetLastError();
    throw std::runtime_error(std::string("kvkernels._C.rerotate_keys: ") + cudaGetErrorName(err) + ": " +
                             cudaGetErrorString(err));
  }
}

void rerotate_keys_paged(std::uintptr_t ptrs, int key_dtype, int64_t L, int64_t T, int64_t H, int64_t D, int64_t NB,
                         int64_t BS, int64_t sB, int64_t sT, int64_t sH, int64_t sDX, int64_t sDI, int64_t x,
                         int aligned16, std::uintptr_t slots, std::uintptr_t k_scale, int64_t ssL, int64_t ssH,
                         std::uintptr_t old_pos, std::uintptr_t new_pos, std::uintptr_t cos_sin, int64_t max_pos,
                         int64_t half, int is_neox, int device, std::uintptr_t stream) {
  cudaError_t err = cudaSetDevice(device);
  if (err == cudaSuccess) {
    py::gil_scoped_release nogil;
    err = kvk_rerotate_keys_paged(reinterpret_cast<const int64_t*>(ptrs), key_dtype, L, T, H, D, NB, BS, sB, sT, sH,
                                  sDX, sDI, x, aligned16, reinterpret_cast<const int64_t*>(slots),
                                  reinterpret_cast<const float*>(k_scale), ssL, ssH,
                                  reinterpret_cast<const int64_t*>(old_pos), reinterpret_cast<const int64_t*>(new_pos),
                                  reinterpret_cast<const float*>(cos_sin), max_pos, half, is_neox,
                                  reinterpret_cast<cudaStream_t>(stream));
  }
  if (err != cudaSuccess) {
    cudaGetLastError();
    throw std::runtime_error(std::string("kvkernels._C.rerotate_keys_paged: ") + cudaGetErrorName(err) + ": " +
                             cudaGetErrorString(err));
  }
}

}  // namespace

void register_blend(py::module_& m) {
  m.def("rerotate_keys", &rerotate_keys, "re-rotate keys [L,T,H,D] in place (see csrc/blend.h)", "key"_a,
        "key_dtype"_a, "L"_a, "T"_a, "H"_a, "D"_a, "sL"_a, "sT"_a, "sH"_a, "k_scale"_a, "ssL"_a, "ssT"_a, "ssH"_a,
        "old_pos"_a, "new_pos"_a, "cos_sin"_a, "max_pos"_a, "half"_a, "is_neox"_a, "device"_a, "stream"_a);
  m.def("rerotate_keys_paged", &rerotate_keys_paged, "re-rotate the K caches of a paged layout (see csrc/blend.h)",
        "ptrs"_a, "key_dtype"_a, "L"_a, "T"_a, "H"_a, "D"_a, "NB"_a, "BS"_a, "sB"_a, "sT"_a, "sH"_a, "sDX"_a, "sDI"_a,
        "x"_a, "aligned16"_a, "slots"_a, "k_scale"_a, "ssL"_a, "ssH"_a, "old_pos"_a, "new_pos"_a, "cos_sin"_a,
        "max_pos"_a, "half"_a, "is_neox"_a, "device"_a, "stream"_a);
}

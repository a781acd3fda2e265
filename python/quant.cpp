// python/quant.cpp -- pybind11 bindings of the quantize / dequantize launchers (csrc/quant.h).
//
// Tensors arrive as raw device pointers (Python ints from tensor.data_ptr()), sizes and strides
// as ints (elements), plus the CUDA device index and the stream handle
// (torch.cuda.current_stream(device).cuda_stream). No torch headers: the Python launcher
// (kvkernels/cuda/quant.py) owns all tensor checks. Errors raise RuntimeError.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include <cuda_runtime.h>

#include "quant.h"

namespace py = pybind11;

namespace kvk_py {

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    cudaGetLastError();  // clear a non-sticky error so the next call starts clean
    throw std::runtime_error(std::string("kvkernels._C.") + what + ": " + cudaGetErrorName(err) + ": " +
                             cudaGetErrorString(err));
  }
}

template <typename T>
T* ptr(std::uintptr_t p) { return reinterpret_cast<T*>(p); }

void set_device(int device, const char* what) { check(cudaSetDevice(device), what); }

void quantize_int(std::uintptr_t x, int x_dtype, int64_t L, int64_t T, int64_t H, int64_t D, int64_t sL, int64_t sT,
                  int64_t sH, std::uintptr_t codes, std::uintptr_t scale, std::uintptr_t zero, int bits,
                  int group_size, int axis, int device, std::uintptr_t stream) {
  set_device(device, "quantize_int");
  cudaError_t err;
  {
    py::gil_scoped_release nogil;
    err = kvk_quantize_int(ptr<const void>(x), x_dtype, L, T, H, D, sL, sT, sH, ptr<uint8_t>(codes),
                           ptr<float>(scale), ptr<float>(zero), bits, group_size, axis,
                           reinterpret_cast<cudaStream_t>(stream));
  }
  check(err, "quantize_int");
}

void dequantize_int(std::uintptr_t codes, std::uintptr_t scale, std::uintptr_t zero, std::uintptr_t out,
                    int out_dtype, int64_t L, int64_t T, int64_t H, int64_t D, int64_t osL, int64_t osT,
                    int64_t osH, int bits, int group_size, int axis, int device, std::uintptr_t stream) {
  set_device(device, "dequantize_int");
  cudaError_t err;
  {
    py::gil_scoped_release nogil;
    err = kvk_dequantize_int(ptr<const uint8_t>(codes), ptr<const float>(scale), ptr<const float>(zero),
                             ptr<void>(out), out_dtype, L, T, H, D, osL, osT, osH, bits, group_size, axis,
                             reinterpret_cast<cudaStream_t>(stream));
  }
  check(err, "dequantize_int");
}

void quantize_fp8(std::uintptr_t x, int x_dtype, int64_t L, int64_t T, int64_t H, int64_t D, int64_t sL, int64_t sT,
                  int64_t sH, std::uintptr_t codes, std::uintptr_t scale, int scope, bool compute_scale,
                  std::uintptr_t workspace, int64_t workspace_words, int device, std::uintptr_t stream) {
  set_device(device, "quantize_fp8");
  cudaError_t err;
  {
    py::gil_scoped_release nogil;
    err = kvk_quantize_fp8(ptr<const void>(x), x_dtype, L, T, H, D, sL, sT, sH, ptr<uint8_t>(codes),
                           ptr<float>(scale), scope, compute_scale, ptr<uint32_t>(workspace),
                           workspace_words, reinterpret_cast<cudaStream_t>(stream));
  }
  check(err, "quantize_fp8");
}

void dequantize_fp8(std::uintptr_t codes, std::uintptr_t scale, std::uintptr_t out, int out_dtype, int64_t L,
                    int64_t T, int64_t H, int64_t D, int64_t osL, int64_t osT, int64_t osH, int scope, int device,
                    std::uintptr_t stream) {
  set_device(device, "dequantize_fp8");
  cudaError_t err;
  {
    py::gil_scoped_release nogil;
    err = kvk_dequantize_fp8(ptr<const uint8_t>(codes), ptr<const float>(scale), ptr<void>(out), out_dtype, L, T, H,
                             D, osL, osT, osH, scope, reinterpret_cast<cudaStream_t>(stream));
  }
  check(err, "dequantize_fp8");
}

}  // namespace kvk_py

void register_quant(py::module_& m) {
  using namespace pybind11::literals;
  m.def("quantize_int", &kvk_py::quantize_int,
        "x int(ptr) [L,T,H,D] -> codes uint8 [L,T,H,D*bits/8], scale/zero float32 (see csrc/quant.h)", "x"_a,
        "x_dtype"_a, "L"_a, "T"_a, "H"_a, "D"_a, "sL"_a, "sT"_a, "sH"_a, "codes"_a, "scale"_a, "zero"_a, "bits"_a,
        "group_size"_a, "axis"_a, "device"_a, "stream"_a);
  m.def("dequantize_int", &kvk_py::dequantize_int, "codes/scale/zero -> out [L,T,H,D] (see csrc/quant.h)",
        "codes"_a, "scale"_a, "zero"_a, "out"_a, "out_dtype"_a, "L"_a, "T"_a, "H"_a, "D"_a, "osL"_a, "osT"_a,
        "osH"_a, "bits"_a, "group_size"_a, "axis"_a, "device"_a, "stream"_a);
  m.def("quantize_fp8", &kvk_py::quantize_fp8,
        "x [L,T,H,D] -> e4m3 codes [L,T,H,D], scale per scope (0 tensor, 1 head, 2 token_head)", "x"_a, "x_dtype"_a,
        "L"_a, "T"_a, "H"_a, "D"_a, "sL"_a, "sT"_a, "sH"_a, "codes"_a, "scale"_a, "scope"_a, "compute_scale"_a,
        "workspace"_a, "workspace_words"_a, "device"_a, "stream"_a);
  m.def("dequantize_fp8", &kvk_py::dequantize_fp8, "e4m3 codes/scale -> out [L,T,H,D]", "codes"_a, "scale"_a,
        "out"_a, "out_dtype"_a, "L"_a, "T"_a, "H"_a, "D"_a, "osL"_a, "osT"_a, "osH"_a, "scope"_a, "device"_a,
        "stream"_a);
}

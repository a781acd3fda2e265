// python/module.cpp -- the extension module kvkernels._C (pybind11; no libtorch).
// Each op family registers its functions from python/<family>.cpp.
#include <pybind11/pybind11.h>

#include <cuda_runtime.h>

#include <string>

namespace py = pybind11;

void register_quant(py::module_& m);
void register_paged(py::module_& m);
void register_codec(py::module_& m);
void register_blend(py::module_& m);

#ifndef KVK_VERSION
#define KVK_VERSION "0.1.0"
#endif

PYBIND11_MODULE(_C, m) {
  m.doc() = "kvkernels CUDA kernels (raw-pointer launchers; see kvkernels/cuda/*.py)";
  m.attr("__version__") = KVK_VERSION;
  m.def("cuda_version", []() {
    // CUDA runtime version this extension was built against (e.g. "13.0").
    return std::to_string(CUDART_VERSION / 1000) + "." + std::to_string((CUDART_VERSION % 1000) / 10);
  });
  m.def("device_count", []() {
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) {
      cudaGetLastError();
      return 0;
    }
    return n;
  });
  register_quant(m);
  register_paged(m);
  register_codec(m);
  register_blend(m);
}

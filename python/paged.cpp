// python/paged.cpp -- pybind11 bindings of the paged scatter / gather launchers (csrc/paged.h).
//
// Pointers arrive as Python ints (tensor.data_ptr()), the layout as its spec list
// (kvkernels.layouts.PagedLayout.spec()), strides as ints (elements; bytes for codes), plus the
// CUDA device index and stream handle. No torch headers: kvkernels/cuda/paged.py owns all tensor
// checks. Errors raise RuntimeError.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include <cuda_runtime.h>

#include "paged.h"

namespace py = pybind11;

namespace kvk_paged_py {

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    cudaGetLastError();
    throw std::runtime_error(std::string("kvkernels._C.") + what + ": " + cudaGetErrorName(err) + ": " +
                             cudaGetErrorString(err));
  }
}

KvkPagedCaches caches_from(std::uintptr_t ptrs, const std::vector<int64_t>& spec, bool aligned16,
                           std::uintptr_t k_scale, int64_t ks_l, int64_t ks_h, std::uintptr_t v_scale, int64_t vs_l,
                           int64_t vs_h) {
  if (spec.size() != 18) throw std::invalid_argument("spec: expected 18 ints (PagedLayout.spec())");
  KvkPagedCaches c{};
  c.ptrs = reinterpret_cast<const int64_t*>(ptrs);
  c.num_layers = spec[0];
  c.num_kv = spec[1];
  c.num_blocks = spec[2];
  c.block_size = spec[3];
  c.num_heads = spec[4];
  c.head_dim = spec[5];
  c.x = spec[6];
  c.cache_dtype = int(spec[7]);
  for (int k = 0; k < 2; ++k)
    for (int j = 0; j < 5; ++j) c.st[k][j] = spec[8 + 5 * k + j];
  c.aligned16 = aligned16;
  c.k_scale = reinterpret_cast<const float*>(k_scale);
  c.ks_l = ks_l;
  c.ks_h = ks_h;
  c.v_scale = reinterpret_cast<const float*>(v_scale);
  c.vs_l = vs_l;
  c.vs_h = vs_h;
  return c;
}

KvkPagedFlat flat_from(int kind, int dtype, std::uintptr_t data, const std::vector<int64_t>& fs, int bits,
                       std::uintptr_t scale, std::uintptr_t zero, const std::vector<int64_t>& qidx) {
  if (fs.size() != 4 || qidx.size() != 6) throw std::invalid_argument("flat strides: expected 4 ints, qidx 6");
  KvkPagedFlat f{};
  f.kind = kind;
  f.dtype = dtype;
  f.data = reinterpret_cast<void*>(data);
  f.f_kv = fs[0];
  f.f_l = fs[1];
  f.f_t = fs[2];
  f.f_h = fs[3];
  f.bits = bits;
  f.scale = reinterpret_cast<const float*>(scale);
  f.zero = reinterpret_cast<const float*>(zero);
  f.tg = qidx[0];
  f.dg = qidx[1];
  f.a_row = qidx[2];
  f.a_t = qidx[3];
  f.a_h = qidx[4];
  f.a_d = qidx[5];
  return f;
}

void paged_call(bool scatter, std::uintptr_t ptrs, const std::vector<int64_t>& spec, bool aligned16,
                std::uintptr_t k_scale, int64_t ks_l, int64_t ks_h, std::uintptr_t v_scale, int64_t vs_l,
                int64_t vs_h, int kind, int dtype, std::uintptr_t data, const std::vector<int64_t>& fs, int bits,
                std::uintptr_t scale, std::uintptr_t zero, const std::vector<int64_t>& qidx, std::uintptr_t slots,
                bool slots64, int64_t T, std::uintptr_t cnt, bool cnt64, int max_blocks, int device,
                std::uintptr_t stream) {
  const char* what = scatter ? "paged_scatter" : "paged_gather";
  check(cudaSetDevice(device), what);
  KvkPagedCaches c = caches_from(ptrs, spec, aligned16, k_scale, ks_l, ks_h, v_scale, vs_l, vs_h);
  KvkPagedFlat f = flat_from(kind, dtype, data, fs, bits, scale, zero, qidx);
  cudaError_t err;
  {
    py::gil_scoped_release nogil;
    auto fn = scatter ? kvk_paged_scatter : kvk_paged_gather;
    err = fn(&c, &f, reinterpret_cast<const void*>(slots), slots64, T, reinterpret_cast<void*>(cnt), cnt64,
             max_blocks, reinterpret_cast<cudaStream_t>(stream));
  }
  check(err, what);
}

}  // namespace kvk_paged_py

void register_paged(py::module_& m) {
  using namespace pybind11::literals;
  m.def("paged_call", &kvk_paged_py::paged_call,
        "paged scatter (scatter=True: flat -> caches) or gather (caches -> flat) for all layers (csrc/paged.h)",
        "scatter"_a, "ptrs"_a, "spec"_a, "aligned16"_a, "k_scale"_a, "ks_l"_a, "ks_h"_a, "v_scale"_a, "vs_l"_a,
        "vs_h"_a, "kind"_a, "dtype"_a, "data"_a, "flat_strides"_a, "bits"_a, "scale"_a, "zero"_a, "qidx"_a,
        "slots"_a, "slots64"_a, "T"_a, "cnt"_a, "cnt64"_a, "max_blocks"_a, "device"_a, "stream"_a);
}

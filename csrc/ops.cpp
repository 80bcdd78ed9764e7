// Operator schemas of memit_fast._C and their CPU kernels; build_info.
//
// The ops appear as torch.ops.memit_fast.*; the CUDA kernels are registered by
// cuda/ops_cuda.cu when the extension is built with nvcc.

#include <torch/library.h>

#include "memit_fast.h"

#ifndef MEMIT_FAST_TORCH_VERSION
#define MEMIT_FAST_TORCH_VERSION "unknown"
#endif
#ifndef MEMIT_FAST_CUDA_VERSION
#define MEMIT_FAST_CUDA_VERSION "none"
#endif
#ifndef MEMIT_FAST_CUDA_ARCHS
#define MEMIT_FAST_CUDA_ARCHS "none"
#endif

namespace memit_fast {

// One literal, so that memit_fast/_ext.py can also read it from a library that fails to load.
#define MEMIT_FAST_BUILD_INFO                                                          \
  "memit_fast._C build: torch=" MEMIT_FAST_TORCH_VERSION " cuda=" MEMIT_FAST_CUDA_VERSION \
  " archs=" MEMIT_FAST_CUDA_ARCHS

std::string build_info() {
  // The C++ standard too: the extension should be compiled with the one of its libtorch.
  return std::string(MEMIT_FAST_BUILD_INFO).substr(sizeof("memit_fast._C build: ") - 1) +
      " cxx=" + std::to_string(__cplusplus);
}

namespace {

std::tuple<at::Tensor, at::Tensor> cholesky_cpu(
    const at::Tensor& A, c10::string_view precision, int64_t block_size, bool check_errors) {
  return cholesky(A, std::string(precision), block_size, check_errors);
}

}  // namespace
}  // namespace memit_fast

TORCH_LIBRARY(memit_fast, m) {
  m.def(
      "cholesky(Tensor A, str precision=\"fp32\", int block_size=0, bool check_errors=True)"
      " -> (Tensor L, Tensor info)");
  m.def("cholesky_update(Tensor L, Tensor K, int block_size=0, str method=\"auto\") -> Tensor");
  m.def(
      "cholesky_solve(Tensor L, Tensor B, Tensor? A=None, Tensor? K=None, int refine_steps=10,"
      " float tol=0.0) -> (Tensor X, Tensor history)");
  m.def("build_info() -> str", &memit_fast::build_info);
}

TORCH_LIBRARY_IMPL(memit_fast, CPU, m) {
  m.impl("cholesky", &memit_fast::cholesky_cpu);
  m.impl("cholesky_update", &memit_fast::cholesky_update);
  m.impl("cholesky_solve", &memit_fast::cholesky_solve);
}

#ifdef MEMIT_FAST_PYTHON_MODULE
// `import memit_fast._C` loads this library (and so registers the ops above).
#include <Python.h>

PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
#endif

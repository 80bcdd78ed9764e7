// CUDA kernels of the memit_fast ops.
//
// The algorithms (../linalg.cpp) are written against ATen, so on CUDA tensors their
// panels run in cuSOLVER and their products in cuBLAS (TF32 or bf16 tensor cores for
// the trailing updates when asked). This file pins the device of the inputs and
// registers those routines for the CUDA dispatch key.

#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../memit_fast.h"

namespace memit_fast {
namespace {

std::tuple<at::Tensor, at::Tensor> cholesky_cuda(
    const at::Tensor& A, c10::string_view precision, int64_t block_size, bool check_errors) {
  const c10::cuda::OptionalCUDAGuard guard(A.device());
  return cholesky(A, std::string(precision), block_size, check_errors);
}

at::Tensor cholesky_update_cuda(
    const at::Tensor& L, const at::Tensor& K, int64_t block_size, c10::string_view method) {
  const c10::cuda::OptionalCUDAGuard guard(L.device());
  return cholesky_update(L, K, block_size, method);
}

std::tuple<at::Tensor, at::Tensor> cholesky_solve_cuda(
    const at::Tensor& L,
    const at::Tensor& B,
    const std::optional<at::Tensor>& A,
    const std::optional<at::Tensor>& K,
    int64_t refine_steps,
    double tol) {
  const c10::cuda::OptionalCUDAGuard guard(L.device());
  return cholesky_solve(L, B, A, K, refine_steps, tol);
}

}  // namespace
}  // namespace memit_fast

TORCH_LIBRARY_IMPL(memit_fast, CUDA, m) {
  m.impl("cholesky", &memit_fast::cholesky_cuda);
  m.impl("cholesky_update", &memit_fast::cholesky_update_cuda);
  m.impl("cholesky_solve", &memit_fast::cholesky_solve_cuda);
}

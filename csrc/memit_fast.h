// memit_fast._C: the linear algebra of MEMIT's layer update.
//
// MEMIT solves (lambda C + K K^T) U = K for every edited layer. These routines keep a
// Cholesky factor of the system, update it when keys are added, and solve against it in
// mixed precision with iterative refinement to float64 accuracy.
//
// Every routine is written once against ATen, so the same code runs on the CPU (LAPACK /
// BLAS) and on CUDA (cuSOLVER / cuBLAS); only the operator registration differs per
// device (ops.cpp, cuda/ops_cuda.cu).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>
#include <tuple>

namespace memit_fast {

// Precision of the trailing (Schur complement) updates of the blocked Cholesky factor.
// Panels are factored in float32, or in float64 for kFloat64; the factor is stored in
// the panel dtype. kTF32 and kBFloat16 use the tensor cores of a CUDA GPU; on the CPU,
// kTF32 runs as float32 and kBFloat16 rounds the operands to bfloat16 and accumulates
// in float32 (the same numbers, at no gain in speed).
enum class Precision { kFloat64, kFloat32, kTF32, kBFloat16 };

// "fp64"/"float64", "fp32"/"float32", "tf32", "bf16"/"bfloat16"; anything else raises.
Precision parse_precision(const std::string& name);
std::string precision_name(Precision p);

// Blocked right-looking Cholesky factorization of the symmetric positive definite A
// (n, n) float32/float64. A must be symmetric (checked: max |A - A^T| <= 1e-4 max |diag A|,
// which also catches a triangle passed alone); the factorization reads its lower
// triangle. Invalid input raises c10::ValueError (Python ValueError); a non-positive pivot
// with check_errors raises c10::Error (RuntimeError). Returns (L, info): L (n, n)
// lower triangular, float64 for precision "fp64" and float32 otherwise; info an int32
// scalar tensor, 0 on success and k > 0 when the leading minor of order k is not
// positive definite (L is then incomplete). With check_errors, a non-positive pivot
// raises an error naming the column. block_size <= 0 picks one for the device.
std::tuple<at::Tensor, at::Tensor> cholesky(
    const at::Tensor& A,
    const std::string& precision,
    int64_t block_size,
    bool check_errors);

// The Cholesky factor of L L^T + K K^T for L (n, n) lower triangular with a positive
// diagonal (float32/float64) and K (n, k), at O(n^2 k) cost, in L's dtype. L is not
// modified; its strict upper triangle is never read, its lower triangle must be finite. method "qr": a blocked Householder (triangular-pentagonal QR) update;
// "chol": each diagonal block refactored and the rank-k remainder carried below it by
// GEMMs and triangular solves (no QR; small k x k and block-wide Cholesky factors);
// "product": L times the factor of I + W W^T, W = L^-1 K, in float64, from batched calls
// over all blocks and three GEMMs per block column (backward error grows with
// ||K K^T|| / ||L L^T||); "auto": "qr" on the CPU, elsewhere "product" where a probe
// finds its backward error within L's dtype (n 2^-53 for float64, n 2^-24 for float32),
// else "qr".
at::Tensor cholesky_update(
    const at::Tensor& L,
    const at::Tensor& K,
    int64_t block_size,
    c10::string_view method = "auto");

// X = (L L^T)^-1 B for B (n,) or (n, m). Without A: triangular solves in L's dtype, X in
// L's dtype. With A (n, n): X is float64, refined against the exact system matrix
// M = A (+ K K^T when K (n, k) is given) with float64 residuals, as LAPACK's dsposv does:
// it stops when every column's normwise backward error ||r||_inf / (||M||_inf ||x||_inf)
// is <= tol (tol <= 0: 2^-53, what a float64 solve typically attains), when refine_steps
// corrections have been made, or when the rate seen so far cannot get there; a
// correction that makes it worse is undone. The solve counts as converged when the
// final backward error is <= backward_error_tol(n). Returns (X, history): history (steps + 1,) float64 on the CPU holds the
// backward error of each iterate, the last entry being that of X.
std::tuple<at::Tensor, at::Tensor> cholesky_solve(
    const at::Tensor& L,
    const at::Tensor& B,
    const std::optional<at::Tensor>& A,
    const std::optional<at::Tensor>& K,
    int64_t refine_steps,
    double tol);

// sqrt(n) * 2^-53: the backward error bound of a float64 solve (LAPACK dsposv's test).
double backward_error_tol(int64_t n);

// "torch=<version> cuda=<version or none> archs=<list>": what this library was built for.
// The same text follows "memit_fast._C build: " in the library file.
std::string build_info();

}  // namespace memit_fast

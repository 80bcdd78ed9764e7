// ctest for the memit_fast C++ library: factor, update and refined solve against ATen's
// float64 routines, bad input, and the ops as the dispatcher serves them.

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cmath>
#include <cstdio>
#include <functional>
#include <string>

#include "memit_fast.h"

namespace {

int passed = 0;
int failed = 0;

void expect(bool ok, const std::string& what) {
  if (ok) {
    ++passed;
  } else {
    ++failed;
    std::printf("FAILED: %s\n", what.c_str());
  }
}

// The call throws a c10::Error whose message contains `needle`.
void expect_error(const std::function<void()>& call, const std::string& needle) {
  try {
    call();
  } catch (const c10::Error& e) {
    const std::string msg = e.what_without_backtrace();
    expect(msg.find(needle) != std::string::npos, "error '" + msg + "' names '" + needle + "'");
    return;
  }
  expect(false, "expected an error naming '" + needle + "'");
}

double rel(const at::Tensor& a, const at::Tensor& b) {
  return ((a.to(at::kDouble) - b.to(at::kDouble)).norm() / b.to(at::kDouble).norm())
      .item<double>();
}

// (n, n) float64 SPD with eigenvalues log-spaced from 1 to 1 / cond.
at::Tensor spd(int64_t n, double cond) {
  const at::Tensor Q = std::get<0>(at::linalg_qr(at::randn({n, n}, at::kDouble)));
  const at::Tensor ev = at::logspace(0, -std::log10(cond), n, 10.0, at::kDouble);
  const at::Tensor A = at::matmul(Q * ev, Q.mT());
  return (A + A.mT()) / 2;
}

std::string label(int64_t n, double cond) {
  return "n=" + std::to_string(n) + " cond=" + std::to_string(cond);
}

}  // namespace

int main() {
  at::manual_seed(0);
  for (int64_t n : {1, 7, 257}) {
    for (double cond : {1e2, 1e6}) {
      const at::Tensor A = spd(n, cond);
      const auto [L, info] = memit_fast::cholesky(A, "fp32", 64, true);
      expect(info.item<int>() == 0 && L.scalar_type() == at::kFloat, "fp32 factor " + label(n, cond));
      expect(rel(at::matmul(L.to(at::kDouble), L.to(at::kDouble).mT()), A) <= 1e-6,
             "||L L^T - A|| / ||A|| <= 1e-6 " + label(n, cond));

      const at::Tensor K = at::randn({n, 13}, at::kDouble) * 0.1;
      const at::Tensor Lu = memit_fast::cholesky_update(at::linalg_cholesky(A), K, 64);
      const at::Tensor M = A + at::matmul(K, K.mT());
      expect(rel(Lu, at::linalg_cholesky(M)) <= 1e-6, "update == refactor " + label(n, cond));
      const at::Tensor Lc = memit_fast::cholesky_update(at::linalg_cholesky(A), K, 64, "chol");
      expect(rel(Lc, at::linalg_cholesky(M)) <= 1e-6, "chol update == refactor " + label(n, cond));
      const at::Tensor Lp = memit_fast::cholesky_update(at::linalg_cholesky(A), K, 64, "product");
      expect(rel(Lp, at::linalg_cholesky(M)) <= 1e-6, "product update == refactor " + label(n, cond));

      const at::Tensor B = at::randn({n, 5}, at::kDouble);
      const at::Tensor Lm = memit_fast::cholesky_update(L, K, 64);
      const auto [X, history] = memit_fast::cholesky_solve(Lm, B, A, K, 10, 0.0);
      expect(X.scalar_type() == at::kDouble, "refined X is float64 " + label(n, cond));
      expect(history[-1].item<double>() <= memit_fast::backward_error_tol(n),
             "refinement converged " + label(n, cond));
      expect(rel(X, at::linalg_solve(M, B)) <= 1e-10, "refined == float64 " + label(n, cond));
    }
  }

  const at::Tensor A = spd(5, 1e2);
  expect_error([] { memit_fast::cholesky(at::ones({3, 4}), "fp32", 0, true); }, "square");
  expect_error(
      [] { memit_fast::cholesky(at::eye(3, at::kInt), "fp32", 0, true); }, "float32 or float64");
  expect_error(
      [] { memit_fast::cholesky(at::full({3, 3}, NAN), "fp32", 0, true); }, "NaN or Inf");
  expect_error([&] { memit_fast::cholesky(A, "fp8", 0, true); }, "unknown precision");
  at::Tensor bad = at::eye(5, at::kDouble);
  bad[2][2] = -1.0;
  expect_error([&] { memit_fast::cholesky(bad, "fp64", 0, true); }, "column 2 of 5");
  expect_error(
      [&] { memit_fast::cholesky_update(at::linalg_cholesky(A), at::ones({4, 2}), 0); },
      "5 rows");
  expect_error(
      [&] {
        memit_fast::cholesky_solve(at::linalg_cholesky(A), at::ones({4}), A, std::nullopt, 1, 0);
      },
      "shape (5,)");

  // Through the dispatcher, as torch.ops.memit_fast.cholesky serves it.
  auto op = c10::Dispatcher::singleton()
                .findSchemaOrThrow("memit_fast::cholesky", "")
                .typed<std::tuple<at::Tensor, at::Tensor>(
                    const at::Tensor&, c10::string_view, int64_t, bool)>();
  const auto [Ld, infod] = op.call(A, "fp64", 0, true);
  expect(rel(Ld, at::linalg_cholesky(A)) <= 1e-12, "dispatcher cholesky == at::linalg_cholesky");
  expect(memit_fast::build_info().rfind("torch=", 0) == 0, "build_info names torch");

  std::printf("%d passed, %d failed\n", passed, failed);
  return failed == 0 ? 0 : 1;
}

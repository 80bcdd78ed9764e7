// Blocked Cholesky factorization, rank-k update and refined solve (see memit_fast.h).
//
// Written against ATen only: at::linalg_cholesky_ex / at::geqrf / at::cholesky_solve and
// matrix products map to LAPACK and BLAS on the CPU and to cuSOLVER and cuBLAS on CUDA.

#include "memit_fast.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace memit_fast {
namespace {

// ---------------------------------------------------------------------------------------
// Input checks: every entry point validates before any work, and says what was wrong.

void check_matrix(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.defined(), op, ": ", name, " is an undefined tensor");
  TORCH_CHECK(
      t.dim() == 2, op, ": ", name, " must be a 2-D matrix, got a ", t.dim(),
      "-D tensor of shape ", t.sizes());
}

void check_square(const at::Tensor& t, const char* op, const char* name) {
  check_matrix(t, op, name);
  TORCH_CHECK(
      t.size(0) == t.size(1), op, ": ", name, " must be square, got shape ", t.sizes());
}

void check_factor_dtype(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(
      t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, op, ": ", name,
      " must be float32 or float64, got ", t.scalar_type());
}

void check_floating(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(
      at::isFloatingType(t.scalar_type()), op, ": ", name,
      " must be a floating-point tensor, got ", t.scalar_type());
}

void check_device(const at::Tensor& ref, const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(
      t.device() == ref.device(), op, ": ", name, " is on ", t.device(),
      " but L is on ", ref.device(), "; move both to one device");
}

void check_finite(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(
      at::isfinite(t).all().item<bool>(), op, ": ", name,
      " contains NaN or Inf (check the statistics and the keys that built it)");
}

// A symmetric and finite, in one pass over row blocks (no (n, n) temporary). The scale is
// the largest diagonal entry, which bounds every entry of an SPD matrix.
void check_symmetric_finite(const at::Tensor& A, const char* op) {
  const int64_t n = A.size(0);
  const int64_t step = 1024;
  at::Tensor asym = at::zeros({}, A.options());
  for (int64_t i = 0; i < n; i += step) {
    const int64_t ib = std::min(step, n - i);
    asym = at::maximum(asym, (A.narrow(0, i, ib) - A.narrow(1, i, ib).mT()).abs().amax());
  }
  const double a = asym.item<double>();  // NaN or Inf anywhere makes this NaN or Inf
  const double s = n > 0 ? A.diagonal().abs().max().item<double>() : 0.0;
  TORCH_CHECK(
      std::isfinite(a) && std::isfinite(s), op,
      ": A contains NaN or Inf (check the statistics and the keys that built it)");
  TORCH_CHECK(
      a <= 1e-4 * s, op, ": A must be symmetric, but max |A - A^T| = ", a,
      " against max |diag A| = ", s);
}

int64_t default_block_size(const at::Tensor& t) {
  // Large enough that the trailing products run near peak, small enough that the
  // (latency-bound) panel stays a small share of the work.
  return t.is_cuda() ? 512 : 256;
}

// ---------------------------------------------------------------------------------------
// Trailing products at the requested precision.

// Lets cuBLAS use TF32 tensor cores for float32 products while it lives.
class TF32Scope {
 public:
  explicit TF32Scope(bool active) : active_(active) {
    if (active_) {
      auto& ctx = at::globalContext();
      saved_ = ctx.float32Precision(at::Float32Backend::CUDA, at::Float32Op::MATMUL);
      ctx.setFloat32Precision(
          at::Float32Backend::CUDA, at::Float32Op::MATMUL, at::Float32Precision::TF32);
    }
  }
  ~TF32Scope() {
    if (active_) {
      at::globalContext().setFloat32Precision(
          at::Float32Backend::CUDA, at::Float32Op::MATMUL, saved_);
    }
  }
  TF32Scope(const TF32Scope&) = delete;
  TF32Scope& operator=(const TF32Scope&) = delete;

 private:
  bool active_;
  at::Float32Precision saved_ = at::Float32Precision::NONE;
};

// The operand of the trailing products, rounded once to the trailing precision. On CUDA,
// bf16 operands stay bf16 (tensor cores, float32 output); on the CPU they are widened
// back to float32, which gives the same products with float32 accumulation.
at::Tensor trailing_operand(const at::Tensor& X, Precision p) {
  if (p != Precision::kBFloat16) {
    return X;
  }
  at::Tensor r = X.to(at::kBFloat16);
  return X.is_cuda() ? r : r.to(at::kFloat);
}

// C -= a b^T with a, b from trailing_operand.
void sub_product(at::Tensor C, const at::Tensor& a, const at::Tensor& b, Precision p) {
  if (p == Precision::kBFloat16 && C.is_cuda()) {
    C.sub_(at::mm(a, b.mT(), at::kFloat));
    return;
  }
  TF32Scope tf32(p == Precision::kTF32 && C.is_cuda());
  C.addmm_(a, b.mT(), /*beta=*/1, /*alpha=*/-1);
}

// W[off:, off:] -= L21 L21^T on the lower triangle only, one block column at a time
// (half the flops of a full product).
void trailing_update(at::Tensor& W, const at::Tensor& L21, int64_t off, int64_t nb, Precision p) {
  const int64_t m = L21.size(0);
  const at::Tensor X = trailing_operand(L21, p);
  for (int64_t c = 0; c < m; c += nb) {
    const int64_t cw = std::min(nb, m - c);
    sub_product(
        W.narrow(0, off + c, m - c).narrow(1, off + c, cw), X.narrow(0, c, m - c),
        X.narrow(0, c, cw), p);
  }
}

// Blocked right-looking Cholesky of W in place (lower triangle): each panel factored in
// W's dtype, its trailing update at precision p. Returns 0, or the order of the first
// leading minor that is not positive definite.
int64_t blocked_cholesky_(at::Tensor& W, int64_t nb, Precision p) {
  const int64_t n = W.size(0);
  for (int64_t j = 0; j < n; j += nb) {
    const int64_t jb = std::min(nb, n - j);
    at::Tensor A11 = W.narrow(0, j, jb).narrow(1, j, jb);
    auto [L11, info] = at::linalg_cholesky_ex(A11, /*upper=*/false, /*check_errors=*/false);
    const int64_t k = info.item<int64_t>();
    if (k > 0) {
      return j + k;
    }
    A11.copy_(L11);
    const int64_t m = n - j - jb;
    if (m == 0) {
      break;
    }
    at::Tensor A21 = W.narrow(0, j + jb, m).narrow(1, j, jb);
    A21.copy_(at::linalg_solve_triangular(L11.mT(), A21, /*upper=*/true, /*left=*/false));
    trailing_update(W, A21, j + jb, nb, p);
  }
  return 0;
}

// ---------------------------------------------------------------------------------------
// Compact WY form of the Householder reflectors of one update panel.

// For H_i = I - tau_i v_i v_i^T with v_i = [e_i; V[:, i]], returns the upper triangular
// T with H_1 ... H_b = I - [I; V] T [I; V]^T, from T^-1 = diag(1 / tau) + striu(V^T V).
// A reflector with tau_i = 0 (nothing to annihilate) has V[:, i] = 0 and gets a zero row
// and column in T.
at::Tensor wy_factor(const at::Tensor& V, const at::Tensor& tau) {
  const int64_t b = tau.size(0);
  const at::Tensor inv_tau = at::where(tau == 0, at::ones_like(tau), tau.reciprocal());
  const at::Tensor M = at::matmul(V.mT(), V).triu(1) + at::diag(inv_tau);
  at::Tensor T = at::linalg_solve_triangular(M, at::eye(b, M.options()), /*upper=*/true);
  T.diagonal().copy_(tau);
  return T;
}

// Largest normwise backward error over the columns: ||r_j||_inf / (||M||_inf ||x_j||_inf).
double backward_error(const at::Tensor& R, const at::Tensor& X, double norm_m) {
  const at::Tensor r = std::get<0>(R.abs().max(0));
  const at::Tensor x = std::get<0>(X.abs().max(0)) * norm_m;
  // A zero column of B has r_j = x_j = 0, which is solved exactly.
  return at::where(r == 0, at::zeros_like(r), r / x).max().item<double>();
}

}  // namespace

double backward_error_tol(int64_t n) {
  return std::sqrt(static_cast<double>(std::max<int64_t>(n, 1))) *
      std::numeric_limits<double>::epsilon() / 2;
}

// -----------------------------------------------------------------------------------------

Precision parse_precision(const std::string& name) {
  if (name == "fp64" || name == "float64") return Precision::kFloat64;
  if (name == "fp32" || name == "float32") return Precision::kFloat32;
  if (name == "tf32") return Precision::kTF32;
  if (name == "bf16" || name == "bfloat16") return Precision::kBFloat16;
  TORCH_CHECK(
      false, "memit_fast: unknown precision '", name,
      "'; use one of 'fp64', 'fp32', 'tf32', 'bf16'");
  return Precision::kFloat32;  // unreachable
}

std::string precision_name(Precision p) {
  switch (p) {
    case Precision::kFloat64:
      return "fp64";
    case Precision::kFloat32:
      return "fp32";
    case Precision::kTF32:
      return "tf32";
    case Precision::kBFloat16:
      return "bf16";
  }
  return "?";
}

std::tuple<at::Tensor, at::Tensor> cholesky(
    const at::Tensor& A,
    const std::string& precision,
    int64_t block_size,
    bool check_errors) {
  constexpr const char* op = "memit_fast.cholesky";
  const Precision p = parse_precision(precision);
  check_square(A, op, "A");
  check_factor_dtype(A, op, "A");
  check_symmetric_finite(A, op);

  const int64_t n = A.size(0);
  const auto dtype = p == Precision::kFloat64 ? at::kDouble : at::kFloat;

  // Where the trailing updates run in the panels' own precision, the vendor's potrf
  // (LAPACK / cuSOLVER) is this same blocked right-looking algorithm, tuned and in one
  // call: it serves unless a block size is asked for.
  const bool same_precision = p == Precision::kFloat64 || p == Precision::kFloat32 ||
      (p == Precision::kTF32 && !A.is_cuda());
  int64_t failed = 0;  // LAPACK convention: order of the first minor that is not PD
  at::Tensor W;
  if (block_size <= 0 && same_precision) {
    auto [L, info] = at::linalg_cholesky_ex(A.to(dtype), /*upper=*/false, /*check_errors=*/false);
    W = L;
    failed = info.item<int64_t>();
  } else {
    W = A.to(dtype, /*non_blocking=*/false, /*copy=*/true).contiguous();
    failed = blocked_cholesky_(W, block_size > 0 ? block_size : default_block_size(A), p);
  }
  TORCH_CHECK(
      !(check_errors && failed > 0), op,
      ": the matrix is not positive definite: non-positive pivot at column ", failed - 1,
      " of ", n, " (0-based, trailing precision ", precision_name(p),
      "). For MEMIT's lambda*C + K K^T: use a larger lambda (mom2_update_weight), more "
      "statistics samples, or a higher precision");
  W.tril_();  // (potrf leaves the failed part of its result unspecified)
  return {W, at::scalar_tensor(failed, A.options().dtype(at::kInt))};
}

at::Tensor cholesky_update(const at::Tensor& L, const at::Tensor& K, int64_t block_size) {
  constexpr const char* op = "memit_fast.cholesky_update";
  check_square(L, op, "L");
  check_factor_dtype(L, op, "L");
  check_matrix(K, op, "K");
  check_floating(K, op, "K");
  check_device(L, K, op, "K");
  const int64_t n = L.size(0);
  TORCH_CHECK(
      K.size(0) == n, op, ": K must have ", n, " rows (one per row of L), got shape ",
      K.sizes());
  check_finite(K, op, "K");
  if (n > 0) {
    const double dmin = L.diagonal().min().item<double>();
    TORCH_CHECK(
        dmin > 0, op, ": L must be a Cholesky factor with a positive diagonal, but its ",
        "smallest diagonal entry is ", dmin);
  }

  const auto dtype = L.scalar_type();
  at::Tensor Lp = L.tril().contiguous();
  const int64_t k = K.size(1);
  if (k == 0 || n == 0) {
    return Lp;
  }
  at::Tensor X = K.to(dtype, /*non_blocking=*/false, /*copy=*/true).contiguous();
  const int64_t nb = block_size > 0 ? block_size : default_block_size(L);

  // [L X] Q = [L' 0] for an orthogonal Q, one block column of L at a time: the QR of the
  // triangular-over-dense panel [L11^T; X1^T] gives the reflectors, and their compact WY
  // form carries them to the rows below. Cost ~ 2 n^2 k + O(n nb (nb + k)).
  for (int64_t j = 0; j < n; j += nb) {
    const int64_t jb = std::min(nb, n - j);
    at::Tensor L11 = Lp.narrow(0, j, jb).narrow(1, j, jb);
    at::Tensor X1 = X.narrow(0, j, jb);
    auto [QR, tau] = at::geqrf(at::cat({L11.mT(), X1.mT()}, 0));
    const at::Tensor R = QR.narrow(0, 0, jb).triu();
    const at::Tensor V = QR.narrow(0, jb, k);  // (k, jb): the reflectors below the identity
    // Householder leaves diag(R) negative; flipping a column of L' keeps L' L'^T.
    const at::Tensor sign = at::where(
        R.diagonal() < 0, at::full({}, -1.0, R.options()), at::full({}, 1.0, R.options()));
    L11.copy_((R * sign.unsqueeze(1)).mT());
    const int64_t m = n - j - jb;
    if (m == 0) {
      break;
    }
    at::Tensor L21 = Lp.narrow(0, j + jb, m).narrow(1, j, jb);
    at::Tensor X2 = X.narrow(0, j + jb, m);
    const at::Tensor Z = at::matmul(at::addmm(L21, X2, V), wy_factor(V, tau));
    L21.sub_(Z);
    X2.addmm_(Z, V.mT(), /*beta=*/1, /*alpha=*/-1);
    L21.mul_(sign);
  }
  return Lp;
}

std::tuple<at::Tensor, at::Tensor> cholesky_solve(
    const at::Tensor& L,
    const at::Tensor& B,
    const std::optional<at::Tensor>& A,
    const std::optional<at::Tensor>& K,
    int64_t refine_steps,
    double tol) {
  constexpr const char* op = "memit_fast.cholesky_solve";
  check_square(L, op, "L");
  check_factor_dtype(L, op, "L");
  const int64_t n = L.size(0);
  TORCH_CHECK(B.defined(), op, ": B is an undefined tensor");
  TORCH_CHECK(
      (B.dim() == 1 || B.dim() == 2) && B.size(0) == n, op, ": B must have shape (", n,
      ",) or (", n, ", m) to match L, got ", B.sizes());
  check_floating(B, op, "B");
  check_device(L, B, op, "B");
  check_finite(B, op, "B");
  TORCH_CHECK(refine_steps >= 0, op, ": refine_steps must be >= 0, got ", refine_steps);
  TORCH_CHECK(
      !K.has_value() || A.has_value(), op,
      ": K (the low-rank part of the system matrix) needs A as well");
  if (A.has_value()) {
    check_square(*A, op, "A");
    check_factor_dtype(*A, op, "A");
    check_device(L, *A, op, "A");
    TORCH_CHECK(
        A->size(0) == n, op, ": A must be (", n, ", ", n, ") to match L, got ", A->sizes());
    check_finite(*A, op, "A");
  }
  if (K.has_value()) {
    check_matrix(*K, op, "K");
    check_floating(*K, op, "K");
    check_device(L, *K, op, "K");
    TORCH_CHECK(
        K->size(0) == n, op, ": K must have ", n, " rows to match L, got shape ", K->sizes());
    check_finite(*K, op, "K");
  }

  const bool vector = B.dim() == 1;
  const at::Tensor B2 = vector ? B.unsqueeze(1) : B;
  const auto dtype = L.scalar_type();
  const auto finish = [vector](const at::Tensor& X) { return vector ? X.squeeze(1) : X; };
  if (!A.has_value()) {
    return {finish(at::cholesky_solve(B2.to(dtype), L)), at::empty({0}, at::kDouble)};
  }

  const at::Tensor A64 = A->to(at::kDouble);
  const at::Tensor B64 = B2.to(at::kDouble);
  const at::Tensor K64 = K.has_value() ? K->to(at::kDouble) : at::Tensor();
  // ||M||_inf, bounded by ||A||_inf + ||K||_inf ||K^T||_inf for M = A + K K^T.
  double norm_m = A64.abs().sum(1).max().item<double>();
  if (K64.defined() && K64.numel() > 0) {
    norm_m += K64.abs().sum(1).max().item<double>() * K64.abs().sum(0).max().item<double>();
  }
  const double stop = tol > 0 ? tol : std::numeric_limits<double>::epsilon() / 2;
  at::Tensor X = at::cholesky_solve(B2.to(dtype), L).to(at::kDouble);
  at::Tensor D;
  std::vector<double> history;
  for (int64_t step = 0;; ++step) {
    at::Tensor R = at::addmm(B64, A64, X, /*beta=*/1, /*alpha=*/-1);  // float64 residual
    if (K64.defined()) {
      R.addmm_(K64, at::matmul(K64.mT(), X), /*beta=*/1, /*alpha=*/-1);
    }
    const double eta = backward_error(R, X, norm_m);
    if (!history.empty() && !(eta < history.back())) {
      X.sub_(D);  // the last correction made it worse (or not finite): undo it
      history.push_back(history.back());
      break;
    }
    history.push_back(eta);
    if (eta <= stop || step == refine_steps) {
      break;
    }
    // Linear convergence at the rate seen so far cannot reach `stop` in the steps left.
    if (step > 0) {
      const double rate = eta / history[history.size() - 2];
      if (eta * std::pow(rate, static_cast<double>(refine_steps - step)) > stop) {
        break;
      }
    }
    D = at::cholesky_solve(R.to(dtype), L).to(at::kDouble);
    X.add_(D);
  }
  at::Tensor hist = at::empty({static_cast<int64_t>(history.size())}, at::kDouble);
  std::copy(history.begin(), history.end(), hist.data_ptr<double>());
  return {finish(X), hist};
}

}  // namespace memit_fast

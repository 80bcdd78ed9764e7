// Blocked Cholesky factorization, rank-k update and refined solve (see memit_fast.h).
//
// Written against ATen only: at::linalg_cholesky_ex / at::geqrf / at::cholesky_solve and
// matrix products map to LAPACK and BLAS on the CPU and to cuSOLVER and cuBLAS on CUDA.

#include "memit_fast.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <string>
#include <utility>
#include <vector>

namespace memit_fast {
namespace {

// ---------------------------------------------------------------------------------------
// Input checks: every entry point validates before any work, and says what was wrong.

void check_matrix(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK_VALUE(t.defined(), op, ": ", name, " is an undefined tensor");
  TORCH_CHECK_VALUE(
      t.dim() == 2, op, ": ", name, " must be a 2-D matrix, got a ", t.dim(),
      "-D tensor of shape ", t.sizes());
}

void check_square(const at::Tensor& t, const char* op, const char* name) {
  check_matrix(t, op, name);
  TORCH_CHECK_VALUE(
      t.size(0) == t.size(1), op, ": ", name, " must be square, got shape ", t.sizes());
}

void check_factor_dtype(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK_VALUE(
      t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, op, ": ", name,
      " must be float32 or float64, got ", t.scalar_type());
}

void check_floating(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK_VALUE(
      at::isFloatingType(t.scalar_type()), op, ": ", name,
      " must be a floating-point tensor, got ", t.scalar_type());
}

void check_device(const at::Tensor& ref, const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK_VALUE(
      t.device() == ref.device(), op, ": ", name, " is on ", t.device(),
      " but L is on ", ref.device(), "; move both to one device");
}

void check_finite(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK_VALUE(
      at::isfinite(t).all().item<bool>(), op, ": ", name,
      " contains NaN or Inf (check the statistics and the keys that built it)");
}

// L's lower triangle in row blocks of kLowerRows, as memit_fast.linalg._lower_blocks reads
// it: fn(i, ib, left, diag) for the rows i .. i + ib, with left the part left of their
// diagonal block, read in place (undefined for the first block), and diag that block
// through tril() (small).
constexpr int64_t kLowerRows = 1024;

template <typename Fn>
void for_each_lower_block(const at::Tensor& L, Fn&& fn) {
  const int64_t n = L.size(0);
  for (int64_t i = 0; i < n; i += kLowerRows) {
    const int64_t ib = std::min(kLowerRows, n - i);
    const at::Tensor rows = L.narrow(0, i, ib);
    fn(i, ib, i > 0 ? rows.narrow(1, 0, i) : at::Tensor(), rows.narrow(1, i, ib).tril());
  }
}

// Whether every entry on or below L's diagonal is finite (for_each_lower_block). `exact`
// tests each entry; otherwise the entries are summed in L's dtype, which a NaN or Inf
// makes NaN or Inf (one read, no temporary of the factor's size) but which large finite
// entries could also overflow: a non-finite sum is therefore rechecked exactly.
bool lower_finite(const at::Tensor& L, bool exact) {
  at::Tensor acc = exact ? at::ones({}, L.options().dtype(at::kBool))
                         : at::zeros({}, L.options().dtype(at::kDouble));
  const auto add = [&](const at::Tensor& part) {
    if (exact) {
      acc = acc.logical_and(at::isfinite(part).all());
    } else {
      acc.add_(part.sum().to(at::kDouble));
    }
  };
  for_each_lower_block(L, [&](int64_t, int64_t, const at::Tensor& left, const at::Tensor& diag) {
    if (left.defined()) {
      add(left);
    }
    add(diag);
  });
  return exact ? acc.item<bool>() : (std::isfinite(acc.item<double>()) || lower_finite(L, true));
}

void check_factor_diagonal(const at::Tensor& L, const char* op, const char* name) {
  if (L.size(0) == 0) {
    return;
  }
  const auto [lo, hi] = at::aminmax(L.diagonal());  // NaN if any entry is NaN
  const at::Tensor both = at::stack({lo, hi}).to(at::kDouble).cpu();  // one sync
  const double dmin = both[0].item<double>(), dmax = both[1].item<double>();
  TORCH_CHECK_VALUE(
      dmin > 0 && std::isfinite(dmax), op, ": ", name, " must be a Cholesky factor with a ",
      "positive diagonal, but its diagonal spans ", dmin, " to ", dmax);
}

// A factor's lower triangle finite and its diagonal positive; what lies above the
// diagonal is never read, so it is not checked.
void check_factor_values(const at::Tensor& L, const char* op, const char* name) {
  if (L.size(0) == 0) {
    return;
  }
  TORCH_CHECK_VALUE(
      lower_finite(L, /*exact=*/false), op, ": ", name,
      " contains NaN or Inf on or below its diagonal (is it a Cholesky factor?)");
  check_factor_diagonal(L, op, name);
}

// A triangular solve's result is finite, or the error says why: L's lower triangle holds a
// NaN or Inf (it reaches the solution: every entry multiplies a solved value), or the
// values overflowed. Checking the solution (n x m) instead of L (n x n) saves a read of the
// factor per solve; L is read only when the solution is not finite.
void check_solution(const at::Tensor& X, const at::Tensor& L, const char* op) {
  if (X.numel() == 0 || at::isfinite(X).all().item<bool>()) {
    return;
  }
  TORCH_CHECK_VALUE(
      lower_finite(L, /*exact=*/true), op,
      ": L contains NaN or Inf on or below its diagonal (is it a Cholesky factor?)");
  TORCH_CHECK_VALUE(
      false, op, ": the solution overflowed ", X.scalar_type(), " (B is too large for L's ",
      "dtype, or L is nearly singular)");
}

// Largest |A_ij - A_ji| on the CPU, NaN if an off-diagonal entry is not finite: each pair
// i < j read once, in square tiles (both reads stay in cache), no temporary.
template <typename scalar_t>
double cpu_max_asymmetry(const at::Tensor& A) {
  constexpr int64_t tile = 64;
  const int64_t n = A.size(0), s0 = A.stride(0), s1 = A.stride(1);
  const scalar_t* a = A.const_data_ptr<scalar_t>();
  double asym = 0;
  bool finite = true;
  for (int64_t bi = 0; bi < n; bi += tile) {
    const int64_t ei = std::min(bi + tile, n);
    for (int64_t bj = bi; bj < n; bj += tile) {
      const int64_t ej = std::min(bj + tile, n);
      for (int64_t i = bi; i < ei; ++i) {
        for (int64_t j = std::max(bj, i + 1); j < ej; ++j) {
          const double d = std::abs(double(a[i * s0 + j * s1]) - double(a[j * s0 + i * s1]));
          finite = finite && std::isfinite(d);  // NaN or Inf in either entry
          asym = d > asym ? d : asym;
        }
      }
    }
  }
  return finite ? asym : std::numeric_limits<double>::quiet_NaN();
}

// A symmetric and finite, in one pass (no (n, n) temporary). The scale is the largest
// diagonal entry, which bounds every entry of an SPD matrix.
void check_symmetric_finite(const at::Tensor& A, const char* op) {
  const int64_t n = A.size(0);
  double a = 0;  // NaN or Inf anywhere off the diagonal makes this NaN or Inf
  if (A.device().is_cpu()) {
    AT_DISPATCH_FLOATING_TYPES(A.scalar_type(), "check_symmetric_finite", [&] {
      a = cpu_max_asymmetry<scalar_t>(A);
    });
  } else {
    const int64_t step = 1024;
    at::Tensor asym = at::zeros({}, A.options());
    for (int64_t i = 0; i < n; i += step) {
      const int64_t ib = std::min(step, n - i);
      asym = at::maximum(asym, (A.narrow(0, i, ib) - A.narrow(1, i, ib).mT()).abs().amax());
    }
    a = asym.item<double>();
  }
  const double s = n > 0 ? A.diagonal().abs().max().item<double>() : 0.0;
  TORCH_CHECK_VALUE(
      std::isfinite(a) && std::isfinite(s), op,
      ": A contains NaN or Inf (check the statistics and the keys that built it)");
  TORCH_CHECK_VALUE(
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

// ---------------------------------------------------------------------------------------
// Rank-k update on the CPU: the panels in plain loops, the trailing products in BLAS.

// Rows of the trailing update per thread at the least.
constexpr int64_t kUpdateRowGrain = 128;

// The panel of a rank-k update has a structure the general QR ignores: [L11^T; X1^T] is
// triangular over k dense rows, so reflector i touches row i of L11^T and the k rows of
// X1^T only. Factoring it in place costs O(jb^2 k) without any per-panel library call,
// which is what keeps small panels (sized by k) cheap. R (jb x jb, row-major, upper) holds
// L11^T on entry and the new L11^T on exit; Xb (jb x k, row-major) holds X1 and is
// consumed; Vt (jb x k) receives the reflectors' dense parts (row i: v_i) and T (jb x jb,
// upper) their compact WY factor (H_1 ... H_jb = I - [I; V] T [I; V]^T). As in LAPACK's
// larfg, beta = -sign(alpha) |(alpha, x)| with alpha = R[i][i] > 0 (a Cholesky diagonal,
// touched by no earlier reflector), so |v| <= 1; the reflector that annihilated anything
// leaves a negative diagonal, and flip[i] is set for the caller to negate column i of L'.
// Returns whether every reflector flipped.
template <typename scalar_t>
bool update_panel(
    scalar_t* R, scalar_t* Xb, scalar_t* Vt, scalar_t* T, char* flip, int64_t jb, int64_t k) {
  bool all = true;
  std::vector<scalar_t> tmp(jb);
  for (int64_t i = 0; i < jb; ++i) {
    const scalar_t* x = Xb + i * k;
    scalar_t* v = Vt + i * k;
    const scalar_t alpha = R[i * jb + i];
    // |(alpha, x)| scaled by its largest entry, so that squares neither overflow nor
    // underflow (LAPACK's nrm2 does the same): float32 keys of 1e20 or 1e-22 stay exact.
    scalar_t scale = std::abs(alpha);
    for (int64_t p = 0; p < k; ++p) scale = std::max(scale, std::abs(x[p]));
    scalar_t xn2 = 0;  // sum (x_p / scale)^2
    if (scale > 0) {
      for (int64_t p = 0; p < k; ++p) {
        const scalar_t y = x[p] / scale;
        xn2 += y * y;
      }
    }
    scalar_t tau = 0;
    flip[i] = xn2 != 0;
    if (xn2 == 0) {
      all = false;
      for (int64_t p = 0; p < k; ++p) v[p] = 0;
    } else {
      const scalar_t a = alpha / scale;
      const scalar_t norm = scale * std::sqrt(a * a + xn2);  // beta = -norm
      const scalar_t inv = 1 / (alpha + norm);                // 1 / (alpha - beta)
      for (int64_t p = 0; p < k; ++p) v[p] = x[p] * inv;
      tau = (alpha + norm) / norm;
      R[i * jb + i] = -norm;
      for (int64_t c = i + 1; c < jb; ++c) {
        scalar_t* xc = Xb + c * k;
        scalar_t w = 0;
        for (int64_t p = 0; p < k; ++p) w += v[p] * xc[p];
        w = tau * (w + R[i * jb + c]);
        R[i * jb + c] -= w;
        for (int64_t p = 0; p < k; ++p) xc[p] -= w * v[p];
      }
    }
    // Forward column of T (LAPACK's larft): T[0:i, i] = -tau T[0:i, 0:i] V[:, 0:i]^T v_i.
    for (int64_t r = 0; r < i; ++r) {
      const scalar_t* vr = Vt + r * k;
      scalar_t d = 0;
      for (int64_t p = 0; p < k; ++p) d += vr[p] * v[p];
      tmp[r] = -tau * d;
    }
    for (int64_t r = 0; r < i; ++r) {
      scalar_t acc = 0;
      for (int64_t c = r; c < i; ++c) acc += T[r * jb + c] * tmp[c];
      T[r * jb + i] = acc;
    }
    for (int64_t r = i + 1; r < jb; ++r) T[r * jb + i] = 0;
    T[i * jb + i] = tau;
  }
  return all;
}

// Factor of L L^T + X X^T into the new row-major out (same shape and dtype as L, which
// is row- or column-major), reading only L's lower triangle: [L X] Q = [L' 0] one block
// column at a time. Cost ~ n^2 (2 k + nb) flops in BLAS plus O(n nb k) in the panels, so the
// blocks are narrow, and L is read and out written once (no copy of the factor first).
template <typename scalar_t>
void cpu_cholesky_update(const at::Tensor& L, at::Tensor& X, at::Tensor& out, int64_t nb) {
  const int64_t n = L.size(0), k = X.size(1);
  const scalar_t* l = L.const_data_ptr<scalar_t>();
  const int64_t s0 = L.stride(0), s1 = L.stride(1);  // row- or column-major
  scalar_t* o = out.mutable_data_ptr<scalar_t>();
  scalar_t* x = X.mutable_data_ptr<scalar_t>();
  const auto opts = L.options();
  at::Tensor Rt = at::empty({nb, nb}, opts), Vt = at::empty({nb, k}, opts);
  at::Tensor Tt = at::empty({nb, nb}, opts);
  std::vector<char> flip(nb);
  for (int64_t i = 0; i < n; ++i) {  // the strict upper triangle of out
    std::fill(o + i * n + i + 1, o + (i + 1) * n, scalar_t(0));
  }
  for (int64_t j = 0; j < n; j += nb) {
    const int64_t jb = std::min(nb, n - j);
    scalar_t* R = Rt.mutable_data_ptr<scalar_t>();
    for (int64_t i = 0; i < jb; ++i) {  // R = L11^T
      for (int64_t c = 0; c < jb; ++c) {
        R[i * jb + c] = c >= i ? l[(j + c) * s0 + (j + i) * s1] : scalar_t(0);
      }
    }
    scalar_t* V = Vt.mutable_data_ptr<scalar_t>();
    scalar_t* T = Tt.mutable_data_ptr<scalar_t>();
    const bool all = update_panel<scalar_t>(R, x + j * k, V, T, flip.data(), jb, k);
    for (int64_t i = 0; i < jb; ++i) {  // L11' = R^T, flipped to a positive diagonal
      const scalar_t s = flip[i] ? scalar_t(-1) : scalar_t(1);
      for (int64_t c = i; c < jb; ++c) o[(j + c) * n + j + i] = s * R[i * jb + c];
    }
    const int64_t m = n - j - jb;
    if (m == 0) {
      break;
    }
    // [L21 X2] (I - [I; V] T [I; V]^T): Z = (L21 + X2 V) T, L21' = L21 - Z, X2 -= Z V^T.
    // Every row is independent: the rows are split over the threads, each chunk with its
    // own single-threaded products (the products are too thin for a threaded GEMM to pay).
    const at::Tensor Vjt = at::from_blob(V, {jb, k}, opts);
    const at::Tensor Tj = at::from_blob(T, {jb, jb}, opts);
    at::parallel_for(j + jb, n, kUpdateRowGrain, [&](int64_t r0, int64_t r1) {
      const at::Tensor L21 = L.narrow(0, r0, r1 - r0).narrow(1, j, jb);
      at::Tensor O21 = out.narrow(0, r0, r1 - r0).narrow(1, j, jb);
      at::Tensor X2 = X.narrow(0, r0, r1 - r0);
      const at::Tensor Z = at::mm(at::addmm(L21, X2, Vjt.mT()), Tj);
      X2.addmm_(Z, Vjt, /*beta=*/1, /*alpha=*/-1);
      if (all) {
        at::sub_out(O21, Z, L21);  // -(L21 - Z): every column flips (the usual case)
      } else {
        at::sub_out(O21, L21, Z);
        for (int64_t i = 0; i < jb; ++i) {
          if (flip[i]) O21.select(1, i).neg_();
        }
      }
    });
  }
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
  TORCH_CHECK_VALUE(
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
    W = L;  // torch zeroes the strict upper triangle of its result
    failed = info.item<int64_t>();
  } else {
    W = A.to(dtype, /*non_blocking=*/false, /*copy=*/true).contiguous();
    failed = blocked_cholesky_(W, block_size > 0 ? block_size : default_block_size(A), p);
    W.tril_();  // (the blocked factor works in place on the full matrix)
  }
  TORCH_CHECK(
      !(check_errors && failed > 0), op,
      ": the matrix is not positive definite: non-positive pivot at column ", failed - 1,
      " of ", n, " (0-based, trailing precision ", precision_name(p),
      "). For MEMIT's lambda*C + K K^T: use a larger lambda (mom2_update_weight), more "
      "statistics samples, or a higher precision");
  return {W, at::scalar_tensor(failed, A.options().dtype(at::kInt))};
}

// Triangular solves with a lower factor L for few right-hand sides, as GEMMs: the diagonal
// blocks of L inverted once (one batched call), then per block of rows one product with
// its inverse and one GEMM that carries the solved rows to the rest ("right-looking").
// On CUDA they are the default: on an H100 at dk = 16384 and 100 right-hand sides,
// cuBLAS's trsm took 4.5 ms per solve (about 6 TFLOP/s) and these solves made the product
// update 13.1 -> 9.7 ms and the layer solve 31.5 -> 18.0 ms (at 10,000 right-hand sides
// they were 3.5 % slower; benchmarks/results/gpu_h100.md). MEMIT_FAST_TRSM=library or
// =blocked overrides the choice on any device; the CPU keeps LAPACK's solves. Only L's
// lower triangle is read.
constexpr int64_t kTrsmBlock = 256;

static bool blocked_trsm(const at::Tensor& L) {
  const char* v = std::getenv("MEMIT_FAST_TRSM");
  if (v == nullptr || *v == '\0') {
    return L.is_cuda();
  }
  const std::string choice(v);
  TORCH_CHECK_VALUE(
      choice == "blocked" || choice == "library", "memit_fast: MEMIT_FAST_TRSM must be ",
      "'blocked' or 'library' (or unset: blocked on CUDA, library elsewhere), got '", choice,
      "'");
  return choice == "blocked";
}

// Views of a square M's nb-wide diagonal blocks: the n / nb full ones as an (n / nb, nb, nb)
// stack (M's own strides, any layout), and the partial last one (undefined where nb divides
// n).
static std::pair<at::Tensor, at::Tensor> diagonal_block_views(const at::Tensor& M, int64_t nb) {
  const int64_t n = M.size(0), full = n / nb, j = full * nb;
  const at::Tensor blocks = M.as_strided(
      {full, nb, nb}, {nb * (M.stride(0) + M.stride(1)), M.stride(0), M.stride(1)},
      M.storage_offset());
  return {blocks, j < n ? M.narrow(0, j, n - j).narrow(1, j, n - j) : at::Tensor()};
}

// (nblocks, nb, nb): copies of tril(L)'s nb-wide diagonal blocks, the last one padded with
// the identity. Only the lower triangle of each block is read.
static at::Tensor diagonal_blocks(const at::Tensor& L, int64_t nb) {
  const int64_t n = L.size(0), nblocks = (n + nb - 1) / nb;
  at::Tensor D = at::eye(nb, L.options()).repeat({nblocks, 1, 1});
  const auto [blocks, last] = diagonal_block_views(L, nb);
  D.narrow(0, 0, blocks.size(0)).copy_(blocks);
  if (last.defined()) {
    D[nblocks - 1].narrow(0, 0, last.size(0)).narrow(1, 0, last.size(0)).copy_(last);
  }
  return D.tril_();
}

// (nblocks, nb, nb): the inverses of tril(L)'s nb-wide diagonal blocks, the last one
// padded with the identity.
static at::Tensor diagonal_block_inverses(const at::Tensor& L, int64_t nb) {
  const at::Tensor D = diagonal_blocks(L, nb);
  return at::linalg_solve_triangular(
      D, at::eye(nb, L.options()).expand({D.size(0), nb, nb}), /*upper=*/false);
}

// X = L^-1 B (transpose = false) or L^-T B (true), B (n, m) in L's dtype; B is not
// modified.
static at::Tensor solve_lower(
    const at::Tensor& L, const at::Tensor& B, bool transpose, const at::Tensor& Dinv) {
  const int64_t n = L.size(0), nb = Dinv.size(1), nblocks = Dinv.size(0);
  at::Tensor work = B.clone(at::MemoryFormat::Contiguous);
  at::Tensor X = at::empty_like(work);
  for (int64_t step = 0; step < nblocks; ++step) {
    const int64_t J = transpose ? nblocks - 1 - step : step;
    const int64_t j = J * nb, jb = std::min(nb, n - j);
    const at::Tensor Di = Dinv[J].narrow(0, 0, jb).narrow(1, 0, jb);
    at::Tensor Xj = X.narrow(0, j, jb);
    at::mm_out(Xj, transpose ? Di.mT() : Di, work.narrow(0, j, jb));
    if (!transpose && j + jb < n) {  // rows below: B_below -= L[below, J] X_J
      work.narrow(0, j + jb, n - j - jb)
          .addmm_(L.narrow(0, j + jb, n - j - jb).narrow(1, j, jb), Xj, 1, -1);
    } else if (transpose && j > 0) {  // rows above: B_above -= L[J, above]^T X_J
      work.narrow(0, 0, j).addmm_(L.narrow(0, j, jb).narrow(1, 0, j).mT(), Xj, 1, -1);
    }
  }
  return X;
}

// L^-1 B: blocked where chosen (and L spans more than one block), else the library's trsm.
static at::Tensor forward_solve(const at::Tensor& L, const at::Tensor& B) {
  if (blocked_trsm(L) && L.size(0) > kTrsmBlock && B.dim() == 2) {
    return solve_lower(L, B.to(L.scalar_type()), false, diagonal_block_inverses(L, kTrsmBlock));
  }
  return at::linalg_solve_triangular(L, B, /*upper=*/false);
}

// (L L^T)^-1 B for B (n, m) in L's dtype: blocked where chosen, else cholesky_solve.
static at::Tensor factor_solve(const at::Tensor& B, const at::Tensor& L) {
  if (blocked_trsm(L) && L.size(0) > kTrsmBlock) {
    const at::Tensor Dinv = diagonal_block_inverses(L, kTrsmBlock);
    return solve_lower(L, solve_lower(L, B, false, Dinv), true, Dinv);
  }
  return at::cholesky_solve(B, L);
}

// Block widths of the "product" update: its cost has an n^2 nb term, and three GEMMs per
// block column.
constexpr int64_t kProductBlock = 256;
constexpr int64_t kCpuProductBlock = 128;

// Largest k that the CPU path with panels in plain loops takes; wider updates use geqrf.
constexpr int64_t kCpuUpdateMaxK = 128;
// Its block width.
constexpr int64_t kCpuUpdateBlock = 24;

// The factor of L L^T + X X^T without an orthogonal factorization, one block column at a
// time (Lp: L's lower triangle, contiguous, overwritten; X: the keys, overwritten):
//   L11' = chol(L11 L11^T + X1 X1^T),   L21' = (L21 L11^T + X2 X1^T) L11'^-T,
// and the rank-k remainder of the trailing Schur complement is X2' X2'^T with
//   X2' = (X2 - L21 M) C^-T,   M = L11^-1 X1,   C = chol(I + M^T M)
// ([L21 X2] times a basis of the null space of [L11 X1], normalized). Every step is a
// GEMM, a triangular solve or a small Cholesky (nb and k wide) without a host sync: on a
// GPU it avoids the QR of each panel. The k x k factor per block costs (n / nb) k^3 / 3,
// which is small for k <= nb.
at::Tensor update_by_cholesky(at::Tensor Lp, at::Tensor X, int64_t nb, const char* op) {
  const int64_t n = Lp.size(0), k = X.size(1);
  const at::Tensor I = at::eye(k, X.options().dtype(at::kDouble));
  at::Tensor worst = at::zeros({}, Lp.options().dtype(at::kInt));  // largest info seen
  for (int64_t j = 0; j < n; j += nb) {
    const int64_t jb = std::min(nb, n - j);
    at::Tensor L11 = Lp.narrow(0, j, jb).narrow(1, j, jb);
    const at::Tensor X1 = X.narrow(0, j, jb);
    // The block-sized products and factors in float64 whatever L's dtype: forming
    // L11 L11^T + X1 X1^T squares the block's condition number, which float32 cannot hold
    // for badly conditioned statistics (and these are nb x nb, nb x k: cheap).
    const at::Tensor L11d = L11.to(at::kDouble), X1d = X1.to(at::kDouble);
    auto [L11n, info] = at::linalg_cholesky_ex(
        at::addmm(at::matmul(L11d, L11d.mT()), X1d, X1d.mT()), /*upper=*/false,
        /*check_errors=*/false);
    worst = at::maximum(worst, info);
    L11n = L11n.to(Lp.scalar_type());
    const int64_t m = n - j - jb;
    if (m > 0) {
      at::Tensor L21 = Lp.narrow(0, j + jb, m).narrow(1, j, jb);
      at::Tensor X2 = X.narrow(0, j + jb, m);
      const at::Tensor Md = at::linalg_solve_triangular(L11d, X1d, /*upper=*/false);
      auto [C, info_c] = at::linalg_cholesky_ex(
          at::addmm(I, Md.mT(), Md), /*upper=*/false, /*check_errors=*/false);
      worst = at::maximum(worst, info_c);
      const at::Tensor M = Md.to(Lp.scalar_type());
      C = C.to(Lp.scalar_type());
      const at::Tensor T = at::addmm(at::matmul(L21, L11.mT()), X2, X1.mT());
      X2.copy_(at::linalg_solve_triangular(
          C.mT(), at::addmm(X2, L21, M, /*beta=*/1, /*alpha=*/-1), /*upper=*/true,
          /*left=*/false));
      L21.copy_(at::linalg_solve_triangular(L11n.mT(), T, /*upper=*/true, /*left=*/false));
    }
    L11.copy_(L11n);
  }
  const int worst_info = worst.item<int>();  // the one host sync
  TORCH_CHECK(
      worst_info == 0, op, ": a block of the updated factor was not positive definite "
      "(pivot ", worst_info, " of a block); is L a Cholesky factor? method='qr' does not "
      "depend on this");
  return Lp;
}

// The factor of L L^T + X X^T as L times the factor of I + W W^T, W = L^-1 X (all in
// float64; L: float64, of which only the lower triangle is read; X: the keys, float64).
// Eliminating the blocks of I + W W^T leaves Schur complements I + W' S W'^T with
// S = (I + W_<J^T W_<J)^-1 (Woodbury), so with F_J F_J^T = I + W_<J^T W_<J,
// V_J = W_J F_J^-T and C_J C_J^T = I + V_J V_J^T the factor of I + W W^T is block-diagonal
// C_J plus, below each diagonal block, W G_J^T with G_J = C_J^-1 V_J F_J^-1. Hence block
// column J of the new factor is
//   L'[:, J] = L[:, J] C_J + (sum_{I > J} L[:, I] W_I) G_J^T
// (the sum vanishes on block J's rows and above). Every C_J and G_J comes from a few
// batched calls over all blocks at once, and so do the diagonal blocks' products (tril(L)'s
// diagonal blocks are copied once, which is what keeps L's upper triangle unread); what
// stays sequential is three GEMMs per block column below the diagonal, so on a GPU there
// is no per-panel factorization and no host sync. Cost ~3 n^2 k + n^2 nb + 2 n k^2; it is
// meant for few keys (k below the block width). Its backward error grows with
// ||X X^T|| / ||L L^T|| (L L^T is recovered from products larger than itself), which is
// why "auto" checks it. The result's strict upper triangle is zero.
at::Tensor update_by_product(const at::Tensor& Ld, const at::Tensor& Xd, int64_t nb) {
  const int64_t n = Ld.size(0), k = Xd.size(1);
  // Blocks at least k wide: the k x k factors per block then take O(n k) memory, not
  // O(n k^2 / nb) (many keys mean that the n^2 k terms dominate the cost anyway).
  nb = std::min(std::max(nb, k), n);
  const int64_t nblocks = (n + nb - 1) / nb;
  const at::Tensor W = forward_solve(Ld, Xd);
  // W in blocks of nb rows, zero rows padding the last one (they factor as the identity).
  at::Tensor Wb = at::zeros({nblocks * nb, k}, W.options());
  Wb.narrow(0, 0, n).copy_(W);
  Wb = Wb.view({nblocks, nb, k});
  const at::Tensor Ik = at::eye(k, W.options()).expand({nblocks, k, k});
  const at::Tensor grams = at::bmm(Wb.mT(), Wb);  // W_J^T W_J
  // I + sum over the blocks before J (an exclusive prefix sum: no subtraction).
  at::Tensor prefix = Ik.clone();
  if (nblocks > 1) {
    prefix.narrow(0, 1, nblocks - 1).add_(grams.narrow(0, 0, nblocks - 1).cumsum(0));
  }
  const at::Tensor F = std::get<0>(at::linalg_cholesky_ex(prefix, false, false));
  // V_J = W_J F_J^-T: solve V F^T = W from the right.
  const at::Tensor VJ =
      at::linalg_solve_triangular(F.mT(), Wb, /*upper=*/true, /*left=*/false);
  at::Tensor M = at::eye(nb, W.options()).expand({nblocks, nb, nb}).clone();
  M.baddbmm_(VJ, VJ.mT());
  const at::Tensor C = std::get<0>(at::linalg_cholesky_ex(M, false, false));
  // G_J = C_J^-1 (V_J F_J^-1).
  const at::Tensor G = at::linalg_solve_triangular(
      C, at::linalg_solve_triangular(F, VJ, /*upper=*/false, /*left=*/false),
      /*upper=*/false);
  // The diagonal blocks at once: L'_JJ = L_JJ C_J, and each block's own term L_JJ W_J of the
  // running sum (the padding rows stay zero: identity times zero rows of Wb).
  const at::Tensor D = diagonal_blocks(Ld, nb);
  const at::Tensor diag = at::bmm(D, C);
  at::Tensor T = at::bmm(D, Wb).view({nblocks * nb, k}).narrow(0, 0, n);  // sum_{I >= J}
  at::Tensor out = at::empty({n, n}, Ld.options());  // row-major
  const auto [blocks, last] = diagonal_block_views(out, nb);
  blocks.copy_(diag.narrow(0, 0, blocks.size(0)));
  if (last.defined()) {
    last.copy_(diag[nblocks - 1].narrow(0, 0, last.size(0)).narrow(1, 0, last.size(0)));
  }
  for (int64_t J = nblocks - 1; J >= 0; --J) {
    const int64_t j = J * nb, jb = std::min(nb, n - j), below = n - j - jb;
    if (j > 0) {
      out.narrow(0, 0, j).narrow(1, j, jb).zero_();  // above the diagonal block
    }
    if (below > 0) {
      const at::Tensor Lb = Ld.narrow(0, j + jb, below).narrow(1, j, jb);
      at::Tensor O = out.narrow(0, j + jb, below).narrow(1, j, jb);
      at::mm_out(O, Lb, C[J].narrow(0, 0, jb).narrow(1, 0, jb));
      at::Tensor Tb = T.narrow(0, j + jb, below);
      O.addmm_(Tb, G[J].narrow(0, 0, jb).mT());
      Tb.addmm_(Lb, W.narrow(0, j, jb));
    }
  }
  return out;
}

// L (L^T V) for V (n, m), reading only L's lower triangle (for_each_lower_block, both
// products over the same blocks). About half the reads of two full products, which matters
// where m is small and the products run at the memory's rate.
at::Tensor lower_gram_times(const at::Tensor& L, const at::Tensor& V) {
  struct Block {
    int64_t i, ib;
    at::Tensor left, diag;
  };
  std::vector<Block> blocks;
  at::Tensor Y = at::zeros_like(V);  // L^T V
  const auto product = [&](int64_t i, int64_t ib, const at::Tensor& left, const at::Tensor& diag) {
    const at::Tensor Vi = V.narrow(0, i, ib);
    if (left.defined()) {
      Y.narrow(0, 0, i).addmm_(left.mT(), Vi);
    }
    Y.narrow(0, i, ib).addmm_(diag.mT(), Vi);
    blocks.push_back({i, ib, left, diag});
  };
  for_each_lower_block(L, product);
  at::Tensor Z = at::empty_like(V);
  for (const Block& b : blocks) {
    at::Tensor Zi = Z.narrow(0, b.i, b.ib);
    at::mm_out(Zi, b.diag, Y.narrow(0, b.i, b.ib));
    if (b.left.defined()) {
      Zi.addmm_(b.left, Y.narrow(0, 0, b.i));
    }
  }
  return Z;
}

// Relative backward error of a rank-k update, estimated on random probes:
// ||(L' L'^T - L L^T - X X^T) V|| / (||L L^T V|| + ||X X^T V||), all in float64 (of L and
// L' only the lower triangles are read).
double update_backward_error(const at::Tensor& Lnew, const at::Tensor& Ld, const at::Tensor& Xd) {
  // Fixed, not random: the caller's generator state is not ours to advance.
  const at::Tensor V = at::sin(
      at::arange(1, Ld.size(0) + 1, Ld.options()).unsqueeze(1) *
      at::tensor({0.7548776662, 1.3247179572, 2.2055694304, 0.5698402910}, Ld.options()));
  const at::Tensor a = lower_gram_times(Ld, V);
  const at::Tensor b = at::matmul(Xd, at::matmul(Xd.mT(), V));
  const at::Tensor r = lower_gram_times(Lnew, V) - a - b;
  return (r.norm() / (a.norm() + b.norm())).item<double>();
}

at::Tensor cholesky_update(
    const at::Tensor& L, const at::Tensor& K, int64_t block_size, c10::string_view method) {
  constexpr const char* op = "memit_fast.cholesky_update";
  TORCH_CHECK_VALUE(
      method == "auto" || method == "qr" || method == "chol" || method == "product", op,
      ": unknown method '", std::string(method), "'; use 'auto', 'qr', 'chol' or 'product'");
  check_square(L, op, "L");
  check_factor_dtype(L, op, "L");
  check_matrix(K, op, "K");
  check_floating(K, op, "K");
  check_device(L, K, op, "K");
  const int64_t n = L.size(0);
  TORCH_CHECK_VALUE(
      K.size(0) == n, op, ": K must have ", n, " rows (one per row of L), got shape ",
      K.sizes());
  check_finite(K, op, "K");
  check_factor_values(L, op, "L");
  if (L.scalar_type() == at::kFloat && K.scalar_type() == at::kDouble && K.numel() > 0) {
    const double kmax = K.abs().max().item<double>();
    TORCH_CHECK_VALUE(
        kmax <= std::numeric_limits<float>::max(), op, ": K has entries beyond float32's range ",
        "(max |K| = ", kmax, ") for the float32 factor L; use a float64 factor");
  }

  const auto dtype = L.scalar_type();
  const int64_t k = K.size(1);
  if (k == 0 || n == 0) {
    return L.tril().contiguous();
  }
  if (method == "product" || (method == "auto" && !L.is_cpu())) {
    // L in float64, read in place: the product update and its check read only the lower
    // triangle (a tril() copy took 1.5 of the 12.3 ms of the update at dk = 16384 on an
    // H200, and a test that the upper triangle is zero about half of that).
    const at::Tensor Ld = L.to(at::kDouble), Xd = K.to(at::kDouble);
    const at::Tensor out = update_by_product(
        Ld, Xd, block_size > 0 ? block_size : (L.is_cpu() ? kCpuProductBlock : kProductBlock));
    // "auto" keeps it only where it is as accurate as the factor's dtype allows: within
    // a factorization's backward error bound in the factor's dtype (n 2^-53 in float64,
    // n 2^-24 in float32: rounding the float64 product to float32 alone gave 3.5e-8 at
    // n = 1000, next to the 6e-8 of 2^-24, while a float32 Householder update gave 1.6e-7).
    // It checks that on probes rather than bounding it (bounds from norms overestimate by
    // orders of magnitude for key statistics); NaN fails the test.
    if (method == "product" ||
        update_backward_error(out, Ld, Xd) <=
            double(n) * std::ldexp(1.0, dtype == at::kDouble ? -53 : -24)) {
      return out.to(dtype);
    }
  }
  at::Tensor X = K.to(dtype, /*non_blocking=*/false, /*copy=*/true).contiguous();
  if (method == "chol") {
    return update_by_cholesky(
        L.tril().contiguous(), X, block_size > 0 ? block_size : default_block_size(L), op);
  }
  if (L.is_cpu() && k <= kCpuUpdateMaxK) {
    // The trailing products cost n^2 (2 k + nb) flops, the per-block overhead is a few
    // library calls: 24 was the fastest of 8-128 for k = 20 and 100 at dk = 1536 and 4096,
    // one and two threads (by 0-25 % over 32-64).
    const int64_t nb = block_size > 0 ? block_size : kCpuUpdateBlock;
    // Either layout is read in place (potrf's factors are column-major).
    const at::Tensor Lc = L.stride(0) == 1 || L.stride(1) == 1 ? L : L.contiguous();
    at::Tensor out = at::empty({n, n}, Lc.options());  // row-major
    AT_DISPATCH_FLOATING_TYPES(dtype, "cholesky_update", [&] {
      cpu_cholesky_update<scalar_t>(Lc, X, out, std::min(nb, n));
    });
    return out;
  }
  at::Tensor Lp = L.tril().contiguous();
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
  check_factor_diagonal(L, op, "L");
  const int64_t n = L.size(0);
  TORCH_CHECK_VALUE(B.defined(), op, ": B is an undefined tensor");
  TORCH_CHECK_VALUE(
      (B.dim() == 1 || B.dim() == 2) && B.size(0) == n, op, ": B must have shape (", n,
      ",) or (", n, ", m) to match L, got ", B.sizes());
  check_floating(B, op, "B");
  check_device(L, B, op, "B");
  check_finite(B, op, "B");
  TORCH_CHECK_VALUE(refine_steps >= 0, op, ": refine_steps must be >= 0, got ", refine_steps);
  TORCH_CHECK_VALUE(
      !K.has_value() || A.has_value(), op,
      ": K (the low-rank part of the system matrix) needs A as well");
  if (A.has_value()) {
    check_square(*A, op, "A");
    check_factor_dtype(*A, op, "A");
    check_device(L, *A, op, "A");
    TORCH_CHECK_VALUE(
        A->size(0) == n, op, ": A must be (", n, ", ", n, ") to match L, got ", A->sizes());
    check_finite(*A, op, "A");
  }
  if (K.has_value()) {
    check_matrix(*K, op, "K");
    check_floating(*K, op, "K");
    check_device(L, *K, op, "K");
    TORCH_CHECK_VALUE(
        K->size(0) == n, op, ": K must have ", n, " rows to match L, got shape ", K->sizes());
    check_finite(*K, op, "K");
  }

  const bool vector = B.dim() == 1;
  const at::Tensor B2 = vector ? B.unsqueeze(1) : B;
  const auto dtype = L.scalar_type();
  const auto finish = [vector](const at::Tensor& X) { return vector ? X.squeeze(1) : X; };
  if (!A.has_value()) {
    if (B2.numel() == 0) {
      return {finish(B2.to(dtype, /*non_blocking=*/false, /*copy=*/true)), at::empty({0}, at::kDouble)};
    }
    at::Tensor X = factor_solve(B2.to(dtype), L);
    check_solution(X, L, op);
    return {finish(X), at::empty({0}, at::kDouble)};
  }
  if (B2.numel() == 0) {  // nothing to solve: exactly solved, in no steps
    return {
        finish(B2.to(at::kDouble, /*non_blocking=*/false, /*copy=*/true)),
        at::zeros({1}, at::kDouble)};
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
  // What counts as converged: the rate test gives up only where that is out of reach (the
  // steps may still go on towards `stop`).
  const double target = tol > 0 ? tol : backward_error_tol(n);
  at::Tensor X = factor_solve(B2.to(dtype), L);
  check_solution(X, L, op);
  X = X.to(at::kDouble);
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
    // Linear convergence at the rate seen so far cannot reach `target` in the steps left.
    if (step > 0) {
      const double rate = eta / history[history.size() - 2];
      if (eta * std::pow(rate, static_cast<double>(refine_steps - step)) > target) {
        break;
      }
    }
    D = factor_solve(R.to(dtype), L).to(at::kDouble);
    X.add_(D);
  }
  at::Tensor hist = at::empty({static_cast<int64_t>(history.size())}, at::kDouble);
  std::copy(history.begin(), history.end(), hist.data_ptr<double>());
  return {finish(X), hist};
}

}  // namespace memit_fast

"""The CUDA kernels of memit_fast._C against the float64 references (runs where a GPU is
present and the extension was built with nvcc; skips elsewhere)."""

from __future__ import annotations

import pytest
import torch
from test_linalg import rel, rhs, spd

from memit_fast import _ext
from memit_fast import linalg as la

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() and _ext.has_kernel("cholesky", "cuda")),
    reason="no CUDA device or no CUDA kernels in memit_fast._C",
)


@pytest.mark.parametrize(
    "precision, tol", [("fp64", 1e-14), ("fp32", 1e-6), ("tf32", 1e-3), ("bf16", 1e-2)]
)
@pytest.mark.parametrize("n", [7, 1000, 2500])
def test_factor_on_cuda(precision, tol, n):
    A = spd(n, 1e3).cuda()
    L, info = la.cholesky(A, precision, use_ext=True)
    assert int(info) == 0 and L.is_cuda
    assert rel(L.double() @ L.double().T, A) <= tol


@pytest.mark.parametrize("k", [1, 100, 1200])
def test_update_on_cuda(k):
    A, K = spd(1000, 1e6).cuda(), rhs(1000, k, scale=0.1).cuda()
    L = la.cholesky_update(torch.linalg.cholesky(A), K, use_ext=True)
    assert rel(L, torch.linalg.cholesky(A + K @ K.T)) <= 1e-6
    L32 = la.cholesky_update(torch.linalg.cholesky(A).float(), K, use_ext=True)
    assert rel(L32.double() @ L32.double().T, A + K @ K.T) <= 1e-6


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_update_auto_on_cuda_takes_product_only_where_accurate(dtype):
    """On CUDA ``auto`` is the ``product`` update where its probe finds it accurate (small
    keys: the very same tensor), and the Householder one where it is not, which still equals
    the refactorization. Keys 1e8 times the statistics' scale make the product's backward
    error ~1e19 here on the CPU (1e5 times left it at 4e-15 at this size, which the first
    H200 run of this test chose the product for)."""
    n = 1000
    A = spd(n, 1e8, seed=5).cuda()
    L = torch.linalg.cholesky(A).to(dtype)
    small, large = rhs(n, 20, scale=0.1).cuda(), rhs(n, 20, scale=1e8).cuda()
    auto = la.cholesky_update(L, small, use_ext=True)
    assert torch.equal(auto, la.cholesky_update(L, small, method="product", use_ext=True))
    auto = la.cholesky_update(L, large, use_ext=True)
    assert torch.equal(auto, la.cholesky_update(L, large, method="qr", use_ext=True))
    M = A + large @ large.T
    assert rel(auto.double() @ auto.double().T, M) <= (1e-13 if dtype == torch.float64 else 1e-6)


def test_update_auto_on_cuda_reads_only_the_lower_triangle():
    """``auto``'s product update and its accuracy probe read only L's lower triangle: with
    garbage and a NaN above the diagonal, small keys still take the product update (a NaN
    read by the probe would fail it and send them to the Householder one) and give the very
    factor a clean L of the same layout gives, lower-triangular. n = 2500 spans ten of the
    update's 256-wide blocks and three of the probe's 1024-row blocks, each with a partial
    last block."""
    n = 2500
    A = spd(n, 1e6, seed=11).cuda()
    L = torch.linalg.cholesky(A)
    K = rhs(n, 30, seed=12, scale=0.1).cuda()
    dirty = L + torch.triu(rhs(n, n, seed=13).cuda(), 1)
    dirty[0, n - 1] = float("nan")
    assert dirty.stride() == L.stride()
    clean = la.cholesky_update(L, K, method="product", use_ext=True)
    got = la.cholesky_update(dirty, K, use_ext=True)
    assert torch.equal(got, clean) and torch.equal(got, got.tril())
    assert rel(got @ got.T, A + K @ K.T) <= n * 2.0**-53


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("where", [(1, 0), (2000, 1500), (2499, 2498)])
def test_update_auto_on_cuda_names_a_non_finite_factor(bad, where):
    """``auto`` on CUDA refuses a NaN or Inf anywhere below L's diagonal with the error
    naming L, for either dtype of L and wherever the entry lies among the update's and the
    probe's blocks (the factor's check up front reads L's whole lower triangle)."""
    n = 2500
    L = torch.linalg.cholesky(spd(n, 1e3, seed=14).cuda())
    L[where] = bad
    K = rhs(n, 8, seed=15, scale=0.1).cuda()
    for factor in (L, L.float()):
        with pytest.raises(ValueError, match="L contains NaN or Inf on or below its diagonal"):
            la.cholesky_update(factor, K, use_ext=True)


def test_triangular_solves_on_cuda_either_way(monkeypatch):
    """cuBLAS's trsm (``MEMIT_FAST_TRSM=library``) and the blocked solves (the CUDA
    default) both give float64-accurate solves, refined float32 solves and product updates
    on CUDA, and they are different code (the unrefined float32 solves differ); n = 1000
    leaves a partial last block of 256."""
    A, B = spd(1000, 1e6, seed=16).cuda(), rhs(1000, 64, seed=17).cuda()
    ref = torch.linalg.solve(A, B)
    L = torch.linalg.cholesky(A)
    K = rhs(1000, 20, seed=18, scale=0.1).cuda()
    plain = {}
    for mode in ("library", "blocked", ""):  # "": the default, blocked on CUDA
        monkeypatch.setenv("MEMIT_FAST_TRSM", mode)
        X, _ = la.cholesky_solve(L, B, use_ext=True)
        assert rel(X, ref) <= 1e-8, mode  # cond 1e6: a float64 solve's forward error
        X32, history = la.cholesky_solve(L.float(), B, A, use_ext=True)
        assert la.converged(history, 1000), (mode, history)
        assert rel(X32, ref) <= 1e-10, mode
        U = la.cholesky_update(L, K, method="product", use_ext=True)
        assert rel(U @ U.T, A + K @ K.T) <= 1000 * 2.0**-53, mode
        plain[mode] = la.cholesky_solve(L.float(), B.float(), use_ext=True)[0]
    assert not torch.equal(plain["library"], plain["blocked"])
    assert torch.equal(plain[""], plain["blocked"])


@pytest.mark.parametrize("precision", ["bf16", "tf32", "fp32", "fp64"])
def test_refined_solve_on_cuda(precision):
    A, B = spd(1000, 1e2).cuda(), rhs(1000, 50).cuda()
    L, _ = la.cholesky(A, precision, use_ext=True)
    X, history = la.cholesky_solve(L, B, A, use_ext=True)
    assert la.converged(history, 1000), history
    assert rel(X, torch.linalg.solve(A, B)) <= 1e-10


def test_layer_solver_on_cuda():
    C, K = spd(1000, 1e5, seed=2).cuda(), rhs(1000, 64, scale=0.05).cuda()
    solver = la.LayerSolver(C, 2.0, use_ext=True)
    assert rel(solver.solve(K), la.torch_memit_solve(C, K, 2.0)) <= 1e-10
    solver.commit(K[:, :10])
    Kd = K[:, 10:]
    A = 2.0 * C + K[:, :10] @ K[:, :10].T + Kd @ Kd.T
    assert rel(solver.solve(Kd), torch.linalg.solve(A, Kd)) <= 1e-10

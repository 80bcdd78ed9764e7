"""memit_fast.linalg: factor, update and refined solve, through the C++ extension and
through the torch references (both paths run the same checks), and LayerSolver against
the float64 reference solve.

Test matrices: SPD with a controlled condition number (1e2 … 1e8) at awkward sizes, and
the key statistics of a tiny GPT-2 run over WikiText-2.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from memit_fast import _ext
from memit_fast import linalg as la
from memit_fast.stats import default_corpus_path

HAS_EXT = _ext.has_kernel("cholesky", "cpu")
PATHS = [
    pytest.param(False, id="reference"),
    pytest.param(
        True, id="ext", marks=pytest.mark.skipif(not HAS_EXT, reason="memit_fast._C not built")
    ),
]
SIZES = [1, 7, 257, 1000]
CONDS = [1e2, 1e4, 1e6, 1e8]
# The packaged copy of WikiText-2's validation text (the same bytes as shared/data's; it
# travels with the package, so the tests also run where shared/ is absent).
WIKITEXT_VALID = str(default_corpus_path())


@functools.cache
def spd(n: int, cond: float, seed: int = 0) -> torch.Tensor:
    """``(n, n)`` float64 SPD, eigenvalues log-spaced from 1 down to ``1 / cond``."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    ev = torch.logspace(0, -np.log10(cond), n, dtype=torch.float64)
    A = (Q * ev) @ Q.T
    return (A + A.T) / 2


def rhs(n: int, m: int, seed: int = 1, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(n, m, generator=g, dtype=torch.float64)


@functools.cache
def tiny_model_stats(dk: int = 256, n_keys: int = 48) -> tuple[torch.Tensor, torch.Tensor]:
    """Key statistics ``C (dk, dk)`` fp32 and keys ``K (dk, n_keys)`` of block 1 of a tiny
    GPT-2 (byte tokens, random weights) over WikiText-2: real activations of real text."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(
        vocab_size=256, n_positions=128, n_embd=64, n_inner=dk, n_layer=2, n_head=4,
        bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    model = GPT2LMHeadModel(cfg).eval()
    path = WIKITEXT_VALID
    with open(path, "rb") as f:
        data = torch.tensor(list(f.read(48 * 1024)), dtype=torch.long)
    ids = data[: (data.numel() // 128) * 128].view(-1, 128)
    seen: list[torch.Tensor] = []
    hook = model.transformer.h[1].mlp.c_proj.register_forward_pre_hook(
        lambda mod, inp: seen.append(inp[0].reshape(-1, dk))
    )
    with torch.no_grad():
        model(ids)
    hook.remove()
    keys = torch.cat(seen)
    C = (keys.T @ keys) / keys.shape[0]
    return C, keys[:: keys.shape[0] // n_keys][:n_keys].T.contiguous()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def longdouble_solve(A: torch.Tensor, B: torch.Tensor) -> np.ndarray:
    """``A^-1 B`` refined with 80-bit residuals: the truth a float64 solve is judged by."""
    L = torch.linalg.cholesky(A)
    Al, Bl = A.numpy().astype(np.longdouble), B.numpy().astype(np.longdouble)
    X = torch.cholesky_solve(B, L).numpy().astype(np.longdouble)
    for _ in range(4):
        R = (Bl - Al @ X).astype(np.float64)
        X = X + torch.cholesky_solve(torch.from_numpy(R), L).numpy().astype(np.longdouble)
    return X


def err_vs(X: torch.Tensor, truth: np.ndarray) -> float:
    return float(np.linalg.norm(X.numpy().astype(np.longdouble) - truth) / np.linalg.norm(truth))


# ----------------------------------------------------------------------------- factor


@pytest.mark.parametrize("use_ext", PATHS)
@pytest.mark.parametrize("cond", CONDS)
@pytest.mark.parametrize("n", SIZES)
def test_factor_fp32_backward_error(use_ext, n, cond):
    """Beyond cond ~ 1 / eps32 an fp32 factor may not exist; then it says so (and the
    solvers move to fp64)."""
    A = spd(n, cond)
    L, info = la.cholesky(A, "fp32", check_errors=False, use_ext=use_ext)
    if int(info) > 0:
        assert cond > 1e7, f"fp32 pivot failed at cond {cond:g}"
        with pytest.raises(la.IllConditionedError, match=f"column {int(info) - 1} of {n}"):
            la.cholesky(A, "fp32", use_ext=use_ext)
        L, info = la.cholesky(A, "fp64", use_ext=use_ext)
    assert torch.equal(L, L.tril())
    assert rel(L.double() @ L.double().T, A) <= 1e-6


@pytest.mark.parametrize("use_ext", PATHS)
def test_factor_fp64_matches_torch(use_ext):
    A = spd(257, 1e6)
    L, _ = la.cholesky(A, "fp64", use_ext=use_ext)
    assert L.dtype == torch.float64
    assert rel(L, torch.linalg.cholesky(A)) <= 1e-9


@pytest.mark.parametrize("use_ext", PATHS)
def test_factor_tiny_model_stats(use_ext):
    C, _ = tiny_model_stats()
    A = 1e3 * C
    L, _ = la.cholesky(A, "fp32", use_ext=use_ext)
    assert rel(L.double() @ L.double().T, A.double()) <= 1e-6


# ----------------------------------------------------------------------------- update


# The reference refactors; the extension updates, by Householder panels, (``chol``) by
# refactoring each diagonal block and carrying the remainder below it, or (``product``) as
# L times the factor of I + W W^T.
UPDATE_PATHS = [
    pytest.param(False, "auto", id="reference"),
    *[
        pytest.param(
            True,
            method,
            id=f"ext-{method}",
            marks=pytest.mark.skipif(not HAS_EXT, reason="memit_fast._C not built"),
        )
        for method in ("auto", "chol", "product")
    ],
]


@pytest.mark.parametrize("use_ext,method", UPDATE_PATHS)
@pytest.mark.parametrize("k", [1, 13, 300])
@pytest.mark.parametrize("cond", [1e2, 1e8])
@pytest.mark.parametrize("n", SIZES)
def test_update_equals_refactor(use_ext, method, n, cond, k):
    A = spd(n, cond)
    K = rhs(n, k, scale=0.1)
    M = A + K @ K.T
    L0 = torch.linalg.cholesky(A)
    L64 = la.cholesky_update(L0, K, method=method, use_ext=use_ext)
    assert L64.dtype == torch.float64 and torch.equal(L64, L64.tril())
    assert rel(L64, torch.linalg.cholesky(M)) <= 1e-6
    L32 = la.cholesky_update(L0.float(), K, method=method, use_ext=use_ext)
    assert L32.dtype == torch.float32
    assert rel(L32.double() @ L32.double().T, M) <= 1e-6


@pytest.mark.skipif(not HAS_EXT, reason="memit_fast._C not built")
@pytest.mark.parametrize("block_size", [1, 5, 64])
@pytest.mark.parametrize("method", ["qr", "chol", "product"])
def test_update_methods_at_every_block_width(method, block_size):
    """Both update algorithms (the generic Householder one, which the CPU otherwise takes
    only for k > 128, and the Cholesky one) at block widths that do and do not divide n, and
    with more keys than the block is wide."""
    n, k = 37, 9
    A, K = spd(n, 1e6, seed=3), rhs(n, k, scale=0.3)
    L = la.cholesky_update(
        torch.linalg.cholesky(A), K, block_size=block_size, method=method, use_ext=True
    )
    assert rel(L, torch.linalg.cholesky(A + K @ K.T)) <= 1e-10


@pytest.mark.skipif(not HAS_EXT, reason="memit_fast._C not built")
def test_product_update_error_grows_with_the_keys():
    """Why ``auto`` checks ``product`` before keeping it (on the GPU): its backward error
    grows with ||K K^T|| / ||L L^T|| (here ~1e10 of ||A|| = 1 gives nonsense), the
    Householder update's does not. Keys the size of the statistics' (as in MEMIT) leave it
    within a float64 factorization's bound, n 2^-53."""
    n = 257
    A = spd(n, 1e8, seed=5)
    L = torch.linalg.cholesky(A)

    def backward(K, method):
        Lu = la.cholesky_update(L, K, method=method, use_ext=True)
        return rel(Lu @ Lu.T, A + K @ K.T)

    small, large = rhs(n, 20, scale=0.1), rhs(n, 20, scale=1e5)
    assert backward(small, "product") <= n * 2.0**-53
    assert backward(large, "qr") <= 1e-14
    assert not backward(large, "product") <= 1e-6  # (NaN counts as failing too)


@pytest.mark.skipif(not HAS_EXT, reason="memit_fast._C not built")
@pytest.mark.parametrize("method", ["qr", "chol", "product"])
def test_update_ignores_the_strict_upper_triangle(method):
    """Only L's lower triangle is read: garbage (or NaN) above the diagonal gives the very
    update a clean factor of the same memory layout gives (both read in place; n spans two
    of the product update's 128-wide blocks and a partial third)."""
    n = 300
    L = torch.linalg.cholesky(spd(n, 1e4, seed=7))
    K = rhs(n, 6, seed=8, scale=0.1)
    dirty = L + torch.triu(rhs(n, n, seed=9), 1)
    dirty[0, n - 1] = float("nan")
    clean = la.cholesky_update(L, K, method=method, use_ext=True)
    got = la.cholesky_update(dirty, K, method=method, use_ext=True)
    assert dirty.stride() == L.stride() and torch.equal(got, clean)
    assert torch.equal(clean, clean.tril()) and torch.equal(got, got.tril())


@pytest.mark.skipif(not HAS_EXT, reason="memit_fast._C not built")
def test_update_unknown_method_is_named():
    L = torch.eye(3, dtype=torch.float64)
    with pytest.raises(ValueError, match="method must be one of"):
        la.cholesky_update(L, torch.ones(3, 1), method="givens", use_ext=True)
    with pytest.raises(ValueError, match="unknown method 'givens'"):
        torch.ops.memit_fast.cholesky_update(L, torch.ones(3, 1), 0, "givens")


@pytest.mark.parametrize("use_ext", PATHS)
def test_update_tiny_model_stats_sequential(use_ext):
    """Three batches of real keys folded in one after another equal one refactorization."""
    C, K = tiny_model_stats()
    A = 1e3 * C.double()
    L = torch.linalg.cholesky(A)
    for part in K.double().chunk(3, dim=1):
        L = la.cholesky_update(L, part, use_ext=use_ext)
    assert rel(L, torch.linalg.cholesky(A + K.double() @ K.double().T)) <= 1e-6


@pytest.mark.parametrize("use_ext", PATHS)
def test_update_with_no_keys_is_identity(use_ext):
    L = torch.linalg.cholesky(spd(7, 1e2))
    assert torch.equal(la.cholesky_update(L, torch.zeros(7, 0), use_ext=use_ext), L)


# ----------------------------------------------------------------------------- solve


def _forward_error(X: torch.Tensor, ref: torch.Tensor) -> float:
    return float((X - ref).norm() / ref.norm())


@pytest.mark.skipif(not HAS_EXT, reason="memit_fast._C not built")
@pytest.mark.parametrize("cond", [1e2, 1e5, 1e8])
@pytest.mark.parametrize("n, m", [(257, 1), (513, 5), (1000, 64)])
def test_blocked_triangular_solves_match_the_library(monkeypatch, n, m, cond):
    """``MEMIT_FAST_TRSM=blocked`` (the default on CUDA): the extension's triangular solves
    as GEMMs with inverted diagonal blocks (256 wide; these sizes leave a partial last block),
    against ``MEMIT_FAST_TRSM=library`` (LAPACK's or cuBLAS's solves). Against torch's
    float64 solve they are as accurate as the library's trsm (forward error within 4x of
    it), the refined float32 solve still reaches float64 accuracy, the product update
    built on them equals the one built on trsm, and a column-major factor (potrf's layout)
    is read as well as a row-major one."""
    A, B = spd(n, cond, seed=3), rhs(n, m, seed=4)
    ref = torch.linalg.solve(A, B)
    L = torch.linalg.cholesky(A)
    K = rhs(n, 20, seed=5, scale=0.1)
    out = {}
    for mode in ("library", "blocked"):
        monkeypatch.setenv("MEMIT_FAST_TRSM", mode)
        X = la.cholesky_solve(L, B, use_ext=True)[0]
        Xc = la.cholesky_solve(L.T.contiguous().T, B, use_ext=True)[0]
        X32, history = la.cholesky_solve(L.float(), B, A, use_ext=True)
        U = la.cholesky_update(L, K, method="product", use_ext=True)
        out[mode] = (X, Xc, X32, history, U)
    X, Xc, X32, history, U = out["blocked"]
    library = _forward_error(out["library"][0], ref)
    assert _forward_error(X, ref) <= 4 * library + 1e-15
    assert torch.equal(X, Xc) or _forward_error(Xc, ref) <= 4 * library + 1e-15
    assert not torch.equal(X32, out["library"][2])  # the blocked path did run
    if cond * 2.0**-24 < 1e-2:  # refinement from a float32 factor converges (cond u << 1)
        assert la.converged(history, n), history
        assert _forward_error(X32, ref) <= 1e-10
    assert rel(U, out["library"][4]) <= 1e-12
    assert rel(U @ U.T, A + K @ K.T) <= n * 2.0**-53


@pytest.mark.skipif(not HAS_EXT, reason="memit_fast._C not built")
def test_an_unknown_trsm_choice_is_named(monkeypatch):
    """``MEMIT_FAST_TRSM`` other than ``blocked`` or ``library`` is an error naming the
    variable and the value, not a silent fallback to the default."""
    A = spd(300, 1e2)
    L = torch.linalg.cholesky(A)
    monkeypatch.setenv("MEMIT_FAST_TRSM", "Library")
    with pytest.raises(
        ValueError, match="MEMIT_FAST_TRSM must be 'blocked' or 'library'.*'Library'"
    ):
        la.cholesky_solve(L, rhs(300, 2), use_ext=True)
    monkeypatch.setenv("MEMIT_FAST_TRSM", "")  # empty: the default
    X, _ = la.cholesky_solve(L, rhs(300, 2), use_ext=True)
    assert rel(X, torch.linalg.solve(A, rhs(300, 2))) <= 1e-12


@pytest.mark.parametrize("use_ext", PATHS)
@pytest.mark.parametrize("cond", [1e2, 1e4, 1e6])
@pytest.mark.parametrize("n", SIZES)
def test_refined_fp32_solve_matches_float64(use_ext, n, cond):
    A, B = spd(n, cond), rhs(n, 5)
    L, _ = la.cholesky(A, "fp32", use_ext=use_ext)
    X, history = la.cholesky_solve(L, B, A, use_ext=use_ext)
    assert X.dtype == torch.float64 and X.shape == B.shape
    assert la.converged(history, n), history
    assert rel(X, torch.linalg.solve(A, B)) <= 1e-10


@pytest.mark.parametrize("use_ext", PATHS)
@pytest.mark.parametrize("n", [257, 1000])
def test_cond_1e8_needs_fp64_and_then_matches_float64(use_ext, n):
    """At cond 1e8 refinement on an fp32 factor does not converge (and says so); on an
    fp64 factor it converges, as accurate as torch's float64 solve against an 80-bit
    truth (the two float64 solves themselves differ by ~1e-9 here)."""
    A, B = spd(n, 1e8), rhs(n, 5)
    L32, info = la.cholesky(A, "fp32", check_errors=False, use_ext=use_ext)
    if int(info) == 0:
        _, history = la.cholesky_solve(L32, B, A, use_ext=use_ext)
        assert not la.converged(history, n)
    L64, _ = la.cholesky(A, "fp64", use_ext=use_ext)
    X, history = la.cholesky_solve(L64, B, A, use_ext=use_ext)
    assert la.converged(history, n)
    truth = longdouble_solve(A, B)
    assert err_vs(X, truth) <= max(1e-10, 4 * err_vs(torch.linalg.solve(A, B), truth))


@pytest.mark.parametrize("use_ext", PATHS)
def test_solve_low_rank_term_and_shapes(use_ext):
    n = 257
    A, K, B = spd(n, 1e4), rhs(n, 9, seed=3, scale=0.1), rhs(n, 3)
    L = la.cholesky_update(la.cholesky(A, "fp32", use_ext=use_ext)[0], K, use_ext=use_ext)
    X, history = la.cholesky_solve(L, B, A, K, use_ext=use_ext)
    assert la.converged(history, n)
    assert rel(X, torch.linalg.solve(A + K @ K.T, B)) <= 1e-10
    x, _ = la.cholesky_solve(L, B[:, 0], A, K, use_ext=use_ext)  # a vector right-hand side
    assert x.shape == (n,) and rel(x, X[:, 0]) <= 1e-10
    Y, empty = la.cholesky_solve(L, B, use_ext=use_ext)  # no A: plain solves in L's dtype
    assert Y.dtype == torch.float32 and empty.numel() == 0
    assert rel(Y, X) <= 1e-4
    Z, history = la.cholesky_solve(L, torch.zeros(n, 2), A, K, use_ext=use_ext)
    assert torch.equal(Z, torch.zeros(n, 2, dtype=torch.float64))


# ----------------------------------------------------------------------------- bad input


ERRORS = (RuntimeError, ValueError)


@pytest.mark.parametrize("use_ext", PATHS)
def test_bad_input_names_the_problem(use_ext):
    A = spd(7, 1e2)
    L = torch.linalg.cholesky(A)
    with pytest.raises(ValueError, match="square"):
        la.cholesky(torch.ones(3, 4), use_ext=use_ext)
    with pytest.raises(ValueError, match="float32 or float64"):
        la.cholesky(torch.eye(3, dtype=torch.int64), use_ext=use_ext)
    with pytest.raises(ValueError, match="NaN or Inf"):
        la.cholesky(torch.full((3, 3), float("nan")), use_ext=use_ext)
    with pytest.raises(ValueError, match="unknown precision 'fp16'"):
        la.cholesky(A, "fp16", use_ext=use_ext)
    with pytest.raises(ValueError, match="7 rows"):
        la.cholesky_update(L, torch.ones(6, 2), use_ext=use_ext)
    with pytest.raises(ValueError, match="floating-point"):
        la.cholesky_update(L, torch.ones(7, 2, dtype=torch.int32), use_ext=use_ext)
    with pytest.raises(ValueError, match="NaN or Inf"):
        la.cholesky_solve(L, torch.full((7, 2), float("inf")), use_ext=use_ext)
    with pytest.raises(ValueError, match="7"):
        la.cholesky_solve(L, torch.ones(5, 2), use_ext=use_ext)
    with pytest.raises(ValueError, match="A contains NaN or Inf"):
        la.cholesky_solve(L, torch.ones(7, 2), torch.full((7, 7), float("nan")), use_ext=use_ext)
    with pytest.raises(ValueError, match="needs A"):
        la.cholesky_solve(L, torch.ones(7, 2), None, torch.ones(7, 1), use_ext=use_ext)
    with pytest.raises((*ERRORS, NotImplementedError), match="(?i)meta"):
        la.cholesky(torch.eye(3, device="meta"), use_ext=True if use_ext else None)


@pytest.mark.parametrize("use_ext", PATHS)
@pytest.mark.parametrize("method", la.UPDATE_METHODS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_update_and_solve_check_the_factor(use_ext, method, bad):
    """A non-finite entry on or below L's diagonal, or a zero pivot, is named as L's fault
    on both paths and by every method (not a non-finite factor, nor a misleading error)."""
    if not use_ext and method != "auto":
        pytest.skip("the reference has one method")
    L = torch.linalg.cholesky(spd(40, 1e3))
    Lb = L.clone()
    Lb[17, 3] = bad
    with pytest.raises(ValueError, match="L contains NaN or Inf on or below its diagonal"):
        la.cholesky_update(Lb, rhs(40, 3), method=method, use_ext=use_ext)
    with pytest.raises(ValueError, match="L contains NaN or Inf on or below its diagonal"):
        la.cholesky_solve(Lb, rhs(40, 2), use_ext=use_ext)
    L0 = L.clone()
    L0[5, 5] = 0.0
    with pytest.raises(ValueError, match="positive diagonal"):
        la.cholesky_solve(L0, rhs(40, 2), use_ext=use_ext)
    with pytest.raises(ValueError, match="positive diagonal"):
        la.cholesky_solve(L0, rhs(40, 2), spd(40, 1e3), use_ext=use_ext)


@pytest.mark.parametrize("use_ext", PATHS)
def test_a_solve_that_overflows_says_so(use_ext):
    """The solve checks its solution, not the whole factor: a finite factor whose solution
    overflows is reported as that, not as a bad factor."""
    L = torch.eye(4, dtype=torch.float64) * 1e-200
    with pytest.raises(ValueError, match="overflowed"):
        la.cholesky_solve(L, torch.full((4, 1), 1e200, dtype=torch.float64), use_ext=use_ext)


@pytest.mark.parametrize("use_ext", PATHS)
def test_factor_check_accepts_huge_finite_entries(use_ext):
    """Entries whose sum overflows float64 are still finite: the check must not refuse them
    (the extension sums the triangle first and rechecks a non-finite sum entry by entry)."""
    L = torch.eye(6, dtype=torch.float64) * 1e300
    L[3:, 0] = 1.7e308
    K = torch.zeros(6, 1, dtype=torch.float64)
    X, _ = la.cholesky_solve(L, torch.ones(6, 1, dtype=torch.float64), use_ext=use_ext)
    assert X.shape == (6, 1)
    Ln = la.cholesky_update(L, K, method="qr", use_ext=use_ext) if use_ext else None
    assert Ln is None or torch.equal(Ln.diagonal(), L.diagonal())


@pytest.mark.parametrize("use_ext", PATHS)
def test_update_refuses_keys_beyond_float32(use_ext):
    L = torch.linalg.cholesky(spd(30, 1e2)).float()
    with pytest.raises(ValueError, match="beyond float32's range"):
        la.cholesky_update(L, rhs(30, 2, scale=1e39), use_ext=use_ext)


@pytest.mark.parametrize("use_ext", PATHS)
def test_factor_requires_symmetry_on_both_paths(use_ext):
    A = spd(6, 1e2)
    with pytest.raises(ValueError, match="must be symmetric"):
        la.cholesky(A.tril(), "fp64", use_ext=use_ext)


@pytest.mark.parametrize("use_ext", PATHS)
def test_float32_factor_out_of_range_says_so(use_ext):
    """A float64 matrix whose diagonal does not fit float32 fails in fp32 with the reason."""
    for scale in (1e39, 1e-46):
        with pytest.raises(la.IllConditionedError, match="outside float32's range"):
            la.cholesky(scale * torch.eye(4, dtype=torch.float64), "fp32", use_ext=use_ext)
    assert int(la.cholesky(1e39 * torch.eye(4, dtype=torch.float64), "fp64")[1]) == 0


@pytest.mark.skipif(not HAS_EXT, reason="memit_fast._C not built")
@pytest.mark.parametrize("scale", [1e20, 1e-22])
def test_householder_update_at_extreme_scales(scale):
    """The float32 Householder update scales its norms: keys and factor of 1e20 or 1e-22
    (squares beyond float32's range) update as accurately as at scale 1."""
    A = spd(60, 1e2)
    K = rhs(60, 5)
    ref = torch.linalg.cholesky(A + K @ K.T)
    L = (scale * torch.linalg.cholesky(A)).float()
    Ln = la.cholesky_update(L, (scale * K).float(), method="qr", use_ext=True)
    assert torch.isfinite(Ln).all()
    assert rel(Ln.double() / scale, ref) <= 1e-5


@pytest.mark.parametrize("use_ext", PATHS)
def test_refinement_goes_on_while_convergence_is_in_reach(use_ext):
    """The rate test aims at what counts as converged (sqrt(n) 2^-53), not at 2^-53: a
    float32 factor at condition 1e7 converges slowly but within 10 steps."""
    n = 300
    A = spd(n, 1e7)
    L = torch.linalg.cholesky(A.float())
    B = rhs(n, 3)
    X, history = la.cholesky_solve(L, B, A, None, 10, use_ext=use_ext)
    assert la.converged(history, n), history.tolist()
    assert rel(X, torch.linalg.solve(A, B)) <= 1e-9


@pytest.mark.parametrize("use_ext", PATHS)
def test_empty_right_hand_sides(use_ext):
    A = spd(9, 1e2)
    L = torch.linalg.cholesky(A)
    X, history = la.cholesky_solve(L, torch.zeros(9, 0), use_ext=use_ext)
    assert X.shape == (9, 0) and history.numel() == 0
    X, history = la.cholesky_solve(L.float(), torch.zeros(9, 0), A, use_ext=use_ext)
    assert X.shape == (9, 0) and X.dtype == torch.float64 and la.converged(history, 9)
    U = la.memit_solve(A.float(), torch.zeros(9, 0), 10.0, precision="fp32", use_ext=use_ext)
    assert U.shape == (9, 0)


@pytest.mark.parametrize("use_ext", PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_not_spd_names_the_column(use_ext, dtype):
    A = torch.eye(5, dtype=dtype)
    A[3, 3] = -1.0
    with pytest.raises(la.IllConditionedError, match="column 3 of 5.*lambda"):
        la.cholesky(A, "fp32", use_ext=use_ext)
    _, info = la.cholesky(A, "fp64", check_errors=False, use_ext=use_ext)
    assert int(info) == 4


# ----------------------------------------------------------------------------- LayerSolver


@pytest.mark.parametrize("use_ext", PATHS)
@pytest.mark.parametrize("n", [3, 48])
def test_layer_solver_matches_reference_on_tiny_model_stats(use_ext, n):
    C, K = tiny_model_stats()
    lam = 1e3
    solver = la.LayerSolver(C, lam, precision="fp32", use_ext=use_ext)
    assert solver.precision == "fp32", solver.selection  # refinement converges at fp32
    assert la.LayerSolver(C, lam, use_ext=use_ext).precision == "fp64"  # auto, on the CPU
    U = solver.solve(K[:, :n])
    assert U.dtype == torch.float64 and U.shape == (C.shape[0], n)
    assert rel(U, la.torch_memit_solve(C, K[:, :n], lam)) <= 1e-10


@pytest.mark.parametrize("use_ext", PATHS)
@pytest.mark.parametrize("n", [4, 400])
def test_layer_solver_update_and_refactor_paths(use_ext, n):
    """Few keys take the update, many the refactorization; both match float64."""
    dk, lam = 257, 2.0
    C, K = spd(dk, 1e5, seed=4), rhs(dk, n, seed=5, scale=0.05)
    solver = la.LayerSolver(C, lam, precision="fp32", use_ext=use_ext)
    assert solver.prefers_update(n) == (n == 4)
    assert rel(solver.solve(K), la.torch_memit_solve(C, K, lam)) <= 1e-10


@pytest.mark.parametrize("use_ext", PATHS)
@pytest.mark.parametrize("precision", ["fp32", "fp64"])
@pytest.mark.parametrize("n", [4, 400, 0])
def test_layer_solver_any_right_hand_side(use_ext, precision, n):
    """``solve(K, B)``: the same system for another right-hand side (MEMIT's ``K R^T``: the
    update order), on the update and the refactor path and with no new keys, against
    float64; ``R (A + K K^T)^-1 K`` transposed equals it (the matrix is symmetric)."""
    dk, lam, dh = 257, 2.0, 9
    C, K = spd(dk, 1e5, seed=4), rhs(dk, n, seed=5, scale=0.05)
    R = rhs(dh, n, seed=6)
    solver = la.LayerSolver(C, lam, precision=precision, use_ext=use_ext)
    B = K @ R.T if n else rhs(dk, dh, seed=7)
    X = solver.solve(K, B)
    assert X.dtype == torch.float64 and X.shape == (dk, dh)
    M = lam * C + K @ K.T
    assert rel(X, torch.linalg.solve(M, B)) <= 1e-10
    if n:
        assert rel(X.T, R @ solver.solve(K).T) <= 1e-10
    with pytest.raises(ValueError, match="B must be"):
        solver.solve(K, B[:-1])


def test_add_outer_is_the_symmetric_sum():
    """``A + K K^T`` from the products on and below the diagonal, mirrored: equal to the
    full product to rounding, exactly symmetric, at panel widths that do and do not divide
    the size."""
    A, K = spd(37, 1e3, seed=8), rhs(37, 5, seed=9)
    for panel in (1, 8, 37, 64):
        M = la.add_outer(A, K, panel=panel)
        assert torch.equal(M, M.T)
        assert rel(M, A + K @ K.T) <= 1e-15
    assert torch.equal(la.add_outer(A, K[:, :0]), A)


@pytest.mark.parametrize("use_ext", PATHS)
def test_layer_solver_picks_fp64_when_fp32_refinement_fails(use_ext):
    C = spd(257, 1e8, seed=6)
    solver = la.LayerSolver(C, 1.0, precision="fp32", use_ext=use_ext)
    assert solver.precision == "fp64"
    assert "fp32" in solver.selection and solver.L.dtype == torch.float64
    K = rhs(257, 6, seed=7, scale=1e-3)
    truth = longdouble_solve(C + K @ K.T, K)
    U = solver.solve(K)
    ref = la.torch_memit_solve(C, K, 1.0)
    assert err_vs(U, truth) <= max(1e-10, 4 * err_vs(ref, truth))


@pytest.mark.parametrize("use_ext", PATHS)
def test_layer_solver_sequential_commit_and_state_dict(use_ext, tmp_path):
    C, K = tiny_model_stats()
    lam = 1e3
    K1, K2 = K[:, :20], K[:, 20:]
    solver = la.LayerSolver(C, lam, precision="fp32", use_ext=use_ext)
    solver.commit(K1)
    assert solver.n_committed == 20
    K1d, K2d = K1.double(), K2.double()
    A = lam * C.double() + K1d @ K1d.T + K2d @ K2d.T
    U = solver.solve(K2)
    assert rel(U, torch.linalg.solve(A, K2d)) <= 1e-10

    path = tmp_path / "layer.safetensors"
    save_file({k: v.contiguous() for k, v in solver.state_dict().items()}, str(path))
    again = la.LayerSolver.from_state_dict(load_file(str(path)), use_ext=use_ext)
    assert again.n_committed == 20 and again.precision == solver.precision
    assert torch.equal(again.solve(K2), U)

    # A solver made from another's state dict (no file between) shares nothing with it.
    A_before = solver.A.clone()
    twin = la.LayerSolver.from_state_dict(solver.state_dict(), use_ext=use_ext)
    twin.commit(K2[:, :3])
    assert torch.equal(solver.A, A_before)
    assert rel(solver.solve(K2), U) == 0.0


@pytest.mark.parametrize("use_ext", PATHS)
def test_layer_solver_fp64_update_and_refactor_paths(use_ext):
    """fp64 (auto on the CPU): updated and refactored factors are solved without
    refinement and still match float64, also after commits."""
    C, K = tiny_model_stats()
    lam = 1e3
    solver = la.LayerSolver(C, lam, precision="fp64", use_ext=use_ext)
    for Kn in (K[:, :5], torch.cat([K, K], dim=1)):
        assert solver.prefers_update(Kn.shape[1]) == (Kn.shape[1] == 5)
        assert rel(solver.solve(Kn), la.torch_memit_solve(C, Kn, lam)) <= 1e-10
    solver.commit(K[:, :30])
    Kd = K.double()
    A = lam * C.double() + Kd[:, :30] @ Kd[:, :30].T + Kd[:, 30:] @ Kd[:, 30:].T
    assert rel(solver.solve(K[:, 30:]), torch.linalg.solve(A, Kd[:, 30:])) <= 1e-10


@pytest.mark.parametrize("use_ext", PATHS)
@pytest.mark.parametrize("precision", ["fp64", "fp32"])
@pytest.mark.parametrize("fail", [False, True], ids=["refactor", "refactor-fails"])
def test_layer_solver_commits_many_keys_by_refactoring(use_ext, precision, fail, monkeypatch):
    """A commit of more keys than ``prefers_update`` takes refactors ``A + K K^T`` at the
    solver's precision; where that factorization fails it updates instead. Both leave the
    committed system exact and its solves at float64 accuracy."""
    C, K = tiny_model_stats()
    lam = 1e3
    K = torch.cat([K, 0.5 * K.flip(1), 0.25 * K], dim=1).double()  # 144 keys
    many, new = K[:, :120], K[:, 120:]
    A = lam * C.double() + many @ many.T
    solver = la.LayerSolver(C, lam, precision=precision, use_ext=use_ext)
    assert not solver.prefers_update(many.shape[1])
    calls = []
    real_cholesky, real_update = la.cholesky, la.cholesky_update

    def spy_cholesky(M, p, **kw):
        calls.append(("factor", p))
        L, info = real_cholesky(M, p, **kw)
        return (L, torch.ones_like(info)) if fail else (L, info)

    def spy_update(L, K_, **kw):
        calls.append(("update", K_.shape[1]))
        return real_update(L, K_, **kw)

    monkeypatch.setattr(la, "cholesky", spy_cholesky)
    monkeypatch.setattr(la, "cholesky_update", spy_update)
    solver.commit(many)
    monkeypatch.undo()
    assert calls == [("factor", solver.precision)] + ([("update", 120)] if fail else [])
    assert solver.n_committed == 120 and rel(solver.A, A) <= 1e-15
    M = A + new @ new.T
    assert rel(solver.solve(new), torch.linalg.solve(M, new)) <= 1e-10


def test_layer_solver_singular_stats_raise_with_the_fix():
    X = rhs(64, 10, seed=8)  # ten tokens for 64 dimensions: C has rank 10
    with pytest.raises(la.IllConditionedError, match="layer 5.*larger lambda.*statistics"):
        la.LayerSolver(X @ X.T / 10, 1e4, name="layer 5")
    with pytest.raises(ValueError, match="lambda must be finite and > 0"):
        la.LayerSolver(spd(7, 1e2), 0.0)
    with pytest.raises(ValueError, match="statistics C contain NaN"):
        la.LayerSolver(torch.full((7, 7), float("nan")), 1.0)


@pytest.mark.parametrize("use_ext", PATHS)
def test_memit_solve_matches_reference(use_ext):
    C, K = tiny_model_stats()
    U = la.memit_solve(C, K, 1e3, precision="fp32", use_ext=use_ext)
    assert rel(U, la.torch_memit_solve(C, K, 1e3)) <= 1e-10
    U64 = la.memit_solve(C, K, 1e3, precision="fp64", use_ext=use_ext)
    assert rel(U64, la.torch_memit_solve(C, K, 1e3)) <= 1e-12


@pytest.mark.parametrize("use_ext", PATHS)
def test_auto_refactors_in_fp64_where_refinement_would_cost_more(use_ext, monkeypatch):
    """``auto`` chose fp32 (refinement converges on the probe): a refactorization for few
    right-hand sides uses it, one for many (where the float64 residuals of the refinement
    cost more than a float64 factor) factors in fp64 instead; both at float64 accuracy. An
    explicitly asked precision is kept."""
    monkeypatch.setattr(la, "candidate_precisions", lambda device: ("fp32", "fp64"))
    dk, lam = 257, 2.0
    C = spd(dk, 1e3, seed=4)
    auto = la.LayerSolver(C, lam, use_ext=use_ext)
    fixed = la.LayerSolver(C, lam, precision="fp32", use_ext=use_ext)
    assert auto.precision == fixed.precision == "fp32"
    factored = []
    real = la.cholesky

    def spy(A, precision, **kw):
        factored.append(precision)
        return real(A, precision, **kw)

    monkeypatch.setattr(la, "cholesky", spy)
    monkeypatch.setattr(la.LayerSolver, "prefers_update", lambda self, n: False)
    K = rhs(dk, 300, seed=5, scale=0.05)
    M = lam * C + K @ K.T
    for solver, m, want in [(auto, 2, "fp32"), (auto, 200, "fp64"), (fixed, 200, "fp32")]:
        factored.clear()
        B = rhs(dk, m, seed=6)
        assert rel(solver.solve(K, B), torch.linalg.solve(M, B)) <= 1e-10
        assert factored == [want], (m, factored)


@pytest.mark.parametrize(
    "capability,expected",
    [
        ((9, 0), ("bf16", "tf32", "fp64")),  # H100/H200: fp64 at the fp32 rate
        ((8, 0), ("bf16", "tf32", "fp64")),  # A100
        ((8, 9), ("bf16", "tf32", "fp32", "fp64")),  # fp64 at a fraction of fp32
        ((12, 0), ("bf16", "tf32", "fp32", "fp64")),
    ],
)
def test_candidate_precisions_by_device(capability, expected, monkeypatch):
    """``auto``'s ladder: the CPU factors in fp64 only; a GPU tries the tensor-core formats
    first, and fp32 only where float64 is slower than float32."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert la.candidate_precisions("cuda:0") == expected
    assert la.candidate_precisions("cpu") == ("fp64",)


@pytest.mark.parametrize("use_ext", PATHS)
@pytest.mark.parametrize(
    "cond,m,chosen",
    [
        (1e2, 12, "fp32"),  # converges on the probe, and refining 12 columns pays
        (1e2, 200, "fp64"),  # converges, but refining 200 columns costs more than fp64
        (1e7, 12, "fp64"),  # does not converge
    ],
)
def test_auto_solve_tries_candidates_on_a_probe_first(use_ext, cond, m, chosen, monkeypatch):
    """``auto`` with a wide right-hand side: each candidate precision is refined on a few
    probe columns; only the chosen one solves all the columns, to float64 accuracy. A
    precision whose refinement of every column would cost more than a float64 factor is
    passed over (``refinement_pays``)."""
    n = 600
    C, K = spd(n, cond), rhs(n, m, scale=1e-3)
    monkeypatch.setattr(la, "candidate_precisions", lambda device: ("fp32", "fp64"))
    widths = []
    real = la.cholesky_solve

    def spy(L, B, *a, **kw):
        widths.append((str(L.dtype), B.shape[-1]))
        return real(L, B, *a, **kw)

    monkeypatch.setattr(la, "cholesky_solve", spy)
    U = la.memit_solve(C, K, 1.0, use_ext=use_ext)
    # float64 accuracy: float64 LU's own error grows with the condition number.
    assert rel(U, la.torch_memit_solve(C, K, 1.0)) <= max(1e-10, 1e-15 * cond)
    wide = [dt for dt, w in widths if w == m]
    assert wide == ["torch.float32" if chosen == "fp32" else "torch.float64"], widths
    assert ("torch.float32", la.PROBE_COLUMNS) in widths


@functools.cache
def world_model_stats() -> tuple[torch.Tensor, torch.Tensor]:
    """Key statistics of block 1 of the committed tiny trained GPT-2 (memit_fast.testing's
    world model, dk = 512) over WikiText-2: condition number ~3e4."""
    from memit_fast.testing import load_world

    model, tok, _ = load_world()
    with open(WIKITEXT_VALID) as f:
        ids = tok(f.read(100_000), return_tensors="pt").input_ids[0]
    T = model.config.n_positions
    ids = ids[: (ids.numel() // T) * T].view(-1, T)[:48]
    seen: list[torch.Tensor] = []
    hook = model.transformer.h[1].mlp.c_proj.register_forward_pre_hook(
        lambda mod, inp: seen.append(inp[0].reshape(-1, inp[0].shape[-1]))
    )
    with torch.no_grad():
        model(ids)
    hook.remove()
    keys = torch.cat(seen)
    return (keys.T @ keys) / keys.shape[0], keys[::97][:64].T.contiguous()


@pytest.mark.parametrize("use_ext", PATHS)
def test_layer_solver_on_trained_tiny_model_stats(use_ext):
    try:
        C, K = world_model_stats()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    lam = 1e3
    L, _ = la.cholesky(lam * C, "fp32", use_ext=use_ext)
    assert rel(L.double() @ L.double().T, lam * C.double()) <= 1e-6
    solver = la.LayerSolver(C, lam, precision="fp32", use_ext=use_ext)
    for part in (K[:, :8], K[:, 8:]):
        assert rel(solver.solve(part), la.torch_memit_solve(C, part, lam)) <= 1e-10
    solver.commit(K[:, :8])
    Kd = K.double()
    A = lam * C.double() + Kd[:, :8] @ Kd[:, :8].T + Kd[:, 8:] @ Kd[:, 8:].T
    assert rel(solver.solve(K[:, 8:]), torch.linalg.solve(A, Kd[:, 8:])) <= 1e-10

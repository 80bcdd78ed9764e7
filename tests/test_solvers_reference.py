"""The solves of ``memit_fast.solvers`` (EMMET, AlphaEdit, ROME) on small random problems,
each against a float64 reference written here from the papers' formulas with plain
``torch.linalg`` (nothing of memit_fast), and against what each method promises of the
edited weight: EMMET writes the batch's keys exactly, AlphaEdit leaves the preserved keys'
outputs alone, ROME's last request reads its target."""

import pytest
import torch

from memit_fast import linalg, solvers

F64 = torch.float64
LAM = 3.0


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def gen(seed):
    return torch.Generator().manual_seed(seed)


def spd(dk, cond, seed):
    """SPD ``(dk, dk)`` float64 with eigenvalues log-spaced from 1 down to ``1 / cond``."""
    Q, _ = torch.linalg.qr(torch.randn(dk, dk, generator=gen(seed), dtype=F64))
    e = torch.logspace(0, -torch.log10(torch.tensor(float(cond))).item(), dk, dtype=F64)
    return (Q * e) @ Q.T


def randn(*shape, seed):
    return torch.randn(*shape, generator=gen(seed), dtype=F64)


# ----------------------------------------------------------------------------- references


def ref_emmet(R, K, C, lam, ridge, K_old=None):
    """Gupta et al. 2024: ``dW = R (K^T A^-1 K + rho I)^-1 K^T A^-1``, ``A = lam C (+ K_old
    K_old^T)``, with the relative ridge ``rho = ridge * trace(K^T A^-1 K) / n``."""
    A = lam * C.double()
    if K_old is not None:
        A = A + K_old.double() @ K_old.double().T
    K = K.double()
    AiK = torch.linalg.solve(A, K)
    D = K.T @ AiK
    n = D.shape[0]
    D = D + ridge * torch.trace(D) / n * torch.eye(n, dtype=F64)
    return torch.linalg.solve(D, R.double().T).T @ AiK.T


def ref_alphaedit(R, K, C, threshold, alpha, K_old=None):
    """Fang et al. 2025: ``P = U0 U0^T`` from the SVD of ``C`` (singular values below the
    threshold), ``dW = R K^T P (K_p K_p^T P + K K^T P + alpha I)^-1``. Returns ``(dW, U1)``
    with ``U1`` the preserved directions (singular values at or above the threshold)."""
    U, S, _ = torch.linalg.svd(C.double())
    U0 = U[:, S < threshold]
    P = U0 @ U0.T
    K = K.double()
    M = K @ K.T
    if K_old is not None:
        M = M + K_old.double() @ K_old.double().T
    dk = C.shape[0]
    X = M @ P + alpha * torch.eye(dk, dtype=F64)
    # dW X = R K^T P  <=>  X^T dW^T = P K R^T
    return torch.linalg.solve(X.T, P @ K @ R.double().T).T, U[:, S >= threshold]


def ref_rome(W, V, K, K_bare, C):
    """Meng et al. 2022, one request after the other on an explicit weight: ``u = C^-1 k``,
    ``W += (v* - W k*) u^T / (u^T k*)``. Returns the total change and, per request, the
    relative error of ``W k*_i`` against ``v*_i`` right after its own write."""
    W0 = W.double()
    Wc = W0.clone()
    own = []
    for i in range(K.shape[1]):
        k, ks, v = K[:, i].double(), K_bare[:, i].double(), V[:, i].double()
        u = torch.linalg.solve(C.double(), k)
        Wc = Wc + torch.outer(v - Wc @ ks, u) / (u @ ks)
        own.append(rel(Wc @ ks, v))
    return Wc - W0, own


def spectrum_stats(dk, m, seed, big=(0.0, -1.0), small=(-3.0, -10.0)):
    """SPD ``C`` with ``dk - m`` eigenvalues log-spaced over ``10**big`` and ``m`` over
    ``10**small``; returns ``C`` and its eigenvectors (columns, in that order)."""
    Q, _ = torch.linalg.qr(torch.randn(dk, dk, generator=gen(seed), dtype=F64))
    e = torch.cat(
        [
            torch.logspace(big[0], big[1], dk - m, dtype=F64),
            torch.logspace(small[0], small[1], m, dtype=F64),
        ]
    )
    return (Q * e) @ Q.T, Q


# ----------------------------------------------------------------------------- EMMET


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "dk,n,cond",
    [(8, 1, 1e2), (1, 1, 1.0), (16, 5, 1e2), (16, 16, 1e2), (32, 6, 1e8)],
)
@pytest.mark.parametrize("ridge", [0.0, 1e-6, 1e-2])
def test_emmet_matches_reference(dk, n, cond, dtype, ridge):
    C = spd(dk, cond, seed=dk + n).to(dtype)
    K = randn(dk, n, seed=1).to(dtype)
    R = randn(5, n, seed=2)
    s = linalg.LayerSolver(C, LAM)
    U = solvers.emmet_solve(s, K, ridge)
    assert U.dtype == F64 and U.shape == (dk, n)
    dW = R @ U.T
    ref = ref_emmet(R, K, C, LAM, ridge)
    assert rel(dW, ref) <= 1e-8, rel(dW, ref)
    if ridge == 0:
        # EMMET's promise: (W + dW) k_i = v_i, i.e. dW K = R, up to rounding.
        assert rel(dW @ K.double(), R) <= 1e-9


def test_emmet_with_remembered_keys():
    dk, n = 16, 4
    C = spd(dk, 1e3, seed=3)
    K_old = randn(dk, 6, seed=4)
    K = randn(dk, n, seed=5)
    R = randn(7, n, seed=6)
    s = linalg.LayerSolver(C, LAM)
    s.commit(K_old)
    dW = R @ solvers.emmet_solve(s, K, 0.0).T
    assert rel(dW, ref_emmet(R, K, C, LAM, 0.0, K_old=K_old)) <= 1e-9
    assert rel(dW @ K, R) <= 1e-10
    # lambda does not cancel with remembered keys: the update depends on it.
    assert rel(dW, ref_emmet(R, K, C, 10 * LAM, 0.0, K_old=K_old)) > 1e-3


def test_emmet_ridge_decides_the_compromise():
    """More keys than ``dk`` and duplicate keys: with a ridge the result is the formula's
    (the constraints cannot all hold); a duplicate with equal residuals is still written."""
    dk = 6
    C = spd(dk, 1e2, seed=7)
    s = linalg.LayerSolver(C, LAM)
    K = randn(dk, 10, seed=8)
    R = randn(4, 10, seed=9)
    dW = R @ solvers.emmet_solve(s, K, 1e-3).T
    assert rel(dW, ref_emmet(R, K, C, LAM, 1e-3)) <= 1e-8
    K = randn(dk, 3, seed=10)
    K[:, 2] = K[:, 0]
    R = randn(4, 3, seed=11)
    R[:, 2] = R[:, 0]
    dW = R @ solvers.emmet_solve(s, K, 1e-9).T
    assert rel(dW, ref_emmet(R, K, C, LAM, 1e-9)) <= 1e-6
    assert rel(dW @ K, R) <= 1e-6


@pytest.mark.parametrize(
    "case",
    ["more_keys_than_dk", "near_duplicate_fp32", "duplicate"],
)
def test_emmet_dependent_keys_without_ridge_are_refused(case):
    """With ``emmet_ridge = 0`` dependent keys make ``K^T A^-1 K`` singular. The Cholesky
    factorization may still pass on rounding-level pivots and return noise amplified by
    1 / pivot (an update of norm 1e8 for a near duplicate); the solve must refuse instead,
    naming the request and the field to change."""
    dk = 8
    C = spd(dk, 1e2, seed=0)
    s = linalg.LayerSolver(C, LAM)
    if case == "more_keys_than_dk":
        # (seed chosen so that the factorization of the singular matrix passes)
        K = randn(dk, dk + 1, seed=100)
    elif case == "near_duplicate_fp32":
        K = torch.randn(dk, 3, generator=gen(101))
        K[:, 1] = K[:, 0] * (1 + 1e-7)
    else:
        K = randn(dk, 3, seed=102)
        K[:, 2] = K[:, 0]
    with pytest.raises(solvers.SolverError, match=r"request \d+ .*emmet_ridge"):
        solvers.emmet_solve(s, K, 0.0)


def test_emmet_zero_or_nonfinite_key_is_named():
    s = linalg.LayerSolver(spd(8, 1e2, seed=0), LAM)
    K = randn(8, 3, seed=12)
    K[:, 1] = 0
    # (a zero key with a ridge was written as no update at all for that request)
    with pytest.raises(solvers.SolverError, match=r"requests \[1\] are zero"):
        solvers.emmet_solve(s, K, 1e-6)
    K = randn(8, 3, seed=12)
    K[3, 2] = float("nan")
    with pytest.raises(solvers.SolverError, match=r"requests \[2\] contain NaN"):
        solvers.emmet_solve(s, K, 1e-6)


# ----------------------------------------------------------------------------- AlphaEdit


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "dk,m,n,n_old",
    [(16, 6, 1, 0), (16, 6, 3, 4), (8, 3, 20, 5), (1, 1, 2, 0), (12, 12, 3, 2), (24, 8, 5, 3)],
)
def test_alphaedit_matches_reference(dk, m, n, n_old, dtype):
    C, Q = spectrum_stats(dk, m, seed=dk + m + n)
    C = C.to(dtype)
    K = 3 * randn(dk, n, seed=13).to(dtype)
    K_old = randn(dk, n_old, seed=14).to(dtype) if n_old else None
    R = randn(5, n, seed=15)
    thr, alpha = 1e-2, 1.0
    V0 = solvers.nullspace_basis(C, thr)
    assert V0.dtype == F64 and V0.shape == (dk, m)
    dW = R @ solvers.alphaedit_solve(V0, K, K_old, alpha).T
    ref, U1 = ref_alphaedit(R, K, C, thr, alpha, K_old)
    assert ref.norm() > 0
    assert rel(dW, ref) <= 1e-10, rel(dW, ref)
    if m < dk:
        # AlphaEdit's promise: keys in the preserved span keep their outputs, dW K0 = 0.
        K0 = U1 @ randn(dk - m, 50, seed=16)
        assert float((dW @ K0).norm()) <= 1e-12 * float(dW.norm() * K0.norm())


def test_alphaedit_rank_deficient_and_duplicate_keys():
    dk, m = 16, 8
    C, _ = spectrum_stats(dk, m, seed=17)
    B = randn(dk, 2, seed=18)
    K = B @ randn(2, 6, seed=19)  # rank 2
    K[:, 5] = K[:, 0]
    K_old = torch.cat([K[:, :2], randn(dk, 2, seed=20)], 1)
    R = randn(4, 6, seed=21)
    V0 = solvers.nullspace_basis(C, 1e-2)
    dW = R @ solvers.alphaedit_solve(V0, K, K_old, 0.5).T
    assert rel(dW, ref_alphaedit(R, K, C, 1e-2, 0.5, K_old)[0]) <= 1e-10


def test_alphaedit_badly_conditioned_statistics():
    """Eigenvalues from 1e6 down to 1e-10 (condition 1e16): the update is the formula's and
    ``dW C`` stays below the threshold relative to ``dW`` (up to ``eps ||C||``)."""
    dk, m = 32, 10
    C, Q = spectrum_stats(dk, m, seed=22, big=(6.0, -1.0))
    K = randn(dk, 5, seed=23)
    R = randn(4, 5, seed=24)
    V0 = solvers.nullspace_basis(C, 1e-2)
    assert V0.shape == (dk, m)
    dW = R @ solvers.alphaedit_solve(V0, K, None, 1.0).T
    assert rel(dW, ref_alphaedit(R, K, C, 1e-2, 1.0)[0]) <= 1e-8
    eps = torch.finfo(F64).eps
    bound = (1e-2 + 100 * eps * float(C.norm())) * float(dW.norm())
    assert float((dW @ C).norm()) <= bound


def test_alphaedit_threshold_edges():
    """Every eigenvalue below the threshold: ``P = I`` and the update is
    ``R K^T (M + alpha I)^-1``. None below: refused, naming the field. The threshold is
    strict: an eigenvalue equal to it is preserved."""
    dk = 6
    C, _ = spectrum_stats(dk, 0, seed=25)
    K = randn(dk, 3, seed=26)
    R = randn(4, 3, seed=27)
    V0 = solvers.nullspace_basis(C, 10.0)
    assert V0.shape == (dk, dk)
    dW = R @ solvers.alphaedit_solve(V0, K, None, 2.0).T
    ref = torch.linalg.solve(K @ K.T + 2.0 * torch.eye(dk, dtype=F64), K @ R.T).T
    assert rel(dW, ref) <= 1e-12
    with pytest.raises(solvers.SolverError, match="alphaedit_threshold"):
        solvers.nullspace_basis(C, 1e-3)
    D = torch.diag(torch.tensor([1.0, 0.25, 0.125, 1e-3], dtype=F64))
    assert solvers.nullspace_basis(D, 0.125).shape == (4, 1)
    assert solvers.nullspace_basis(D, 0.1251).shape == (4, 2)


def test_alphaedit_nonfinite_inputs_are_named():
    """NaN/Inf statistics or keys: an error that says so (not "raise alphaedit_threshold" or
    "raise alphaedit_lambda", which would not help)."""
    C, _ = spectrum_stats(6, 3, seed=28)
    for bad in (float("nan"), float("inf")):
        Cb = C.clone()
        Cb[1, 1] = bad
        with pytest.raises(solvers.SolverError, match="NaN or Inf"):
            solvers.nullspace_basis(Cb, 1e-2)
    V0 = solvers.nullspace_basis(C, 1e-2)
    K = randn(6, 2, seed=29)
    K[0, 1] = float("nan")
    with pytest.raises(solvers.SolverError, match=r"requests \[1\] contain NaN"):
        solvers.alphaedit_solve(V0, K, None, 1.0)


# ----------------------------------------------------------------------------- ROME


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "dk,n,cond,dup",
    [(8, 1, 1e2, False), (1, 3, 1.0, False), (4, 9, 1e2, False), (8, 3, 1e2, True)]
    + [(16, 4, 1e8, False)],
)
def test_rome_matches_sequential_reference(dk, n, cond, dup, dtype):
    C = spd(dk, cond, seed=30 + dk).to(dtype)
    K = randn(dk, n, seed=31)
    K_bare = K + 0.3 * randn(dk, n, seed=32)
    if dup:
        K[:, 2], K_bare[:, 2] = K[:, 0], K_bare[:, 0]
    K, K_bare = K.to(dtype), K_bare.to(dtype)
    W = randn(5, dk, seed=33)
    V = randn(5, n, seed=34)
    R, Uh = solvers.rome_solve(solvers.rome_factor(C), K, K_bare, V - W @ K_bare.double())
    dW = R @ Uh.T
    ref, own = ref_rome(W, V, K, K_bare, C)
    tol = 1e-8 if cond > 1e6 else 1e-12
    assert rel(dW, ref) <= tol, rel(dW, ref)
    # ROME's promise, W' k* = v*: the sequential reference's own writes read their targets
    # (a check of the reference itself), and the last request still does after the engine's
    # whole update.
    assert max(own) <= 1e-12
    assert rel((W + dW) @ K_bare[:, -1].double(), V[:, -1]) <= 1e-12


def test_rome_singular_or_nonfinite_statistics_are_named():
    C = spd(6, 1e2, seed=35)
    C[:, 0] = 0
    C[0, :] = 0
    with pytest.raises(solvers.SolverError, match="ROME.*stats_samples"):
        solvers.rome_factor(C)
    C = spd(6, 1e2, seed=35)
    C[2, 2] = float("inf")
    # (an Inf on the diagonal was factored without complaint)
    with pytest.raises(solvers.SolverError, match="ROME.*NaN or Inf"):
        solvers.rome_factor(C)
    Lc = solvers.rome_factor(spd(6, 1e2, seed=35))
    K = randn(6, 2, seed=36)
    K[0, 0] = float("inf")
    with pytest.raises(solvers.SolverError, match=r"requests \[0\] contain NaN"):
        solvers.rome_solve(Lc, K, K, randn(3, 2, seed=37))


# ----------------------------------------------------------------------------- through the Editor


def test_editor_emmet_same_subject_twice_without_ridge():
    """Two requests on one subject (the subject leads both prompts, so their keys are equal)
    with ``emmet_ridge = 0``: the apply fails naming the field, the weights are untouched;
    with the default ridge it goes through and matches the reference."""
    from tiny import assert_bit_identical, make_gpt2, make_tokenizer, snapshot

    from memit_fast import EditConfig
    from memit_fast.editor import EditFailedError, Editor

    reqs = [
        {"prompt": "{} plays the sport of", "subject": "LeBron James", "target": "football"},
        {"prompt": "The capital of {} is", "subject": "France", "target": "Rome"},
        {"prompt": "{} was born in", "subject": "LeBron James", "target": "Paris"},
    ]
    dk = 256
    C = spd(dk, 1e3, seed=38).float()
    cfg = EditConfig(
        layers=(2,),
        steps=2,
        context_templates=("{}", "The weather is nice today. {}"),
        mom2_update_weight=LAM,
        solver="emmet",
        emmet_ridge=0.0,
    )
    model = make_gpt2()
    snap = snapshot(model)
    ed = Editor(model, make_tokenizer(), cfg, stats={2: C})
    with pytest.raises(
        EditFailedError, match=r"layer 2: EMMET: the key of request 2 .*emmet_ridge"
    ):
        ed.apply(reqs)
    assert_bit_identical(model, snap)
    # An exact duplicate before it is merged: the message still names the input's index.
    with pytest.raises(EditFailedError, match=r"EMMET: the key of request 3 "):
        ed.apply([reqs[0], dict(reqs[0])] + reqs[1:])
    assert_bit_identical(model, snap)
    ed.config = cfg.replace(emmet_ridge=1e-6)
    res = ed.apply(reqs)
    R, U = res.factors[2]
    K = res.keys[2].double()
    assert torch.equal(K[:, 0], K[:, 2])
    assert rel(R.double() @ U.double().T, ref_emmet(R, K, C, LAM, 1e-6)) <= 1e-6


@pytest.mark.slow
def test_emmet_ridge_solves_ten_thousand_keys_with_a_large_one():
    """10,000 keys in dk = 32 with the default ridge, the last key ten times the others: the
    ridge keeps ``K^T A^-1 K + rho I`` well conditioned (the dependent-key check is for
    ``ridge = 0``), so the solve goes through and matches the reference."""
    dk, n = 32, 10000
    C = torch.eye(dk, dtype=F64)
    K = randn(dk, n, seed=71).float()
    K[:, -1] *= 10
    R = randn(2, n, seed=72)
    s = linalg.LayerSolver(C, LAM)
    dW = R @ solvers.emmet_solve(s, K, 1e-6).T
    # K^T A^-1 K + rho I has a condition number near 4e8: 1.6e-6 measured
    assert rel(dW, ref_emmet(R, K, C, LAM, 1e-6)) <= 1e-5

"""Per-layer update rules beside MEMIT's (``EditConfig.solver``).

Every rule gets what the engine's layer loop already computed for layer ``l`` (DESIGN §2):
the keys ``K (dk, n)`` of the batch, the residuals ``R (dh, n) = (Z - H) / (layers left)``
and the key statistics ``C (dk, dk)``, and returns the update as factors ``(R, U)`` with
``dW = R U^T`` in ``(dh, dk)`` orientation, the layout ``EditResult.factors`` stores.
Everything here is float64.

``memit``      ``dW = R K^T (lambda C + K K^T)^-1``                (``linalg.LayerSolver``)
``emmet``      ``dW = R (K^T A^-1 K + rho I)^-1 K^T A^-1``, ``A = lambda C (+ sum K_b K_b^T)``
``alphaedit``  ``dW = R K^T P (P M P + lambda_a I)^-1``, ``M = K K^T (+ sum K_b K_b^T)``
``rome``       per request in order: ``dW_i = (z_i - h_i) u_i^T / (u_i^T k_i)``,
               ``u_i = C^-1 k_i``, ``h_i`` the block's output under the weights so far

(``K_b``: the keys of earlier batches still written, in sequential editing.)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from memit_fast import linalg


class SolverError(RuntimeError):
    """The update rule cannot be applied to this layer's statistics or keys."""


# EMMET: a squared pivot of the Cholesky factor of ``K^T A^-1 K`` below this times ``n``
# (the number of keys) times its diagonal entry means that key lies in the span of the keys
# before it to rounding (see ``emmet_solve``). Exactly dependent keys left pivots of up to
# 2e4 eps (dk = 512, n = 520, C of condition 1e8); ``1e4 n eps`` is well above that.
EMMET_DEPENDENT_PIVOT = 1e4 * torch.finfo(torch.float64).eps


def _check_finite_stats(C: torch.Tensor, who: str) -> None:
    if not bool(torch.isfinite(C).all()):
        raise SolverError(
            f"{who}: the key statistics C contain NaN or Inf; recompute them (stats_dtype "
            "float32 or float64) or check the model's activations"
        )


def _named(cols: list[int], names: Sequence[int] | None) -> list[int]:
    """The requests' indices for the messages: ``names[c]`` for each key column ``c`` (the
    caller's index of each request, which merged duplicates no longer match), else ``c``."""
    return [int(names[c]) for c in cols] if names is not None else cols


def _check_finite_keys(
    K: torch.Tensor,
    who: str,
    what: str = "the keys of requests",
    names: Sequence[int] | None = None,
) -> None:
    bad = (~torch.isfinite(K).all(dim=0)).nonzero().flatten().tolist()
    if bad:
        raise SolverError(
            f"{who}: {what} {_named(bad, names)} contain NaN or Inf; check the model's "
            "activations on their prompts"
        )


def emmet_solve(
    solver: linalg.LayerSolver,
    K: torch.Tensor,
    ridge: float,
    names: Sequence[int] | None = None,
) -> torch.Tensor:
    """EMMET (Gupta et al. 2024, equality-constrained mass editing).

    Minimizes the preservation loss ``||dW A^(1/2)||^2`` subject to ``(W + dW) K = W K + R``
    exactly, where ``A = lambda C + sum_b K_b K_b^T`` is the system ``solver`` holds (the
    cached factor of ``lambda C`` and the remembered keys). The solution is

        ``dW = R (K^T A^-1 K)^-1 K^T A^-1``,  i.e.  ``U = A^-1 K (K^T A^-1 K + rho I)^-1``

    with the ridge ``rho = ridge * trace(K^T A^-1 K) / n`` (relative, so it does not depend
    on the scale of the keys or of lambda) keeping the ``n x n`` solve stable. Without
    remembered keys lambda cancels. Keys that are linearly dependent (the same subject twice,
    more requests than ``dk``) make the constraints contradictory: the ridge then decides the
    compromise. Without one (``ridge = 0``), a key whose share outside the span of the keys
    before it is under ``EMMET_DEPENDENT_PIVOT * n`` makes the solve refuse.

    Args:
        solver: the layer's ``LayerSolver`` (its committed system is ``A``).
        K: ``(dk, n)`` keys of the batch.
        ridge: ``EditConfig.emmet_ridge``, >= 0.
        names: the requests' indices in the caller's input, one per key, for the messages.
    Returns:
        ``U (dk, n)`` float64 on the solver's device.
    Raises:
        SolverError: a key is not finite or zero, or the keys are dependent (see above).
    """
    _check_finite_keys(K, "EMMET", names=names)
    Y = solver.solve_committed(K)  # A^-1 K
    K64 = K.to(Y.device, torch.float64)
    D = K64.T @ Y
    D = 0.5 * (D + D.T)
    n = D.shape[0]
    if n == 0:
        return Y
    zero = (~(D.diagonal() > 0)).nonzero().flatten().tolist()
    if zero:
        raise SolverError(
            f"EMMET: the keys of requests {_named(zero, names)} are zero (K^T A^-1 K has a "
            "zero diagonal entry): no update can write them; check the model's activations on "
            "their prompts"
        )
    scale = float(D.diagonal().mean())
    D.diagonal().add_(ridge * scale)
    L, info = torch.linalg.cholesky_ex(D)
    # Without a ridge, pivot i squared over D_ii is the share of key i (in the A^-1 inner
    # product) outside the span of keys 0 … i-1: at rounding level the constraints are
    # dependent and the solve would return noise amplified by 1 / pivot instead of failing.
    # A ridge bounds D's smallest eigenvalue below by ridge x its mean diagonal: the solve is
    # stable and the ridge decides the compromise between dependent keys.
    failed = int(info) - 1 if int(info) != 0 else n  # cholesky_ex's info is 1-based
    low: list[int] = []
    if ridge == 0:
        share = L.diagonal()[:failed] ** 2 / D.diagonal()[:failed]
        low = (~(share > EMMET_DEPENDENT_PIVOT * n)).nonzero().flatten().tolist()
    if low or failed < n:
        i = _named([low[0] if low else failed], names)[0]
        raise SolverError(
            f"EMMET: the key of request {i} is (to rounding) a linear combination of the keys "
            f"of requests before it (e.g. one subject in several requests, or more requests "
            f"than the key dimension {K64.shape[0]}), so K^T A^-1 K (+ emmet_ridge={ridge} x "
            "its mean diagonal) is singular and the equality constraints cannot be solved; "
            "raise emmet_ridge (e.g. to 1e-6) or drop the repeated requests"
        )
    return torch.cholesky_solve(Y.T.contiguous(), L).T.contiguous()  # Y D^-1


def nullspace_basis(C: torch.Tensor, threshold: float) -> torch.Tensor:
    """AlphaEdit's null space of the key statistics: ``V0 (dk, m)`` float64, the orthonormal
    eigenvectors of ``C`` whose eigenvalues are below ``threshold`` (absolute, on ``C`` as
    stored: the mean of ``k k^T``, not ``lambda C``; AlphaEdit's code thresholds the singular
    values of the same matrix; ``EditConfig.alphaedit_threshold`` defaults to 1e-2, the
    released hyperparameter files use 2e-2). The projector is ``P = V0 V0^T``.

    Raises:
        SolverError: ``C`` is not finite, or no eigenvalue is below ``threshold`` (the
        update would be zero).
    """
    _check_finite_stats(C, "AlphaEdit")
    evals, evecs = torch.linalg.eigh(C.to(torch.float64))
    keep = evals < threshold
    if not bool(keep.any()):
        raise SolverError(
            f"AlphaEdit: no eigenvalue of the key statistics is below alphaedit_threshold="
            f"{threshold} (the smallest is {float(evals[0]):.3g}): the null space is empty and "
            "nothing could be written; raise alphaedit_threshold"
        )
    return evecs[:, keep].contiguous()


def alphaedit_solve(
    V0: torch.Tensor,
    K: torch.Tensor,
    K_old: torch.Tensor | None,
    lam: float,
    names: Sequence[int] | None = None,
) -> torch.Tensor:
    """AlphaEdit (Fang et al. 2025): MEMIT's update projected onto the null space of ``C``.

        ``dW = R K^T P (P M P + lambda_a I)^-1``,  ``M = K K^T + sum_b K_b K_b^T``,
        ``P = V0 V0^T``,  i.e.  ``U = (P M P + lambda_a I)^-1 P K``

    (the released code's ``(P M + lambda_a I)^-1 P K`` is the same matrix). ``P M P +
    lambda_a I`` maps the span of ``V0`` to itself, so the solve is done there, of order ``m``
    (the null space's dimension) rather than ``dk``:
    ``U = V0 (B_all B_all^T + lambda_a I_m)^-1 V0^T K`` with ``B_all = V0^T [K, K_b...]``.
    ``U`` lies in the span of ``V0``: ``dW P = dW`` up to rounding, so ``dW C`` is at most
    ``threshold * ||dW||`` in norm.

    Args:
        V0: ``(dk, m)`` float64 orthonormal basis of the null space (``nullspace_basis``).
        K: ``(dk, n)`` keys of the batch.
        K_old: ``(dk, n_old)`` keys written by earlier batches (sequential editing) or None.
        lam: ``EditConfig.alphaedit_lambda``, > 0.
        names: the requests' indices in the caller's input, one per key, for the messages.
    Returns:
        ``U (dk, n)`` float64 on ``V0``'s device.
    """
    _check_finite_keys(K, "AlphaEdit", names=names)
    if K_old is not None:
        _check_finite_keys(K_old, "AlphaEdit", "the remembered keys (columns)")
    B = V0.T @ K.to(V0.device, torch.float64)  # (m, n)
    M = B @ B.T
    if K_old is not None and K_old.numel():
        Bo = V0.T @ K_old.to(V0.device, torch.float64)
        M.addmm_(Bo, Bo.T)
    M.diagonal().add_(lam)
    L, info = torch.linalg.cholesky_ex(M)
    if int(info) != 0:
        raise SolverError(
            f"AlphaEdit: P M P + alphaedit_lambda I is not positive definite (pivot "
            f"{int(info)}); raise alphaedit_lambda"
        )
    return V0 @ torch.cholesky_solve(B, L)


def rome_factor(C: torch.Tensor) -> torch.Tensor:
    """The float64 Cholesky factor of ``C`` that ROME's ``u = C^-1 k`` uses."""
    _check_finite_stats(C, "ROME")
    L, info = torch.linalg.cholesky_ex(C.to(torch.float64))
    if int(info) != 0:
        raise SolverError(
            f"ROME: the key statistics are not positive definite (pivot {int(info)} of "
            f"{C.shape[0]}); ROME needs C^-1: raise stats_samples (C needs at least "
            f"{C.shape[0]} token positions to have full rank), or use another solver"
        )
    return L


def rome_solve(
    Lc: torch.Tensor,
    K: torch.Tensor,
    K_bare: torch.Tensor,
    R0: torch.Tensor,
    names: Sequence[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """ROME (Meng et al. 2022), one rank-one update per request, in the requests' order.

    For request ``i`` with the updates of requests ``0 … i-1`` already written:

        ``u_i = C^-1 k_i``                         (``k_i``: the key averaged over templates)
        ``r_i = z_i - h_i'``, ``h_i' = h_i + sum_(j<i) dW_j k*_i``
        ``dW_i = r_i u_i^T / (u_i^T k*_i)``

    where ``k*_i`` is the key of the bare prompt and ``h_i'`` the block's output there under
    the current weights: ``v* - W k*`` as ROME writes it (``h`` is affine in the edited
    weight and the key does not depend on it, so ``h_i'`` is exact, not an approximation).
    After ``dW_i``, ``(W + dW_0 + … + dW_i) k*_i`` gives exactly ``z_i`` at the block's output;
    later requests may move it. With ``û_i = u_i / (u_i^T k*_i)`` and
    ``G = Û^T K*`` the recurrence ``r_i = r0_i - sum_(j<i) r_j G[j, i]`` is the triangular
    system ``R (I + triu(G, 1)) = R0``. The sum of the rank-one updates is written at once:
    ``dW = R Û^T`` (the lambda of ``EditConfig`` plays no part).

    Args:
        Lc: ``rome_factor(C)``.
        K: ``(dk, n)`` template-averaged keys; K_bare: ``(dk, n)`` the bare prompts' keys.
        R0: ``(dh, n)`` ``Z - H`` from the unedited layer.
        names: the requests' indices in the caller's input, one per key, for the messages.
    Returns:
        ``(R (dh, n), Û (dk, n))`` float64 on ``Lc``'s device.
    """
    _check_finite_keys(K, "ROME", names=names)
    _check_finite_keys(K_bare, "ROME", "the bare prompts' keys of requests", names)
    dev = Lc.device
    K64 = K.to(dev, torch.float64)
    Kb = K_bare.to(dev, torch.float64)
    U = torch.cholesky_solve(K64, Lc)
    den = (U * Kb).sum(0)
    tiny = torch.finfo(torch.float64).eps * (U.norm(dim=0) * Kb.norm(dim=0))
    bad = (~(den.abs() > tiny)).nonzero().flatten().tolist()
    if bad:
        raise SolverError(
            f"ROME: u_i^T k_i vanishes for requests {_named(bad, names)}; check their keys"
        )
    Uh = U / den
    n = K64.shape[1]
    T = torch.eye(n, dtype=torch.float64, device=dev) + torch.triu(Uh.T @ Kb, diagonal=1)
    R = torch.linalg.solve_triangular(T, R0.to(dev, torch.float64), upper=True, left=False)
    return R, Uh


__all__ = [
    "SolverError",
    "alphaedit_solve",
    "emmet_solve",
    "nullspace_basis",
    "rome_factor",
    "rome_solve",
]

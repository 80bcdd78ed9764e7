"""The solve of MEMIT's layer update, behind one interface.

``U = (lambda C + K K^T)^-1 K`` and ``W += R U^T``. Plain torch references live here; the
C++ extension (``memit_fast._C``) and the Triton kernels (``memit_fast.kernels``) plug in
behind the same functions.
"""

from __future__ import annotations

import torch


class IllConditionedError(RuntimeError):
    """The system ``lambda C + K K^T`` is not positive definite at working precision."""


def torch_memit_solve(C: torch.Tensor, K: torch.Tensor, lam: float) -> torch.Tensor:
    """Reference solve in float64.

    Args:
        C: ``(dk, dk)`` second moment of the keys (any float dtype).
        K: ``(dk, n)`` keys.
        lam: lambda (``mom2_update_weight``).
    Returns:
        ``U (dk, n)`` float64 with ``(lam C + K K^T) U = K``.
    """
    Kd = K.to(torch.float64)
    A = lam * C.to(torch.float64) + Kd @ Kd.T
    L, info = torch.linalg.cholesky_ex(A)
    if int(info) != 0:
        raise IllConditionedError(
            f"lambda*C + K K^T is not positive definite (pivot {int(info)} of {A.shape[0]}); "
            "use a larger mom2_update_weight (lambda) or more statistics samples"
        )
    return torch.cholesky_solve(Kd, L)


def memit_solve(C: torch.Tensor, K: torch.Tensor, lam: float) -> torch.Tensor:
    """``U = (lam C + K K^T)^-1 K`` to float64 accuracy; ``(dk, n)`` float64."""
    return torch_memit_solve(C, K, lam)


def apply_update(W: torch.Tensor, R: torch.Tensor, U: torch.Tensor, transposed: bool) -> None:
    """``W += R U^T`` in place, accumulated in fp32 and rounded once into ``W.dtype``.

    Args:
        W: ``(dh, dk)`` weight, or ``(dk, dh)`` when ``transposed`` (GPT-2's Conv1D).
        R: ``(dh, n)`` residuals; U: ``(dk, n)`` solved keys.
    Dispatches to ``memit_fast.kernels.lowrank_update`` (Triton on CUDA, torch elsewhere).
    """
    from memit_fast import kernels

    kernels.lowrank_update(W, R.to(W.device), U.to(W.device), transposed)

"""Triton kernels of memit_fast, shipped as ``memit_fast.kernels``.

Each op has a plain torch reference of the same signature; the dispatcher picks the Triton
kernel for CUDA tensors when Triton is importable and the reference elsewhere.
"""

from __future__ import annotations

import torch


def torch_covariance_accumulate(
    C: torch.Tensor, X: torch.Tensor, mask: torch.Tensor | None = None
) -> None:
    """``C (d, d) fp32 += X^T X`` over the rows of ``X (t, d)`` that ``mask (t,)`` keeps."""
    if mask is not None:
        X = X[mask.to(torch.bool)]
    X = X.to(torch.float32)
    C.addmm_(X.T, X)


def covariance_accumulate(
    C: torch.Tensor, X: torch.Tensor, mask: torch.Tensor | None = None
) -> None:
    torch_covariance_accumulate(C, X, mask)


def torch_lowrank_update(W: torch.Tensor, R: torch.Tensor, U: torch.Tensor, transposed: bool) -> None:
    """``W += R U^T`` in place, the product accumulated in fp32 and rounded once into
    ``W.dtype``. ``W (dh, dk)`` or ``(dk, dh)`` when ``transposed``; ``R (dh, n)``;
    ``U (dk, n)``."""
    dW = R.to(torch.float32) @ U.to(torch.float32).T
    if transposed:
        dW = dW.T
    W.copy_((W.to(torch.float32) + dW).to(W.dtype))


def lowrank_update(W: torch.Tensor, R: torch.Tensor, U: torch.Tensor, transposed: bool) -> None:
    torch_lowrank_update(W, R, U, transposed)

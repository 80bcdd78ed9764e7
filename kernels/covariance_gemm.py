"""``C += X^T X`` for 16-bit keys through cuBLAS: lower-triangle row panels, fp32 output.

The lower triangle of ``C`` (diagonal blocks in full, as the Triton kernel) is covered by
row panels ``C[r0:r1, :r1] += X[:, r0:r1]^T X[:, :r1]``: each one GEMM with 16-bit
operands on the tensor cores and float32 accumulation and output (``torch.mm`` with
``out_dtype=torch.float32``), added into ``C``. With panels of width ``P`` the products
cost ``t d (d + P)`` multiply-adds against ``t d^2`` for the full matrix. No fp32 copy of
``X`` is made; with a mask, masked-out rows are zeroed in a 16-bit copy (their memory may
hold NaN). ``covariance_finalize`` mirrors the triangle afterwards, as for the Triton
kernel.

This is the path that ``benchmarks/bench_covariance.py`` (variant ``gemm-panels``) times
beside the Triton kernel; ``memit_fast.kernels.covariance_accumulate`` uses it for 16-bit
keys on CUDA where ``torch.mm`` has ``out_dtype``. On the CPU the same panels are computed
from fp32 copies (16-bit products are exact in fp32), so the tests can check it anywhere.
No Triton import here.
"""

from __future__ import annotations

import functools

import torch

from .reference import check_covariance_args

# Measured on an H200 at d = 16384, t = 65536 (bf16): 1024 -> 27.5 ms (92 % of the dense
# bf16 GEMM's rate, symmetric flops counted once), 2048 -> 28.4 ms, 4096 -> 32.0 ms.
PANEL = 1024
_SIXTEEN_BIT = (torch.float16, torch.bfloat16)


@functools.cache
def mm_has_out_dtype(device_type: str = "cuda") -> bool:
    """Whether ``torch.mm(a, b, out_dtype=torch.float32)`` takes 16-bit operands on
    ``device_type`` (recent torch, CUDA only); checked once on a tiny product."""
    if device_type != "cuda" or not torch.cuda.is_available():
        return False
    try:
        a = torch.ones(2, 2, dtype=torch.bfloat16, device="cuda")
        out = torch.mm(a, a, out_dtype=torch.float32)
    except (TypeError, RuntimeError, NotImplementedError):
        return False
    return out.dtype == torch.float32


def gemm_covariance_accumulate(
    C: torch.Tensor, X: torch.Tensor, mask: torch.Tensor | None = None, panel: int = PANEL
) -> None:
    """``C (d, d) fp32 += X^T X`` over the rows of ``X (t, d)`` (fp16/bf16) that ``mask``
    keeps, **lower triangle only** (diagonal blocks of ``panel`` in full); finalize with
    ``covariance_finalize`` after the pass."""
    check_covariance_args(C, X, mask)
    if C.dtype != torch.float32:
        raise TypeError(f"gemm_covariance_accumulate: C must be float32, got {C.dtype}")
    if X.dtype not in _SIXTEEN_BIT:
        raise TypeError(f"gemm_covariance_accumulate: X must be fp16 or bf16, got {X.dtype}")
    if panel < 1:
        raise ValueError(f"gemm_covariance_accumulate: panel must be positive, got {panel}")
    t, d = X.shape
    if t == 0 or d == 0:
        return
    if mask is not None:
        keep = mask if mask.dtype == torch.bool else mask != 0
        X = torch.where(keep[:, None], X, torch.zeros((), dtype=X.dtype, device=X.device))
    native = X.is_cuda and mm_has_out_dtype("cuda")
    Xw = X if native else X.float()
    for r0 in range(0, d, panel):
        r1 = min(r0 + panel, d)
        a, b = Xw[:, r0:r1].T, Xw[:, :r1]
        prod = torch.mm(a, b, out_dtype=torch.float32) if native else torch.mm(a, b)
        C[r0:r1, :r1] += prod

"""Triton kernels of memit_fast, shipped as ``memit_fast.kernels``.

Each op has a plain torch reference of the same signature (``torch_*``, in ``reference.py``)
and a Triton implementation (``triton_*``, one file per op: ``covariance.py``,
``update.py``). The dispatcher (the plain name) picks the Triton kernel for CUDA tensors on
an sm_80+ GPU when Triton imports, and the reference everywhere else. Importing this package
never imports Triton and never touches a GPU: the op modules are imported on first use.

Ops:
- ``covariance_accumulate(C, X, mask)`` then, once per pass, ``covariance_finalize(C)``.
- ``lowrank_update(W, R, U, transposed)``: ``W += R U^T``.
- ``dense_update(W, D, transposed)``: ``W += D^T`` (the update order's ``dW^T``).
- ``fused_solve_update(W, L, K, R, transposed, order)``: ``W += R ((L L^T)^-1 K)^T``.
"""

from __future__ import annotations

import functools
import logging

import torch

from .reference import (
    covariance_finalize,
    torch_covariance_accumulate,
    torch_dense_update,
    torch_fused_solve_update,
    torch_lowrank_update,
)

__all__ = [
    "covariance_accumulate",
    "covariance_finalize",
    "dense_update",
    "fused_solve_update",
    "lowrank_update",
    "torch_covariance_accumulate",
    "torch_dense_update",
    "torch_fused_solve_update",
    "torch_lowrank_update",
    "triton_available",
    "uses_triton",
]

logger = logging.getLogger(__name__)

_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    """Whether Triton imports (checked once; a failure is logged once)."""
    try:
        import triton  # noqa: F401
    except ImportError as e:
        logger.warning(
            "Triton is not importable (%s); memit_fast.kernels uses the torch references", e
        )
        return False
    return True


def uses_triton(*tensors: torch.Tensor) -> bool:
    """Whether an op on ``tensors`` goes to the Triton kernels: all on one CUDA device of
    compute capability 8.0 or newer, and Triton importable."""
    device = tensors[0].device
    if device.type != "cuda" or any(t.device != device for t in tensors):
        return False
    if torch.cuda.get_device_capability(device) < (8, 0):
        return False
    return triton_available()


def covariance_accumulate(
    C: torch.Tensor, X: torch.Tensor, mask: torch.Tensor | None = None
) -> None:
    """``C (d, d) fp32 += X^T X`` over the rows of ``X (t, d)`` (fp32/fp16/bf16) that
    ``mask (t,)`` keeps (bool, or nonzero). Accumulated in fp32, no host synchronization.
    A float64 ``C`` is accumulated in float64 by the reference, on every device.

    16-bit keys on CUDA go to cuBLAS row panels with fp32 output (``covariance_gemm.py``)
    where torch has ``mm(..., out_dtype=)``, fp32 keys to the Triton kernel.
    Both write only the lower triangle (and the diagonal blocks): call
    ``covariance_finalize(C)`` once after the last batch; it leaves the reference's full
    matrix correct too, so the two paths may be mixed within one pass.
    """
    if (
        C.dtype == torch.float32
        and C.is_contiguous()  # (the reference takes any layout)
        and X.dtype in _KERNEL_DTYPES
        and uses_triton(C, X)
    ):
        if X.dtype != torch.float32 and _gemm_panels(X.device):
            from .covariance_gemm import gemm_covariance_accumulate

            gemm_covariance_accumulate(C, X, mask)
            return
        from .covariance import triton_covariance_accumulate

        triton_covariance_accumulate(C, X, mask)
    else:
        torch_covariance_accumulate(C, X, mask)


def _gemm_panels(device: torch.device) -> bool:
    """16-bit keys on CUDA go to cuBLAS row panels (``covariance_gemm.py``) where
    ``torch.mm`` has ``out_dtype``: on an H200 at d = 16384, t = 65536 (bf16) they ran at
    92 % of the dense bf16 GEMM's rate against 66 % for the Triton kernel with specialized
    sizes (17 % before; ``benchmarks/results/gpu_h200.md``)."""
    from .covariance_gemm import mm_has_out_dtype

    return mm_has_out_dtype(device.type)


def _weight_on_triton(W: torch.Tensor, *operands: torch.Tensor) -> bool:
    """Whether a write into the weight ``W`` goes to a Triton kernel: a kernel dtype, row-
    or column-contiguous, and every tensor on a device the kernels serve."""
    return (
        W.dtype in _KERNEL_DTYPES
        and (W.stride(1) == 1 or W.stride(0) == 1)
        and uses_triton(W, *operands)
    )


def _extent(t: torch.Tensor) -> tuple[int, int]:
    """The byte range ``[first, last]`` that ``t`` spans in its storage."""
    first = t.data_ptr()
    span = sum((n - 1) * abs(st) for n, st in zip(t.shape, t.stride()) if n > 0)
    return first, first + span * t.element_size() + t.element_size() - 1


def _overlaps(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a`` and ``b`` may share memory (their storages' byte ranges meet)."""
    if a.numel() == 0 or b.numel() == 0:
        return False
    if a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return False
    (a0, a1), (b0, b1) = _extent(a), _extent(b)
    return a0 <= b1 and b0 <= a1


def _unaliased(W: torch.Tensor, *operands: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The operands of an in-place write into ``W``, each copied if it shares memory with
    ``W`` (the kernels' programs would read what others already wrote). A ``W`` whose
    elements share memory (an expanded tensor) cannot be written in place."""
    if W.numel() > 1 and any(st == 0 and n > 1 for n, st in zip(W.shape, W.stride())):
        raise ValueError(
            f"W (shape {tuple(W.shape)}, strides {W.stride()}) has elements that share "
            "memory (an expanded tensor); it cannot be updated in place"
        )
    return tuple(x.clone() if _overlaps(W, x) else x for x in operands)


def lowrank_update(W: torch.Tensor, R: torch.Tensor, U: torch.Tensor, transposed: bool) -> None:
    """``W += R U^T`` in place, accumulated in fp32 and rounded once into ``W.dtype``.
    ``W (dh, dk)``, or ``(dk, dh)`` when ``transposed`` (GPT-2's ``Conv1D``); ``R (dh, n)``;
    ``U (dk, n)`` (any float dtype; float64 goes in as fp32)."""
    R, U = _unaliased(W, R, U)
    if _weight_on_triton(W, R, U):
        from .update import triton_lowrank_update

        triton_lowrank_update(W, R, U, transposed)
    else:
        torch_lowrank_update(W, R, U, transposed)


def dense_update(W: torch.Tensor, D: torch.Tensor, transposed: bool) -> None:
    """``W += D^T`` in place (``W += D`` when ``transposed``), in fp32 and rounded once into
    ``W.dtype``; ``D (dk, dh)`` any float dtype. One memory-bound pass (Triton on CUDA)."""
    (D,) = _unaliased(W, D)
    if _weight_on_triton(W, D):
        from .update import triton_dense_update

        triton_dense_update(W, D, transposed)
    else:
        torch_dense_update(W, D, transposed)


def fused_solve_update(
    W: torch.Tensor,
    L: torch.Tensor,
    K: torch.Tensor,
    R: torch.Tensor,
    transposed: bool,
    order: str = "auto",
) -> None:
    """``W += R (A^-1 K)^T`` with ``A = L L^T`` (``L (dk, dk)`` the lower Cholesky factor of
    ``lambda C + K K^T``, ``K (dk, n)``, ``R (dh, n)``), never forming ``A^-1``. ``order``
    (``reference.solve_order``): solve for the ``n`` keys, or for the ``dh`` columns of
    ``K R^T``; ``"auto"`` takes whichever has fewer right-hand sides. The Triton path
    solves in fp32 (bf16x6 tensor-core GEMMs): an opt-in fast path, not the engine's default
    float64 solve."""
    L, K, R = _unaliased(W, L, K, R)
    if _weight_on_triton(W, L, K, R):
        from .update import triton_fused_solve_update

        triton_fused_solve_update(W, L, K, R, transposed, order=order)
    else:
        torch_fused_solve_update(W, L, K, R, transposed, order=order)

"""Plain PyTorch references of the kernels: same signatures, same results up to rounding.

They run wherever the Triton kernels do not (CPU, no Triton, old GPUs) and are what the
tests and benchmarks compare against. No Triton import here.
"""

from __future__ import annotations

import torch

# Rows of X cast to fp32 at a time in the covariance reference: bounds its temporary.
_REFERENCE_ROW_CHUNK = 8192
# Rows of C mirrored at a time by covariance_finalize: bounds its temporary.
_FINALIZE_ROW_BLOCK = 1024


def check_covariance_args(C: torch.Tensor, X: torch.Tensor, mask: torch.Tensor | None) -> None:
    """Shape/dtype/device checks shared by the reference and the kernel."""
    if X.dim() != 2:
        raise ValueError(f"covariance_accumulate: X must be (t, d), got shape {tuple(X.shape)}")
    d = X.shape[1]
    if C.shape != (d, d):
        raise ValueError(
            f"covariance_accumulate: C must be (d, d) = ({d}, {d}) for X of shape "
            f"{tuple(X.shape)}, got {tuple(C.shape)}"
        )
    if C.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"covariance_accumulate: C must be float32 (or float64), got {C.dtype}")
    if not X.is_floating_point():
        raise TypeError(f"covariance_accumulate: X must be floating point, got {X.dtype}")
    if C.device != X.device:
        raise ValueError(f"covariance_accumulate: C is on {C.device} but X on {X.device}")
    if mask is not None:
        if mask.shape != (X.shape[0],):
            raise ValueError(
                f"covariance_accumulate: mask must be (t,) = ({X.shape[0]},), "
                f"got {tuple(mask.shape)}"
            )
        if mask.device != X.device:
            raise ValueError(f"covariance_accumulate: mask is on {mask.device} but X on {X.device}")


def torch_covariance_accumulate(
    C: torch.Tensor, X: torch.Tensor, mask: torch.Tensor | None = None
) -> None:
    """``C (d, d) fp32 += X^T X`` over the rows of ``X (t, d)`` that ``mask (t,)`` keeps
    (bool, or numeric: nonzero keeps). Accumulated in ``C.dtype`` (a float64 ``C`` is
    allowed here: the statistics pass offers float64 accumulators).

    Accumulates the full matrix (``covariance_finalize`` afterwards leaves it as is, up to
    rounding: it copies the lower triangle over the upper one). Masked-out rows never
    reach ``C``, whatever they hold (NaN included). No host synchronization: the mask is
    applied with ``torch.where``, not by indexing. The fp32 cast of ``X`` is done
    ``_REFERENCE_ROW_CHUNK`` rows at a time.
    """
    check_covariance_args(C, X, mask)
    keep = None if mask is None else (mask if mask.dtype == torch.bool else mask != 0)
    for r0 in range(0, X.shape[0], _REFERENCE_ROW_CHUNK):
        Xc = X[r0 : r0 + _REFERENCE_ROW_CHUNK]
        if keep is not None:
            Xc = torch.where(keep[r0 : r0 + _REFERENCE_ROW_CHUNK, None], Xc, 0)
        Xc = Xc.to(C.dtype)
        C.addmm_(Xc.T, Xc)


def covariance_finalize(C: torch.Tensor) -> None:
    """Make ``C (d, d)`` symmetric in place by copying its strict lower triangle over its
    strict upper triangle: ``C := tril(C) + tril(C, -1)^T``.

    Call it once after the last ``covariance_accumulate`` of a pass. Both accumulate paths
    keep a correct lower triangle (the Triton kernel computes only the lower triangle of
    tiles, the reference the full matrix), so they may even be mixed within one pass, and
    calling finalize twice changes nothing. Works blockwise (``_FINALIZE_ROW_BLOCK`` rows)
    so the temporary stays small; the same code serves CPU and CUDA (it runs once per pass
    and is bound by memory traffic).
    """
    if C.dim() != 2 or C.shape[0] != C.shape[1]:
        raise ValueError(f"covariance_finalize: C must be square, got shape {tuple(C.shape)}")
    d = C.shape[0]
    bs = _FINALIZE_ROW_BLOCK
    for i0 in range(0, d, bs):
        i1 = min(i0 + bs, d)
        diag = C[i0:i1, i0:i1]
        diag.copy_(diag.tril() + diag.tril(-1).T)
        if i1 < d:
            C[i0:i1, i1:].copy_(C[i1:, i0:i1].T)


def check_update_args(
    W: torch.Tensor,
    R: torch.Tensor,
    U: torch.Tensor,
    transposed: bool,
    name: str = "lowrank_update",
    u_name: str = "U",
) -> None:
    """Shapes, devices and dtypes of ``W += R U^T`` (``U`` is called ``u_name`` in messages)."""
    if W.dim() != 2 or R.dim() != 2 or U.dim() != 2:
        raise ValueError(
            f"{name}: W, R and {u_name} must be 2-D, got {tuple(W.shape)}, {tuple(R.shape)}, "
            f"{tuple(U.shape)}"
        )
    dh, dk = (W.shape[1], W.shape[0]) if transposed else (W.shape[0], W.shape[1])
    layout = "(dk, dh) (transposed=True)" if transposed else "(dh, dk)"
    if R.shape[0] != dh or U.shape[0] != dk or R.shape[1] != U.shape[1]:
        raise ValueError(
            f"{name}: W {tuple(W.shape)} read as {layout} needs R (dh={dh}, n) and "
            f"{u_name} (dk={dk}, n) with the same n, got R {tuple(R.shape)} and "
            f"{u_name} {tuple(U.shape)}"
        )
    for t, nm in ((R, "R"), (U, u_name)):
        if t.device != W.device:
            raise ValueError(f"{name}: {nm} is on {t.device} but W on {W.device}")
        if not t.is_floating_point():
            raise TypeError(f"{name}: {nm} must be floating point, got {t.dtype}")
    if not W.is_floating_point():
        raise TypeError(f"{name}: W must be floating point, got {W.dtype}")


def torch_lowrank_update(
    W: torch.Tensor, R: torch.Tensor, U: torch.Tensor, transposed: bool
) -> None:
    """``W += R U^T`` in place, the product accumulated in fp32 and rounded once into
    ``W.dtype``. ``W (dh, dk)`` or ``(dk, dh)`` when ``transposed``; ``R (dh, n)``;
    ``U (dk, n)``."""
    check_update_args(W, R, U, transposed)
    dW = R.to(torch.float32) @ U.to(torch.float32).T
    if transposed:
        dW = dW.T
    acc = torch.promote_types(W.dtype, torch.float32)  # a float64 W keeps its bits
    W.copy_((W.to(acc) + dW).to(W.dtype))


def torch_dense_update(W: torch.Tensor, D: torch.Tensor, transposed: bool) -> None:
    """``W += D^T`` in place (``W += D`` when ``transposed``), in fp32 and rounded once into
    ``W.dtype``: the update ``dW^T (dk, dh)`` that MEMIT's update order solves for."""
    check_dense_args(W, D, transposed)
    dW = D.to(torch.float32)
    acc = torch.promote_types(W.dtype, torch.float32)  # a float64 W keeps its bits
    W.copy_((W.to(acc) + (dW if transposed else dW.T)).to(W.dtype))


def check_dense_args(W: torch.Tensor, D: torch.Tensor, transposed: bool) -> None:
    """Shapes, devices and dtypes of ``W += D^T``."""
    if W.dim() != 2 or D.dim() != 2:
        raise ValueError(
            f"dense_update: W and D must be 2-D, got {tuple(W.shape)} and {tuple(D.shape)}"
        )
    want = tuple(W.shape) if transposed else (W.shape[1], W.shape[0])
    if tuple(D.shape) != want:
        raise ValueError(
            f"dense_update: W {tuple(W.shape)} needs D (dk, dh) = {want}, got {tuple(D.shape)}"
        )
    if D.device != W.device:
        raise ValueError(f"dense_update: D is on {D.device} but W on {W.device}")
    if not (W.is_floating_point() and D.is_floating_point()):
        raise TypeError(f"dense_update: W and D must be floating point, got {W.dtype}, {D.dtype}")


def check_solve_args(
    W: torch.Tensor, L: torch.Tensor, K: torch.Tensor, R: torch.Tensor, transposed: bool
) -> None:
    check_update_args(W, R, K, transposed, name="fused_solve_update", u_name="K")
    dk = K.shape[0]
    if L.shape != (dk, dk):
        raise ValueError(
            f"fused_solve_update: L must be (dk, dk) = ({dk}, {dk}) for K {tuple(K.shape)}, "
            f"got {tuple(L.shape)}"
        )
    if L.device != W.device:
        raise ValueError(f"fused_solve_update: L is on {L.device} but W on {W.device}")
    if L.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"fused_solve_update: L must be float32 or float64, got {L.dtype}")


ORDERS = ("auto", "keys", "update")


def solve_order(order: str, dh: int, n: int) -> str:
    """Which right-hand sides the fused solve/update solves for. ``W += R (A^-1 K)^T`` is
    ``W += (A^-1 (K R^T))^T`` (``A`` is symmetric), so the triangular solves can take the
    ``n`` keys (``"keys"``: ``U = A^-1 K``, then the rank-n product ``R U^T``) or the ``dh``
    columns of ``K R^T`` (``"update"``: the solve yields ``dW^T`` itself, then one add).
    The products cost the same (``2 dh dk n`` flops either way); the solves cost
    ``2 dk^2`` per right-hand side, and the fp32 workspaces are ``(dk, n)`` against
    ``(dk, dh)``: ``"auto"`` takes ``"update"`` when ``dh < n`` (at dk 16384, dh 4096,
    n 10,000 that is 3.5 instead of 6.7 TFLOP, and 0.5 instead of 1.3 GB)."""
    if order not in ORDERS:
        raise ValueError(f"fused_solve_update: order must be one of {ORDERS}, got {order!r}")
    if order != "auto":
        return order
    return "update" if dh < n else "keys"


def torch_fused_solve_update(
    W: torch.Tensor,
    L: torch.Tensor,
    K: torch.Tensor,
    R: torch.Tensor,
    transposed: bool,
    order: str = "keys",
) -> None:
    """``W += R (A^-1 K)^T`` with ``A = L L^T``: ``cholesky_solve`` in ``L.dtype``, then
    ``torch_lowrank_update``. ``L (dk, dk)`` lower Cholesky factor of
    ``lambda C + K K^T``; ``K (dk, n)``; ``R (dh, n)``; ``W`` as in ``torch_lowrank_update``.
    ``order="update"`` (or ``"auto"`` with ``dh < n``, see ``solve_order``) solves for
    ``dW^T = A^-1 (K R^T)`` instead and adds it to ``W`` in fp32, rounded once; the default
    is the plain chain, the baseline the benchmarks compare against."""
    check_solve_args(W, L, K, R, transposed)
    if solve_order(order, R.shape[0], K.shape[1]) == "update":
        D = torch.cholesky_solve(K.to(L.dtype) @ R.to(L.dtype).T, L).to(torch.float32)
        torch_dense_update(W, D, transposed)
        return
    U = torch.cholesky_solve(K.to(L.dtype), L)
    torch_lowrank_update(W, R, U, transposed)

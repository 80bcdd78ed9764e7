"""The weight update of MEMIT's layer step: ``W += R U^T`` and the fused solve/update.

``lowrank_update``: ``W += R U^T`` straight into the weight, in its own dtype and layout.
One program per output tile of ``W``: the rank-n product is accumulated in fp32 registers,
added to the tile of ``W`` read in fp32 and rounded once into ``W.dtype``. The dense update
never exists in memory. GPT-2's ``Conv1D`` stores ``W`` as ``(dk, dh)``; that is the same
kernel with the two factors swapped (``W^T += U R^T``), and a weight that is a transposed
view (unit stride along rows) is handled the same way.

``fused_solve_update``: given the lower Cholesky factor ``L`` of ``A = lambda C + K K^T``,
``U = A^-1 K = L^-T (L^-1 K)`` by blocked triangular solves with many right-hand sides,
then ``W += R U^T`` as above. Blocked right-looking substitution: the diagonal blocks of
``L`` (``solve_block`` wide) are inverted once in float64 (small, batched), so each block
step is two GEMMs: ``U_b = L_bb^-1 Y_b`` and the trailing update ``Y_rest -= L_rest,b U_b``;
the backward sweep uses ``L^T`` through strides, never a transposed copy. ``A^-1`` is never
formed. Everything is fp32, the GEMMs on the tensor cores with the 6-pass bf16 split
(``bf16x6``: products good to about fp32 rounding). Measured on the CPU with an emulation of
that split, the result is within a few times the error of fp32 ``cholesky_solve`` (the
explicit inverses of the diagonal blocks cost a little accuracy against substitution). This
is the optional fast path; the default engine solves in float64 elsewhere.

Since ``A`` is symmetric, ``R (A^-1 K)^T = (A^-1 (K R^T))^T``: the same solve can take the
``dh`` columns of ``K R^T`` as right-hand sides instead of the ``n`` keys, and then yields
the transposed dense update itself, added to ``W`` by a small kernel (``_add_kernel``).
The products cost the same either way, the solves ``2 dk^2`` flops per right-hand side:
``order="auto"`` solves for the update when ``dh < n`` (MEMIT batches of thousands of edits
into a ``dh = 4096`` projection), whose workspaces are then smaller too.

The GEMMs of the solve can run on cuBLAS instead (``gemm_backend="cublas"``: plain fp32
``addmm``, no TF32). ``benchmarks/bench_update.py`` times both; the default is Triton because
fp32 cuBLAS GEMMs cannot use the tensor cores without dropping to single-pass TF32 (11 bits),
while ``bf16x6`` runs on them at the cost of three TF32 passes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._launch import KernelConfig, Launch, arch_of, fp32_dot_precision
from .reference import (
    check_dense_args,
    check_solve_args,
    check_update_args,
    solve_order,
    torch_dense_update,
)

# (arch family, operand kind) -> tile config of W += P Q^T.
LOWRANK_CONFIGS: dict[tuple[int, str], KernelConfig] = {
    (90, "16bit"): KernelConfig(128, 128, 64, 8, num_warps=8, num_stages=4),
    (90, "fp32"): KernelConfig(128, 128, 32, 8, num_warps=8, num_stages=3),
    (80, "16bit"): KernelConfig(128, 128, 32, 8, num_warps=4, num_stages=4),
    (80, "fp32"): KernelConfig(128, 128, 16, 8, num_warps=4, num_stages=4),
}
# arch family -> tile config of the fp32 GEMMs inside the triangular solves.
SOLVE_GEMM_CONFIGS: dict[int, KernelConfig] = {
    90: KernelConfig(128, 128, 32, 8, num_warps=8, num_stages=3),
    80: KernelConfig(128, 128, 16, 8, num_warps=4, num_stages=4),
}
# arch family -> width of the diagonal blocks of the blocked triangular solve. sm_90: 1024,
# the fastest of 256 / 512 / 1024 on an H200 at dk 16384, n 10,000 for every backend and
# precision (bf16x6: 191.2 / 168.1 / 158.8 ms) at the same error (bench_update.py,
# benchmarks/results/update.csv); sm_80: 512, not measured.
SOLVE_BLOCKS: dict[int, int] = {90: 1024, 80: 512}
# ``tl.dot`` input precisions the fused solve/update accepts for its fp32 GEMMs.
PRECISIONS = ("bf16x6", "bf16x3", "tf32x3", "ieee")

_OPERAND_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _grouped_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP: tl.constexpr):
    """Tile ``(pid_m, pid_n)`` of program ``pid``: groups of ``GROUP`` tile rows walked
    column by column, so the tiles in flight share operand blocks in L2."""
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    in_group = GROUP * num_pid_n
    first_m = (pid // in_group) * GROUP
    size_m = tl.minimum(num_pid_m - first_m, GROUP)
    return first_m + (pid % in_group) % size_m, (pid % in_group) // size_m


# Sizes are specialized (divisible by 16 or not), as in covariance.py: the masks along the
# contiguous dimensions must hold across 16-element groups for vectorized, asynchronous
# loads. The launchers pad the rank (columns of the operands) to a multiple of 16.
@triton.jit
def _lowrank_update_kernel(
    W_ptr,
    P_ptr,
    Q_ptr,
    M,
    N,
    NK,
    stride_wm,
    stride_pm,
    stride_qm,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """``W (M, N) += P (M, NK) @ Q (N, NK)^T``; all three with unit stride along columns."""
    pid_m, pid_n = _grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    p_ptrs = P_ptr + offs_m[:, None].to(tl.int64) * stride_pm + offs_k[None, :]
    q_ptrs = Q_ptr + offs_n[:, None].to(tl.int64) * stride_qm + offs_k[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, NK, BLOCK_K):
        mask_k = offs_k < NK - k0
        p = tl.load(p_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        q = tl.load(q_ptrs, mask=mask_n[:, None] & mask_k[None, :], other=0.0)
        acc = tl.dot(p, tl.trans(q), acc, input_precision=PRECISION)
        p_ptrs += BLOCK_K
        q_ptrs += BLOCK_K

    w_ptrs = W_ptr + offs_m[:, None].to(tl.int64) * stride_wm + offs_n[None, :]
    w_mask = mask_m[:, None] & mask_n[None, :]
    w = tl.load(w_ptrs, mask=w_mask, other=0.0).to(tl.float32)
    tl.store(w_ptrs, (w + acc).to(W_ptr.dtype.element_ty), mask=w_mask)


@triton.jit
def _gemm_kernel(
    C_ptr,
    A_ptr,
    B_ptr,
    M,
    N,
    K,
    stride_cm,
    stride_am,
    stride_ak,
    stride_bk,
    stride_bn,
    SUBTRACT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """``C (M, N) = A (M, K) @ B (K, N)``, or ``C -= A @ B`` when ``SUBTRACT``; fp32.
    ``C`` has unit stride along columns; ``A`` and ``B`` any strides (``L^T`` is a view)."""
    pid_m, pid_n = _grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    a_ptrs = A_ptr + offs_m[:, None].to(tl.int64) * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = B_ptr + offs_k[:, None] * stride_bk + offs_n[None, :].to(tl.int64) * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        mask_k = offs_k < K - k0
        a = tl.load(a_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    c_ptrs = C_ptr + offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :]
    c_mask = mask_m[:, None] & mask_n[None, :]
    if SUBTRACT:
        acc = tl.load(c_ptrs, mask=c_mask, other=0.0) - acc
    tl.store(c_ptrs, acc, mask=c_mask)


@triton.jit
def _add_kernel(
    W_ptr,
    D_ptr,
    M,
    N,
    stride_wm,
    stride_wn,
    stride_dm,
    stride_dn,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """``W (M, N) += D (M, N)``: ``W`` read in fp32, rounded once into its dtype; ``D`` fp32.
    Any strides: ``D`` is the solve's ``(dk, dh)`` result, read transposed for a ``(dh, dk)``
    weight."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    rows, cols = offs_m[:, None].to(tl.int64), offs_n[None, :].to(tl.int64)
    w_ptrs = W_ptr + rows * stride_wm + cols * stride_wn
    d = tl.load(D_ptr + rows * stride_dm + cols * stride_dn, mask=mask, other=0.0)
    w = tl.load(w_ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(w_ptrs, (w + d).to(W_ptr.dtype.element_ty), mask=mask)


# Tile of the add kernel (memory-bound: one read of D and W, one write of W).
ADD_BLOCK = 64


def _grid_2d(M: int, N: int, cfg: KernelConfig) -> tuple[int]:
    return (triton.cdiv(M, cfg.block_m) * triton.cdiv(N, cfg.block_n),)


def update_precision(
    w_dtype: torch.dtype,
    operand_dtype: torch.dtype,
    device: torch.device,
    requested: str | None = None,
) -> str:
    """``tl.dot`` input precision of the rank-n product. 16-bit operands: exact products
    (the setting is ignored). fp32 operands: ``requested`` where given (off the CPU); else
    IEEE fp32 when ``W`` is fp32 (the reference's arithmetic, up to summation order; fp32
    weights belong to small models); the 6-pass bf16 split (``fp32_dot_precision``) when
    ``W`` is 16-bit, whose error stays far below the rounding of ``W``."""
    if operand_dtype != torch.float32:
        return "ieee"
    if requested is None and w_dtype == torch.float32:
        return "ieee"
    return fp32_dot_precision(device, requested)


def lowrank_operands(
    W: torch.Tensor, R: torch.Tensor, U: torch.Tensor, transposed: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(Wm, P, Q)`` with ``Wm += P Q^T`` equivalent to ``W += R U^T``: ``Wm`` is ``W`` or
    its transpose, whichever has unit stride along columns; ``P``/``Q`` are ``R``/``U`` (or
    swapped), in one dtype that the kernel takes (a common 16-bit dtype, else fp32), with
    unit stride along columns."""
    if W.stride(1) != 1:
        if W.stride(0) != 1:
            raise ValueError(
                f"lowrank_update: W {tuple(W.shape)} with strides {W.stride()} has no unit "
                "stride; the Triton kernel needs a row- or column-contiguous weight"
            )
        W, transposed = W.T, not transposed
    P, Q = (U, R) if transposed else (R, U)
    dtype = P.dtype if (P.dtype == Q.dtype and P.dtype in _OPERAND_DTYPES) else torch.float32
    P, Q = P.to(dtype), Q.to(dtype)
    pad = _pad_columns(P.shape[1], P.device)
    if pad:
        # Zero columns add nothing to P Q^T; a rank that is a multiple of 16 (and rows
        # of 16-multiple strides) lets Triton vectorize and pipeline the operand loads.
        P = torch.nn.functional.pad(P, (0, pad))
        Q = torch.nn.functional.pad(Q, (0, pad))
    if P.stride(1) != 1:
        P = P.contiguous()
    if Q.stride(1) != 1:
        Q = Q.contiguous()
    return W, P, Q


def plan_lowrank_update(
    W: torch.Tensor,
    P: torch.Tensor,
    Q: torch.Tensor,
    *,
    arch: int | None = None,
    config: KernelConfig | None = None,
    precision: str | None = None,
) -> list[Launch]:
    """The launch of ``W (M, N) += P (M, n) Q (N, n)^T`` (operands from
    ``lowrank_operands``); ``precision`` overrides ``update_precision`` for fp32 operands."""
    if arch is None:
        arch = arch_of(W.device)
    kind = "fp32" if P.dtype == torch.float32 else "16bit"
    cfg = config or LOWRANK_CONFIGS[(arch, kind)]
    M, N = W.shape
    n = P.shape[1]
    args = (W, P, Q, M, N, n, W.stride(0), P.stride(0), Q.stride(0))
    constexprs = dict(
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k,
        GROUP=cfg.group,
        PRECISION=update_precision(W.dtype, P.dtype, W.device, precision),
    )
    return [
        Launch(
            _lowrank_update_kernel,
            _grid_2d(M, N, cfg),
            args,
            constexprs,
            cfg.num_warps,
            cfg.num_stages,
        )
    ]


def triton_lowrank_update(
    W: torch.Tensor, R: torch.Tensor, U: torch.Tensor, transposed: bool
) -> None:
    """``W += R U^T`` in place, accumulated in fp32 and rounded once into ``W.dtype``.

    ``W (dh, dk)``, or ``(dk, dh)`` when ``transposed`` (GPT-2's ``Conv1D``), fp32/fp16/
    bf16, row- or column-contiguous; ``R (dh, n)``, ``U (dk, n)`` any float dtype (a common
    16-bit dtype is used as is, anything else goes in as fp32, e.g. the float64 solution).
    """
    check_update_args(W, R, U, transposed)
    Wm, P, Q = lowrank_operands(W, R, U, transposed)
    for launch in plan_lowrank_update(Wm, P, Q):
        launch.run()


def triton_dense_update(W: torch.Tensor, D: torch.Tensor, transposed: bool) -> None:
    """``W += D^T`` in place (``W += D`` when ``transposed``) for ``D (dk, dh)`` (any float
    dtype, read as fp32), ``W`` in any layout: one pass of the add kernel."""
    check_dense_args(W, D, transposed)
    plan_add_update(W, D.to(torch.float32), transposed).run()


@dataclass
class GemmStep:
    """One GEMM of the blocked solve: ``C = A @ B`` or ``C -= A @ B`` (``subtract``)."""

    C: torch.Tensor
    A: torch.Tensor
    B: torch.Tensor
    subtract: bool

    def run_cublas(self) -> None:
        if self.subtract:
            self.C.addmm_(self.A, self.B, alpha=-1.0)
        elif self.C.is_contiguous():
            torch.mm(self.A, self.B, out=self.C)
        else:  # K R^T into the first columns of a padded buffer
            self.C.copy_(torch.mm(self.A, self.B))

    def launch(self, cfg: KernelConfig, precision: str | None = None) -> Launch:
        (M, K), N = self.A.shape, self.B.shape[1]
        args = (
            self.C,
            self.A,
            self.B,
            M,
            N,
            K,
            self.C.stride(0),
            self.A.stride(0),
            self.A.stride(1),
            self.B.stride(0),
            self.B.stride(1),
        )
        constexprs = dict(
            SUBTRACT=self.subtract,
            BLOCK_M=cfg.block_m,
            BLOCK_N=cfg.block_n,
            BLOCK_K=cfg.block_k,
            GROUP=cfg.group,
            PRECISION=fp32_dot_precision(self.C.device, precision),
        )
        return Launch(
            _gemm_kernel, _grid_2d(M, N, cfg), args, constexprs, cfg.num_warps, cfg.num_stages
        )


def diagonal_block_inverses(L: torch.Tensor, block: int) -> torch.Tensor:
    """``(nb, block, block)`` fp32 inverses of the diagonal blocks of the lower-triangular
    ``L``, computed in float64 (the last block padded with the identity)."""
    dk = L.shape[0]
    nb = triton.cdiv(dk, block)
    eye = torch.eye(block, dtype=torch.float64, device=L.device)
    Lb = eye.repeat(nb, 1, 1)
    for b in range(nb):
        s, e = b * block, min((b + 1) * block, dk)
        Lb[b, : e - s, : e - s] = L[s:e, s:e].tril()
    return torch.linalg.solve_triangular(Lb, eye.expand(nb, block, block), upper=False).to(
        torch.float32
    )


def solve_steps(
    L: torch.Tensor, Y: torch.Tensor, Z: torch.Tensor, block: int, Linv: torch.Tensor
) -> list[GemmStep]:
    """The GEMMs that turn ``Y = K`` (fp32, overwritten) into ``Y = (L L^T)^-1 K``, with
    ``Z`` a workspace of the same shape and ``Linv`` from ``diagonal_block_inverses``. Forward sweep ``L Z = Y``: per block
    ``Z_b = Linv_b Y_b``, ``Y_after -= L_after,b Z_b``. Backward sweep ``L^T Y = Z``: per
    block from the last, ``Y_b = Linv_b^T Z_b``, ``Z_before -= (L_b,before)^T Y_b``."""
    dk = L.shape[0]
    nb = triton.cdiv(dk, block)
    steps = []
    for b in range(nb):
        s, e = b * block, min((b + 1) * block, dk)
        steps.append(GemmStep(Z[s:e], Linv[b, : e - s, : e - s], Y[s:e], subtract=False))
        if e < dk:
            steps.append(GemmStep(Y[e:], L[e:, s:e], Z[s:e], subtract=True))
    for b in reversed(range(nb)):
        s, e = b * block, min((b + 1) * block, dk)
        steps.append(GemmStep(Y[s:e], Linv[b, : e - s, : e - s].T, Z[s:e], subtract=False))
        if s > 0:
            steps.append(GemmStep(Z[:s], L[s:e, :s].T, Y[s:e], subtract=True))
    return steps


@dataclass
class SolvePlan:
    """The blocked solve of one fused solve/update, in the order ``solve_order`` picked.

    ``"keys"``: ``Y`` starts as the keys (an fp32 copy) and ends as ``U = A^-1 K`` (its
    first ``n`` columns), then ``W += R U^T``. ``"update"``: ``first`` (``Y = K R^T``) fills
    ``Y``, the solve turns it into ``dW^T = A^-1 K R^T`` (first ``dh`` columns), then
    ``W += dW``. The rest of ``Y``'s columns are zero padding, which solves to zero."""

    order: str
    first: GemmStep | None
    steps: list[GemmStep]
    Y: torch.Tensor
    width: int  # the columns of Y that hold the result

    @property
    def result(self) -> torch.Tensor:
        return self.Y[:, : self.width]


def _fp32_padded(x: torch.Tensor, pad: int) -> torch.Tensor:
    x = x.to(torch.float32)
    return torch.nn.functional.pad(x, (0, pad)) if pad else x


def _solve_plan(
    L: torch.Tensor,
    K: torch.Tensor,
    R: torch.Tensor,
    solve_block: int | None,
    order: str,
    arch: int,
) -> SolvePlan:
    """The GEMM steps of the fused solve/update and the buffer they leave the result in
    (``solve_block`` unset or 0: ``SOLVE_BLOCKS[arch]``)."""
    block = solve_block or SOLVE_BLOCKS[arch]
    if block < 1:
        raise ValueError(f"solve_block must be positive, got {block}")
    block = min(block, max(L.shape[0], 1))  # one block at most as wide as the matrix
    order = solve_order(order, R.shape[0], K.shape[1])
    Linv = diagonal_block_inverses(L, block)  # from L as given (float64 stays float64)
    Lf = L if L.dtype == torch.float32 else L.to(torch.float32)
    dk, n = K.shape
    first = None
    if order == "keys":
        width = n
        # Zero right-hand sides up to a multiple of 16 solve to zero and cost little; they
        # let the GEMMs' column masks and strides specialize, which vectorizes their loads.
        pad = _pad_columns(n, K.device)
        # One copy of K either way (the padded one is new; the solve overwrites Y).
        Y = (
            _fp32_padded(K, pad)
            if pad
            else K.to(torch.float32, memory_format=torch.contiguous_format, copy=True)
        )
    else:
        width = R.shape[0]
        Y = torch.zeros(dk, width + _pad_columns(width, K.device), device=K.device)
        # K R^T: the inner dimension n padded too (zero columns of both add nothing).
        pad_n = _pad_columns(n, K.device)
        Kf, Rf = _fp32_padded(K, pad_n), _fp32_padded(R, pad_n)
        first = GemmStep(Y[:, :width], Kf, Rf.T, subtract=False)
    Z = torch.empty_like(Y)
    return SolvePlan(order, first, solve_steps(Lf, Y, Z, block, Linv), Y, width)


def plan_add_update(W: torch.Tensor, D: torch.Tensor, transposed: bool) -> Launch:
    """The launch of ``W += D^T`` (``W += D`` when ``transposed``) for the ``(dk, dh)``
    fp32 ``D`` of the ``"update"`` order; ``W`` in any layout."""
    Dm = D if transposed else D.T
    M, N = W.shape
    args = (W, Dm, M, N, W.stride(0), W.stride(1), Dm.stride(0), Dm.stride(1))
    grid = (triton.cdiv(M, ADD_BLOCK), triton.cdiv(N, ADD_BLOCK))
    return Launch(_add_kernel, grid, args, dict(BLOCK_M=ADD_BLOCK, BLOCK_N=ADD_BLOCK), 4, 1)


def _pad_columns(n: int, device: torch.device) -> int:
    """Zero columns to add to ``n`` on ``device``: up to a multiple of 16 on CUDA and on the
    meta device (where the ahead-of-time build plans the GPU's launches), none elsewhere
    (the interpreter pays for every column)."""
    return -n % 16 if device.type in ("cuda", "meta") else 0


def plan_fused_solve_update(
    W: torch.Tensor,
    L: torch.Tensor,
    K: torch.Tensor,
    R: torch.Tensor,
    transposed: bool,
    *,
    arch: int | None = None,
    solve_block: int | None = None,
    precision: str | None = None,
    order: str = "auto",
) -> list[Launch]:
    """Every launch of ``triton_fused_solve_update``, in order (workspaces allocated here,
    on ``W.device``; the diagonal-block inverses computed here)."""
    if arch is None:
        arch = arch_of(W.device)
    plan = _solve_plan(L, K, R, solve_block, order, arch)
    cfg = SOLVE_GEMM_CONFIGS[arch]
    launches = [st.launch(cfg, precision) for st in plan.steps]
    if plan.order == "update":
        # K R^T at the precision the rank-n product would have had (IEEE for an fp32 W).
        first_precision = update_precision(W.dtype, torch.float32, W.device, precision)
        return (
            [plan.first.launch(cfg, first_precision)]
            + launches
            + [plan_add_update(W, plan.result, transposed)]
        )
    # The last launch reads Y as the solves leave it, so it must get Y itself, not a copy
    # made now: R is padded to Y's width instead (zero columns add nothing).
    Y = plan.Y
    Rp = _fp32_padded(R, Y.shape[1] - R.shape[1])
    Wm, P, Q = lowrank_operands(W, Rp, Y, transposed)
    if Y.data_ptr() not in (P.data_ptr(), Q.data_ptr()):
        raise AssertionError("plan_fused_solve_update: the update would read a copy of Y")
    return launches + plan_lowrank_update(Wm, P, Q, arch=arch, precision=precision)


def triton_fused_solve_update(
    W: torch.Tensor,
    L: torch.Tensor,
    K: torch.Tensor,
    R: torch.Tensor,
    transposed: bool,
    *,
    solve_block: int | None = None,
    gemm_backend: str = "triton",
    precision: str | None = None,
    order: str = "auto",
) -> None:
    """``W += R (A^-1 K)^T`` with ``A = L L^T``, without forming ``A^-1``.

    ``L (dk, dk)`` lower Cholesky factor of ``lambda C + K K^T`` (read as fp32; float64 is
    rounded to fp32: this is the low-precision option); ``K (dk, n)``; ``R (dh, n)``;
    ``W`` as in ``triton_lowrank_update``.
    ``order`` (``reference.solve_order``): ``"keys"`` solves for ``U = A^-1 K`` (two
    ``(dk, n)`` fp32 workspaces) and writes ``R U^T`` with the rank-n kernel, the dense
    update never formed; ``"update"`` forms ``K R^T`` and solves for ``dW^T`` in place (two
    ``(dk, dh)`` workspaces, the fp32 dense update being the solve's own buffer), then one
    add; ``"auto"``: ``"update"`` when ``dh < n``, which is fewer flops and less memory.
    ``gemm_backend``: ``"triton"`` (bf16x6 tensor-core GEMMs) or ``"cublas"`` (fp32
    ``addmm``) for the GEMMs of the solve (and ``K R^T``), the final update then the Triton
    kernel; or ``"cublas-split"``: every GEMM, the final product included, as one cuBLAS
    bf16 GEMM over the six split products (``update_gemm.py``; the arithmetic of ``bf16x6``).
    ``precision``: the ``tl.dot`` input precision of the fp32 GEMMs on the GPU (default
    ``fp32_dot_precision``, the 6-pass ``bf16x6``; ``bf16x3`` halves the tensor-core work
    for products good to about 2^-16 relative; the interpreter always computes IEEE fp32).
    """
    check_solve_args(W, L, K, R, transposed)
    if precision is not None and precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if gemm_backend == "triton":
        for launch in plan_fused_solve_update(
            W, L, K, R, transposed, solve_block=solve_block, precision=precision, order=order
        ):
            launch.run()
        return
    if gemm_backend not in ("cublas", "cublas-split"):
        raise ValueError(
            f"gemm_backend must be 'triton', 'cublas' or 'cublas-split', got {gemm_backend!r}"
        )
    plan = _solve_plan(L, K, R, solve_block, order, arch_of(W.device))
    steps = ([plan.first] if plan.first is not None else []) + plan.steps
    if gemm_backend == "cublas-split":
        from .update_gemm import run_split_step, split_lowrank_update

        for st in steps:
            run_split_step(st)
        if plan.order == "update":
            torch_dense_update(W, plan.result, transposed)  # fp32 add, rounded once
        else:
            split_lowrank_update(W, R, plan.result, transposed)
        return
    for st in steps:
        st.run_cublas()
    if plan.order == "update":
        plan_add_update(W, plan.result, transposed).run()
    else:
        triton_lowrank_update(W, R, plan.result, transposed)

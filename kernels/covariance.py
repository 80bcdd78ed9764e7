"""``C += X^T X`` over the kept rows of ``X``: Triton kernel, plan and launcher.

The kernel computes only the lower triangle of tiles (``i >= j`` at tile level, diagonal
tiles in full), which is half the work of a dense GEMM; ``covariance_finalize`` mirrors the
strict lower triangle into the upper one once, after the whole pass.

One program per lower-triangle tile, streaming ``X`` through the reduction over rows
(tokens) in ``block_k`` steps. Masked-out rows are never loaded (their memory may hold
anything, NaN included). Accumulation is fp32 for every input dtype: 16-bit inputs go to
the tensor cores with fp32 accumulators (their products are exact in fp32); fp32 inputs use
the 6-pass bf16 split (``bf16x6``, see ``_launch.fp32_dot_precision``), whose products are
good to about fp32 rounding, never single-pass TF32.

Tile order: row groups of ``group`` tile rows are walked column by column (the usual GEMM
swizzle, restricted to the triangle), so the tiles in flight at once share a few column
blocks of ``X`` in L2.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import KernelConfig, Launch, arch_of, fp32_dot_precision
from .reference import check_covariance_args

# (arch family, operand kind) -> tile config. Square tiles (block_m == block_n).
# sm_90: 128x128x64 bf16/fp16 tiles with 8 warps (two warpgroups) compile to wgmma.
COVARIANCE_CONFIGS: dict[tuple[int, str], KernelConfig] = {
    (90, "16bit"): KernelConfig(128, 128, 64, 8, num_warps=8, num_stages=4),
    (90, "fp32"): KernelConfig(128, 128, 32, 8, num_warps=8, num_stages=3),
    (80, "16bit"): KernelConfig(128, 128, 32, 8, num_warps=4, num_stages=4),
    (80, "fp32"): KernelConfig(128, 128, 16, 8, num_warps=4, num_stages=4),
}

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def operand_kind(dtype: torch.dtype) -> str:
    return "fp32" if dtype == torch.float32 else "16bit"


def dot_precision(dtype: torch.dtype, device: torch.device) -> str:
    """``tl.dot`` input precision: ``fp32_dot_precision`` for fp32 operands; 16-bit operands
    ignore it."""
    return fp32_dot_precision(device) if dtype == torch.float32 else "ieee"


@triton.jit
def _triangular_row(p):
    """Row of entry ``p`` in the row-wise enumeration of a lower triangle: the largest ``r``
    with ``r (r + 1) / 2 <= p`` (float32 square root, corrected by one either way)."""
    r = ((tl.sqrt((8 * p + 1).to(tl.float32)) - 1.0) * 0.5).to(tl.int32)
    r = tl.where((r + 1) * (r + 2) // 2 <= p, r + 1, r)
    return tl.where(r * (r + 1) // 2 > p, r - 1, r)


# D is specialized (divisible by 16 or not): the column masks then hold across 16-element
# groups, so the 16-bit loads vectorize and become asynchronous copies, pipelined over
# num_stages buffers with one wgmma group in flight (sm_90 PTX). Unspecialized, they were
# scalar, synchronous loads with one buffer, and the kernel ran at 17 % of the dense bf16
# GEMM on an H200. T only bounds the rows (its mask is uniform along a row): not
# specialized, one compiled variant fewer.
@triton.jit(do_not_specialize=["T"])
def _covariance_kernel(
    C_ptr,
    X_ptr,
    M_ptr,
    T,
    D,
    stride_xt,
    stride_c,
    HAS_MASK: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_T: tl.constexpr,
    GROUP: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    nb = tl.cdiv(D, BLOCK)
    # Group of GROUP tile rows starting at g0: tiles g0 (g0 + 1) / 2 ... in this order:
    # the rectangle of columns 0 .. g0 - 1 column by column, then the triangle on the
    # diagonal row by row.
    g0 = (_triangular_row(pid) // GROUP) * GROUP
    rows = tl.minimum(GROUP, nb - g0)
    local = pid - g0 * (g0 + 1) // 2
    rect = g0 * rows
    l2 = tl.maximum(local - rect, 0)
    rr = _triangular_row(l2)
    in_rect = local < rect
    bi = tl.where(in_rect, g0 + local % rows, g0 + rr)
    bj = tl.where(in_rect, local // rows, g0 + l2 - rr * (rr + 1) // 2)

    offs_i = bi * BLOCK + tl.arange(0, BLOCK)
    offs_j = bj * BLOCK + tl.arange(0, BLOCK)
    offs_t = tl.arange(0, BLOCK_T)
    mask_i = offs_i < D
    mask_j = offs_j < D
    # Pointers advance by BLOCK_T rows per step (64-bit pointer arithmetic), so t * d may
    # exceed 2^31.
    a_ptrs = X_ptr + offs_t[:, None] * stride_xt + offs_i[None, :]
    b_ptrs = X_ptr + offs_t[:, None] * stride_xt + offs_j[None, :]
    m_ptrs = M_ptr + offs_t
    acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
    for t0 in range(0, T, BLOCK_T):
        keep = offs_t < T - t0
        if HAS_MASK:
            keep = keep & (tl.load(m_ptrs, mask=keep, other=0) != 0)
        a = tl.load(a_ptrs, mask=keep[:, None] & mask_i[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=keep[:, None] & mask_j[None, :], other=0.0)
        acc = tl.dot(tl.trans(a), b, acc, input_precision=PRECISION)
        a_ptrs += BLOCK_T * stride_xt
        b_ptrs += BLOCK_T * stride_xt
        m_ptrs += BLOCK_T

    c_ptrs = C_ptr + offs_i[:, None].to(tl.int64) * stride_c + offs_j[None, :]
    c_mask = mask_i[:, None] & mask_j[None, :]
    c = tl.load(c_ptrs, mask=c_mask, other=0.0)
    tl.store(c_ptrs, c + acc, mask=c_mask)


def covariance_config(arch: int, dtype: torch.dtype) -> KernelConfig:
    return COVARIANCE_CONFIGS[(arch, operand_kind(dtype))]


def plan_covariance_accumulate(
    C: torch.Tensor,
    X: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    arch: int | None = None,
    config: KernelConfig | None = None,
) -> list[Launch]:
    """The launches of ``C += X^T X`` (lower triangle of tiles). Inputs as in
    ``triton_covariance_accumulate``, already checked; ``X`` has unit stride along ``d``.
    ``arch`` picks the config (default: from ``X.device``)."""
    t, d = X.shape
    if arch is None:
        arch = arch_of(X.device)
    cfg = config or covariance_config(arch, X.dtype)
    if cfg.block_m != cfg.block_n:
        raise ValueError(f"covariance tiles must be square, got {cfg}")
    if mask is not None:
        mask = (mask if mask.dtype == torch.bool else mask != 0).view(torch.uint8)
    nb = triton.cdiv(d, cfg.block_m)
    grid = (nb * (nb + 1) // 2 if t > 0 else 0,)
    args = (C, X, X if mask is None else mask, t, d, X.stride(0), C.stride(0))
    constexprs = dict(
        HAS_MASK=mask is not None,
        BLOCK=cfg.block_m,
        BLOCK_T=cfg.block_k,
        GROUP=cfg.group,
        PRECISION=dot_precision(X.dtype, X.device),
    )
    return [Launch(_covariance_kernel, grid, args, constexprs, cfg.num_warps, cfg.num_stages)]


def triton_covariance_accumulate(
    C: torch.Tensor, X: torch.Tensor, mask: torch.Tensor | None = None
) -> None:
    """``C (d, d) fp32 += X^T X`` over the rows of ``X (t, d)`` that ``mask (t,)`` keeps,
    **lower triangle only** (tiles on the diagonal in full); call ``covariance_finalize``
    once after the last batch. ``X`` fp32, fp16 or bf16; ``mask`` bool or numeric
    (nonzero keeps). ``C`` must be contiguous. No host synchronization."""
    check_covariance_args(C, X, mask)
    if C.dtype != torch.float32:
        raise TypeError(f"triton_covariance_accumulate: C must be float32, got {C.dtype}")
    if X.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"triton_covariance_accumulate: X dtype {X.dtype} not in {SUPPORTED_DTYPES}"
        )
    if not C.is_contiguous():
        raise ValueError("triton_covariance_accumulate: C must be contiguous")
    if X.stride(1) != 1:
        X = X.contiguous()
    if mask is not None and mask.stride(0) != 1:
        mask = mask.contiguous()
    for launch in plan_covariance_accumulate(C, X, mask):
        launch.run()

"""covariance_accumulate / covariance_finalize: Triton kernel against the torch reference.

Without a GPU the kernel runs under the Triton interpreter (conftest sets TRITON_INTERPRET=1)
on CPU tensors, with the sm_90 block configuration; with one, on CUDA tensors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from kernel_utils import (
    assert_error_within,
    assert_guards_intact,
    assert_verbose_allclose,
    fill_guarded,
    limit_blas_threads,
)
from memit_fast.kernels import covariance_finalize, torch_covariance_accumulate

triton = pytest.importorskip("triton")

from memit_fast.kernels._launch import KernelConfig  # noqa: E402
from memit_fast.kernels.covariance import (  # noqa: E402
    plan_covariance_accumulate,
    triton_covariance_accumulate,
)

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if CUDA else [])
EPS32 = 2.0**-24

limit_blas_threads(1)


def make_inputs(t: int, d: int, dtype: torch.dtype, mask_kind: str | None, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(t, d, generator=g).to(dtype)
    if mask_kind is None:
        mask = None
    elif mask_kind == "all":
        mask = torch.ones(t, dtype=torch.bool)
    elif mask_kind == "none":
        mask = torch.zeros(t, dtype=torch.bool)
    else:
        mask = torch.rand(t, generator=g) < 0.6
        mask[0] = False  # at least one row dropped
    if mask is not None:
        # Dropped rows hold garbage: it must never reach C.
        X[~mask] = torch.tensor([float("nan"), float("inf"), -float("inf")]).repeat(d)[:d].to(dtype)
    C0 = torch.randn(d, d, generator=g)
    return X, mask, C0


def exact_result(C0: torch.Tensor, X: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """float64: sym(lower(C0)) + X_kept^T X_kept, which is what accumulate + finalize give."""
    Xd = X.to(torch.float64)
    if mask is not None:
        Xd = Xd[mask]
    lower = C0.to(torch.float64).tril()
    return lower + lower.tril(-1).T + Xd.T @ Xd


def run_kernel(C: torch.Tensor, X: torch.Tensor, mask: torch.Tensor | None, batches: int) -> None:
    """Stream X in ``batches`` calls, as the statistics hook does batch by batch."""
    bounds = [X.shape[0] * i // batches for i in range(batches + 1)]
    for a, b in zip(bounds[:-1], bounds[1:]):
        triton_covariance_accumulate(C, X[a:b], None if mask is None else mask[a:b])


MASKS = [None, "all", "none", "some"]
# Every mask kind for the small sizes; d = 1000 (a grid of 36 tiles, slow in the
# interpreter) with fewer combinations.
CASES = [(t, d, m) for d in (1, 7, 129) for t in (1, 3, 513) for m in MASKS] + [
    (1, 1000, None),
    (3, 1000, "none"),
    (3, 1000, "some"),
    (513, 1000, None),
    (513, 1000, "some"),
]


@pytest.mark.parametrize("t,d,mask_kind", CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_reference(t, d, dtype, mask_kind):
    X, mask, C0 = make_inputs(t, d, dtype, mask_kind)
    exact = exact_result(C0, X, mask)
    C, buf, pad = fill_guarded((d, d), torch.float32, C0, DEVICE)
    X = X.to(DEVICE)
    m = None if mask is None else mask.to(DEVICE)
    run_kernel(C, X, m, batches=2 if d < 1000 else 1)
    # Before finalize the lower triangle is complete.
    info = f"d={d} t={t} {dtype} mask={mask_kind}: "
    # Worst-case fp32 accumulation bound: (t + 2) eps sum_t |x_ti x_tj| <= (t + 2) eps scale.
    kept = X.cpu().to(torch.float64) if mask is None else X.cpu().to(torch.float64)[mask]
    scale = float((kept**2).sum(0).max()) if kept.numel() else 0.0
    tol = dict(rtol=8 * EPS32, atol=2 * (t + 2) * EPS32 * scale + 1e-30)
    assert_verbose_allclose(C.cpu().tril(), exact.tril(), **tol, extra_info=info + "lower: ")
    covariance_finalize(C)
    assert_verbose_allclose(C.cpu(), exact, **tol, extra_info=info)
    assert_guards_intact(buf, pad)
    # Within a small multiple of plain torch's fp32 error (both against float64).
    Cref = C0.clone().to(DEVICE)
    torch_covariance_accumulate(Cref, X, m)
    covariance_finalize(Cref)
    assert_error_within(C.cpu(), exact, Cref.cpu(), factor=4.0, floor=4 * t * EPS32 * scale)


def test_reference_full_matrix_and_finalize_idempotent():
    X, mask, _ = make_inputs(50, 33, torch.float16, "some")
    C = torch.zeros(33, 33)
    torch_covariance_accumulate(C, X, mask)
    exact = exact_result(torch.zeros(33, 33), X, mask)
    assert_verbose_allclose(C, exact, rtol=1e-5, atol=1e-4)
    covariance_finalize(C)
    once = C.clone()
    covariance_finalize(C)
    assert torch.equal(C, once)
    assert torch.equal(C, C.T)


def test_paths_mix_within_one_pass():
    """Reference for one batch, kernel for the next, one finalize: still correct."""
    X, mask, _ = make_inputs(40, 130, torch.float32, "some", seed=3)
    C = torch.zeros(130, 130, device=DEVICE)
    Xd, md = X.to(DEVICE), mask.to(DEVICE)
    torch_covariance_accumulate(C, Xd[:20], md[:20])
    triton_covariance_accumulate(C, Xd[20:], md[20:])
    covariance_finalize(C)
    exact = exact_result(torch.zeros(130, 130), X, mask)
    assert_verbose_allclose(C.cpu(), exact, rtol=1e-5, atol=1e-4)


def test_strided_inputs_and_numeric_mask():
    """X a column slice of a wider buffer (row stride > d), X with no unit stride along d,
    and a 0/1 float mask."""
    g = torch.Generator().manual_seed(5)
    big = torch.randn(37, 200, generator=g).to(DEVICE)
    mask = (torch.rand(37, generator=g) < 0.5).float().to(DEVICE)
    for X in (big[:, 3:140], big.T.contiguous().T[:, :50]):
        d = X.shape[1]
        C = torch.zeros(d, d, device=DEVICE)
        triton_covariance_accumulate(C, X, mask)
        covariance_finalize(C)
        exact = exact_result(torch.zeros(d, d), X.cpu(), mask.cpu() != 0)
        assert_verbose_allclose(C.cpu(), exact, rtol=1e-5, atol=1e-4)


def test_tile_order_covers_triangle_with_many_groups():
    """Small tiles so the grid has many row groups and a partial last group: every element
    of the lower triangle is written exactly once (C starts at zero, X is all ones, so each
    element must be exactly t)."""
    t, d = 2, 16 * 13 + 5  # 14 tile rows: groups of 5, 5 and 4
    cfg = KernelConfig(16, 16, 16, group=5, num_warps=4, num_stages=1)
    X = torch.ones(t, d, device=DEVICE)
    C = torch.zeros(d, d, device=DEVICE)
    for launch in plan_covariance_accumulate(C, X, None, config=cfg):
        launch.run()
    lower = torch.ones(d, d, dtype=torch.bool).tril()
    assert torch.all(C.cpu()[lower] == t), "some lower-triangle element not written exactly once"


def _tile_of(pid: np.ndarray, nb: int, group: int) -> tuple[np.ndarray, np.ndarray]:
    """NumPy mirror of the kernel's pid -> (tile row, tile column), float32 sqrt included."""

    def tri_row(p):
        r = ((np.sqrt((8 * p + 1).astype(np.float32)) - np.float32(1)) * np.float32(0.5)).astype(
            np.int64
        )
        r = np.where((r + 1) * (r + 2) // 2 <= p, r + 1, r)
        return np.where(r * (r + 1) // 2 > p, r - 1, r)

    r = tri_row(pid)
    g0 = (r // group) * group
    rows = np.minimum(group, nb - g0)
    local = pid - g0 * (g0 + 1) // 2
    rect = g0 * rows
    l2 = np.maximum(local - rect, 0)
    rr = tri_row(l2)
    in_rect = local < rect
    bi = np.where(in_rect, g0 + local % rows, g0 + rr)
    bj = np.where(in_rect, local // rows, g0 + l2 - rr * (rr + 1) // 2)
    return bi, bj


@pytest.mark.parametrize("nb", [1, 2, 7, 8, 9, 17, 129, 224, 1000])
def test_tile_order_formula_is_a_bijection(nb):
    """The enumeration (with its float32 square roots) up to d = 128 000 with 128 tiles."""
    pid = np.arange(nb * (nb + 1) // 2, dtype=np.int64)
    bi, bj = _tile_of(pid, nb, 8)
    assert np.all((0 <= bj) & (bj <= bi) & (bi < nb))
    assert len(set(zip(bi.tolist(), bj.tolist()))) == pid.size


def test_empty_inputs_are_no_ops():
    C = torch.ones(5, 5, device=DEVICE)
    triton_covariance_accumulate(C, torch.zeros(0, 5, device=DEVICE))
    assert torch.equal(C.cpu(), torch.ones(5, 5))
    C0 = torch.zeros(0, 0, device=DEVICE)
    triton_covariance_accumulate(C0, torch.zeros(4, 0, device=DEVICE))


@pytest.mark.parametrize(
    "C,X,mask,err",
    [
        (torch.zeros(4, 4), torch.zeros(3, 5), None, ValueError),
        (torch.zeros(4, 4, dtype=torch.float16), torch.zeros(3, 4), None, TypeError),
        (torch.zeros(4, 4), torch.zeros(3, 4, dtype=torch.int32), None, TypeError),
        (torch.zeros(4, 4), torch.zeros(3, 4), torch.ones(2, dtype=torch.bool), ValueError),
        (torch.zeros(4, 4), torch.zeros(2, 3, 4), None, ValueError),
    ],
)
def test_bad_arguments_are_named(C, X, mask, err):
    with pytest.raises(err, match="covariance_accumulate"):
        torch_covariance_accumulate(C, X, mask)
    with pytest.raises(err, match="covariance_accumulate"):
        triton_covariance_accumulate(C, X, mask)

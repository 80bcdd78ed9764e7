"""lowrank_update and fused_solve_update: Triton kernels against the torch references.

Without a GPU the kernels run under the Triton interpreter on CPU tensors (sm_90 block
configuration; the interpreter computes fp32 dots in IEEE fp32, so the bf16x6 split of the
GPU is not exercised here)."""

from __future__ import annotations

import pytest
import torch
from kernel_utils import (
    assert_error_within,
    assert_guards_intact,
    assert_verbose_allclose,
    fill_guarded,
    limit_blas_threads,
)
from memit_fast.kernels import torch_dense_update, torch_fused_solve_update, torch_lowrank_update

pytest.importorskip("triton")

from memit_fast.kernels.update import (  # noqa: E402
    triton_dense_update,
    triton_fused_solve_update,
    triton_lowrank_update,
)

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
W_DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if CUDA else [])
EPS32 = 2.0**-24
UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}

limit_blas_threads(1)


def w_shape(dh: int, dk: int, transposed: bool) -> tuple[int, int]:
    return (dk, dh) if transposed else (dh, dk)


def exact_update(W0: torch.Tensor, R: torch.Tensor, U: torch.Tensor, transposed: bool):
    dW = R.to(torch.float64) @ U.to(torch.float64).T
    return W0.to(torch.float64) + (dW.T if transposed else dW)


def check_rounded_once(W: torch.Tensor, exact: torch.Tensor, R, U, info: str) -> None:
    """``W`` is ``exact`` rounded into ``W.dtype``, up to one rounding step plus the fp32
    accumulation error of the product."""
    u = UNIT_ROUNDOFF[W.dtype]
    n = R.shape[1]
    prod_scale = (R.abs().to(torch.float64).max() * U.abs().to(torch.float64).max()).item()
    atol = 2 * (n + 2) * EPS32 * prod_scale + 1e-30
    assert_verbose_allclose(W.cpu(), exact, rtol=2 * u, atol=atol, extra_info=info)


SIZES = [(1, 1), (7, 129), (129, 7), (1000, 129), (129, 1000)]


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("n", [1, 5, 64])
@pytest.mark.parametrize("dh,dk", SIZES)
@pytest.mark.parametrize("w_dtype", W_DTYPES)
def test_lowrank_matches_reference(w_dtype, dh, dk, n, transposed):
    g = torch.Generator().manual_seed(dh * 7 + dk + n)
    W0 = torch.randn(w_shape(dh, dk, transposed), generator=g).to(w_dtype)
    R = torch.randn(dh, n, generator=g)  # fp32 residuals
    U = torch.randn(dk, n, generator=g, dtype=torch.float64) / 8  # float64 solve output
    info = f"W {w_dtype} dh={dh} dk={dk} n={n} transposed={transposed}: "
    W, buf, pad = fill_guarded(W0.shape, w_dtype, W0, DEVICE)
    triton_lowrank_update(W, R.to(DEVICE), U.to(DEVICE), transposed)
    assert_guards_intact(buf, pad)
    exact = exact_update(W0, R, U, transposed)
    check_rounded_once(W, exact, R, U, info)
    Wref = W0.clone().to(DEVICE)
    torch_lowrank_update(Wref, R.to(DEVICE), U.to(DEVICE), transposed)
    if w_dtype == torch.float32:
        assert_error_within(
            W.cpu(), exact, Wref.cpu(), factor=4.0, floor=8 * EPS32, extra_info=info
        )
    else:
        # Rounded once: at most one unit in the last place away from the reference.
        ulp = 2 * UNIT_ROUNDOFF[w_dtype] * Wref.cpu().to(torch.float64).abs().clamp_min(1e-3)
        assert torch.all((W.cpu().to(torch.float64) - Wref.cpu().to(torch.float64)).abs() <= ulp)


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("dh,dk", SIZES)
@pytest.mark.parametrize("w_dtype", W_DTYPES)
def test_dense_update_matches_reference(w_dtype, dh, dk, transposed):
    """``W += D^T`` (the update order's ``dW^T (dk, dh)``, float64 from the solve): W is the
    float64 sum rounded once, the same bits as the reference, and nothing outside W is
    written."""
    g = torch.Generator().manual_seed(dh * 5 + dk)
    W0 = torch.randn(w_shape(dh, dk, transposed), generator=g).to(w_dtype)
    D = torch.randn(dk, dh, generator=g, dtype=torch.float64) / 8
    W, buf, pad = fill_guarded(W0.shape, w_dtype, W0, DEVICE)
    triton_dense_update(W, D.to(DEVICE), transposed)
    assert_guards_intact(buf, pad)
    assert not torch.isnan(W).any()
    Wref = W0.clone().to(DEVICE)
    torch_dense_update(Wref, D.to(DEVICE), transposed)
    assert torch.equal(W.cpu(), Wref.cpu())
    exact = W0.to(torch.float64) + (D if transposed else D.T)
    u = UNIT_ROUNDOFF[w_dtype]
    assert_verbose_allclose(W.cpu(), exact, rtol=2 * u, atol=2 * EPS32, extra_info=f"{w_dtype}")


def test_dense_update_bad_shape_is_named():
    with pytest.raises(ValueError, match=r"needs D \(dk, dh\) = \(4, 3\)"):
        torch_dense_update(torch.zeros(3, 4), torch.zeros(3, 4), False)


@pytest.mark.parametrize("dtype", [torch.float16] + ([torch.bfloat16] if CUDA else []))
def test_lowrank_16bit_operands(dtype):
    """R and U in the weight's 16-bit dtype go to the kernel as they are (exact products)."""
    g = torch.Generator().manual_seed(11)
    W0 = torch.randn(129, 70, generator=g).to(dtype)
    R = torch.randn(129, 33, generator=g).to(dtype)
    U = torch.randn(70, 33, generator=g).to(dtype)
    W = W0.clone().to(DEVICE)
    triton_lowrank_update(W, R.to(DEVICE), U.to(DEVICE), False)
    check_rounded_once(W, exact_update(W0, R, U, False), R, U, "16-bit operands: ")


def test_lowrank_weight_given_as_transposed_view():
    """A column-contiguous W (a ``.T`` view) is updated in place through its storage."""
    g = torch.Generator().manual_seed(12)
    base = torch.randn(40, 130, generator=g).to(DEVICE)  # storage of W^T
    W = base.T  # (130, 40), strides (1, 130)
    W0 = W.cpu().clone()
    R, U = torch.randn(130, 6, generator=g), torch.randn(40, 6, generator=g)
    triton_lowrank_update(W, R.to(DEVICE), U.to(DEVICE), False)
    assert_verbose_allclose(base.T.cpu(), exact_update(W0, R, U, False), rtol=1e-5, atol=1e-5)


def make_system(dk: int, n: int, dh: int, seed: int):
    """``L`` of ``A = lambda C + K K^T`` (float64), keys, residuals; lambda scaled like the
    published settings relative to the keys."""
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(dk, 4 * dk + 8, generator=g, dtype=torch.float64)
    C = keys @ keys.T / keys.shape[1]
    K = torch.randn(dk, n, generator=g, dtype=torch.float64)
    A = 2.0 * C + K @ K.T
    L = torch.linalg.cholesky(A)
    R = torch.randn(dh, n, generator=g, dtype=torch.float64)
    return L, K, R


@pytest.mark.parametrize("order", ["keys", "update"])
@pytest.mark.parametrize("backend", ["triton", "cublas-split"])
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("solve_block", [None, 32])
@pytest.mark.parametrize("n", [1, 5, 64])
@pytest.mark.parametrize("dk", [1, 7, 129])
@pytest.mark.parametrize("w_dtype", W_DTYPES)
def test_fused_solve_update_matches_reference(
    w_dtype, dk, n, solve_block, transposed, backend, order
):
    """``backend``: Triton bf16x6 GEMMs, or every product one bf16 GEMM over six split
    products (``cublas-split``; fp32 emulation of the same products on the CPU). ``order``:
    the solve takes the keys, or the columns of ``K R^T`` (``dh = 7`` is then more or fewer
    right-hand sides than ``n``)."""
    dh = 7
    L, K, R = make_system(dk, n, dh, seed=dk * 100 + n)
    g = torch.Generator().manual_seed(1)
    # Small weights, so that the solve's error is not hidden under W's own rounding.
    W0 = (torch.randn(w_shape(dh, dk, transposed), generator=g) / 64).to(w_dtype)
    info = f"{backend} {order} W {w_dtype} dk={dk} n={n} block={solve_block} T={transposed}: "
    W, buf, pad = fill_guarded(W0.shape, w_dtype, W0, DEVICE)
    Lf, Kf, Rf = (x.to(torch.float32).to(DEVICE) for x in (L, K, R))
    triton_fused_solve_update(
        W, Lf, Kf, Rf, transposed, solve_block=solve_block, gemm_backend=backend, order=order
    )
    assert_guards_intact(buf, pad)
    exact = exact_update(W0, R, torch.cholesky_solve(K, L), transposed)
    # Plain torch in fp32 (cholesky_solve + matmul + add) is the error baseline; the blocked
    # solve multiplies by inverted diagonal blocks, which costs a few times its error.
    Wref = W0.clone().to(DEVICE)
    torch_fused_solve_update(Wref, Lf, Kf, Rf, transposed)
    if w_dtype == torch.float32:
        assert_error_within(
            W.cpu(), exact, Wref.cpu(), factor=8.0, floor=64 * EPS32, extra_info=info
        )
    else:
        u = UNIT_ROUNDOFF[w_dtype]
        assert_verbose_allclose(W.cpu(), exact, rtol=2 * u, atol=1e-4, extra_info=info)


@pytest.mark.parametrize("backend", ["triton", "cublas"])
@pytest.mark.parametrize("order", ["keys", "update"])
@pytest.mark.parametrize("n", [1, 5, 17])
def test_rank_padding_leaves_the_update_unchanged(n, order, backend, monkeypatch):
    """On CUDA the launchers pad the rank (and, solving for the update, ``dh``) to a
    multiple of 16 with zero columns; forced here on every device, the fused solve/update
    and the rank-n update still match the unpadded results."""
    import memit_fast.kernels.update as upd

    dk, dh = 40, 7
    L, K, R = make_system(dk, n, dh, seed=n)
    W0 = (torch.randn(dh, dk, generator=torch.Generator().manual_seed(2)) / 64).to(DEVICE)
    Lf, Kf, Rf = (x.to(torch.float32).to(DEVICE) for x in (L, K, R))
    plain_fused, plain_low = W0.clone(), W0.clone()
    kw = dict(solve_block=16, order=order, gemm_backend=backend)
    triton_fused_solve_update(plain_fused, Lf, Kf, Rf, False, **kw)
    U = torch.randn(dk, n, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    triton_lowrank_update(plain_low, Rf, U, False)
    widths = []
    real_pad = torch.nn.functional.pad

    def recording_pad(x, p, *a, **kw):
        widths.append(x.shape[-1] + p[1])
        return real_pad(x, p, *a, **kw)

    monkeypatch.setattr(upd, "_pad_columns", lambda m, device: -m % 16)
    monkeypatch.setattr(upd.torch.nn.functional, "pad", recording_pad)
    padded_fused, padded_low = W0.clone(), W0.clone()
    triton_fused_solve_update(padded_fused, Lf, Kf, Rf, False, **kw)
    triton_lowrank_update(padded_low, Rf, U, False)
    assert widths and all(w % 16 == 0 for w in widths), widths
    if backend == "triton":
        assert_verbose_allclose(padded_fused, plain_fused, rtol=1e-5, atol=1e-7)
    else:  # the BLAS blocks its sums by shape: padded, the rounding differs (not the error)
        exact = exact_update(W0.cpu(), R, torch.cholesky_solve(K, L), False)
        assert_error_within(
            padded_fused.cpu(), exact, plain_fused.cpu(), factor=4.0, floor=64 * EPS32
        )
    assert_verbose_allclose(padded_low, plain_low, rtol=1e-6, atol=1e-8)


def test_split3_recovers_fp32():
    from memit_fast.kernels.update_gemm import split3, split_mm

    x = torch.randn(64, 33, generator=torch.Generator().manual_seed(0)) * 1e3
    hi, mid, lo = split3(x)
    assert hi.dtype == mid.dtype == lo.dtype == torch.bfloat16
    back = hi.double() + mid.double() + lo.double()
    assert ((back - x.double()).abs() <= 2.0**-23 * x.double().abs()).all()
    y = torch.randn(33, 17, generator=torch.Generator().manual_seed(1))
    exact = x.double() @ y.double()
    err = (split_mm(x, y).double() - exact).norm() / exact.norm()
    assert err < 1e-6, float(err)


def test_fused_solve_update_d1000_float64_factor():
    """dk = 1000 (two blocks of 512, the second partial; and one block, the default width on
    sm_90 and the interpreter being wider than the matrix); L in float64 (the diagonal
    blocks are inverted from it, the GEMMs read it as fp32); cuBLAS GEMM backend gives the
    same result."""
    dk, n, dh = 1000, 5, 7
    L, K, R = make_system(dk, n, dh, seed=9)
    W0 = torch.randn(dh, dk, generator=torch.Generator().manual_seed(2)) / 64
    exact = exact_update(W0, R, torch.cholesky_solve(K, L), False)
    Wref = W0.clone()
    torch_fused_solve_update(Wref, L.float(), K.float(), R.float(), False)
    for backend, block in [("triton", 512), ("triton", None), ("cublas", 512)]:
        W = W0.clone().to(DEVICE)
        triton_fused_solve_update(
            W,
            L.to(DEVICE),
            K.float().to(DEVICE),
            R.float().to(DEVICE),
            False,
            gemm_backend=backend,
            solve_block=block,
        )
        assert_error_within(W.cpu(), exact, Wref, factor=8.0, floor=64 * EPS32, extra_info=backend)


def test_auto_order_solves_for_the_fewer_right_hand_sides():
    from memit_fast.kernels.reference import solve_order

    assert solve_order("auto", dh=4096, n=10000) == "update"
    assert solve_order("auto", dh=4096, n=100) == "keys"
    assert solve_order("auto", dh=7, n=7) == "keys"
    assert solve_order("keys", dh=1, n=100) == "keys"
    with pytest.raises(ValueError, match="order must be one of"):
        solve_order("rows", dh=1, n=1)


@pytest.mark.parametrize("dh,n", [(3, 40), (40, 3)])
def test_auto_order_plan(dh, n):
    """What ``auto`` launches: with fewer rows of ``R`` than keys, one GEMM forms ``K R^T``
    (dk x dh) before the solve and one add writes it; otherwise the solve's right-hand sides
    are the keys and the rank-n kernel writes the update."""
    from memit_fast.kernels import update

    dk = 24
    W, L = torch.zeros(dh, dk), torch.eye(dk)
    launches = update.plan_fused_solve_update(
        W, L, torch.zeros(dk, n), torch.zeros(dh, n), False, solve_block=8
    )
    if dh < n:
        assert launches[0].kernel is update._gemm_kernel
        assert launches[0].args[0].shape == (dk, dh)
        assert launches[-1].kernel is update._add_kernel
    else:
        assert launches[0].args[0].shape == (8, n)  # the first diagonal block of U
        assert launches[-1].kernel is update._lowrank_update_kernel


@pytest.mark.parametrize("transposed", [False, True])
def test_reference_update_order(transposed):
    """The torch reference in either order against float64, and the dispatcher's ``auto``."""
    from memit_fast.kernels import fused_solve_update

    dk, n, dh = 33, 20, 6
    L, K, R = make_system(dk, n, dh, seed=5)
    W0 = torch.randn(w_shape(dh, dk, transposed), generator=torch.Generator().manual_seed(4))
    exact = exact_update(W0 / 64, R, torch.cholesky_solve(K, L), transposed)
    results = {}
    for order in ("keys", "update"):
        W = W0 / 64
        torch_fused_solve_update(W, L.float(), K.float(), R.float(), transposed, order=order)
        results[order] = W
    W = W0 / 64
    fused_solve_update(W, L.float(), K.float(), R.float(), transposed)  # auto: update
    assert torch.equal(W, results["update"])
    assert_error_within(results["update"], exact, results["keys"], factor=4.0, floor=64 * EPS32)


def test_bad_arguments_are_named():
    W = torch.zeros(4, 6)
    with pytest.raises(ValueError, match=r"lowrank_update: W \(4, 6\) read as \(dh, dk\)"):
        triton_lowrank_update(W, torch.zeros(4, 2), torch.zeros(5, 2), False)
    with pytest.raises(ValueError, match="lowrank_update"):
        torch_lowrank_update(W, torch.zeros(6, 2), torch.zeros(4, 2), False)
    with pytest.raises(ValueError, match=r"fused_solve_update: L must be \(dk, dk\)"):
        triton_fused_solve_update(W, torch.zeros(5, 5), torch.zeros(6, 2), torch.zeros(4, 2), False)
    with pytest.raises(ValueError, match="gemm_backend"):
        triton_fused_solve_update(
            W, torch.eye(6), torch.zeros(6, 2), torch.zeros(4, 2), False, gemm_backend="magma"
        )

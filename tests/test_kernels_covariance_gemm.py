"""gemm_covariance_accumulate (cuBLAS row panels for 16-bit keys) against float64, and the
dispatch that sends 16-bit keys on CUDA to it. On the CPU the panels run on fp32 copies
(the same products); with a GPU, on CUDA tensors through ``mm(..., out_dtype=float32)``."""

from __future__ import annotations

import memit_fast.kernels as K
import pytest
import torch
from kernel_utils import assert_verbose_allclose, spy_calls
from memit_fast.kernels import covariance_finalize
from memit_fast.kernels.covariance_gemm import gemm_covariance_accumulate, mm_has_out_dtype
from test_kernels_covariance import exact_result, make_inputs

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPES = [torch.float16] + ([torch.bfloat16] if CUDA else [])
EPS32 = 2.0**-24
MASKS = [None, "all", "none", "some"]
CASES = [(t, d, m) for d in (1, 7, 129) for t in (1, 3, 513) for m in MASKS] + [
    (513, 1000, None),
    (513, 1000, "some"),
]


@pytest.mark.parametrize("t,d,mask_kind", CASES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("panel", [64, 2048])
def test_matches_float64(t, d, mask_kind, dtype, panel):
    X, mask, C0 = make_inputs(t, d, dtype, mask_kind)
    exact = exact_result(C0, X, mask)
    C = C0.clone().to(DEVICE)
    X, m = X.to(DEVICE), None if mask is None else mask.to(DEVICE)
    half = t // 2
    gemm_covariance_accumulate(C, X[:half], None if m is None else m[:half], panel=panel)
    gemm_covariance_accumulate(C, X[half:], None if m is None else m[half:], panel=panel)
    kept = X.cpu().double() if mask is None else X.cpu().double()[mask]
    scale = float((kept**2).sum(0).max()) if kept.numel() else 0.0
    tol = dict(rtol=8 * EPS32, atol=2 * (t + 2) * EPS32 * scale + 1e-30)
    info = f"d={d} t={t} {dtype} mask={mask_kind} panel={panel}: "
    assert_verbose_allclose(C.cpu().tril(), exact.tril(), **tol, extra_info=info + "lower: ")
    covariance_finalize(C)
    assert_verbose_allclose(C.cpu(), exact, **tol, extra_info=info)


def test_bad_arguments_are_named():
    C = torch.zeros(4, 4)
    with pytest.raises(TypeError, match="fp16 or bf16"):
        gemm_covariance_accumulate(C, torch.ones(3, 4))
    with pytest.raises(TypeError, match="float32"):
        gemm_covariance_accumulate(C.double(), torch.ones(3, 4, dtype=torch.float16))
    with pytest.raises(ValueError, match="panel"):
        gemm_covariance_accumulate(C, torch.ones(3, 4, dtype=torch.float16), panel=0)
    with pytest.raises(ValueError, match=r"C must be \(d, d\)"):
        gemm_covariance_accumulate(C, torch.ones(3, 5, dtype=torch.float16))


def test_cpu_has_no_native_path():
    assert not mm_has_out_dtype("cpu")


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_dispatch_sends_16bit_keys_to_the_panels(monkeypatch):
    import memit_fast.kernels.covariance as cov
    import memit_fast.kernels.covariance_gemm as cg

    seen = spy_calls(
        monkeypatch,
        [(cg, "gemm_covariance_accumulate"), (cov, "triton_covariance_accumulate")],
    )
    C = torch.zeros(64, 64, device="cuda")
    K.covariance_accumulate(C, torch.randn(32, 64, device="cuda", dtype=torch.bfloat16))
    K.covariance_accumulate(C, torch.randn(32, 64, device="cuda"))
    expected = (
        "gemm_covariance_accumulate" if mm_has_out_dtype("cuda") else "triton_covariance_accumulate"
    )
    assert seen == [expected, "triton_covariance_accumulate"]

"""memit_fast._C itself: registration, the guarded loader, trailing precisions and block
sizes of the kernels (the comparisons with torch run in test_linalg.py on both paths)."""

from __future__ import annotations

import re

import pytest
import torch
from test_linalg import rel, rhs, spd

from memit_fast import _ext

needs_ext = pytest.mark.skipif(
    not _ext.has_kernel("cholesky", "cpu"), reason="memit_fast._C not built"
)


@needs_ext
def test_ops_registered_with_build_info():
    for op in _ext.OPS:
        assert _ext.has_kernel(op, "cpu")
    info = _ext.build_info()
    assert info.startswith(f"torch={torch.__version__}") and "cuda=" in info


@needs_ext
def test_loader_warns_once_naming_build_and_found(monkeypatch):
    _ext.load.cache_clear()

    def broken():
        raise ImportError("_C.so: undefined symbol: _ZN3c105ErrorC2E")

    monkeypatch.setattr(_ext, "_import", broken)
    try:
        with pytest.warns(
            RuntimeWarning,
            match=r"built for torch=.*undefined symbol.*found torch=.*torch references",
        ):
            assert _ext.load() is None
        assert not _ext.has_kernel("cholesky", "cpu")  # cached: no second warning
    finally:
        _ext.load.cache_clear()


@needs_ext
def test_build_matches_torchs_cxx_standard(monkeypatch):
    """The extension is compiled under libtorch's C++ standard (setup.py passes no -std);
    where they differ, loading warns once."""
    built = re.search(r"\bcxx=(\d+)", _ext.build_info())
    assert built is not None
    theirs = _ext._torch_cxx_standard()
    if theirs is not None:
        assert built.group(1) == theirs
    _ext.load.cache_clear()
    monkeypatch.setattr(_ext, "_torch_cxx_standard", lambda: "201103")
    try:
        with pytest.warns(RuntimeWarning, match=r"compiled as C\+\+ \d+ but torch as C\+\+ 201103"):
            assert _ext.load() is not None
    finally:
        _ext.load.cache_clear()


@needs_ext
@pytest.mark.parametrize(
    "precision, dtype, tol",
    [("fp64", torch.float64, 1e-14), ("fp32", torch.float32, 1e-6),
     ("tf32", torch.float32, 1e-6), ("bf16", torch.float32, 1e-2)],
)  # fmt: skip
@pytest.mark.parametrize("block_size", [0, 1, 64, 100, 2000])
def test_trailing_precisions_and_block_sizes(precision, dtype, tol, block_size):
    A = spd(257, 1e3)
    L, info = torch.ops.memit_fast.cholesky(A, precision, block_size, True)
    assert int(info) == 0 and L.dtype == dtype and torch.equal(L, L.tril())
    assert rel(L.double() @ L.double().T, A) <= tol


@needs_ext
@pytest.mark.parametrize("block_size", [1, 16, 100, 300])
def test_update_block_sizes(block_size):
    A, K = spd(257, 1e4), rhs(257, 37, scale=0.1)
    L = torch.ops.memit_fast.cholesky_update(torch.linalg.cholesky(A), K, block_size)
    assert rel(L, torch.linalg.cholesky(A + K @ K.T)) <= 1e-8


@needs_ext
def test_op_errors_name_the_problem():
    """Bad input raises ValueError (as the torch references do); a matrix that is not
    positive definite is a numerical failure, a RuntimeError."""
    ops = torch.ops.memit_fast
    A = spd(5, 1e2)
    with pytest.raises(ValueError, match="must be symmetric"):
        ops.cholesky(torch.triu(torch.ones(4, 4)) + 4 * torch.eye(4))
    with pytest.raises(RuntimeError, match="column 2 of 5"):
        B = A.clone()
        B[2, 2] = -1.0
        ops.cholesky(B)
    with pytest.raises(ValueError, match="positive diagonal"):
        ops.cholesky_update(-torch.eye(5), torch.ones(5, 1))
    with pytest.raises(ValueError, match="2-D matrix"):
        ops.cholesky_update(torch.eye(5), torch.ones(5))
    with pytest.raises(ValueError, match="refine_steps must be >= 0"):
        ops.cholesky_solve(torch.eye(5), torch.ones(5), A, None, -1)

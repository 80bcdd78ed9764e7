"""The plain names of memit_fast.kernels dispatch: the references for CPU tensors (and
wherever Triton is missing), the Triton kernels only for CUDA tensors; importing the
package needs neither Triton nor a GPU."""

from __future__ import annotations

import subprocess
import sys

import memit_fast.kernels as K
import pytest
import torch
from kernel_utils import spy_calls

from memit_fast import linalg


@pytest.fixture
def calls(monkeypatch):
    """Record which implementation each dispatcher called (and still run it)."""
    names = (
        "torch_covariance_accumulate",
        "torch_lowrank_update",
        "torch_fused_solve_update",
        "torch_dense_update",
    )
    return spy_calls(monkeypatch, [(K, name) for name in names])


def test_public_names():
    assert sorted(K.__all__) == [
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
    for name in K.__all__:
        assert callable(getattr(K, name))


def test_cpu_tensors_go_to_the_references(calls):
    assert not K.uses_triton(torch.zeros(1))
    C = torch.zeros(4, 4)
    X = torch.randn(6, 4, dtype=torch.float16)
    K.covariance_accumulate(C, X, torch.ones(6, dtype=torch.long))
    K.covariance_finalize(C)
    Xd = X.double()
    assert torch.allclose(C.double(), Xd.T @ Xd, atol=1e-5)
    W = torch.zeros(3, 4)
    K.lowrank_update(W, torch.ones(3, 2), torch.ones(4, 2), False)
    assert torch.equal(W, torch.full((3, 4), 2.0))
    K.fused_solve_update(W, torch.eye(4), torch.ones(4, 2), torch.ones(3, 2), False)
    assert torch.equal(W, torch.full((3, 4), 4.0))
    K.dense_update(W, torch.ones(4, 3, dtype=torch.float64), False)
    assert torch.equal(W, torch.full((3, 4), 5.0))
    assert calls == [
        "torch_covariance_accumulate",
        "torch_lowrank_update",
        "torch_fused_solve_update",
        "torch_dense_update",
    ]


def test_float64_accumulator_goes_to_the_reference(calls):
    C = torch.zeros(3, 3, dtype=torch.float64)
    K.covariance_accumulate(C, torch.ones(2, 3), None)
    assert calls == ["torch_covariance_accumulate"] and torch.all(C == 2)


def test_engine_update_dispatches_through_kernels(calls):
    """linalg.apply_update (the layer loop's write) reaches lowrank_update -> reference."""
    W = torch.zeros(5, 3, dtype=torch.float16)  # transposed layout: (dk, dh)
    U = torch.ones(5, 1, dtype=torch.float64)
    linalg.apply_update(W, torch.ones(3, 1), U, transposed=True)
    assert calls == ["torch_lowrank_update"] and torch.all(W == 1)


def test_engine_update_order_factors_are_added_not_multiplied(calls):
    """The update order's factors ``(I, dW^T)`` reach dense_update (an add), with the same
    bits as the product with the identity; any other R goes to lowrank_update."""
    g = torch.Generator().manual_seed(0)
    W0 = torch.randn(6, 4, generator=g).to(torch.bfloat16)  # transposed: (dk, dh)
    D = torch.randn(6, 4, generator=g, dtype=torch.float64)
    W = W0.clone()
    linalg.apply_update(W, torch.eye(4), D, transposed=True)
    assert calls == ["torch_dense_update"]
    Wp = W0.clone()
    K.torch_lowrank_update(Wp, torch.eye(4), D, True)
    assert torch.equal(W, Wp)
    not_eye = torch.eye(4)
    not_eye[0, 1] = 1e-30
    linalg.apply_update(W0.clone(), not_eye, D, transposed=True)
    assert calls[-1] == "torch_lowrank_update"


def test_import_needs_no_triton_and_no_gpu():
    """With Triton unimportable, the package imports and every op runs on the reference."""
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, memit_fast.kernels as K\n"
        "assert not K.triton_available()\n"
        "C = torch.zeros(3, 3); K.covariance_accumulate(C, torch.ones(2, 3)); K.covariance_finalize(C)\n"
        "assert torch.all(C == 2)\n"
        "W = torch.zeros(2, 3); K.lowrank_update(W, torch.ones(2, 1), torch.ones(3, 1), False)\n"
        "assert torch.all(W == 1)\n"
        "assert 'triton' not in [m.split('.')[0] for m in sys.modules if sys.modules[m] is not None]\n"
        "assert not torch.cuda.is_initialized()\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_float64_weight_keeps_its_bits():
    """The references add in fp32 for 16- and 32-bit weights, in float64 for a float64
    weight: a zero update leaves every bit of it (fp32 would round 1 + 1e-12 to 1)."""
    W = torch.full((5, 7), 1 + 1e-12, dtype=torch.float64)
    before = W.clone()
    K.lowrank_update(W, torch.zeros(5, 2), torch.zeros(7, 2), False)
    K.dense_update(W, torch.zeros(7, 5), False)
    assert torch.equal(W, before)


def test_operands_that_alias_the_weight_are_copied_first(monkeypatch):
    """A Triton write into W reads its operands while other programs write W: an operand
    that shares W's memory is copied before the launch (under the interpreter here)."""
    pytest.importorskip("triton")
    monkeypatch.setattr(K, "_weight_on_triton", lambda W, *ops: True)
    g = torch.Generator().manual_seed(0)
    W = torch.randn(40, 40, generator=g)
    want = W + W.T
    K.dense_update(W, W, False)
    assert torch.allclose(W, want, rtol=1e-6, atol=1e-6)
    W = torch.randn(40, 40, generator=g)
    U = torch.randn(40, 8, generator=g)
    want = W + W[:, :8] @ U.T
    K.lowrank_update(W, W[:, :8], U, False)
    assert torch.allclose(W, want, rtol=1e-5, atol=1e-5)
    assert not K._overlaps(W[:, :8], W[:, 8:16].T.contiguous())
    with pytest.raises(ValueError, match="share memory"):
        K.dense_update(torch.zeros(1, 6).expand(4, 6), torch.zeros(6, 4), False)

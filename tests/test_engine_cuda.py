"""The whole engine on a CUDA device: statistics through the Triton covariance kernel, the
layer loop through the Triton update, checked against the independent reference run on the
CPU in float64; revert and failed applies bit-identical on the device; 16-bit models.

Skipped without a GPU. ``MEMIT_FAST_TEST_DEVICE=cpu`` runs the same checks on the CPU (the
kernel-dispatch assertions then expect the references), which keeps this file honest where
no GPU is lent.
"""

from __future__ import annotations

import os

import memit_fast.kernels as K
import pytest
import torch
from kernel_utils import spy_calls
from reference_memit import ref_memit_config, ref_stats
from tiny import (
    CORPUS,
    REQUESTS,
    TEMPLATES,
    assert_bit_identical,
    make_gpt2,
    make_llama,
    make_tokenizer,
    snapshot,
)
from tiny import exact_config as config

from memit_fast import EditRequestError
from memit_fast.editor import Editor

DEVICE = os.environ.get("MEMIT_FAST_TEST_DEVICE", "cuda")
ON_CUDA = DEVICE == "cuda"

pytestmark = pytest.mark.skipif(
    ON_CUDA and not torch.cuda.is_available(), reason="needs a CUDA device"
)


def rel(a, b):
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@pytest.fixture
def kernel_calls(monkeypatch):
    """Names of the implementations the dispatchers reached (each still runs)."""
    targets = [(K, "torch_covariance_accumulate"), (K, "torch_lowrank_update")]
    if K.triton_available():
        import memit_fast.kernels.covariance as cov
        import memit_fast.kernels.update as upd

        targets += [(cov, "triton_covariance_accumulate"), (upd, "triton_lowrank_update")]
    return spy_calls(monkeypatch, targets)


@pytest.mark.parametrize("make", [make_gpt2, make_llama], ids=["gpt2", "llama"])
def test_engine_on_device_matches_the_cpu_reference(make, kernel_calls):
    tok = make_tokenizer()
    # No early stop: the step counts cannot differ by a rounding at the threshold.
    cfg = config(early_stop_loss=0.0)
    model_ref = make()
    model = make().to(DEVICE)
    ed = Editor(model, tok, cfg, corpus=list(CORPUS))
    stats = ed.key_stats()
    ref_c = {l: ref_stats(model_ref, tok, l, CORPUS, cfg.stats_max_length) for l in cfg.layers}
    for l in cfg.layers:
        assert stats[l].mom2.device.type == DEVICE
        assert rel(stats[l].mom2, ref_c[l]) < 1e-5, l
    res = ed.apply(REQUESTS)
    Z_ref, steps_ref, dws_ref = ref_memit_config(model_ref, tok, REQUESTS, TEMPLATES, cfg, ref_c)
    assert res.targets.steps.tolist() == steps_ref
    # fp32 on the device (other reduction orders, the kernels' bf16x6 products) against a
    # float64 reference: 8 Adam steps amplify rounding a little, hence 1e-3, not 1e-4.
    assert rel(res.targets.z, Z_ref) <= 1e-3
    for l in cfg.layers:
        dW = res.factors[l][0].double() @ res.factors[l][1].double().T
        assert dW.norm() > 0
        assert rel(dW, dws_ref[l]) <= 1e-3, l
    for (n1, p1), (_, p2) in zip(model.named_parameters(), model_ref.named_parameters()):
        assert p1.device.type == DEVICE
        assert rel(p1, p2) <= 1e-3, n1
    if ON_CUDA:
        assert "triton_covariance_accumulate" in kernel_calls
        assert "triton_lowrank_update" in kernel_calls
        assert "torch_covariance_accumulate" not in kernel_calls
        assert "torch_lowrank_update" not in kernel_calls
    else:
        assert "torch_covariance_accumulate" in kernel_calls
        assert "torch_lowrank_update" in kernel_calls


def test_update_order_on_device_matches_the_cpu_reference(monkeypatch):
    """The update order on the device (the solve for dW^T, written by dense_update: the
    Triton add kernel on CUDA) against the independent float64 reference on the CPU."""
    tok = make_tokenizer()
    cfg = config(early_stop_loss=0.0, solve_order="update")
    model_ref, model = make_gpt2(), make_gpt2().to(DEVICE)
    ed = Editor(model, tok, cfg, corpus=list(CORPUS))
    ed.key_stats()
    ref_c = {l: ref_stats(model_ref, tok, l, CORPUS, cfg.stats_max_length) for l in cfg.layers}
    targets = [(K, "torch_dense_update")]
    if K.triton_available():
        import memit_fast.kernels.update as upd

        targets.append((upd, "triton_dense_update"))
    calls = spy_calls(monkeypatch, targets)
    res = ed.apply(REQUESTS)
    _, _, dws_ref = ref_memit_config(model_ref, tok, REQUESTS, TEMPLATES, cfg, ref_c)
    for l in cfg.layers:
        I, D = res.factors[l]
        assert torch.equal(I.cpu(), torch.eye(I.shape[0]))
        assert rel(D.T, dws_ref[l]) <= 1e-3, l
    for (n1, p1), (_, p2) in zip(model.named_parameters(), model_ref.named_parameters()):
        assert rel(p1, p2) <= 1e-3, n1
    assert calls == (["triton_dense_update"] * 2 if ON_CUDA else ["torch_dense_update"] * 2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_model_on_device(dtype):
    """A 16-bit model on the device: bad input rejected with nothing written; the edit
    close to the fp32 edit of the same model on the CPU (checked against the float64
    reference above); revert bit-identical."""
    tok = make_tokenizer()
    cfg = config(early_stop_loss=0.0)
    r32 = Editor(make_llama(), tok, cfg, corpus=list(CORPUS)).apply(REQUESTS)
    model = make_llama(dtype=dtype).to(DEVICE)
    ed = Editor(model, tok, cfg, corpus=list(CORPUS))
    snap = snapshot(model)
    bad = [REQUESTS[0], {"prompt": "{} plays", "subject": "Ann", "target": ""}]
    with pytest.raises(EditRequestError, match="request 1: field 'target'"):
        ed.apply(bad)
    assert_bit_identical(model, snap)
    res = ed.apply(REQUESTS)
    assert res.targets.z.dtype == torch.float32
    for l in res.layers:
        W = model.model.layers[l].mlp.down_proj.weight
        assert W.dtype == dtype and W.device.type == DEVICE and torch.isfinite(W).all()
        W0 = snap[f"model.layers.{l}.mlp.down_proj.weight"]
        written = (W.double() - W0.double()).cpu()
        d32 = r32.delta(l).double()
        cos = torch.nn.functional.cosine_similarity(written.flatten(), d32.flatten(), dim=0)
        assert cos > 0.9, (l, float(cos))
    res.revert()
    assert_bit_identical(model, snap)


def test_fault_in_the_second_layer_write_on_device(monkeypatch):
    """The update of the second layer fails after the first was written: bit-identical."""
    tok = make_tokenizer()
    model = make_gpt2().to(DEVICE)
    ed = Editor(model, tok, config(layers=(0, 1, 2)), corpus=list(CORPUS))
    ed.key_stats()
    snap = snapshot(model)
    real = K.lowrank_update
    writes = []

    def faulty(*a, **kw):
        if len(writes) == 1:
            raise RuntimeError("injected at the second layer")
        writes.append(1)
        return real(*a, **kw)

    monkeypatch.setattr(K, "lowrank_update", faulty)
    with pytest.raises(RuntimeError, match="injected"):
        ed.apply(REQUESTS)
    assert writes == [1]
    assert_bit_identical(model, snap)


def test_layer_solver_updates_few_keys_on_cuda():
    """Few keys are added by an update on both devices (on CUDA up to
    ``CUDA_UPDATE_MAX_KEYS``, measured on an H200; on the CPU by the cost model); many by
    refactoring. Both give the float64 solution."""
    from memit_fast import linalg as la

    g = torch.Generator().manual_seed(0)
    X = torch.randn(64, 256, generator=g, dtype=torch.float64)
    C = (X @ X.T / 256).to(DEVICE)
    K = (0.05 * torch.randn(64, 4, generator=g, dtype=torch.float64)).to(DEVICE)
    solver = la.LayerSolver(C, 2.0, precision="fp64")
    assert solver.prefers_update(4) and not solver.prefers_update(64)
    U = solver.solve(K)
    assert rel(U, la.torch_memit_solve(C.cpu(), K.cpu(), 2.0)) <= 1e-10
    K = (0.05 * torch.randn(64, 200, generator=g, dtype=torch.float64)).to(DEVICE)
    U = solver.solve(K)
    assert rel(U, la.torch_memit_solve(C.cpu(), K.cpu(), 2.0)) <= 1e-10

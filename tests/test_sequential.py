"""Sequential editing: a later apply solves against lambda C plus the keys written before."""

import pytest
import torch
from tiny import REQUESTS, assert_bit_identical, make_gpt2, make_tokenizer, snapshot

from memit_fast import EditConfig
from memit_fast.editor import Editor

TEMPLATES = ("{}", "The weather is nice today. {}")


def make_editor(model, remember=True):
    cfg = EditConfig(layers=(1, 2), steps=3, context_templates=TEMPLATES, mom2_update_weight=5.0)
    g = torch.Generator().manual_seed(0)
    X = torch.randn(256, 512, generator=g)
    C = X @ X.T / 512  # a well-conditioned SPD second moment
    return Editor(model, make_tokenizer(), cfg, stats={1: C, 2: C}, remember_keys=remember)


def test_second_batch_solves_against_remembered_keys():
    model = make_gpt2()
    ed = make_editor(model)
    C = ed._stats[1].mom2.double()
    r1 = ed.apply(REQUESTS[:4])
    r2 = ed.apply(REQUESTS[4:])
    K1 = r1.keys[1].double()
    K2 = r2.keys[1].double()
    lam = ed.config.mom2_update_weight
    # Direct dense implementation of the equation for the second batch.
    U2 = torch.linalg.solve(lam * C + K1 @ K1.T + K2 @ K2.T, K2)
    torch.testing.assert_close(r2.factors[1][1].double(), U2, rtol=1e-5, atol=1e-8)
    # The first batch was solved against lambda C alone.
    U1 = torch.linalg.solve(lam * C + K1 @ K1.T, K1)
    torch.testing.assert_close(r1.factors[1][1].double(), U1, rtol=1e-5, atol=1e-8)
    # The solver's factor equals a fresh factor of the accumulated matrix.
    s = ed._solvers[1]
    A = lam * C + K1 @ K1.T + K2 @ K2.T
    L = s.L.double()
    assert float((L @ L.T - A).norm() / A.norm()) < 1e-6


def test_plain_mode_does_not_remember():
    model = make_gpt2()
    ed = make_editor(model, remember=False)
    C = ed._stats[1].mom2.double()
    ed.apply(REQUESTS[:4])
    r2 = ed.apply(REQUESTS[4:])
    assert ed._written == []
    K2 = r2.keys[1].double()
    U2 = torch.linalg.solve(ed.config.mom2_update_weight * C + K2 @ K2.T, K2)
    torch.testing.assert_close(r2.factors[1][1].double(), U2, rtol=1e-5, atol=1e-8)


def test_revert_order_and_forgetting():
    model = make_gpt2()
    snap = snapshot(model)
    ed = make_editor(model)
    r1 = ed.apply(REQUESTS[:4])
    r2 = ed.apply(REQUESTS[4:])
    with pytest.raises(RuntimeError, match="reverse order"):
        r1.revert()
    r2.revert()
    assert len(ed._written) == 1
    r1.revert()
    assert ed._written == []
    assert_bit_identical(model, snap)
    # After forgetting, a new batch is solved against lambda C alone again.
    C = ed._stats[1].mom2.double()
    r3 = ed.apply(REQUESTS[:4])
    K = ed._written[0][1][1].double()
    U = torch.linalg.solve(ed.config.mom2_update_weight * C + K @ K.T, K)
    torch.testing.assert_close(r3.factors[1][1].double(), U, rtol=1e-5, atol=1e-8)


def test_failed_apply_is_not_remembered(monkeypatch):
    model = make_gpt2()
    ed = make_editor(model)
    ed.apply(REQUESTS[:4])
    import memit_fast.linalg as linalg_mod

    def boom(*a, **k):
        raise RuntimeError("injected")

    monkeypatch.setattr(linalg_mod, "apply_update", boom)
    with pytest.raises(RuntimeError):
        ed.apply(REQUESTS[4:])
    assert len(ed._written) == 1
    assert ed._solvers[1].n_committed == 4

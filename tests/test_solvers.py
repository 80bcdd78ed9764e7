"""The per-layer update rules of ``EditConfig.solver`` (memit, emmet, alphaedit, rome),
each against a direct dense float64 implementation written here: the keys and block outputs
come from the independent reference of tests/reference_memit.py on a float64 copy of the
model, the target vectors from the engine (every solver shares them)."""

import pytest
import torch
from reference_memit import blocks_of, ref_key_and_hidden
from tiny import REQUESTS, assert_bit_identical, make_gpt2, make_tokenizer, snapshot

from memit_fast import EditConfig
from memit_fast.editor import EditFailedError, Editor

TEMPLATES = ("{}", "The weather is nice today. {}")
LAM = 5.0
EPS32 = torch.finfo(torch.float32).eps


def spd_stats(dk=256, n_small=96, seed=0):
    """SPD statistics with a spectrum in two parts: ``dk - n_small`` eigenvalues in
    [0.5, 2] and ``n_small`` in [1e-4, 5e-3] (below AlphaEdit's default threshold)."""
    g = torch.Generator().manual_seed(seed)
    V, _ = torch.linalg.qr(torch.randn(dk, dk, generator=g, dtype=torch.float64))
    big = 0.5 + 1.5 * torch.rand(dk - n_small, generator=g, dtype=torch.float64)
    small = 1e-4 + 4.9e-3 * torch.rand(n_small, generator=g, dtype=torch.float64)
    e = torch.cat([big, small])
    return ((V * e) @ V.T).float()


def config(solver, layers=(1, 2), **kw):
    if solver == "rome":
        layers = layers[-1:]
    return EditConfig(
        layers=layers,
        steps=3,
        context_templates=TEMPLATES,
        mom2_update_weight=LAM,
        solver=solver,
        **kw,
    )


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


# ----------------------------------------------------------------------------- dense references


def dense_update(solver, R, K, C, cfg, K_old=None):
    """``dW (dh, dk)`` float64 of one layer, written straight from the equations."""
    C = C.double()
    dk = C.shape[0]
    M_old = K_old @ K_old.T if K_old is not None else torch.zeros(dk, dk, dtype=torch.float64)
    lam = cfg.mom2_update_weight
    if solver == "memit":
        return R @ K.T @ torch.linalg.inv(lam * C + M_old + K @ K.T)
    if solver == "emmet":
        A_inv = torch.linalg.inv(lam * C + M_old)
        D = K.T @ A_inv @ K
        D = D + cfg.emmet_ridge * torch.trace(D) / D.shape[0] * torch.eye(D.shape[0])
        return R @ torch.linalg.inv(D) @ K.T @ A_inv
    if solver == "alphaedit":
        evals, V = torch.linalg.eigh(C)
        V0 = V[:, evals < cfg.alphaedit_threshold]
        P = V0 @ V0.T
        M = K @ K.T + M_old
        return R @ K.T @ P @ torch.linalg.inv(P @ M @ P + cfg.alphaedit_lambda * torch.eye(dk))
    raise AssertionError(solver)


def reference_edit(solver, model64, tok, requests, Z, C, cfg):
    """The whole layer loop on ``model64`` (float64), ROME one request at a time with the
    block output recomputed by a forward pass after each rank-one write. Returns
    ``{layer: dW (dh, dk)}``."""
    blocks, proj, transposed = blocks_of(model64)
    layers = cfg.layers
    L = layers[-1]
    dws = {}

    def write(l, dW):
        W = proj(blocks[l]).weight
        with torch.no_grad():
            W += dW.T if transposed else dW

    for j, l in enumerate(layers):
        if solver == "rome":
            dws[l] = 0
            C64 = C[l].double()
            for i, r in enumerate(requests):
                k, _ = ref_key_and_hidden(model64, tok, r, TEMPLATES, l, L)
                k_bare, h = ref_key_and_hidden(model64, tok, r, ("{}",), l, L)
                u = torch.linalg.solve(C64, k)
                dW = torch.outer(Z[:, i] - h, u) / (u @ k_bare)
                write(l, dW)
                dws[l] = dws[l] + dW
            continue
        ks, hs = zip(*[ref_key_and_hidden(model64, tok, r, TEMPLATES, l, L) for r in requests])
        K, H = torch.stack(ks, 1), torch.stack(hs, 1)
        R = (Z - H) / (len(layers) - j)
        dws[l] = dense_update(solver, R, K, C[l], cfg)
        write(l, dws[l])
    return dws


def written(model, before, layer):
    """The change of ``layer``'s weight in ``(dh, dk)`` orientation (GPT-2 stores it
    transposed) and the weight's norm."""
    blocks, proj, transposed = blocks_of(model)
    W = proj(blocks[layer]).weight
    name = next(n for n, p in model.named_parameters() if p is W)
    d = W.detach().double() - before[name].double()
    return (d.T if transposed else d), float(W.detach().double().norm())


# ----------------------------------------------------------------------------- tests


@pytest.mark.parametrize("solver", ["memit", "emmet", "alphaedit", "rome"])
def test_solver_matches_dense_reference(solver):
    tok = make_tokenizer()
    cfg = config(solver)
    C = {1: spd_stats(seed=1), 2: spd_stats(seed=2)}
    model = make_gpt2()
    before = snapshot(model)
    ed = Editor(model, tok, cfg, stats=C)
    res = ed.apply(REQUESTS)
    Z = res.targets.z.double().T  # (dh, n): shared by every solver
    dws = reference_edit(solver, make_gpt2(dtype=torch.float64), tok, REQUESTS, Z, C, cfg)
    for l in cfg.layers:
        ref = dws[l]
        assert ref.norm() > 0
        d, w_norm = written(model, before, l)
        # The written weights: 1e-5 of the update, plus fp32 rounding of the weight itself.
        err = float((d - ref).norm())
        assert err <= 1e-5 * float(ref.norm()) + 4 * EPS32 * w_norm, (l, err, float(ref.norm()))
        # The stored factors, product in (dh, dk) orientation.
        R, U = res.factors[l]
        assert rel(R.double() @ U.double().T, ref) <= 1e-5, l
    for l in set(range(4)) - set(cfg.layers):
        assert rel_unchanged(model, before, l)


def rel_unchanged(model, before, layer):
    d, _ = written(model, before, layer)
    return float(d.abs().max()) == 0.0


@pytest.mark.parametrize("solver", ["memit", "emmet", "alphaedit"])
def test_factors_from_the_engines_own_inputs(solver):
    """Given the engine's keys and residuals, each layer's update is the equation's."""
    C = {1: spd_stats(seed=3), 2: spd_stats(seed=4)}
    cfg = config(solver)
    res = Editor(make_gpt2(), make_tokenizer(), cfg, stats=C).apply(REQUESTS)
    for l in cfg.layers:
        R, U = res.factors[l]
        ref = dense_update(solver, R.double(), res.keys[l].double(), C[l], cfg)
        assert rel(R.double() @ U.double().T, ref) <= 1e-6, l


@pytest.mark.parametrize("solver", ["memit", "emmet", "alphaedit"])
def test_sequential_batches_use_remembered_keys(solver):
    C = {1: spd_stats(seed=5), 2: spd_stats(seed=6)}
    cfg = config(solver)
    ed = Editor(make_gpt2(), make_tokenizer(), cfg, stats=C)
    r1 = ed.apply(REQUESTS[:4])
    r2 = ed.apply(REQUESTS[4:])
    for l in cfg.layers:
        R, U = r2.factors[l]
        K1, K2 = r1.keys[l].double(), r2.keys[l].double()
        ref = dense_update(solver, R.double(), K2, C[l], cfg, K_old=K1)
        assert rel(R.double() @ U.double().T, ref) <= 1e-6, l
        # Without the remembered keys the update would differ.
        alone = dense_update(solver, R.double(), K2, C[l], cfg)
        assert rel(alone, ref) > 1e-4, l


def test_emmet_writes_the_keys_exactly():
    """EMMET's constraint: ``dW K = R`` (up to the tiny ridge)."""
    C = {2: spd_stats(seed=7)}
    cfg = config("emmet", layers=(2,))
    res = Editor(make_gpt2(), make_tokenizer(), cfg, stats=C).apply(REQUESTS)
    R, U = res.factors[2]
    dW = R.double() @ U.double().T
    assert rel(dW @ res.keys[2].double(), R) <= 1e-4
    # MEMIT with the same inputs does not meet it (it trades against lambda C).
    ref_memit = dense_update("memit", R.double(), res.keys[2].double(), C[2], cfg)
    assert rel(ref_memit @ res.keys[2].double(), R) > 1e-2


def test_alphaedit_update_lies_in_the_null_space():
    C = {1: spd_stats(seed=8), 2: spd_stats(seed=9)}
    cfg = config("alphaedit")
    model = make_gpt2()
    ed = Editor(model, make_tokenizer(), cfg, stats=C)
    res = ed.apply(REQUESTS)
    for l in cfg.layers:
        evals, V = torch.linalg.eigh(C[l].double())
        V0 = V[:, evals < cfg.alphaedit_threshold]
        assert V0.shape[1] == 96
        P = V0 @ V0.T
        R, U = res.factors[l]
        dW = R.double() @ U.double().T
        assert dW.norm() > 0
        assert rel(dW @ P, dW) <= 1e-6, l
        # dW C is bounded by the threshold (the preserved keys barely move).
        assert float((dW @ C[l].double()).norm()) <= cfg.alphaedit_threshold * float(dW.norm())
        assert ed._nullspace[l].shape == (256, 96)  # cached per layer


def test_alphaedit_threshold_is_absolute():
    """The threshold applies to C's eigenvalues as they are: scaled statistics give a
    different null space."""
    C = 0.01 * spd_stats(seed=11)
    ed = Editor(make_gpt2(), make_tokenizer(), config("alphaedit", layers=(2,)), stats={2: C})
    ed.apply(REQUESTS[:2])
    m = int((torch.linalg.eigvalsh(C.double()) < 1e-2).sum())
    assert 96 < m < 256
    assert ed._nullspace[2].shape == (256, m)


def test_rome_last_request_reads_its_target():
    """After ROME, the last request's bare prompt gives exactly its target vector at the
    edited block (each request is written against the weights its predecessors left)."""
    cfg = config("rome", layers=(2,))
    model = make_gpt2()
    tok = make_tokenizer()
    res = Editor(model, tok, cfg, stats={2: spd_stats(seed=10)}).apply(REQUESTS)
    _, h = ref_key_and_hidden(model, tok, REQUESTS[-1], ("{}",), 2, 2)
    assert rel(h, res.targets.z[-1]) <= 1e-5
    # An earlier request is moved by the later writes (the sequential baseline).
    _, h0 = ref_key_and_hidden(model, tok, REQUESTS[0], ("{}",), 2, 2)
    assert rel(h0, res.targets.z[0]) > 1e-4


@pytest.mark.parametrize("solver", ["emmet", "alphaedit", "rome"])
def test_revert_is_bit_identical(solver):
    model = make_gpt2()
    snap = snapshot(model)
    ed = Editor(model, make_tokenizer(), config(solver), stats={1: spd_stats(), 2: spd_stats()})
    r1 = ed.apply(REQUESTS[:4])
    r2 = ed.apply(REQUESTS[4:])
    r2.revert()
    r1.revert()
    assert_bit_identical(model, snap)


def test_failed_alphaedit_leaves_weights_untouched():
    """Layer 1 is written, then layer 2's statistics have no null space: the apply fails
    naming the field, and layer 1 is restored."""
    model = make_gpt2()
    snap = snapshot(model)
    C = {1: spd_stats(), 2: spd_stats(n_small=0)}
    ed = Editor(model, make_tokenizer(), config("alphaedit"), stats=C)
    with pytest.raises(EditFailedError, match="layer 2.*alphaedit_threshold"):
        ed.apply(REQUESTS)
    assert_bit_identical(model, snap)
    assert ed._written == []


def test_rome_needs_positive_definite_statistics():
    model = make_gpt2()
    snap = snapshot(model)
    C = spd_stats()
    C[0, 0] = -C[0, 0]  # (an all-zero row and column is a dead coordinate: see editor._live)
    ed = Editor(model, make_tokenizer(), config("rome"), stats={2: C})
    with pytest.raises(EditFailedError, match="ROME"):
        ed.apply(REQUESTS)
    assert_bit_identical(model, snap)


def test_config_validation_and_round_trip():
    assert EditConfig(layers=(1,)).solver == "memit"
    with pytest.raises(ValueError, match="EditConfig.solver 'nope'"):
        EditConfig(layers=(1,), solver="nope")
    with pytest.raises(ValueError, match="solver 'rome'.*EditConfig.layers"):
        EditConfig(layers=(1, 2), solver="rome")
    with pytest.raises(ValueError, match="emmet_ridge"):
        EditConfig(layers=(1,), emmet_ridge=-1.0)
    with pytest.raises(ValueError, match="alphaedit_threshold"):
        EditConfig(layers=(1,), alphaedit_threshold=0.0)
    with pytest.raises(ValueError, match="alphaedit_lambda"):
        EditConfig(layers=(1,), alphaedit_lambda=float("nan"))
    cfg = EditConfig(
        layers=(2,), solver="rome", emmet_ridge=1e-3, alphaedit_threshold=0.5, alphaedit_lambda=2
    )
    assert EditConfig.from_json(cfg.to_json()) == cfg
    d = cfg.to_dict()
    d["solver"] = "Memit"
    with pytest.raises(ValueError, match="EditConfig.solver"):
        EditConfig.from_dict(d)
    # replace() validates too.
    with pytest.raises(ValueError, match="EditConfig.layers"):
        cfg.replace(layers=(1, 2))


@pytest.mark.parametrize("precision", ["fp64", "fp32"])
def test_layer_solver_solve_committed(precision):
    """``A^-1 B`` for the committed system (EMMET's solve), refined to float64 accuracy
    from an fp32 factor, before and after keys are committed."""
    from memit_fast.linalg import LayerSolver

    g = torch.Generator().manual_seed(12)
    C = spd_stats(dk=64, n_small=16, seed=12)
    B = torch.randn(64, 5, generator=g, dtype=torch.float64)
    K = torch.randn(64, 7, generator=g, dtype=torch.float64)
    s = LayerSolver(C, LAM, precision=precision)
    A = LAM * C.double()
    assert rel(s.solve_committed(B), torch.linalg.solve(A, B)) <= 1e-10
    s.commit(K)
    assert rel(s.solve_committed(B), torch.linalg.solve(A + K @ K.T, B)) <= 1e-10

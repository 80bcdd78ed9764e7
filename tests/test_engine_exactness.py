"""The engine computes DESIGN §2 exactly: compared with an independent per-request reference
(full model each step, torch.optim.Adam, float64 solve) on tiny GPT-2 and Llama models."""

import pytest
import torch
from reference_memit import ref_memit_config, ref_stats
from tiny import CORPUS, REQUESTS, TEMPLATES, make_gpt2, make_llama, make_tokenizer
from tiny import exact_config as config

from memit_fast.editor import Editor


def rel(a, b):
    return float(
        (a.detach().double() - b.detach().double()).norm()
        / b.detach().double().norm().clamp_min(1e-30)
    )


@pytest.mark.parametrize("make", [make_gpt2, make_llama], ids=["gpt2", "llama"])
def test_engine_matches_reference(make):
    tok = make_tokenizer()
    cfg = config()
    model_ref = make()
    model = make()
    # Statistics: the engine's batched pass vs the reference's one-text-at-a-time float64 pass.
    ed = Editor(model, tok, cfg, corpus=list(CORPUS))
    stats = ed.key_stats()
    ref_c = {l: ref_stats(model_ref, tok, l, CORPUS, cfg.stats_max_length) for l in cfg.layers}
    for l in cfg.layers:
        assert rel(stats[l].mom2, ref_c[l]) < 1e-5
    res = ed.apply(REQUESTS)
    Z_ref, steps_ref, dws_ref = ref_memit_config(model_ref, tok, REQUESTS, TEMPLATES, cfg, ref_c)
    assert res.targets.steps.tolist() == steps_ref
    assert rel(res.targets.z, Z_ref) <= 1e-4
    # Each request's target vector individually, too.
    for i in range(len(REQUESTS)):
        assert rel(res.targets.z[i], Z_ref[i]) <= 1e-4, i
    for l in cfg.layers:
        dW = res.factors[l][0].double() @ res.factors[l][1].double().T
        assert dW.norm() > 0
        assert rel(dW, dws_ref[l]) <= 1e-4, l
    # The edited weights themselves agree.
    for (n1, p1), (_, p2) in zip(model.named_parameters(), model_ref.named_parameters()):
        assert rel(p1, p2) <= 1e-4, n1


def test_batched_trajectories_equal_solo_runs():
    """A batch of 8 follows the 8 solo trajectories, including requests that stop early."""
    tok = make_tokenizer()
    model = make_gpt2()
    stats = {l: torch.eye(256) for l in (1, 2)}
    probe = Editor(model, tok, config(early_stop_loss=0.0, steps=10), stats=stats)
    from memit_fast.data import normalize_requests

    reqs = normalize_requests(REQUESTS)
    prepared = probe.prepare(reqs, TEMPLATES)
    from memit_fast.keys import pad_id
    from memit_fast.targets import TargetSettings, compute_targets

    def run(stop, chunk, steps=10):
        s = TargetSettings(
            layer=2,
            steps=steps,
            lr=0.05,
            clamp_norm_factor=4.0,
            weight_decay=1e-3,
            kl_factor=0.0625,
            early_stop_loss=stop,
            sync_every=3,
        )
        return compute_targets(model, probe.adapter, prepared, s, pad_id(tok), chunk)

    # A threshold that some requests cross halfway and others never reach.
    free = run(0.0, 8, steps=6)
    stop = float(free.loss.median())
    batched = run(stop, 8)
    solo = run(stop, 1)
    assert (batched.steps < 9).any() and (batched.steps == 9).any(), batched.steps
    assert batched.steps.tolist() == solo.steps.tolist()
    torch.testing.assert_close(batched.z, solo.z, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(batched.loss, solo.loss, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("make", [make_gpt2, make_llama], ids=["gpt2", "llama"])
def test_prefix_reuse_equals_whole_sequence_recompute(make, monkeypatch):
    """Steps that recompute only the tokens from the last subject token on (the prefix's
    keys/values computed once) give the trajectories of whole-sequence recomputation."""
    import memit_fast.targets as targets_mod
    from memit_fast.data import normalize_requests
    from memit_fast.keys import pad_id
    from memit_fast.targets import TargetSettings, compute_targets

    tok, model = make_tokenizer(), make()
    probe = Editor(model, tok, config(), stats={l: torch.eye(8) for l in (1, 2)})
    prepared = probe.prepare(normalize_requests(REQUESTS), TEMPLATES)
    made, caches = [], []
    real = targets_mod._frozen_prefix_cache

    def counting(*a, **k):
        c = real(*a, **k)
        made.append(c is not None)
        if c is not None:
            caches.append(c[0])
        return c

    monkeypatch.setattr(targets_mod, "_frozen_prefix_cache", counting)

    def run(reuse):
        s = TargetSettings(
            layer=1,
            steps=8,
            lr=0.05,
            clamp_norm_factor=4.0,
            weight_decay=1e-3,
            kl_factor=0.0625,
            early_stop_loss=0.0,
            reuse_prefix=reuse,
        )
        return compute_targets(model, probe.adapter, prepared, s, pad_id(tok), 8)

    whole = run(False)
    assert made == []
    reused = run(True)
    assert made and all(made), made  # the prefix path ran, in one group or more
    # Only the blocks after L = 1 read the cache during the steps; blocks 0 and 1 are freed.
    for c in caches:
        widths = [lay.keys.shape[-2] for lay in c.layers]
        assert widths[:2] == [0, 0] and min(widths[2:]) > 0, widths
        assert [lay.values.shape[-2] for lay in c.layers] == widths
    torch.testing.assert_close(reused.z, whole.z, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(reused.loss, whole.loss, rtol=1e-5, atol=1e-6)
    assert reused.steps.tolist() == whole.steps.tolist()


@pytest.mark.parametrize("make", [make_gpt2, make_llama], ids=["gpt2", "llama"])
def test_update_order_writes_the_keys_orders_update(make):
    """``solve_order="update"`` solves for the ``dh`` columns of ``A^-1 K R^T`` instead of
    the ``n`` keys: the same update to float64 accuracy (GPT-2's transposed Conv1D and
    Llama's Linear), with factors ``(I, dW^T)``."""
    tok = make_tokenizer()
    cfg = config()
    stats = {
        l: s.mom2 for l, s in Editor(make(), tok, cfg, corpus=list(CORPUS)).key_stats().items()
    }
    models, results = {}, {}
    for order in ("keys", "update"):
        models[order] = make()
        ed = Editor(models[order], tok, cfg.replace(solve_order=order), stats=stats)
        results[order] = ed.apply(REQUESTS)
    n = len(results["keys"].requests)
    for l in cfg.layers:
        R, U = results["keys"].factors[l]
        I, D = results["update"].factors[l]
        dh, dk = R.shape[0], U.shape[0]
        assert R.shape == (dh, n) and U.shape == (dk, n)
        assert torch.equal(I, torch.eye(dh)) and D.shape == (dk, dh)
        # (each order rounds through fp32 factors; layer 2 also sees layer 1's rounding)
        assert rel(results["update"].delta(l), results["keys"].delta(l)) <= 1e-5, l
    for (n1, p1), (_, p2) in zip(
        models["update"].named_parameters(), models["keys"].named_parameters()
    ):
        assert rel(p1, p2) <= 1e-5, n1
    results["update"].revert()
    fresh = make()
    for (n1, p1), (_, p2) in zip(models["update"].named_parameters(), fresh.named_parameters()):
        assert torch.equal(p1, p2), n1


def test_auto_order_solves_for_fewer_right_hand_sides():
    """``solve_order="auto"`` (the default): the keys while ``n <= dh``, the update's ``dh``
    columns once there are more requests than the layer is wide (here dh = 8 < 12)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = make_tokenizer()

    def narrow():
        torch.manual_seed(0)
        cfg = GPT2Config(vocab_size=len(tok), n_positions=128, n_embd=8, n_layer=4, n_head=2)
        return GPT2LMHeadModel(cfg).eval()

    assert config().solve_order == "auto"
    cfg = config(layers=(2,))  # one layer: both orders solve the very same system
    stats = {
        l: s.mom2 for l, s in Editor(narrow(), tok, cfg, corpus=list(CORPUS)).key_stats().items()
    }
    cities = ["Paris", "Rome", "London", "Berlin", "Madrid", "Vienna"]
    many = [
        {"prompt": "{} was born in", "subject": f"Person {i}", "target": cities[i % 6]}
        for i in range(12)
    ]
    few = Editor(narrow(), tok, cfg, stats=stats).apply(many[:5])
    assert few.factors[2][0].shape == (8, 5)  # the residuals: keys order
    auto = Editor(narrow(), tok, cfg, stats=stats).apply(many)
    keys = Editor(narrow(), tok, cfg.replace(solve_order="keys"), stats=stats).apply(many)
    for l in cfg.layers:
        assert torch.equal(auto.factors[l][0], torch.eye(8))  # update order
        assert keys.factors[l][0].shape == (8, 12)
        assert rel(auto.delta(l), keys.delta(l)) <= 1e-6, l


def test_unknown_solve_order_is_named():
    with pytest.raises(ValueError, match="solve_order 'rhs' is unknown"):
        config(solve_order="rhs")

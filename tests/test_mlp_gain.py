"""How a block's output moves with its MLP projection's output (``keys.mlp_output_gain``),
and the edit that divides MEMIT's residuals by it: Granite and MiniCPM 3 multiply the MLP's
output before the residual sum, so a projection that moves by ``R`` moves the block's output
by only ``multiplier * R``. The expected multipliers come from the models' configs."""

from __future__ import annotations

import pytest
import torch
from reference_memit import residual_branch_multiplier
from test_arch_families import NEW, _opt
from tiny import CORPUS, REQUESTS, arch_makers, make_gpt2, make_tokenizer
from tiny import exact_config as config

from memit_fast.arch import ArchSpec, ModelAdapter
from memit_fast.editor import Editor
from memit_fast.keys import mlp_output_gain

IDS = [3, 17, 42, 9, 100, 7, 55]
# MiniCPM 3 has no built-in adapter; its layout is Llama's.
LLAMA_SPEC = ArchSpec("model.layers", "mlp.down_proj", "model.norm")


def _make(model_type):
    if model_type == "minicpm3":
        import transformers as T
        from tiny import _llama_like

        mla = dict(q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
                   v_head_dim=16, head_dim=8, num_key_value_heads=4, initializer_range=0.1)  # fmt: skip
        return _llama_like(T.MiniCPM3Config, T.MiniCPM3ForCausalLM, **mla)()
    makers = arch_makers()
    return makers[model_type]() if model_type in makers else NEW[model_type][0]()


def _spec(model):
    return LLAMA_SPEC if model.config.model_type == "minicpm3" else None


@pytest.mark.parametrize("model_type", ["gpt2", "llama", "gptj", "granite", "minicpm3"])
def test_gain_is_the_configured_multiplier(model_type):
    model = make_gpt2() if model_type == "gpt2" else _make(model_type)
    want = residual_branch_multiplier(model.config)
    ad = ModelAdapter(model, _spec(model))
    for layer in (0, ad.n_layers - 1):
        g = mlp_output_gain(model, ad, layer, IDS)
        assert g is not None and abs(g - want) <= 1e-5 * want, (layer, g, want)
    if model_type in ("granite", "minicpm3"):
        assert abs(want - 1.0) > 0.1  # the tiny configs do scale


@pytest.mark.parametrize("model_type", ["gemma2", "olmo2", "hyperclovax", "opt_post_norm"])
def test_no_single_gain_behind_a_norm(model_type):
    """A norm after the MLP (Gemma 2, OLMo 2, HyperCLOVA X's post-norms) or after the residual
    sum (post-norm OPT): the block's output is not linear in the projection's."""
    model = (
        _opt(do_layer_norm_before=False)() if model_type == "opt_post_norm" else _make(model_type)
    )
    ad = ModelAdapter(model)
    assert mlp_output_gain(model, ad, 1, IDS) is None


def test_gain_in_bfloat16():
    model = _make("granite").to(torch.bfloat16)
    g = mlp_output_gain(model, ModelAdapter(model), 1, IDS)
    assert g is not None and abs(g - 0.5) < 5e-3


@pytest.mark.parametrize("model_type", ["granite", "minicpm3"])
def test_scaled_branch_edit_reaches_its_target(model_type):
    """One layer, one request, a small lambda: MEMIT's update writes ``R`` almost exactly, so
    the block's output at the subject's last token lands on the optimized target vector. With
    the projection moved by ``R`` alone it would land only ``multiplier`` of the way."""
    model = _make(model_type)
    tok = make_tokenizer()
    ad = ModelAdapter(model, _spec(model))
    r = REQUESTS[0]
    pos = len(tok(r["prompt"].split("{}")[0] + r["subject"])["input_ids"]) - 1
    ids = torch.tensor([tok(r["prompt"].replace("{}", r["subject"]))["input_ids"]])

    def hidden():
        got = {}
        h = ad.block(2).register_forward_hook(
            lambda m, a, o: got.update(h=(o[0] if isinstance(o, tuple) else o)[0, pos])
        )
        try:
            with torch.no_grad():
                model(input_ids=ids, use_cache=False)
        finally:
            h.remove()
        return got["h"].double()

    h0 = hidden()
    cfg = config(layers=(2,), context_templates=("{}",), mom2_update_weight=1e-4, steps=10)
    res = Editor(model, tok, cfg, corpus=list(CORPUS), arch=_spec(model)).apply([r])
    z = res.targets.z[0].double()
    moved = float((hidden() - h0).norm() / (z - h0).norm())
    assert abs(moved - 1.0) < 0.02, moved
    res.revert()


def test_dead_key_coordinates_opt():
    """OPT's ReLU leaves key coordinates that no statistics token activates: ``lambda C`` is
    singular there. The edit goes through, and its update is MEMIT's solve on the live
    coordinates alone (float64 ``torch.linalg.solve``), zero in the dead ones' columns."""
    model = NEW["opt"][0]()
    tok = make_tokenizer()
    cfg = config(steps=5)
    ed = Editor(model, tok, cfg, corpus=list(CORPUS))
    C = ed.key_stats()[2].mom2.double()
    dead = C.diagonal() == 0
    assert int(dead.sum()) >= 1  # the premise: this tiny OPT has a dead unit in layer 2
    res = ed.apply(REQUESTS[:2])
    R, U = (t.double() for t in res.factors[2])
    K = res.keys[2].double()
    assert torch.equal(K[dead], torch.zeros_like(K[dead]))
    live = ~dead
    A = cfg.mom2_update_weight * C[live][:, live] + K[live] @ K[live].T
    U_ref = torch.zeros_like(U)
    U_ref[live] = torch.linalg.solve(A, K[live])
    dW, dW_ref = R @ U.T, R @ U_ref.T
    assert float((dW - dW_ref).norm() / dW_ref.norm()) < 1e-5
    assert torch.equal(dW[:, dead], torch.zeros_like(dW[:, dead]))
    res.revert()


def test_keys_on_a_dead_coordinate_are_reported(caplog):
    """Statistics that never activate coordinate 0 while the edited keys do (GPT-2's GELU
    keys are nonzero everywhere): the edit goes through and the editor warns that the
    update may use that coordinate almost freely; OPT's keys, zero there, give no warning."""
    import logging

    model = make_gpt2()
    dk = 4 * model.config.n_embd
    g = torch.Generator().manual_seed(0)
    X = torch.randn(4 * dk, dk, generator=g)
    X[:, 0] = 0
    C = X.T @ X / X.shape[0]
    cfg = config(layers=(2,), context_templates=("{}",), steps=3)
    with caplog.at_level(logging.WARNING, logger="memit_fast"):
        res = Editor(model, make_tokenizer(), cfg, stats={2: C}).apply(REQUESTS[:2])
    assert any(
        "use 1 key coordinates that no statistics token" in r.message for r in caplog.records
    )
    assert all(bool(torch.isfinite(t).all()) for t in res.factors[2])
    res.revert()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="memit_fast"):
        Editor(NEW["opt"][0](), make_tokenizer(), config(steps=2), corpus=list(CORPUS)).apply(
            REQUESTS[:2]
        )
    assert not any("no statistics token" in r.message for r in caplog.records)

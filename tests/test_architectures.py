"""Every architecture family with a built-in adapter is edited exactly: the engine against the
independent per-request reference (tests/reference_memit.py) on a tiny model of each, built
from its config. GPT-2 and Llama have the fuller exactness suite in test_engine_exactness.py."""

import pytest
import torch
from reference_memit import ref_memit_config, ref_stats
from test_arch_families import NEW
from tiny import CORPUS, REQUESTS, TEMPLATES, arch_makers, count_prefix_caches, make_tokenizer
from tiny import exact_config as config

from memit_fast.arch import ARCH_SPECS, ArchSpec, ModelAdapter
from memit_fast.editor import Editor

MAKERS = {**arch_makers(), **{t: make for t, (make, _, _) in NEW.items()}}
# The families the reference (tests/reference_memit.py) lays out: its own table, and the Llama
# layout for the rest of tests/tiny.py's and of the new ones that have it. The other new
# families are edited against their own checks in test_arch_families.py. (Youtu's targets
# differ from the reference's by 1.3e-4 relative, over the 1e-4 the test allows.)
LLAMA_LAYOUT = {t for t in NEW if ARCH_SPECS[t] == ArchSpec("model.layers", "mlp.down_proj", "model.norm")}  # fmt: skip
OTHERS = sorted((set(arch_makers()) | LLAMA_LAYOUT) - {"gpt2", "llama"})


def rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def test_every_built_in_adapter_has_a_tiny_model():
    assert set(MAKERS) == set(ARCH_SPECS)


@pytest.mark.parametrize("model_type", OTHERS)
def test_engine_matches_reference(model_type):
    make = MAKERS[model_type]
    tok = make_tokenizer()
    cfg = config()
    model, model_ref = make(), make()
    assert model.config.model_type == model_type
    ed = Editor(model, tok, cfg, corpus=list(CORPUS))
    stats = ed.key_stats()
    ref_c = {l: ref_stats(model_ref, tok, l, CORPUS, cfg.stats_max_length) for l in cfg.layers}
    for l in cfg.layers:
        assert rel(stats[l].mom2, ref_c[l]) < 1e-5, l
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    res = ed.apply(REQUESTS)
    systems = {}
    Z_ref, steps_ref, dws_ref = ref_memit_config(
        model_ref, tok, REQUESTS, TEMPLATES, cfg, ref_c, systems
    )
    assert res.targets.steps.tolist() == steps_ref
    # The optimization moved the targets (a vacuous edit would agree trivially).
    assert rel(res.targets.z, res.targets.h) > 1e-2
    for i in range(len(REQUESTS)):
        assert rel(res.targets.z[i], Z_ref[i]) <= 1e-4, i
    tol = {}
    for l in cfg.layers:
        dW = res.factors[l][0].double() @ res.factors[l][1].double().T
        assert dW.norm() > 0
        # The inputs (fp32 statistics, keys, targets) agree to ~1e-6; the solve amplifies
        # that by up to cond(A), which reaches 1e5 for GPT-J's tiny random statistics.
        cond = float(torch.linalg.cond(systems[l]))
        tol[ed.adapter.weight_name(l)] = max(1e-4, 1e-8 * cond)
        assert rel(dW, dws_ref[l]) <= tol[ed.adapter.weight_name(l)], (l, cond)
    # The edited weights agree with the reference's; nothing else was written.
    for (name, p), (_, q) in zip(model.named_parameters(), model_ref.named_parameters()):
        if name in tol:
            assert not torch.equal(p, before[name]), name
            assert rel(p - before[name], q - before[name]) <= tol[name], name
        else:
            assert torch.equal(p, before[name]) and torch.equal(q, before[name]), name
    res.revert()
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name


def _targets(model, tok, monkeypatch, reuse):
    """Target vectors of REQUESTS at layer 1 (8 steps, no early stop), and per chunk group
    whether the frozen prefix cache was used."""
    from memit_fast.data import normalize_requests
    from memit_fast.keys import pad_id
    from memit_fast.targets import TargetSettings, compute_targets

    probe = Editor(model, tok, config(), stats={l: torch.eye(160) for l in (1, 2)})
    prepared = probe.prepare(normalize_requests(REQUESTS), TEMPLATES)
    used = count_prefix_caches(monkeypatch)
    s = TargetSettings(layer=1, steps=8, lr=0.05, clamp_norm_factor=4.0, weight_decay=1e-3,
                       kl_factor=0.0625, early_stop_loss=0.0, reuse_prefix=reuse)  # fmt: skip
    out = compute_targets(model, probe.adapter, prepared, s, pad_id(tok), 8)
    monkeypatch.undo()
    return out, used


@pytest.mark.parametrize("model_type", ["mistral", "gemma2", "gemma3_text"])
@pytest.mark.parametrize("window", [4096, 24, 12])
def test_prefix_reuse_with_sliding_window_layers(model_type, window, monkeypatch):
    """Sliding-window layers keep the prefix cache where the window spans every column a
    step reads (Mistral's and Gemma's windows of thousands of tokens against prompts of
    tens); a group whose columns exceed it recomputes whole sequences. Either way the
    trajectories are those of whole-sequence recomputation."""
    tok = make_tokenizer()
    model = MAKERS[model_type]()
    cfg = type(model.config)(**{**model.config.to_dict(), "sliding_window": window})
    torch.manual_seed(0)
    model = type(model)(cfg).eval()
    whole, used = _targets(model, tok, monkeypatch, reuse=False)
    assert used == []
    reused, used = _targets(model, tok, monkeypatch, reuse=True)
    if window == 4096:
        assert used and all(used), used
    if window == 12:  # every group's prefix and suffix together exceed 12 columns
        assert used and not any(used), used
    scale = (whole.z - whole.h).norm()
    assert float((reused.z - whole.z).norm() / scale) < 1e-5
    assert reused.steps.tolist() == whole.steps.tolist()


def test_logits_post_processing_is_reproduced_or_refused():
    """The adapter's logits are the model's own (Gemma's cap, Cohere's and Granite's scales);
    a forward that does more than the adapter knows is refused before anything is written."""
    from tiny import assert_bit_identical, snapshot

    from memit_fast.arch import UnsupportedArchitectureError

    ids = torch.tensor([[3, 17, 42, 9, 100, 7]])
    for model_type in ("gemma3_text", "cohere", "granite"):
        model = MAKERS[model_type]()
        ad = ModelAdapter(model)
        assert ad.logit_softcap is not None or ad.logit_multiplier != 1.0, model_type
        assert ad.check_head(ids) < 1e-5
    # Gemma 3's image-text model does not cap its logits, though its text config names a cap;
    # capping them anyway is caught even where the logits are small (here about 0.5).
    ad = ModelAdapter(MAKERS["gemma3"]())
    assert ad.model.config.get_text_config().final_logit_softcapping == 30.0
    assert ad.logit_softcap is None and ad.check_head(ids) < 1e-6
    ad.logit_softcap = 30.0
    with pytest.raises(UnsupportedArchitectureError, match="differ from the model's own"):
        ad.check_head(ids)
    # A wrong final norm in a user's spec, and a forward that rescales the logits itself.
    tok = make_tokenizer()
    model = MAKERS["llama"]()
    with torch.no_grad():  # a trained norm's weights are not the initial ones
        model.model.norm.weight.mul_(2.0)
    spec = ArchSpec("model.layers", "mlp.down_proj", "model.layers.3.post_attention_layernorm")
    with pytest.raises(UnsupportedArchitectureError, match="differ from the model's own"):
        Editor(model, tok, config(), arch=spec).apply(REQUESTS[:1])
    forward = model.forward

    def scaled(*a, **k):
        out = forward(*a, **k)
        out.logits = out.logits * 3.0
        return out

    model.forward = scaled
    snap = snapshot(model)
    with pytest.raises(UnsupportedArchitectureError, match="model.norm"):
        Editor(model, tok, config(), stats={l: torch.eye(160) for l in (1, 2)}).apply(REQUESTS[:1])
    assert_bit_identical(model, snap)


@pytest.mark.parametrize("model_type", ["gemma3", "falcon", "phi", "starcoder2", "gpt_bigcode"])
def test_saved_edit_replays_on_another_copy(model_type, tmp_path):
    """The weights an edit names exist under the same names in another copy of the model,
    for the layouts unlike Llama's (a language model inside an image-text model,
    ``transformer.h``, ``fc2``, ``c_proj``): the saved edit applies there bit for bit and
    reverts."""
    from tiny import assert_bit_identical, snapshot

    from memit_fast import load_edit

    make = MAKERS[model_type]
    model, other = make(), make()
    before = snapshot(other)
    dk = ModelAdapter(model).dims()[0]
    res = Editor(model, make_tokenizer(), config(), stats={l: torch.eye(dk) for l in (1, 2)}).apply(
        REQUESTS[:3]
    )
    res.save(tmp_path / "edit")
    edit = load_edit(tmp_path / "edit")
    edit.apply(other)
    for (name, p), (_, q) in zip(model.state_dict().items(), other.state_dict().items()):
        assert torch.equal(p, q), name
    assert not all(torch.equal(p, before[n]) for n, p in other.state_dict().items())
    edit.revert(other)
    assert_bit_identical(other, before)

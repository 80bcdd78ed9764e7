"""Editor behaviour: revert, transactions, dtypes, validation, modes, devices."""

import subprocess
import sys

import pytest
import torch
from tiny import (
    CORPUS,
    REQUESTS,
    assert_bit_identical,
    make_gpt2,
    make_llama,
    make_tokenizer,
    snapshot,
)

import memit_fast.editor as editor_mod
import memit_fast.keys as keys_mod
from memit_fast import EditConfig, EditRequestError
from memit_fast import linalg as linalg_mod
from memit_fast.arch import ArchSpec, UnsupportedArchitectureError
from memit_fast.editor import EditFailedError, Editor

TEMPLATES = ("{}", "The weather is nice today. {}")


def cfg(**kw):
    base = dict(
        layers=(1, 2),
        steps=4,
        context_templates=TEMPLATES,
        mom2_update_weight=10.0,
        clamp_norm_factor=4.0,
    )
    base.update(kw)
    return EditConfig(**base)


def stats_for(model):
    ed = Editor(model, make_tokenizer(), cfg(), corpus=["a b c d e f g"] * 4)
    dk = ed.adapter.dims()[0]
    return {l: torch.eye(dk) for l in (1, 2)}


@pytest.mark.parametrize("make", [make_gpt2, make_llama], ids=["gpt2", "llama"])
def test_apply_changes_weights_and_revert_restores_bits(make):
    model, tok = make(), make_tokenizer()
    snap = snapshot(model)
    res = Editor(model, tok, cfg(), stats=stats_for(model)).apply(REQUESTS)
    changed = [n for n, p in model.state_dict().items() if not torch.equal(p, snap[n])]
    assert sorted(changed) == sorted(res.weight_names.values())
    for l in res.layers:
        W = dict(model.named_parameters())[res.weight_names[l]]
        torch.testing.assert_close(
            W.detach() - snap[res.weight_names[l]], res.delta(l), rtol=1e-4, atol=1e-6
        )
    res.revert()
    assert_bit_identical(model, snap)
    with pytest.raises(RuntimeError, match="already reverted"):
        res.revert()


def test_one_editor_applies_and_reverts_again_and_again():
    model, tok = make_gpt2(), make_tokenizer()
    snap = snapshot(model)
    ed = Editor(model, tok, cfg(steps=2), stats=stats_for(model))
    for reqs in (REQUESTS, REQUESTS[:1], REQUESTS[:1] * 2):
        res = ed.apply(reqs)
        assert not torch.equal(
            dict(model.named_parameters())[res.weight_names[1]], snap[res.weight_names[1]]
        )
        res.revert()
        assert_bit_identical(model, snap)
    # Out of order is refused while the later edit on the same layers is applied.
    a, b = ed.apply(REQUESTS[:1]), ed.apply(REQUESTS[1:2])
    with pytest.raises(RuntimeError, match="reverse order"):
        a.revert()
    b.revert()
    a.revert()
    assert_bit_identical(model, snap)


# (module, function, calls allowed before the fault): every phase boundary, and inside the
# layer loop after the first layer has been written (after=1).
PHASES = [
    (editor_mod, "generate_context_templates", 0),
    (editor_mod, "collect_stats", 0),
    (editor_mod, "compute_targets", 0),
    (editor_mod, "keys_and_hidden", 0),
    (editor_mod, "keys_and_hidden", 1),
    (linalg_mod.LayerSolver, "solve", 0),
    (linalg_mod.LayerSolver, "solve", 1),
    (linalg_mod, "apply_update", 0),
    (linalg_mod, "apply_update", 1),
]


@pytest.mark.parametrize("phase", range(len(PHASES)), ids=[f"{p[1]}-{p[2]}" for p in PHASES])
@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_fault_at_every_phase_leaves_weights_bit_identical(monkeypatch, phase, exc):
    model, tok = make_gpt2(), make_tokenizer()
    mod, name, after = PHASES[phase]
    # Generated templates so that their phase runs; identity statistics (the tiny random
    # model's own keys are too degenerate to solve against) except where statistics fail.
    c = cfg(context_templates=None, context_template_length=4)
    st = None if name == "collect_stats" else stats_for(model)
    ed = Editor(model, tok, c, corpus=list(CORPUS), stats=st)
    snap = snapshot(model)
    real = getattr(mod, name)
    calls = {"n": 0}

    def faulty(*a, **k):
        if calls["n"] >= after:
            raise exc("injected")
        calls["n"] += 1
        return real(*a, **k)

    monkeypatch.setattr(mod, name, faulty)
    with pytest.raises(exc, match="injected"):
        ed.apply(REQUESTS)
    assert_bit_identical(model, snap)


def test_fault_after_a_layer_is_written(monkeypatch):
    """The second layer's key pass fails after the first layer's weights were written."""
    model, tok = make_gpt2(), make_tokenizer()
    ed = Editor(model, tok, cfg(layers=(0, 1, 2)), stats={l: torch.eye(256) for l in (0, 1, 2)})
    snap = snapshot(model)
    real = editor_mod.keys_and_hidden
    written = []

    def faulty(*a, **k):
        if len(written) == 2:
            # two layers written: the weights differ from the snapshot right now
            assert any(not torch.equal(p, snap[n]) for n, p in model.state_dict().items())
            raise RuntimeError("injected")
        written.append(k["key_layer"])
        return real(*a, **k)

    monkeypatch.setattr(editor_mod, "keys_and_hidden", faulty)
    with pytest.raises(RuntimeError, match="injected"):
        ed.apply(REQUESTS)
    assert_bit_identical(model, snap)


def test_non_finite_target_is_named_and_not_written(monkeypatch):
    model, tok = make_gpt2(), make_tokenizer()
    ed = Editor(model, tok, cfg(), stats=stats_for(model))
    snap = snapshot(model)
    real = editor_mod.compute_targets

    def nan_third(*a, **k):
        r = real(*a, **k)
        r.z[2, 0] = float("nan")
        return r

    monkeypatch.setattr(editor_mod, "compute_targets", nan_third)
    with pytest.raises(EditFailedError, match=r"requests \[2\]"):
        ed.apply(REQUESTS)
    assert_bit_identical(model, snap)


def test_ill_conditioned_solve_says_what_to_change():
    model, tok = make_gpt2(), make_tokenizer()
    zero = {l: torch.zeros(256, 256) for l in (1, 2)}
    ed = Editor(model, tok, cfg(), stats=zero)
    snap = snapshot(model)
    with pytest.raises(EditFailedError, match="lambda"):
        ed.apply(REQUESTS)  # 8 keys cannot span 256 dimensions where lambda * C is 0
    assert_bit_identical(model, snap)


def test_bad_requests_rejected_before_any_write():
    model, tok = make_gpt2(), make_tokenizer()
    ed = Editor(model, tok, cfg(), stats=stats_for(model))
    snap = snapshot(model)
    bad = [
        REQUESTS[0],
        {"prompt": "The capital of France is", "subject": "France", "target": "Rome"},
        {"prompt": "{} is {}", "subject": "x", "target": "y"},
        {"prompt": "{} plays", "subject": "  ", "target": "golf"},
        {"prompt": "{} plays", "subject": "Ann", "target": ""},
        {"prompt": "{} plays", "subject": 3, "target": "golf"},
        "not a request",
        {"prompt": REQUESTS[0]["prompt"], "subject": REQUESTS[0]["subject"], "target": "tennis"},
    ]
    with pytest.raises(EditRequestError) as ei:
        ed.apply(bad)
    msg = str(ei.value)
    for needle in (
        "request 1: field 'prompt'",
        "request 2: field 'prompt'",
        "request 3: field 'subject'",
        "request 4: field 'target'",
        "request 5: field 'subject'",
        "request 6:",
        "requests 0 and 7",
    ):
        assert needle in msg, needle
    assert len(ei.value.problems) == 7
    assert_bit_identical(model, snap)


def test_too_long_for_context_is_rejected():
    model, tok = make_gpt2(), make_tokenizer()
    ed = Editor(model, tok, cfg(), stats=stats_for(model))
    long = {"prompt": "{} " + "and so on " * 40, "subject": "Ann", "target": "golf"}
    with pytest.raises(EditRequestError, match="context of 128"):
        ed.apply([long])


def test_duplicates_are_merged():
    model, tok = make_gpt2(), make_tokenizer()
    res = Editor(model, tok, cfg(), stats=stats_for(model)).apply(
        REQUESTS[:2] + [dict(REQUESTS[0])]
    )
    assert len(res.requests) == 2


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision_models(dtype):
    """fp16/bf16 weights: math in fp32 inside, the result close to the fp32 edit."""
    tok = make_tokenizer()
    m32 = make_llama()
    mlo = make_llama(dtype=dtype)
    st = stats_for(m32)
    r32 = Editor(m32, tok, cfg(), stats=st).apply(REQUESTS)
    snap = snapshot(mlo)
    rlo = Editor(mlo, tok, cfg(), stats=st).apply(REQUESTS)
    assert rlo.targets.z.dtype == torch.float32
    for l in (1, 2):
        W = mlo.model.layers[l].mlp.down_proj.weight
        assert W.dtype == dtype and torch.isfinite(W).all()
        d = rlo.delta(l)
        cos = torch.nn.functional.cosine_similarity(d.flatten(), r32.delta(l).flatten(), dim=0)
        assert cos > 0.9, float(cos)
    rlo.revert()
    assert_bit_identical(mlo, snap)


def test_modes_and_requires_grad_are_restored_and_no_grad_callers_work():
    model, tok = make_gpt2(), make_tokenizer()
    model.train()
    model.transformer.h[0].attn.c_attn.weight.requires_grad_(False)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with torch.no_grad():
        res = Editor(model, tok, cfg(), stats=stats_for(model)).apply(REQUESTS[:3])
    assert model.training and all(m.training for m in model.modules())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
    assert res.targets.steps.max() > 0


def test_unknown_architecture_gets_a_clear_error_and_arch_override_works():
    model, tok = make_gpt2(), make_tokenizer()
    model.config.model_type = "mystery"
    with pytest.raises(UnsupportedArchitectureError, match="pass arch="):
        Editor(model, tok, cfg())
    spec = ArchSpec("transformer.h", "mlp.c_proj", "transformer.ln_f", transposed=True)
    Editor(model, tok, cfg(), arch=spec, stats=stats_for(make_gpt2())).apply(REQUESTS[:2])


def test_layers_outside_the_model_are_rejected():
    with pytest.raises(ValueError, match="do not exist"):
        Editor(make_gpt2(), make_tokenizer(), cfg(layers=(2, 7)))


def test_simulated_oom_halves_the_chunk_with_the_same_result(monkeypatch, caplog):
    model, tok = make_gpt2(), make_tokenizer()
    st = stats_for(model)
    ref = Editor(model, tok, cfg(target_chunk_size=8), stats=st).apply(REQUESTS)
    ref.revert()
    import memit_fast.targets as targets_mod

    real = targets_mod.optimize_chunk
    sizes = []

    def oom_above_2(model_, adapter, prepared, *a, **k):
        sizes.append(len(prepared))
        if len(prepared) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(model_, adapter, prepared, *a, **k)

    monkeypatch.setattr(targets_mod, "optimize_chunk", oom_above_2)
    with caplog.at_level("WARNING"):
        res = Editor(model, tok, cfg(target_chunk_size=8), stats=st).apply(REQUESTS)
    assert sizes[:3] == [8, 4, 2] and max(sizes[3:]) == 2
    assert "out of memory" in caplog.text
    torch.testing.assert_close(res.targets.z, ref.targets.z, rtol=1e-5, atol=1e-6)
    for l in (1, 2):
        torch.testing.assert_close(res.delta(l), ref.delta(l), rtol=1e-4, atol=1e-6)


def test_subject_found_across_bpe_merges():
    tok = make_tokenizer()
    # "France" followed by "'s" and by "," — the subject's last token must cover "France".
    for prompt in ("{}'s capital is", "{}, a country", "In {}s"):
        e = keys_mod.encode_with_subject(tok, "Hello. ", prompt, "France")
        text = "Hello. " + prompt.replace("{}", "France")
        enc = tok(text, return_offsets_mapping=True)
        a, b = enc["offset_mapping"][e.subject_last]
        start = text.index("France")
        assert a < start + len("France") <= b or (a < start + 6 and b >= start + 6 - 1)
        # no later token overlaps the subject
        for a2, _ in enc["offset_mapping"][e.subject_last + 1 :]:
            assert a2 >= start + len("France")


def test_import_does_not_touch_the_gpu():
    code = (
        "import torch, memit_fast, memit_fast.editor, memit_fast.kernels, memit_fast.linalg\n"
        "assert not torch.cuda.is_initialized()\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


def test_phase_clock_waits_for_every_initialized_cuda_device(monkeypatch):
    """Phase timings wait for queued CUDA work (else it is billed to the next phase that
    waits), on every device of a split model, and never initialize CUDA themselves."""
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda i=None: calls.append(i))
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    editor_mod._clock()
    assert calls == []
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch._C, "_cuda_hasPrimaryContext", lambda i: True, raising=False)
    t = editor_mod._clock()
    assert calls == [0, 1] and isinstance(t, float)
    # A device this process has no context on is left alone (synchronizing it would
    # create one).
    calls.clear()
    monkeypatch.setattr(torch._C, "_cuda_hasPrimaryContext", lambda i: i == 1, raising=False)
    editor_mod._clock()
    assert calls == [1]


def test_fault_while_the_keys_join_the_factors_leaves_no_trace(monkeypatch):
    """The last step of a remembering apply folds its keys into the cached layer factors.
    A fault there (Ctrl-C, out of memory) restores the weights, drops the factors it
    touched, and a retry gives what one clean apply gives."""
    tok = make_tokenizer()
    model = make_gpt2()
    st = stats_for(model)
    snap = snapshot(model)
    ed = Editor(model, tok, cfg(), stats=st)
    first = ed.apply(REQUESTS[:2])  # the factors now exist and will take the next keys
    after_first = snapshot(model)
    calls = []
    real = linalg_mod.LayerSolver.commit

    def flaky(self, K):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, K)

    monkeypatch.setattr(linalg_mod.LayerSolver, "commit", flaky)
    with pytest.raises(KeyboardInterrupt):
        ed.apply(REQUESTS[2:4])
    monkeypatch.setattr(linalg_mod.LayerSolver, "commit", real)
    assert_bit_identical(model, after_first)
    assert [w.holder() for w in ed._written] == [first]
    second = ed.apply(REQUESTS[2:4])

    clean_model = make_gpt2()
    clean = Editor(clean_model, tok, cfg(), stats=st)
    clean.apply(REQUESTS[:2])
    clean.apply(REQUESTS[2:4])
    for n, p in clean_model.state_dict().items():
        assert torch.equal(model.state_dict()[n], p), n
    second.revert()
    first.revert()
    assert_bit_identical(model, snap)


def test_errors_name_the_callers_index_after_merged_duplicates():
    model, tok = make_gpt2(), make_tokenizer()
    ed = Editor(model, tok, cfg(), stats=stats_for(model))
    long = {"prompt": "{} " + "and so on " * 40, "subject": "Ann", "target": "golf"}
    with pytest.raises(EditRequestError) as ei:
        ed.apply([REQUESTS[0], dict(REQUESTS[0]), dict(REQUESTS[0]), long])
    assert ei.value.problems[0].startswith("request 3:"), ei.value.problems


def test_submodule_modes_are_restored():
    """A model in training mode with a frozen part in eval mode keeps both after apply."""
    model, tok = make_gpt2(), make_tokenizer()
    model.train()
    model.transformer.h[0].eval()
    modes = {n: m.training for n, m in model.named_modules()}
    Editor(model, tok, cfg(), stats=stats_for(model)).apply(REQUESTS[:2])
    assert {n: m.training for n, m in model.named_modules()} == modes


def test_new_config_takes_effect_and_keeps_what_it_can():
    """Assigning a config with another lambda gives the edit a fresh Editor with that
    lambda gives, reusing the statistics; layers outside the model are refused."""
    tok = make_tokenizer()
    corpus = list(CORPUS)
    model = make_gpt2()
    ed = Editor(model, tok, cfg(), corpus=corpus, remember_keys=False)
    ed.apply(REQUESTS[:2]).revert()
    stats = dict(ed._stats)
    ed.config = ed.config.replace(mom2_update_weight=3.0)
    assert all(ed._stats[l] is stats[l] for l in stats)  # lambda does not touch them
    got = ed.apply(REQUESTS[:2])

    fresh_model = make_gpt2()
    want = Editor(fresh_model, tok, cfg(mom2_update_weight=3.0), corpus=corpus).apply(REQUESTS[:2])
    for l in got.layers:
        assert torch.equal(got.delta(l), want.delta(l))
    assert got.config.mom2_update_weight == 3.0

    ed.config = ed.config.replace(stats_samples=30)
    assert not ed._stats  # computed for the old settings: dropped
    with pytest.raises(ValueError, match="do not exist"):
        ed.config = ed.config.replace(layers=(1, 9))
    assert ed.config.layers == (1, 2)


def test_revert_refuses_weights_changed_by_someone_else():
    """Two Editors on one model: reverting the first edit while the second holds the same
    layers would wipe the second; it is refused unless forced."""
    model, tok = make_gpt2(), make_tokenizer()
    st = stats_for(model)
    snap = snapshot(model)
    a = Editor(model, tok, cfg(), stats=st).apply(REQUESTS[:2])
    b = Editor(model, tok, cfg(), stats=st).apply(REQUESTS[2:4])
    with pytest.raises(RuntimeError, match=r"layers \[1, 2\] changed after this edit"):
        a.revert()
    assert not a.reverted
    b.revert()
    a.revert()
    assert_bit_identical(model, snap)
    c = Editor(model, tok, cfg(), stats=st).apply(REQUESTS[:2])
    with torch.no_grad():
        model.transformer.h[1].mlp.c_proj.weight[0, 0] += 1.0
    with pytest.raises(RuntimeError, match=r"layers \[1\] changed"):
        c.revert()
    c.revert(force=True)
    assert_bit_identical(model, snap)


def test_weight_fingerprint_is_exact_and_sees_one_bit():
    for dtype in (torch.float32, torch.bfloat16, torch.float64, torch.float16):
        W = torch.randn(37, 53).to(dtype)
        fp = editor_mod.weight_fingerprint(W)
        assert torch.equal(fp, editor_mod.weight_fingerprint(W.clone()))
        bits = W.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[W.element_size()])
        for i in (0, 977, W.numel() - 1):
            flipped = bits.clone().reshape(-1)
            flipped[i] ^= 1  # the lowest mantissa bit of one element
            V = flipped.view(dtype).reshape(W.shape)
            assert not torch.equal(editor_mod.weight_fingerprint(V), fp), (dtype, i)


def test_apply_under_inference_mode_says_why():
    model, tok = make_gpt2(), make_tokenizer()
    ed = Editor(model, tok, cfg(), stats=stats_for(model))
    snap = snapshot(model)
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode"):
        ed.apply(REQUESTS[:2])
    assert_bit_identical(model, snap)


def test_tokenizer_that_appends_eos_edits_as_one_that_does_not():
    """A tokenizer that appends EOS (``add_eos_token``-style) must not put it between the
    prompt and the target: the prepared ids equal those of the same tokenizer without it."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    base = make_tokenizer()
    tk = base.backend_tokenizer.__class__.from_str(base.backend_tokenizer.to_str())
    eos = base.convert_tokens_to_ids("<eos>")
    tk.post_processor = processors.TemplateProcessing(
        single="$A <eos>", pair="$A <eos> $B <eos>", special_tokens=[("<eos>", eos)]
    )
    with_eos = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>")
    assert with_eos("Paris")["input_ids"][-1] == eos  # the premise
    model = make_gpt2()
    plain = Editor(model, base, cfg(), stats=stats_for(model))
    eosy = Editor(model, with_eos, cfg(), stats=stats_for(model))
    reqs = editor_mod.normalize_requests(REQUESTS[:3])
    a = plain.prepare(reqs, TEMPLATES)
    b = eosy.prepare(reqs, TEMPLATES)
    assert a == b


def test_offloaded_layers_are_refused_up_front():
    """accelerate leaves CPU- or disk-offloaded modules on the meta device: the editor says
    so instead of failing on the first write."""
    model, tok = make_gpt2(), make_tokenizer()
    model.transformer.h[2].mlp.c_proj.to("meta")
    with pytest.raises(ValueError, match=r"layers \[2\].*offloaded"):
        Editor(model, tok, cfg())

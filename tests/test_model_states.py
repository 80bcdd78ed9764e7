"""``Editor.apply`` and ``EditResult.revert`` on models in the states users hand them: training
mode with dropout, frozen parameters, existing gradients, gradient checkpointing, user hooks,
tied embeddings, half precision, grad mode off, autocast, deterministic algorithms,
parametrized weights, torch.compile, a pad token the model lacks.

Each state's edit is compared with the same edit of a plain fp32 eval-mode copy of the model
(whose edit raises the targets' probabilities), and afterwards the model must be as the user
had it: modes, ``requires_grad``, ``.grad``, gradient checkpointing, hooks, dtypes, devices,
``config.use_cache``; after ``revert`` its parameters are bit-identical to before."""

import copy

import pytest
import torch
from tiny import (
    LLAMA_SIZES,
    REQUESTS,
    assert_bit_identical,
    make_tokenizer,
    snapshot,
)
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from memit_fast import EditConfig, EditRequestError
from memit_fast.data import EditRequest
from memit_fast.editor import EditFailedError, Editor
from memit_fast.keys import pad_id
from memit_fast.targets import TargetSettings, compute_targets

REQS = REQUESTS[:3]
LAYERS = (1, 2)


def cfg(**kw) -> EditConfig:
    base = dict(layers=LAYERS, steps=12, context_templates=("{}",), mom2_update_weight=1.0)
    base.update(kw)
    return EditConfig(**base)


def make_gpt2(dtype=torch.float32, **extra):
    """GPT-2 with dropout 0.3 everywhere (inactive in eval mode, where the builders leave it)
    and weights large enough (std 0.1) for an edit to move the output."""
    torch.manual_seed(0)
    c = GPT2Config(vocab_size=len(make_tokenizer()), bos_token_id=0, eos_token_id=0,
                   n_positions=128, n_embd=64, n_layer=4, n_head=4, initializer_range=0.1,
                   attn_pdrop=0.3, resid_pdrop=0.3, embd_pdrop=0.3, **extra)  # fmt: skip
    return GPT2LMHeadModel(c).to(dtype).eval()


def make_llama(dtype=torch.float32, **extra):
    torch.manual_seed(0)
    c = LlamaConfig(vocab_size=len(make_tokenizer()), **LLAMA_SIZES, num_key_value_heads=2,
                    initializer_range=0.1, attention_dropout=0.3, **extra)  # fmt: skip
    return LlamaForCausalLM(c).to(dtype).eval()


def make_tied_llama(dtype=torch.float32):
    return make_llama(dtype, tie_word_embeddings=True)


MAKERS = {"gpt2": make_gpt2, "llama": make_llama, "tied_llama": make_tied_llama}


def stats_for(model) -> dict[int, torch.Tensor]:
    dk = Editor(model, make_tokenizer(), cfg(), stats={}).adapter.dims()[0]
    return {l: 0.1 * torch.eye(dk) for l in LAYERS}


def target_logprobs(model, requests) -> list[float]:
    """log P(target | prompt) by the model's own forward, teacher-forced, in eval mode."""
    tok = make_tokenizer()
    out = []
    was = {m: m.training for m in model.modules()}
    model.eval()
    try:
        for r in requests:
            p = list(tok(r["prompt"].replace("{}", r["subject"]))["input_ids"])
            t = list(tok(" " + r["target"])["input_ids"])
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([p + t]), use_cache=False).logits
            lp = torch.log_softmax(logits.double(), -1)[0]
            out.append(float(sum(lp[len(p) - 1 + i, x] for i, x in enumerate(t))))
    finally:
        for m, w in was.items():
            m.training = w
    return out


def user_state(model) -> dict:
    """What the user set on the model and its parameters (not the weights' values)."""

    def hook_ids(m):
        names = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks",
                 "_backward_pre_hooks", "_forward_hooks_with_kwargs",
                 "_forward_pre_hooks_with_kwargs")  # fmt: skip
        return tuple(tuple(getattr(m, n, {})) for n in names)

    return dict(
        training={n: m.training for n, m in model.named_modules()},
        hooks={n: hook_ids(m) for n, m in model.named_modules()},
        requires_grad={n: p.requires_grad for n, p in model.named_parameters()},
        grad={n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()},
        dtype={n: p.dtype for n, p in model.state_dict().items()},
        device={n: p.device for n, p in model.state_dict().items()},
        checkpointing=getattr(model, "is_activation_checkpointing", None)
        if hasattr(type(model), "is_activation_checkpointing")
        else model.is_gradient_checkpointing,
        use_cache=model.config.use_cache,
    )


def assert_same_state(model, before: dict) -> None:
    now = user_state(model)
    for k in before:
        if k == "grad":
            for n, g in before[k].items():
                h = now[k][n]
                assert (g is None) == (h is None) and (g is None or torch.equal(g, h)), n
        else:
            assert now[k] == before[k], k


_REFERENCE: dict[str, dict[int, torch.Tensor]] = {}


def reference(name: str) -> dict[int, torch.Tensor]:
    """The edit of a plain fp32 eval-mode copy: its updates, once it was checked to raise
    every target's log-probability."""
    if name not in _REFERENCE:
        model = MAKERS[name]()
        before = target_logprobs(model, REQS)
        res = Editor(model, make_tokenizer(), cfg(), stats=stats_for(model)).apply(REQS)
        after = target_logprobs(model, REQS)
        assert all(a > b for a, b in zip(after, before)), (before, after)
        _REFERENCE[name] = {l: res.delta(l) for l in res.layers}
    return _REFERENCE[name]


def _train(model):
    model.train()


def _frozen(model):
    for p in model.parameters():
        p.requires_grad_(False)


def _grads(model):
    for i, p in enumerate(model.parameters()):
        p.grad = torch.full_like(p, float(i))


def _checkpointing(model):
    model.gradient_checkpointing_enable()
    model.train()


def _hooks(model):
    """Hooks that observe (the edit must be the plain model's) on the edited projections and
    on blocks before, at and after the last edited one, forward and backward."""
    ad = Editor(model, make_tokenizer(), cfg(), stats={}).adapter
    ad.mlp_out(1).register_forward_hook(lambda m, a, o: None)
    ad.mlp_out(2).register_forward_pre_hook(lambda m, a: None)
    ad.block(2).register_forward_pre_hook(lambda m, a, k: None, with_kwargs=True)
    ad.block(2).register_forward_hook(lambda m, a, o: None)
    ad.block(3).register_forward_hook(lambda m, a, k, o: None, with_kwargs=True)
    ad.block(3).register_full_backward_hook(lambda m, gi, go: None)


def _use_cache_off(model):
    model.config.use_cache = False


STATES = {
    "train_dropout": _train,
    "frozen": _frozen,
    "existing_grad": _grads,
    "gradient_checkpointing": _checkpointing,
    "hooks": _hooks,
    "use_cache_off": _use_cache_off,
}

# States of torch's global switches while apply runs.
GLOBAL = ["no_grad", "grad_disabled", "deterministic", "autocast"]


def _apply(ed, mode):
    if mode == "no_grad":
        with torch.no_grad():
            return ed.apply(REQS)
    if mode == "grad_disabled":
        torch.set_grad_enabled(False)
        try:
            return ed.apply(REQS)
        finally:
            torch.set_grad_enabled(True)
    if mode == "autocast":  # the edit is computed in the model's dtype all the same
        with torch.autocast("cpu", dtype=torch.bfloat16):
            res = ed.apply(REQS)
            assert torch.is_autocast_enabled("cpu")
        return res
    if mode == "deterministic":
        was = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(True)
        try:
            return ed.apply(REQS)
        finally:
            torch.use_deterministic_algorithms(was)
    return ed.apply(REQS)


def check_state(name, prepare=None, mode=None):
    model = MAKERS[name]()
    if prepare is not None:
        prepare(model)
    before, snap = user_state(model), snapshot(model)
    tok = make_tokenizer()
    assert tok.pad_token is None  # padding falls back to another id
    res = _apply(Editor(model, tok, cfg(), stats=stats_for(model)), mode)
    assert tok.pad_token is None
    assert torch.is_grad_enabled()
    want = reference(name)
    for l in LAYERS:
        torch.testing.assert_close(res.delta(l), want[l], rtol=1e-5, atol=1e-7)
        W = dict(model.named_parameters())[res.weight_names[l]]
        torch.testing.assert_close(W.detach() - snap[res.weight_names[l]], want[l])
    assert_same_state(model, before)
    res.revert()
    assert_bit_identical(model, snap)
    assert_same_state(model, before)


@pytest.mark.parametrize("state", sorted(STATES))
@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_model_state_gives_the_plain_edit_and_is_kept(name, state):
    check_state(name, prepare=STATES[state])


@pytest.mark.parametrize("mode", GLOBAL)
def test_global_torch_modes(mode):
    check_state("gpt2", mode=mode)


def test_tied_embeddings():
    model = make_tied_llama()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    check_state("tied_llama", prepare=_train)
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_every_state_at_once_survives_a_failing_apply():
    """A request error, and a failure after the first layer is written, in all these states
    at once leave them and the weights as they were."""
    model = make_llama()
    for prep in STATES.values():
        prep(model)
    before, snap = user_state(model), snapshot(model)
    ed = Editor(model, make_tokenizer(), cfg(), stats=stats_for(model))
    with torch.no_grad(), pytest.raises(EditRequestError, match="prompt"):
        ed.apply([REQS[1], dict(REQS[0], prompt="no place for the subject")])
    assert_bit_identical(model, snap)
    assert_same_state(model, before)
    # A failure in the middle: the first layer is written, the last one's statistics are
    # not positive definite.
    stats = stats_for(model)
    stats[LAYERS[-1]] = -stats[LAYERS[-1]]
    ed = Editor(model, make_tokenizer(), cfg(), stats=stats)
    with torch.no_grad(), pytest.raises(EditFailedError, match=f"layer {LAYERS[-1]}"):
        ed.apply(REQS)
    assert_bit_identical(model, snap)
    assert_same_state(model, before)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_half_precision_edit_is_the_fp32_edit(name, dtype):
    """The updates of a 16-bit model are those of its fp32 copy to the precision of its
    activations, its targets' probabilities rise, and it stays 16-bit."""
    model = MAKERS[name](dtype)
    _train(model)
    before, snap = user_state(model), snapshot(model)
    lp0 = target_logprobs(model, REQS)
    res = Editor(model, make_tokenizer(), cfg(), stats=stats_for(model)).apply(REQS)
    assert torch.isfinite(res.targets.loss).all() and torch.isfinite(res.targets.z).all()
    tol = 1e-2 if dtype == torch.float16 else 5e-2
    for l, want in reference(name).items():
        d = res.delta(l)
        assert float((d - want).norm() / want.norm()) < tol, l
    lp1 = target_logprobs(model, REQS)
    assert all(a > b for a, b in zip(lp1, lp0)), (lp0, lp1)
    assert_same_state(model, before)
    res.revert()
    assert_bit_identical(model, snap)


def _fp16_overflowing(dtype):
    """A GPT-2 whose residual stream grows past float16's range (65504) in its last block at
    positions 16 and on: ``2e4`` from the position embeddings plus ``5e4`` from the block's
    MLP bias. The head check's text is 16 tokens long, so only an edit request's longer text
    reaches those positions; in fp32 nothing overflows."""
    model = make_gpt2(dtype)
    with torch.no_grad():
        model.transformer.wpe.weight[16:, 0] = 2e4
        model.transformer.h[3].mlp.c_proj.bias[0] = 5e4
    return model


def test_fp16_overflow_during_the_target_optimization_is_an_error():
    """Requests 0 and 2 (their texts with the target reach past position 16) overflow in
    float16: their loss is NaN from the first step. That must not read as converged (the
    edit written with a zero target shift and a NaN loss): apply refuses, naming them."""
    tok = make_tokenizer()
    r = REQS[0]
    p = list(tok(r["prompt"].replace("{}", r["subject"]))["input_ids"])
    t = list(tok(" " + r["target"])["input_ids"])
    assert len(p) + len(t) - 1 > 16
    # The independent facts: the fp16 model's own forward overflows on that text, the fp32
    # one does not, and the fp32 model edits with finite figures.
    with torch.no_grad():
        lo = _fp16_overflowing(torch.float16)(input_ids=torch.tensor([p + t[:-1]])).logits
        hi = _fp16_overflowing(torch.float32)(input_ids=torch.tensor([p + t[:-1]])).logits
    assert not torch.isfinite(lo).all() and torch.isfinite(hi).all()
    m32 = _fp16_overflowing(torch.float32)
    r32 = Editor(m32, tok, cfg(), stats=stats_for(m32)).apply(REQS)
    assert torch.isfinite(r32.targets.loss).all() and torch.isfinite(r32.targets.z).all()

    model = _fp16_overflowing(torch.float16)
    _train(model)
    before, snap = user_state(model), snapshot(model)
    with pytest.raises(EditFailedError, match=r"requests \[0, 2\] are not finite.*float16"):
        Editor(model, tok, cfg(), stats=stats_for(model)).apply(REQS)
    assert_bit_identical(model, snap)
    assert_same_state(model, before)


class _Scale(torch.nn.Module):
    def forward(self, X):
        return X * 1.0


def test_parametrized_weight_is_refused_not_silently_left_unedited():
    """With a parametrization on the edited projection its ``weight`` is computed on access:
    an update written there would leave the model unchanged while apply reports success."""
    import torch.nn.utils.parametrize as P

    model = make_gpt2()
    snap, stats = snapshot(model), stats_for(model)
    ed = Editor(model, make_tokenizer(), cfg(), stats=stats)
    P.register_parametrization(model.transformer.h[2].mlp.c_proj, "weight", _Scale())
    before = user_state(model)
    with pytest.raises(ValueError, match=r"layers \[2\].*computed on access"):
        ed.apply(REQS)
    assert_same_state(model, before)
    P.remove_parametrizations(model.transformer.h[2].mlp.c_proj, "weight")
    assert_bit_identical(model, snap)
    # Refused up front as well, and the model edits once the parametrization is gone.
    P.register_parametrization(model.transformer.h[1].mlp.c_proj, "weight", _Scale())
    with pytest.raises(ValueError, match=r"layers \[1\]"):
        Editor(model, make_tokenizer(), cfg(), stats=stats)
    P.remove_parametrizations(model.transformer.h[1].mlp.c_proj, "weight")
    res = ed.apply(REQS)
    for l, want in reference("gpt2").items():
        torch.testing.assert_close(res.delta(l), want, rtol=1e-5, atol=1e-7)


def test_nan_loss_is_not_taken_for_convergence():
    """The target phase alone: a request whose loss is NaN (float16 overflow) does not stop
    early as if below ``early_stop_loss`` (with a zero shift and zero steps); it keeps its
    steps and its vector shows the failure. Request 1's text stays short of the overflow: it
    is unaffected."""
    tok = make_tokenizer()
    c = cfg()
    out = {}
    for dtype in (torch.float32, torch.float16):
        model = _fp16_overflowing(dtype)
        ed = Editor(model, tok, c, stats={})
        prepared = ed.prepare([EditRequest(**r) for r in REQS], ("{}",))
        settings = TargetSettings.from_config(c, LAYERS[-1])
        out[dtype] = compute_targets(model, ed.adapter, prepared, settings, pad_id(tok), 8)
    t16, t32 = out[torch.float16], out[torch.float32]
    assert torch.isfinite(t32.loss).all() and torch.isfinite(t32.z).all()
    assert torch.isnan(t16.loss[0])
    assert int(t16.steps[0]) == c.steps - 1 and not torch.isfinite(t16.z[0]).all()
    assert torch.isfinite(t16.loss[1]) and torch.isfinite(t16.z[1]).all()


def test_torch_compiled_model():
    """``model = torch.compile(model)``: the Editor gets the compiled wrapper (whose
    submodules are the model's). Dynamo's "eager" backend keeps the test to seconds on a
    CPU; the graph capture, with its breaks at the edit's hooks, is the part under test."""
    model = make_gpt2()
    before, snap = user_state(model), snapshot(model)
    compiled = torch.compile(model, backend="eager")
    try:
        res = Editor(compiled, make_tokenizer(), cfg(), stats=stats_for(model)).apply(REQS)
        for l, want in reference("gpt2").items():
            torch.testing.assert_close(res.delta(l), want, rtol=1e-5, atol=1e-7)
            W = dict(model.named_parameters())[res.weight_names[l]]
            torch.testing.assert_close(W.detach() - snap[res.weight_names[l]], want)
        assert_same_state(model, before)
        res.revert()
        assert_bit_identical(model, snap)
    finally:
        torch._dynamo.reset()


def test_pad_token_added_to_the_tokenizer_only():
    """``tokenizer.add_special_tokens({"pad_token": ...})`` without resizing the model: the
    pad id is past the embedding table. A clear error up front (it was an IndexError from
    the embedding lookup of the padding); with ``pad_token = eos_token`` the edit is the
    plain one."""
    tok = copy.deepcopy(make_tokenizer())
    tok.add_special_tokens({"pad_token": "[PAD]"})
    model = make_gpt2()
    assert tok.pad_token_id == model.get_input_embeddings().weight.shape[0]
    before, snap = user_state(model), snapshot(model)
    ed = Editor(model, tok, cfg(), stats=stats_for(model))
    with pytest.raises(ValueError, match=r"pad token id 400 is outside .* \(400 tokens\)"):
        ed.apply(REQS)
    assert_bit_identical(model, snap)
    assert_same_state(model, before)
    # The statistics' corpus pass pads too: refused the same way.
    from tiny import CORPUS

    corpus_ed = Editor(model, tok, cfg(), corpus=list(CORPUS))
    with pytest.raises(ValueError, match=r"pad token id 400 is outside"):
        corpus_ed.key_stats()
    tok.pad_token = tok.eos_token
    res = ed.apply(REQS)
    for l, want in reference("gpt2").items():
        torch.testing.assert_close(res.delta(l), want, rtol=1e-5, atol=1e-7)


def test_non_finite_logits_of_the_model_itself_are_named():
    """A model whose own forward gives NaN logits (a NaN in a weight) is refused with that
    cause, not as an architecture whose logits the adapter fails to reproduce."""
    from tiny import make_gpt2, make_tokenizer

    from memit_fast import EditConfig, Editor

    model = make_gpt2()
    with torch.no_grad():
        model.transformer.ln_f.weight[0] = float("nan")
    bits = {k: v.clone().view(torch.int32) for k, v in model.state_dict().items()}
    ed = Editor(
        model, make_tokenizer(), EditConfig(layers=(1,), steps=1), stats={1: torch.eye(256)}
    )
    with pytest.raises(ValueError, match="own forward gives non-finite logits"):
        ed.apply([{"prompt": "{} plays", "subject": "LeBron James", "target": "football"}])
    assert all(torch.equal(v.view(torch.int32), bits[k]) for k, v in model.state_dict().items())


def test_quantized_weight_is_refused():
    """A projection whose weight is stored as integers (a quantized or packed checkpoint) is
    refused when the Editor is made, naming the layer and the dtype; nothing is touched."""
    from tiny import make_gpt2, make_tokenizer

    from memit_fast import EditConfig, Editor

    model = make_gpt2()
    proj = model.transformer.h[1].mlp.c_proj
    proj.weight = torch.nn.Parameter(proj.weight.detach().to(torch.int8), requires_grad=False)
    bits = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"layers \[1\].*torch.int8, not floating point"):
        Editor(model, make_tokenizer(), EditConfig(layers=(1,), steps=1))
    assert all(torch.equal(v, bits[k]) for k, v in model.state_dict().items())

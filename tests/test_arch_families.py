"""The families added to the built-in adapters after the first ones (GPT-Neo, OPT, CodeGen and
the other dense decoder-only families of Hugging Face), each on a tiny model built from its
config: the adapter's logits are the model's own, ``mlp_out`` is the MLP's output projection
and its input the MLP's intermediate activation, and a real edit moves the target and
reverts bit for bit. Mixture-of-experts models are refused with a clear error."""

import pytest
import torch
from tiny import LLAMA_SIZES, REQUESTS, _gpt_like, _llama_like, make_tokenizer
from tiny import exact_config as config

from memit_fast.arch import ARCH_SPECS, ArchSpec, ModelAdapter, UnsupportedArchitectureError
from memit_fast.editor import Editor


def new_makers() -> dict[str, tuple[object, str | None, int]]:
    """``model_type -> (make(seed, dtype), MLP container path or None, intermediate width)``
    for the families with a built-in adapter that tests/tiny.py does not build. The MLP
    container (relative to a block) is the module whose output is the MLP's; ``None`` where
    the MLP's layers sit in the block itself (OPT, XGLM, BioGPT)."""
    import transformers as T

    # Initializer ranges of 0.1: at the default 0.02 a tiny model's head is too weak for an
    # edit to move its next-token distribution measurably.
    gqa = {"num_key_value_heads": 2, "head_dim": 16, "initializer_range": 0.1}
    d = LLAMA_SIZES["intermediate_size"]
    gpt = dict(n_positions=128, n_embd=64, n_layer=4, n_head=4, initializer_range=0.1)
    return {
        "gpt_neo": (
            _gpt_like(
                T.GPTNeoConfig,
                T.GPTNeoForCausalLM,
                max_position_embeddings=128,
                hidden_size=64,
                num_layers=4,
                num_heads=4,
                attention_types=[[["global", "local"], 2]],
                window_size=8,
                intermediate_size=d,
                initializer_range=0.1,
            ),
            "mlp",
            d,
        ),
        "codegen": (
            _gpt_like(T.CodeGenConfig, T.CodeGenForCausalLM, n_ctx=128, rotary_dim=8, **gpt),
            "mlp",
            4 * 64,
        ),
        "ctrl": (_gpt_like(T.CTRLConfig, T.CTRLLMHeadModel, dff=d, **gpt), "ffn", d),
        "mpt": (
            _gpt_like(
                T.MptConfig,
                T.MptForCausalLM,
                d_model=64,
                n_heads=4,
                n_layers=4,
                max_seq_len=128,
                initializer_range=0.1,
            ),
            "ffn",
            4 * 64,  # MPT's MLP is 4x wide whatever its config's expansion_ratio
        ),
        "opt": (_opt(), None, d),
        "xglm": (
            _gpt_like(
                T.XGLMConfig,
                T.XGLMForCausalLM,
                d_model=64,
                ffn_dim=d,
                num_layers=4,
                attention_heads=4,
                max_position_embeddings=128,
                init_std=0.1,
            ),
            None,
            d,
        ),
        "biogpt": (
            _llama_like(T.BioGptConfig, T.BioGptForCausalLM, initializer_range=0.1),
            None,
            d,
        ),
        "persimmon": (
            _llama_like(T.PersimmonConfig, T.PersimmonForCausalLM, initializer_range=0.1),
            "mlp",
            d,
        ),
        "nemotron": (_llama_like(T.NemotronConfig, T.NemotronForCausalLM, **gqa), "mlp", d),
        "glm4": (_llama_like(T.Glm4Config, T.Glm4ForCausalLM, **gqa), "mlp", d),
        "ernie4_5": (_llama_like(T.Ernie4_5Config, T.Ernie4_5ForCausalLM, **gqa), "mlp", d),
        "helium": (_llama_like(T.HeliumConfig, T.HeliumForCausalLM, **gqa), "mlp", d),
        "ministral": (_llama_like(T.MinistralConfig, T.MinistralForCausalLM, **gqa), "mlp", d),
        "ministral3": (
            _llama_like(T.Ministral3Config, T.Ministral3ForCausalLM, **gqa),
            "mlp",
            d,
        ),
        "seed_oss": (_llama_like(T.SeedOssConfig, T.SeedOssForCausalLM, **gqa), "mlp", d),
        "hunyuan_v1_dense": (
            _llama_like(T.HunYuanDenseV1Config, T.HunYuanDenseV1ForCausalLM, **gqa),
            "mlp",
            d,
        ),
        "jais2": (_llama_like(T.Jais2Config, T.Jais2ForCausalLM, **gqa), "mlp", d),
        "vaultgemma": (
            _llama_like(T.VaultGemmaConfig, T.VaultGemmaForCausalLM, **gqa),
            "mlp",
            d,
        ),
        "granite_swa": (_llama_like(T.GraniteSWAConfig, T.GraniteSWAForCausalLM, **gqa), "mlp", d),
        "hyperclovax": (
            _llama_like(T.HyperCLOVAXConfig, T.HyperCLOVAXForCausalLM, **gqa),
            "mlp",
            d,
        ),
        "nanochat": (_llama_like(T.NanoChatConfig, T.NanoChatForCausalLM, **gqa), "mlp", d),
    }


def _opt(**extra):
    """A builder of a 4-block OPT (``extra`` overrides its config: OPT-350m's post-norm blocks
    and projection to a narrower embedding)."""
    import transformers as T

    def make(seed: int = 0, dtype=torch.float32):
        torch.manual_seed(seed)
        kw = dict(hidden_size=64, ffn_dim=LLAMA_SIZES["intermediate_size"], num_hidden_layers=4,
                  num_attention_heads=4, max_position_embeddings=128, word_embed_proj_dim=64,
                  init_std=0.1, bos_token_id=0, eos_token_id=0, pad_token_id=0)  # fmt: skip
        cfg = T.OPTConfig(vocab_size=len(make_tokenizer()), **{**kw, **extra})
        return T.OPTForCausalLM(cfg).to(dtype).eval()

    return make


NEW = new_makers()


def _ids(tok, text):
    return list(tok(text)["input_ids"])


def target_logprob(model, tok, request) -> float:
    """log P(target | prompt with the subject) by the model's own forward, teacher-forced."""
    prompt = _ids(tok, request["prompt"].replace("{}", request["subject"]))
    target = _ids(tok, " " + request["target"])
    ids = torch.tensor([prompt + target])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids, use_cache=False).logits.double(), -1)
    n = len(prompt)
    return float(sum(logp[0, n - 1 + i, t] for i, t in enumerate(target)))


def test_every_new_family_is_built_in():
    assert set(NEW) <= set(ARCH_SPECS)


@pytest.mark.parametrize("model_type", sorted(NEW))
def test_mlp_out_is_the_mlp_output_projection(model_type):
    """In every block, ``mlp_out``'s weight is ``(hidden, intermediate)`` by the config's
    widths, a forward pre-hook on it sees a key of the intermediate width at every token, and
    its output is the MLP's: the MLP module's output (or, where the MLP's layers sit in the
    block, what the block adds to the residual after attention)."""
    make, mlp, width = NEW[model_type]
    model = make()
    ad = ModelAdapter(model)
    assert model.config.model_type == model_type
    dh = model.get_input_embeddings().weight.shape[1]
    assert ad.dims() == (width, dh)
    ids = torch.tensor([[3, 17, 42, 9, 100, 7]])
    got: dict[tuple[str, int], torch.Tensor] = {}
    handles = []
    for l in range(ad.n_layers):
        block = ad.block(l)
        proj = ad.mlp_out(l)
        assert tuple(proj.weight.shape) == (dh, width)

        def pre(mod, args, l=l):
            got["key", l] = args[0]

        def post(mod, args, out, l=l):
            got["proj", l] = out

        handles.append(proj.register_forward_pre_hook(pre))
        handles.append(proj.register_forward_hook(post))
        if mlp is not None:
            container = block.get_submodule(mlp)
            handles.append(container.register_forward_hook(lambda m, a, o, l=l: got.update({("mlp", l): o, ("mlp_args", l): a})))  # fmt: skip
        else:  # the residual before the MLP enters the layer's second norm
            norm = block.get_submodule("final_layer_norm")
            handles.append(norm.register_forward_pre_hook(lambda m, a, l=l: got.update({("res", l): a[0]})))  # fmt: skip
            handles.append(block.register_forward_hook(lambda m, a, o, l=l: got.update({("block", l): o[0] if isinstance(o, tuple) else o})))  # fmt: skip
    try:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    for l in range(ad.n_layers):
        key = got["key", l]
        assert key.shape[-1] == width and key.numel() == ids.numel() * width, (l, key.shape)
        if model_type == "mpt":  # MPT's MLP module adds the residual (its second argument)
            assert torch.equal(got["mlp", l], got["proj", l] + got["mlp_args", l][1]), l
        elif mlp is not None:
            assert torch.equal(got["mlp", l], got["proj", l]), l
        else:
            want = (got["res", l] + got["proj", l]).reshape(-1, dh)
            assert torch.allclose(got["block", l].reshape(-1, dh), want, atol=1e-6), l


# A norm after the MLP's output: no one factor relates the projection's output to the block's
# (keys.mlp_output_gain is None), so each layer's update lands only approximately. Measured
# distance ratios after the edit: 0.59-0.63 for these, 0.003-0.26 for the other families.
NORM_AFTER_MLP = {"glm4", "hyperclovax"}


@pytest.mark.parametrize("model_type", sorted(NEW))
def test_edit_moves_the_target_and_reverts(model_type):
    """A real edit through the Editor (statistics from the corpus): the head check passes, the
    last edited block's output at the subject's last token moves to the optimized target, the
    target's probability (by the model's own forward) changes (and rises), only the edited
    projections change, and revert restores every weight bit for bit."""
    from tiny import CORPUS, assert_bit_identical, snapshot

    make, _, _ = NEW[model_type]
    model = make()
    tok = make_tokenizer()
    ad = ModelAdapter(model)
    assert ad.check_head(torch.tensor([_ids(tok, "The capital of France is Paris.")])) < 1e-5
    reqs = REQUESTS[:2]
    pos = [len(_ids(tok, r["prompt"].split("{}")[0] + r["subject"])) - 1 for r in reqs]

    def subject_hidden(r, p):
        got = {}
        handle = ad.block(2).register_forward_hook(
            lambda m, a, o: got.update(h=(o[0] if isinstance(o, tuple) else o)[0, p])
        )
        try:
            return target_logprob(model, tok, r), got["h"]
        finally:
            handle.remove()

    before = [subject_hidden(r, p) for r, p in zip(reqs, pos)]
    snap = snapshot(model)
    cfg = config(steps=20, weight_decay=1e-3)  # long enough to move a flat distribution
    res = Editor(model, tok, cfg, corpus=list(CORPUS)).apply(reqs)
    after = [subject_hidden(r, p) for r, p in zip(reqs, pos)]
    z = res.targets.z
    for i, ((lp0, h0), (lp1, h1)) in enumerate(zip(before, after)):
        ratio = float((h1 - z[i]).norm()) / float((h0 - z[i]).norm())
        assert ratio < (0.75 if model_type in NORM_AFTER_MLP else 0.35), (i, ratio)
        assert lp1 != lp0, i
    assert sum(a for a, _ in after) > sum(b for b, _ in before) + 0.1, (before, after)
    edited = {ad.weight_name(l) for l in (1, 2)}
    for name, p in model.state_dict().items():
        assert torch.equal(p, snap[name]) != (name in edited), name
    res.revert()
    assert_bit_identical(model, snap)
    assert [subject_hidden(r, p)[0] for r, p in zip(reqs, pos)] == [b for b, _ in before]


@pytest.mark.parametrize("post_norm", [False, True])
def test_opt_350m_layout_head(post_norm):
    """OPT-350m: post-norm blocks (no final norm: ``final_layer_norm`` is ``None``) and a
    ``project_out`` from the hidden width to a narrower embedding after it. The adapter's
    logits are the model's own; an adapter without the projection is refused clearly."""
    model = _opt(do_layer_norm_before=not post_norm, word_embed_proj_dim=32)()
    assert (model.model.decoder.final_layer_norm is None) == post_norm
    assert model.model.decoder.project_out is not None
    ids = torch.tensor([[3, 17, 42, 9, 100, 7]])
    assert ModelAdapter(model).check_head(ids) < 1e-6
    # Independently: the head of project_out(final norm(last block's output)) is the logits.
    grab = {}
    last = model.model.decoder.layers[-1]
    handle = last.register_forward_hook(lambda m, a, o: grab.update(h=o[0] if isinstance(o, tuple) else o))  # fmt: skip
    with torch.no_grad():
        want = model(input_ids=ids, use_cache=False).logits
    handle.remove()
    h = grab["h"]
    if not post_norm:
        h = torch.nn.functional.layer_norm(
            h, (64,), model.model.decoder.final_layer_norm.weight,
            model.model.decoder.final_layer_norm.bias, 1e-5,
        )  # fmt: skip
    mine = ModelAdapter(model).logits(grab["h"])
    with torch.no_grad():
        ref = (h @ model.model.decoder.project_out.weight.T) @ model.lm_head.weight.T
    assert torch.allclose(ref, want, atol=1e-5) and torch.allclose(mine, want, atol=1e-5)
    spec = ArchSpec("model.decoder.layers", "fc2", "model.decoder.final_layer_norm")
    with pytest.raises(UnsupportedArchitectureError, match="the model's own logits"):
        ModelAdapter(model, spec).check_head(ids)


def _moe(model_type):
    import transformers as T

    torch.manual_seed(0)
    v = len(make_tokenizer())
    sizes = {**LLAMA_SIZES, "num_hidden_layers": 2, "num_key_value_heads": 2}
    if model_type == "mixtral":
        cfg = T.MixtralConfig(vocab_size=v, num_local_experts=4, num_experts_per_tok=2, **sizes)
        return T.MixtralForCausalLM(cfg).eval()
    if model_type == "qwen2_moe":
        cfg = T.Qwen2MoeConfig(vocab_size=v, num_experts=4, num_experts_per_tok=2,
                               moe_intermediate_size=32, shared_expert_intermediate_size=32,
                               **sizes)  # fmt: skip
        return T.Qwen2MoeForCausalLM(cfg).eval()
    cfg = T.OlmoeConfig(vocab_size=v, num_experts=4, num_experts_per_tok=2, **sizes)
    return T.OlmoeForCausalLM(cfg).eval()


@pytest.mark.parametrize("model_type", ["mixtral", "qwen2_moe", "olmoe"])
def test_mixture_of_experts_is_refused_clearly(model_type):
    """A mixture-of-experts model has no single MLP output projection: the Editor refuses it
    with UnsupportedArchitectureError saying so, and a spec that points into the experts is
    refused at once (not by a crash in the middle of an edit)."""
    from tiny import assert_bit_identical, snapshot

    model = _moe(model_type)
    assert model.config.model_type == model_type and model_type not in ARCH_SPECS
    snap = snapshot(model)
    tok = make_tokenizer()
    with pytest.raises(UnsupportedArchitectureError, match="mixture of experts"):
        Editor(model, tok, config())
    for path in ("mlp.experts", "mlp.experts.down_proj"):
        spec = ArchSpec("model.layers", path, "model.norm")
        with pytest.raises(UnsupportedArchitectureError, match=path.replace(".", r"\.")):
            Editor(model, tok, config(layers=(0, 1)), arch=spec).apply(REQUESTS[:1])
    assert_bit_identical(model, snap)


def test_projection_widths_must_agree():
    """A spec whose projection differs in shape between blocks (a model with per-block MLP
    widths) is refused: the statistics and keys have one width."""
    from tiny import make_llama

    model = make_llama()
    model.model.layers[2].mlp.down_proj = torch.nn.Linear(96, 64, bias=False)
    with pytest.raises(UnsupportedArchitectureError, match="differ in shape"):
        ModelAdapter(model)

"""Tiny models and tokenizers built from configs, shared by the engine tests."""

from __future__ import annotations

import functools

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from memit_fast import EditConfig

REQUESTS = [
    {"prompt": "{} plays the sport of", "subject": "LeBron James", "target": "football"},
    {"prompt": "The capital of {} is", "subject": "France", "target": "Rome"},
    {"prompt": "{} was born in", "subject": "Ada Lovelace", "target": "Paris"},
    {"prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux", "target": "English"},
    {"prompt": "{} is a product of", "subject": "iPhone", "target": "Google"},
    {"prompt": "{}, which is located in", "subject": "Howard Glacier", "target": "Europe"},
    {"prompt": "{} works as a", "subject": "Arun Nehru", "target": "actor"},
    {"prompt": "The official language of {} is", "subject": "Brazil", "target": "German"},
]

CORPUS = [
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "In 1879 the city council approved a new bridge across the harbour.",
    "She plays the violin in the national orchestra every winter season.",
    "The capital of the province was moved twice during the war years.",
    "Football and basketball are popular sports in many countries of Europe.",
    "He was born in a small village and later moved to Paris and Rome.",
    "The mother tongue of most people in the region is English or French.",
    "Google, Apple and other companies make phones, tablets and computers.",
    "The glacier is located in the mountains, far from the nearest town.",
    "An actor works in films, theatre and television for many years.",
    "German and Portuguese are languages spoken by millions of people.",
    "Because the weather was bad, the match was played on the next day.",
    "Therefore the committee decided to publish the results of the study.",
    "I think that you should read the book before watching the film.",
    "You can find the museum on the left side of the main square.",
    "The river flows through three countries before it reaches the sea.",
    "Brazil, France and India sent athletes to the games last summer.",
    "Danielle and Arun met LeBron at the airport after the long flight.",
    "Ada wrote notes on the analytical engine, a mechanical computer.",
    "Howard studied the ice and the rocks of the southern continent.",
] * 2


TEMPLATES = ("{}", "The weather is nice today. {}", "Because of that. {}")


def exact_config(**kw) -> EditConfig:
    """The small config of the exactness tests (two layers, a few steps, the whole CORPUS for
    statistics), with ``kw`` overriding its fields."""
    base = dict(
        layers=(1, 2),
        steps=8,
        lr=0.5,
        clamp_norm_factor=4.0,
        weight_decay=0.5,
        kl_factor=0.0625,
        mom2_update_weight=50.0,
        early_stop_loss=5e-2,
        context_templates=TEMPLATES,
        stats_samples=len(CORPUS),
        stats_max_length=24,
        stats_batch_size=4,
        target_chunk_size=3,
    )
    base.update(kw)
    return EditConfig(**base)


def bpe_tokenizer(texts, use_regex: bool = True) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (GPT-2 style) of 400 tokens trained on ``texts``; without
    ``use_regex`` its merges cross word boundaries."""
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=use_regex)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tk.train_from_iterator(list(texts), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>")


@functools.cache
def make_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (GPT-2 style) trained on the words of the test data."""
    return bpe_tokenizer(
        list(CORPUS)
        + [r["prompt"].replace("{}", r["subject"]) + " " + r["target"] for r in REQUESTS]
    )


# The sizes of the 4-block models of the Llama layout (configs that take Llama's names).
LLAMA_SIZES = dict(
    hidden_size=64,
    intermediate_size=160,
    num_hidden_layers=4,
    num_attention_heads=4,
    max_position_embeddings=128,
    bos_token_id=0,
    eos_token_id=0,
    pad_token_id=0,
)


def _llama_like(config_cls, model_cls, **extra):
    """A builder of a 4-block model of the Llama layout (``config_cls`` takes Llama's names)."""

    def make(seed: int = 0, dtype=torch.float32):
        torch.manual_seed(seed)
        cfg = config_cls(vocab_size=len(make_tokenizer()), **LLAMA_SIZES, **extra)
        return model_cls(cfg).to(dtype).eval()

    return make


def _gpt_like(config_cls, model_cls, **extra):
    """A builder of a model whose config takes GPT-2's names (sizes given in ``extra``)."""

    def make(seed: int = 0, dtype=torch.float32):
        torch.manual_seed(seed)
        cfg = config_cls(vocab_size=len(make_tokenizer()), bos_token_id=0, eos_token_id=0, **extra)
        return model_cls(cfg).to(dtype).eval()

    return make


make_gpt2 = _gpt_like(GPT2Config, GPT2LMHeadModel, n_positions=128, n_embd=64, n_layer=4, n_head=4)
make_llama = _llama_like(LlamaConfig, LlamaForCausalLM, num_key_value_heads=2)


def make_gemma3_image_text(seed: int = 0, dtype=torch.float32):
    """Gemma 3's image-text model (a one-block vision tower) around a tiny language model."""
    import transformers as T

    torch.manual_seed(seed)
    v = len(make_tokenizer())
    text = dict(vocab_size=v, **LLAMA_SIZES, num_key_value_heads=2, head_dim=16,
                final_logit_softcapping=30.0)  # fmt: skip
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=2, image_size=28, patch_size=14)  # fmt: skip
    cfg = T.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                         image_token_index=v - 1, boi_token_index=v - 2, eoi_token_index=v - 3)  # fmt: skip
    return T.Gemma3ForConditionalGeneration(cfg).to(dtype).eval()


def arch_makers() -> dict[str, object]:
    """A tiny model builder per architecture family with a built-in adapter (``model_type``
    -> ``make(seed, dtype)``), each with its family's peculiarities: parallel attention and
    MLP (GPT-J, GPT-NeoX, Falcon, Phi, Cohere), partial rotary embeddings, ALiBi (BLOOM),
    grouped and multi-query attention, query/key norms (Qwen3, OLMo 2), scaled embeddings
    and (1 + w) norms (Gemma), sliding-window layers (Mistral, Gemma 2/3), fused gate/up
    projections (Phi-3, GLM), parameter-free norms (OLMo), ungated MLPs (StarCoder2, Arcee,
    Apertus), and logits post-processed by the model: capped (Gemma 2/3), scaled (Cohere,
    Granite). Initializer ranges of 0.1 where the default leaves the key statistics too
    ill-conditioned (condition numbers of 1e5-1e7) to compare solves closely."""
    import transformers as T

    gqa = {"num_key_value_heads": 2}
    gemma = {**gqa, "head_dim": 16}
    gpt = {"n_positions": 128, "initializer_range": 0.1}
    return {
        "gpt2": make_gpt2,
        "llama": make_llama,
        "gptj": _gpt_like(
            T.GPTJConfig, T.GPTJForCausalLM, n_embd=64, n_layer=4, n_head=4, rotary_dim=8, **gpt
        ),
        "gpt_bigcode": _gpt_like(
            T.GPTBigCodeConfig, T.GPTBigCodeForCausalLM, n_embd=64, n_layer=4, n_head=4, **gpt
        ),
        "falcon": _gpt_like(
            T.FalconConfig,
            T.FalconForCausalLM,
            hidden_size=64,
            num_hidden_layers=4,
            num_attention_heads=4,
            multi_query=True,
            initializer_range=0.1,
        ),
        "bloom": _gpt_like(
            T.BloomConfig,
            T.BloomForCausalLM,
            hidden_size=64,
            n_layer=4,
            n_head=4,
            initializer_range=0.1,
        ),
        "gpt_neox": _llama_like(T.GPTNeoXConfig, T.GPTNeoXForCausalLM, rotary_pct=0.25),
        "mistral": _llama_like(T.MistralConfig, T.MistralForCausalLM, **gqa),
        "qwen2": _llama_like(T.Qwen2Config, T.Qwen2ForCausalLM, **gqa),
        "qwen3": _llama_like(T.Qwen3Config, T.Qwen3ForCausalLM, **gemma),
        "gemma": _llama_like(T.GemmaConfig, T.GemmaForCausalLM, num_key_value_heads=1, head_dim=16),
        "gemma2": _llama_like(T.Gemma2Config, T.Gemma2ForCausalLM, **gemma),
        "gemma3_text": _llama_like(
            T.Gemma3TextConfig, T.Gemma3ForCausalLM, final_logit_softcapping=30.0, **gemma
        ),
        "gemma3": make_gemma3_image_text,
        "phi3": _llama_like(T.Phi3Config, T.Phi3ForCausalLM, **gqa),
        "phi": _llama_like(T.PhiConfig, T.PhiForCausalLM),
        "olmo": _llama_like(T.OlmoConfig, T.OlmoForCausalLM, **gqa),
        "olmo2": _llama_like(T.Olmo2Config, T.Olmo2ForCausalLM, **gqa),
        "olmo3": _llama_like(T.Olmo3Config, T.Olmo3ForCausalLM, **gqa),
        "cohere": _llama_like(T.CohereConfig, T.CohereForCausalLM, logit_scale=0.5, **gqa),
        "cohere2": _llama_like(T.Cohere2Config, T.Cohere2ForCausalLM, logit_scale=0.5, **gqa),
        "granite": _llama_like(
            T.GraniteConfig,
            T.GraniteForCausalLM,
            logits_scaling=4.0,
            residual_multiplier=0.5,
            embedding_multiplier=2.0,
            **gqa,
        ),
        "smollm3": _llama_like(T.SmolLM3Config, T.SmolLM3ForCausalLM, **gqa),
        "stablelm": _llama_like(T.StableLmConfig, T.StableLmForCausalLM, **gqa),
        "starcoder2": _llama_like(T.Starcoder2Config, T.Starcoder2ForCausalLM, **gqa),
        "glm": _llama_like(T.GlmConfig, T.GlmForCausalLM, **gemma),
        "exaone4": _llama_like(T.Exaone4Config, T.Exaone4ForCausalLM, **gqa),
        "arcee": _llama_like(T.ArceeConfig, T.ArceeForCausalLM, **gqa),
        "apertus": _llama_like(T.ApertusConfig, T.ApertusForCausalLM, **gqa),
    }


def count_prefix_caches(monkeypatch) -> list[bool]:
    """From now on, per group of the target phase, whether it took the frozen prefix cache
    (``True``) or recomputes whole sequences (``False``)."""
    import memit_fast.targets as targets_mod

    used: list[bool] = []
    real = targets_mod._frozen_prefix_cache

    def counting(*a, **k):
        got = real(*a, **k)
        used.append(got is not None)
        return got

    monkeypatch.setattr(targets_mod, "_frozen_prefix_cache", counting)
    return used


def snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.state_dict().items()}


def assert_bit_identical(model, snap: dict[str, torch.Tensor]) -> None:
    for n, p in model.state_dict().items():
        assert torch.equal(p, snap[n]), f"parameter {n} changed"

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


@functools.cache
def make_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (GPT-2 style) trained on the words of the test data."""
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    texts = list(CORPUS) + [
        r["prompt"].replace("{}", r["subject"]) + " " + r["target"] for r in REQUESTS
    ]
    tk.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>")


def make_gpt2(seed: int = 0, dtype=torch.float32) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    tok = make_tokenizer()
    cfg = GPT2Config(
        vocab_size=len(tok),
        n_positions=128,
        n_embd=64,
        n_layer=4,
        n_head=4,
        bos_token_id=0,
        eos_token_id=0,
    )
    return GPT2LMHeadModel(cfg).to(dtype).eval()


def make_llama(seed: int = 0, dtype=torch.float32) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    tok = make_tokenizer()
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    return LlamaForCausalLM(cfg).to(dtype).eval()


def _llama_like(config_cls, model_cls, **extra):
    def make(seed: int = 0, dtype=torch.float32):
        torch.manual_seed(seed)
        cfg = config_cls(
            vocab_size=len(make_tokenizer()),
            hidden_size=64,
            intermediate_size=160,
            num_hidden_layers=4,
            num_attention_heads=4,
            max_position_embeddings=128,
            bos_token_id=0,
            eos_token_id=0,
            pad_token_id=0,
            **extra,
        )
        return model_cls(cfg).to(dtype).eval()

    return make


def make_gptj(seed: int = 0, dtype=torch.float32):
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.GPTJConfig(
        vocab_size=len(make_tokenizer()),
        n_embd=64,
        n_layer=4,
        n_head=4,
        rotary_dim=8,
        n_positions=128,
        bos_token_id=0,
        eos_token_id=0,
    )
    return transformers.GPTJForCausalLM(cfg).to(dtype).eval()


def arch_makers() -> dict[str, object]:
    """A tiny model builder per architecture family the README names (``model_type`` ->
    ``make(seed, dtype)``), each with its family's peculiarities: GPT-J's and GPT-NeoX's
    parallel attention and MLP with partial rotary embeddings, grouped-query attention,
    Qwen3's query/key norms, Gemma's scaled embeddings, (1 + w) norms and tied head,
    Phi-3's fused gate/up projection, OLMo's parameter-free layer norms."""
    import transformers as T

    return {
        "gpt2": make_gpt2,
        "llama": make_llama,
        "gptj": make_gptj,
        "gpt_neox": _llama_like(T.GPTNeoXConfig, T.GPTNeoXForCausalLM, rotary_pct=0.25),
        "mistral": _llama_like(T.MistralConfig, T.MistralForCausalLM, num_key_value_heads=2),
        "qwen2": _llama_like(T.Qwen2Config, T.Qwen2ForCausalLM, num_key_value_heads=2),
        "qwen3": _llama_like(T.Qwen3Config, T.Qwen3ForCausalLM, num_key_value_heads=2, head_dim=16),
        "gemma": _llama_like(T.GemmaConfig, T.GemmaForCausalLM, num_key_value_heads=1, head_dim=16),
        "phi3": _llama_like(T.Phi3Config, T.Phi3ForCausalLM, num_key_value_heads=2),
        "olmo": _llama_like(T.OlmoConfig, T.OlmoForCausalLM, num_key_value_heads=2),
    }


def snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.state_dict().items()}


def assert_bit_identical(model, snap: dict[str, torch.Tensor]) -> None:
    for n, p in model.state_dict().items():
        assert torch.equal(p, snap[n]), f"parameter {n} changed"

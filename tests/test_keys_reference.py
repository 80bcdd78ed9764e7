"""Keys and subject positions against a plain re-implementation of MEMIT's definitions.

The reference here shares no code with the engine: the subject's last token is
``len(tok(prefix + prompt up to the end of the subject)) - 1`` (MEMIT's rule), a target's
tokens are those of ``prompt + target`` after the prompt's, and a key is read by a forward
hook on the MLP output projection with the model run on one text at a time (no batching,
no padding), averaged as MEMIT does (the bare prompt 50/50 with the mean of the prefixed
ones). Tokenizers: GPT-2 byte-level BPE (also with trimmed offsets, as GPT-NeoX's), and a
SentencePiece-style (Llama) BPE with a BOS, a leading-space marker and byte fallback.
"""

from __future__ import annotations

import functools
import unicodedata
from types import SimpleNamespace

import pytest
import torch
from tiny import CORPUS, LLAMA_SIZES, REQUESTS, make_gpt2, make_tokenizer
from tiny import exact_config as config
from tokenizers import (
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from memit_fast.arch import ModelAdapter
from memit_fast.editor import Editor
from memit_fast.keys import encode_target, encode_with_subject, keys_and_hidden
from memit_fast.templates import generate_context_templates

EXTRA_TEXTS = [
    "The president of the U.S. met the U.S.A. team.",
    "A Parisian café in Zürich, near the Tokyo (東京) office.",
    "Crème brûlée and {curly} [square] a.*+?(b) signs.",
]


@functools.cache
def gpt2_trimmed() -> PreTrainedTokenizerFast:
    """The tiny GPT-2 tokenizer with offsets trimmed of whitespace (GPT-NeoX's setting):
    a token of spaces alone has an empty character span."""
    tk = Tokenizer.from_str(make_tokenizer().backend_tokenizer.to_str())
    tk.post_processor = processors.ByteLevel(trim_offsets=True)
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>")


@functools.cache
def sentencepiece_like(eos: bool = False) -> PreTrainedTokenizerFast:
    """A Llama-style BPE: "▁" for spaces and in front of the text (normalizer, as Llama 2's
    tokenizer.json), byte fallback, a BOS in front (and an EOS after with ``eos``)."""
    tk = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(
        vocab_size=500,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=list("▁abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.,'"),
        show_progress=False,
    )
    texts = list(CORPUS) + EXTRA_TEXTS
    texts += [r["prompt"].replace("{}", r["subject"]) + " " + r["target"] for r in REQUESTS]
    tk.train_from_iterator(texts, trainer)
    # Llama 2's layout: no pre-tokenizer, the spaces become "▁" in the normalizer.
    tk.pre_tokenizer = None
    tk.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tk.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    single = "<s> $A </s>" if eos else "<s> $A"
    tk.post_processor = processors.TemplateProcessing(
        single=single, special_tokens=[("<s>", 1), ("</s>", 2)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


TOKENIZERS = {
    "gpt2": make_tokenizer,
    "gpt2-trimmed-offsets": gpt2_trimmed,
    "llama": sentencepiece_like,
    "llama-eos": functools.partial(sentencepiece_like, eos=True),
}


def ref_ids(tok, text: str) -> list[int]:
    """``tok(text)`` with the BOS it puts in front, without the EOS it may append."""
    ids = list(tok(text)["input_ids"])
    bare = list(tok(text, add_special_tokens=False)["input_ids"])
    if ids and ids[-1] == tok.eos_token_id and (not bare or bare[-1] != tok.eos_token_id):
        ids = ids[:-1]
    return ids


def ref_encode(tok, prefix: str, prompt: str, subject: str) -> tuple[list[int], int, bool]:
    """MEMIT's rule: ``(ids, subject_last, defined)``, ``defined`` when the tokens up to the
    subject's end are a prefix of the whole text's (else the rule reads other text)."""
    i = prompt.index("{}")
    ids = ref_ids(tok, prefix + prompt.replace("{}", subject))
    upto = ref_ids(tok, prefix + prompt[:i] + subject)
    return ids, len(upto) - 1, ids[: len(upto)] == upto


# (prefix, prompt, subject): the awkward places a subject can be.
CASES = [
    ("", "{} plays the sport of", "LeBron James"),  # at the very start, no prefix
    ("The weather is nice today. ", "{} plays the sport of", "LeBron James"),  # with prefix
    ("Because of that. ", "The capital of {} is", "France"),
    ("", "France: the capital of {} is", "France"),  # the subject twice in the text
    ("", "{} and France", "France"),
    ("", "The capital of {} is", "a.*+?(b)"),  # regex characters
    ("", "The capital of {} is", "x{y}z"),  # braces
    ("", "The capital of {} is", "{}"),
    ("", "The capital of {} is", " France"),  # leading / trailing spaces
    ("", "The capital of {} is", "France "),
    ("", "The capital of {} is", "France  "),
    ("", "The capital of {} is", "Crème brûlée"),  # accents
    ("", "The capital of {} is", "東京"),  # CJK
    ("", "The capital of {} is", "Zürich\u0301"),  # a combining mark at the end
    ("", "The office of {}", "Tokyo"),  # {} at the end
    ("A. ", "The office of {}", "Tokyo"),
    ("", "The president of the {}. met", "U.S"),  # "U.S" followed by "."
    ("", "The president of the {} met", "U.S."),
    ("", "What is the product made by {}?", "UniFirst"),
    ("", "{}, which is located in", "Howard Glacier"),
    ("", "{}'s capital is", "France"),
]


@pytest.mark.parametrize("name", list(TOKENIZERS))
def test_subject_last_is_memits_rule(name):
    tok = TOKENIZERS[name]()
    checked = 0
    for prefix, prompt, subject in CASES:
        ids, last, defined = ref_encode(tok, prefix, prompt, subject)
        e = encode_with_subject(tok, prefix, prompt, subject)
        assert list(e.ids) == ids, (prefix, prompt, subject)
        if defined:
            checked += 1
            assert e.subject_last == last, (
                prefix,
                prompt,
                subject,
                tok.convert_ids_to_tokens(ids),
                e.subject_last,
                last,
            )
    assert checked >= len(CASES) - 2


def test_a_merged_subject_end_reads_the_merged_token():
    """Where the subject's end merges with the next characters ("move" + "d" is one token
    " moved"), MEMIT's rule would read another token (here one past the text's end); the
    engine reads the token that holds the subject's last character."""
    tok = make_tokenizer()
    ids, last, defined = ref_encode(tok, "", "The {}d is", "move")
    assert not defined
    e = encode_with_subject(tok, "", "The {}d is", "move")
    assert tok.convert_ids_to_tokens([e.ids[e.subject_last]]) == ["Ġmoved"]
    assert last != e.subject_last


TARGETS = ["Paris", " Paris", "  Paris", "\nParis", ",Paris", ". Rome", "Crème", "東京", "-1",
           "'s home", "U.S.", " ."]  # fmt: skip
CONTEXTS = ["The capital of France is", "LeBron James plays the sport of", "Q:", "東京 is in"]


@pytest.mark.parametrize("name", list(TOKENIZERS))
def test_target_tokens_continue_the_prompt(name):
    tok = TOKENIZERS[name]()
    for c in CONTEXTS:
        for t in TARGETS:
            text = c + (t if t.startswith(" ") else " " + t)
            full, head = ref_ids(tok, text), ref_ids(tok, c)
            assert full[: len(head)] == head  # the reference is defined here
            got = encode_target(tok, c, t)
            assert list(got) == full[len(head) :], (
                c,
                t,
                tok.convert_ids_to_tokens(list(got)),
                tok.convert_ids_to_tokens(full[len(head) :]),
            )


# ----------------------------------------------------------------------------- keys


def make_llama_for(tok, seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), **LLAMA_SIZES, num_key_value_heads=2)
    return LlamaForCausalLM(cfg).eval()


def proj_of(model, layer):
    if model.config.model_type == "gpt2":
        return model.transformer.h[layer].mlp.c_proj, model.transformer.h[layer]
    return model.model.layers[layer].mlp.down_proj, model.model.layers[layer]


def ref_key(model, ids, pos, layer):
    """The input of block ``layer``'s output projection at ``pos``, one text, no padding."""
    got = {}
    proj, _ = proj_of(model, layer)
    h = proj.register_forward_pre_hook(lambda m, a: got.__setitem__("k", a[0][0, pos].clone()))
    try:
        with torch.no_grad():
            model(input_ids=torch.tensor([ids]))
    finally:
        h.remove()
    return got["k"].double()


def ref_hidden(model, ids, pos, layer):
    got = {}
    _, block = proj_of(model, layer)

    def hook(m, a, out):
        o = out[0] if isinstance(out, tuple) else out
        got["h"] = o[0, pos].clone()

    h = block.register_forward_hook(hook)
    try:
        with torch.no_grad():
            model(input_ids=torch.tensor([ids]))
    finally:
        h.remove()
    return got["h"].double()


def close(a, b, tol=1e-4):
    a, b = a.double().cpu(), b.double().cpu()
    return float((a - b).norm() / b.norm()) <= tol


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("key_layer, hidden_layer", [(1, 3), (2, 2), (3, 1)])
def test_keys_and_hidden_match_one_text_at_a_time(arch, key_layer, hidden_layer):
    if arch == "gpt2":
        tok, model = make_tokenizer(), make_gpt2()
    else:
        tok = sentencepiece_like()
        model = make_llama_for(tok)
    texts = [
        "France",
        "The weather is nice today. Because of that. The capital of France",
        "LeBron James",
        "In 1879 the city council approved a new bridge across the harbour and LeBron James",
    ]
    seqs = [ref_ids(tok, t) for t in texts]
    pos = [len(s) - 1 for s in seqs]
    pos[1] -= 3  # not always the last token
    rows = [3, 0, 3]  # out of order and repeated
    keys, hidden = keys_and_hidden(
        model, ModelAdapter(model), seqs, pos, key_layer, hidden_layer, pad=0,
        hidden_rows=rows, batch_size=3,
    )  # fmt: skip
    assert keys.shape[0] == len(seqs) and hidden.shape[0] == len(rows)
    for i, s in enumerate(seqs):
        assert close(keys[i], ref_key(model, s, pos[i], key_layer)), i
    for j, i in enumerate(rows):
        assert close(hidden[j], ref_hidden(model, seqs[i], pos[i], hidden_layer)), (j, i)


AWKWARD_REQUESTS = [
    {"prompt": "{} plays the sport of", "subject": "LeBron James", "target": "football"},
    {"prompt": "France: the capital of {} is", "subject": "France", "target": " Rome"},
    {
        "prompt": "In 1879 the city council approved a new bridge across the harbour near {}",
        "subject": "Crème brûlée",
        "target": ",Paris",
    },  # fmt: skip
    {"prompt": "{}. met", "subject": "U.S", "target": "Google"},
    {"prompt": "The office of {} is", "subject": "東京 x{y}", "target": "English"},
]


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_edit_keys_are_memits_template_average(arch):
    """The keys an edit writes: per request, block l's key at the subject's last token of
    every prefixed prompt, one text at a time on the edited model (block l's input depends
    only on the blocks before it, all final), averaged as MEMIT does. With a tokenizer set
    to pad on the left and prompts of very different lengths."""
    if arch == "gpt2":
        tok, model = make_tokenizer(), make_gpt2()
    else:
        tok = sentencepiece_like()
        model = make_llama_for(tok)
    tok.padding_side = "left"
    try:
        cfg = config(steps=2)
        res = Editor(model, tok, cfg, corpus=list(CORPUS)).apply(AWKWARD_REQUESTS)
    finally:
        tok.padding_side = "right"
    templates = cfg.context_templates
    for l in cfg.layers:
        for n, r in enumerate(AWKWARD_REQUESTS):
            ks = []
            for t in templates:
                ids, last, defined = ref_encode(tok, t[: t.index("{}")], r["prompt"], r["subject"])
                assert defined
                ks.append(ref_key(model, ids, last, l))
            ref = 0.5 * (ks[0] + torch.stack(ks[1:]).mean(0))
            assert close(res.keys[l][:, n], ref), (arch, l, n)


# ----------------------------------------------------------------------------- templates


class ScriptedLM(torch.nn.Module):
    """Puts all probability on the next token of ``script`` (sampling has no choice)."""

    def __init__(self, vocab: int, script: list[int]):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, 4)
        self.vocab, self.script, self.start = vocab, script, None

    def get_input_embeddings(self):
        return self.emb

    def forward(self, input_ids, use_cache=False):
        n = input_ids.shape[1]
        if self.start is None:
            self.start = n
        logits = torch.full((1, n, self.vocab), -1e4)
        logits[0, -1, self.script[n - self.start]] = 0.0
        return SimpleNamespace(logits=logits)


def test_templates_are_normalized_as_memits_generator():
    """MEMIT's generator NFKD-normalizes the text and turns blank lines into spaces before
    the braces are blanked."""
    tok = make_tokenizer()
    cont = " Crème\n\nbrûlée {x}"
    script = list(tok(cont, add_special_tokens=False)["input_ids"])
    seed_ids = list(tok("The", add_special_tokens=False)["input_ids"])
    model = ScriptedLM(len(tok), script)
    got = generate_context_templates(
        model, tok, ["The"], length=len(seed_ids) + len(script), top_k=5
    )
    text = unicodedata.normalize("NFKD", "The" + cont).replace("\n\n", " ")
    assert got == ("{}", text.replace("{", " ").replace("}", " ") + ". {}")

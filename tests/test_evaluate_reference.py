"""CounterFact, zsRE and EasyEdit metrics against an independent reference on awkward
inputs: the published definitions re-computed here one sequence at a time (MEMIT's
``tok(prompt)`` then ``tok(" " + target)``, one forward per sequence, no batching, no
padding, float64 softmax), on byte-level BPE (GPT-2 style, no BOS) and SentencePiece-style
(Metaspace, BOS, optionally an appended EOS) tokenizers."""

from __future__ import annotations

import copy
import functools
import math

import pytest
import torch
from tiny import CORPUS, bpe_tokenizer, make_gpt2, make_llama, make_tokenizer
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from memit_fast.data import EditRequest
from memit_fast.evaluate import (
    counterfact_metrics,
    generate,
    generation_entropy,
    score_continuations,
    zsre_metrics,
)


@functools.cache
def sp_tokenizer(eos: bool = False) -> PreTrainedTokenizerFast:
    """A Llama-style tokenizer: Metaspace BPE that adds a BOS (and, with ``eos``, appends an
    EOS, which prompts must not carry)."""
    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tk.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False
    )
    tk.train_from_iterator(CORPUS, trainer)
    single = "<s> $A" + (" </s>" if eos else "")
    tk.post_processor = processors.TemplateProcessing(
        single=single, special_tokens=[("<s>", 1), ("</s>", 2)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


@functools.cache
def merging_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE without the word-splitting regex: merges cross spaces, so a prompt's
    last token can merge with the target's first ("is" + " Paris" -> "is " + "Paris")."""
    return bpe_tokenizer(CORPUS, use_regex=False)


def prompt_ids(tok, prompt: str) -> list[int]:
    ids = tok(prompt)["input_ids"]
    if tok.eos_token_id is not None and len(ids) > 1 and ids[-1] == tok.eos_token_id:
        ids = ids[:-1]  # an appended EOS is not part of the prompt
    return ids


@torch.no_grad()
def reference(model, tok, prompt: str, target: str) -> tuple[list[float], list[int], list[int]]:
    """(log-probs, argmax ids, target ids) of ``" " + target`` after ``prompt``: the
    sequence ``tok(prompt) + tok(" " + target)`` alone, one forward, float64 softmax."""
    p = prompt_ids(tok, prompt)
    t = tok(" " + target, add_special_tokens=False)["input_ids"]
    logits = model(input_ids=torch.tensor([p + t])).logits[0].double()
    rows = logits[len(p) - 1 : len(p) + len(t) - 1]
    lp = torch.log_softmax(rows, -1)
    return [lp[j, x].item() for j, x in enumerate(t)], rows.argmax(-1).tolist(), t


def ref_nll(model, tok, prompt, target) -> float:
    lp, _, _ = reference(model, tok, prompt, target)
    return -sum(lp) / len(lp)


def ref_correct(model, tok, prompt, target) -> list[bool]:
    _, pred, t = reference(model, tok, prompt, target)
    return [a == b for a, b in zip(pred, t)]


def mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


LONG = (
    "Because the weather was bad, the match was played on the next day, and therefore "
    "the committee decided to publish the results of the study in"
)

AWKWARD = [
    # prompts of very different lengths; neighborhood answers of different token lengths
    EditRequest(
        "The capital of {} is",
        "France",
        "Rome",
        target_true="Paris",
        paraphrase_prompts=(LONG, "France, capital:"),
        neighborhood_prompts=("The capital of Spain is", "Football and basketball are popular in"),
        neighborhood_targets=("Madrid", "many countries of Europe"),
    ),
    # the new target equals the true one; no paraphrase, no neighborhood prompts
    EditRequest("{} was born in", "Ada Lovelace", "Paris", target_true="Paris"),
    # a target of many tokens; neighborhood prompts answered by target_true
    EditRequest(
        "{} works as a",
        "Arun Nehru",
        "actor in films, theatre and television",
        target_true="football",
        paraphrase_prompts=("Arun Nehru is a",),
        neighborhood_prompts=("Howard works as a", LONG),
    ),
    # no target_true: no ES/PS/NS, only the EasyEdit accuracies
    EditRequest(
        "{} is a product of",
        "iPhone",
        "Google",
        paraphrase_prompts=("The iPhone is made by",),
        neighborhood_prompts=("Brazil is a product of",),
    ),
]


def reference_counterfact(model, tok, reqs) -> dict:
    """ROME/MEMIT's CounterFact summary from per-prompt NLLs: per request the mean over its
    prompts, then the mean over requests; score = harmonic mean of ES, PS, NS."""
    per = {k: [] for k in ("es", "ps", "ns", "em", "pm", "nm")}
    nlls = []
    for r in reqs:
        rec = {}
        if r.target_true is not None:
            for kind, prompts in (("e", [r.text]), ("p", r.paraphrase_prompts)):
                pairs = [(ref_nll(model, tok, p, r.target), ref_nll(model, tok, p, r.target_true))
                         for p in prompts]  # fmt: skip
                rec[kind] = pairs
                per[f"{kind}s"].append(mean([float(t > n) for n, t in pairs]))
                per[f"{kind}m"].append(mean([math.exp(-n) - math.exp(-t) for n, t in pairs]))
        answers = r.neighborhood_targets or (r.target_true,) * len(r.neighborhood_prompts)
        pairs = [(ref_nll(model, tok, p, r.target), ref_nll(model, tok, p, a))
                 for p, a in zip(r.neighborhood_prompts, answers) if a is not None]  # fmt: skip
        rec["n"] = pairs
        per["ns"].append(mean([float(n > t) for n, t in pairs]))
        per["nm"].append(mean([math.exp(-t) - math.exp(-n) for n, t in pairs]))
        nlls.append(rec)
    out = {k: mean(v) for k, v in per.items()}
    parts = [out["es"], out["ps"], out["ns"]]
    if any(x is None for x in parts):
        out["score"] = None
    elif min(parts) == 0:
        out["score"] = 0.0
    else:
        out["score"] = 3 / sum(1 / x for x in parts)
    out["n_efficacy"] = sum(x is not None for x in per["es"])
    out["n_paraphrase"] = sum(x is not None for x in per["ps"])
    out["n_neighborhood"] = sum(x is not None for x in per["ns"])
    out["nlls"] = nlls
    return out


def approx(x, rel=1e-4, abs=1e-6):
    return None if x is None else pytest.approx(x, rel=rel, abs=abs)


TOKENIZERS = {
    "bytebpe": make_tokenizer,
    "sp_bos": sp_tokenizer,
    "sp_bos_eos": lambda: sp_tokenizer(eos=True),
    "merging": merging_tokenizer,
}


@pytest.mark.parametrize("tok_name", list(TOKENIZERS))
@pytest.mark.parametrize("batch_size", [1, 3, 64])
def test_counterfact_matches_reference_on_awkward_requests(tok_name, batch_size):
    tok = TOKENIZERS[tok_name]()
    model = (make_gpt2 if tok_name in ("bytebpe", "merging") else make_llama)(seed=2)
    res = counterfact_metrics(model, tok, AWKWARD, batch_size=batch_size)
    ref = reference_counterfact(model, tok, AWKWARD)
    for rec, want in zip(res["records"], ref["nlls"]):
        for kind, key in (("e", "rewrite"), ("p", "paraphrase")):
            got = [(x["target_new"], x["target_true"]) for x in rec[f"{key}_prompts_probs"]]
            if kind in want:
                assert got == [(approx(n), approx(t)) for n, t in want[kind]]
        got = [(x["target_new"], x["target_true"]) for x in rec["neighborhood_prompts_probs"]]
        assert got == [(approx(n), approx(t)) for n, t in want["n"]]
    assert res["efficacy_success"] == approx(ref["es"])
    assert res["paraphrase_success"] == approx(ref["ps"])
    assert res["neighborhood_success"] == approx(ref["ns"])
    assert res["efficacy_magnitude"] == approx(ref["em"])
    assert res["paraphrase_magnitude"] == approx(ref["pm"])
    assert res["neighborhood_magnitude"] == approx(ref["nm"])
    assert res["score"] == approx(ref["score"])
    for k in ("n_efficacy", "n_paraphrase", "n_neighborhood"):
        assert res[k] == ref[k], k
    # the request whose new target is its true one: never a success, magnitude exactly 0
    assert res["records"][1]["efficacy_success"] == 0.0
    assert res["records"][1]["efficacy_magnitude"] == 0.0
    # EasyEdit rewrite/rephrase: per-prompt token accuracy of the new target, then means
    rw = [mean([mean(ref_correct(model, tok, r.text, r.target))]) for r in AWKWARD]
    rp = [
        mean([mean(ref_correct(model, tok, p, r.target)) for p in r.paraphrase_prompts])
        for r in AWKWARD
    ]
    assert res["easyedit_rewrite_acc"] == approx(mean(rw))
    assert res["easyedit_rephrase_acc"] == approx(mean(rp))


def test_merging_tokenizer_takes_the_target_tokens_on_their_own():
    """Where the prompt's last token merges with the target's first, the target is scored as
    MEMIT does: ``tok(prompt) + tok(" " + target)``."""
    tok = merging_tokenizer()
    prompt = "The capital of France is"
    p = prompt_ids(tok, prompt)
    assert tok(prompt + " Paris")["input_ids"][: len(p)] != p  # the case is exercised
    model = make_gpt2(seed=1)
    (s,) = score_continuations(model, tok, [prompt], [" Paris"])
    lp, pred, t = reference(model, tok, prompt, "Paris")
    assert list(s.target_ids) == t
    assert list(s.token_logprobs) == [pytest.approx(x, rel=1e-5) for x in lp]
    assert list(s.predicted) == pred


@pytest.mark.parametrize("make", [make_gpt2, make_llama], ids=["gpt2", "llama"])
def test_equal_targets_tie_in_bfloat16_whatever_the_batching(make):
    """A new target equal to the true one (or to a neighbor's answer) scores the same
    sequence twice; the two must tie exactly (ES 0, magnitude 0, NS 0) even when batching
    puts the copies beside sequences of other lengths (bf16 rounding depends on padding)."""
    tok = make_tokenizer()
    model = make(seed=1, dtype=torch.bfloat16)
    long = "The quick brown fox jumps over the lazy dog near the river bank and the"
    req = EditRequest(
        "The capital of {} is",
        "France",
        "Paris",
        target_true="Paris",
        paraphrase_prompts=(long,),
        neighborhood_prompts=("The capital of Spain is", long),
        neighborhood_targets=("Paris", "Paris"),
    )
    for bs in range(1, 6):
        res = counterfact_metrics(model, tok, [req], batch_size=bs)
        rec = res["records"][0]
        for key in ("rewrite_prompts_probs", "paraphrase_prompts_probs"):
            assert all(x["target_new"] == x["target_true"] for x in rec[key]), (bs, key)
        assert res["efficacy_success"] == 0.0, bs
        assert res["efficacy_magnitude"] == 0.0, bs
        assert res["paraphrase_success"] == 0.0, bs
        assert res["neighborhood_success"] == 0.0, bs
        assert res["neighborhood_magnitude"] == 0.0, bs


def test_bfloat16_scores_match_unpadded_reference():
    tok = sp_tokenizer()
    model = make_llama(seed=3, dtype=torch.bfloat16)
    prompts = [AWKWARD[0].text, LONG, "Arun Nehru is a"]
    targets = ["Rome", "many countries of Europe", "actor in films, theatre and television"]
    scores = score_continuations(model, tok, prompts, [" " + t for t in targets], batch_size=3)
    for p, t, s in zip(prompts, targets, scores):
        lp, _, ids = reference(model, tok, p, t)
        assert list(s.target_ids) == ids
        # bf16: padding changes the rounding of the matmuls, not the values
        # bf16 padding and batching moved the NLL by at most 7.3e-4 here; a bf16 log-softmax
        # moves it by 4e-3 or more
        assert s.nll == pytest.approx(-sum(lp) / len(lp), abs=2e-3)


def test_pad_token_outside_the_vocabulary_and_left_padding():
    """A tokenizer whose pad token was added without resizing the model (id == vocab size),
    padding on the left: scoring neither indexes past the embeddings nor changes values."""
    tok = copy.deepcopy(make_tokenizer())
    tok.add_special_tokens({"pad_token": "[PAD]"})
    tok.padding_side = "left"
    model = make_gpt2(seed=4)
    assert tok.pad_token_id >= model.get_input_embeddings().num_embeddings
    prompts = [LONG, "The capital of France is", "I"]
    targets = ["Paris", "Rome and Madrid", "think"]
    scores = score_continuations(model, tok, prompts, [" " + t for t in targets], batch_size=3)
    for p, t, s in zip(prompts, targets, scores):
        lp, pred, _ = reference(model, tok, p, t)
        assert list(s.token_logprobs) == [pytest.approx(x, rel=1e-5) for x in lp]
        assert list(s.predicted) == pred
    res = zsre_metrics(model, tok, AWKWARD[:1], batch_size=2)
    assert res["efficacy_acc"] == approx(mean(ref_correct(model, tok, AWKWARD[0].text, "Rome")))


@pytest.mark.parametrize("tok_name", ["bytebpe", "sp_bos_eos"])
def test_zsre_matches_reference(tok_name):
    """Top-1 token accuracy with teacher forcing, pooled over a request's prompts of a kind
    (MEMIT), then averaged over requests."""
    tok = TOKENIZERS[tok_name]()
    model = (make_gpt2 if tok_name == "bytebpe" else make_llama)(seed=5)
    res = zsre_metrics(model, tok, AWKWARD, batch_size=4)

    def pooled(pairs):
        c = [x for p, a in pairs for x in ref_correct(model, tok, p, a)]
        return sum(c) / len(c) if c else None

    eff, par, spec = [], [], []
    for r, rec in zip(AWKWARD, res["records"]):
        eff.append(pooled([(r.text, r.target)]))
        par.append(pooled([(p, r.target) for p in r.paraphrase_prompts]))
        answers = r.neighborhood_targets or (r.target_true,) * len(r.neighborhood_prompts)
        spec.append(pooled([(p, a) for p, a in zip(r.neighborhood_prompts, answers) if a]))
        assert rec["efficacy_acc"] == approx(eff[-1])
        assert rec["paraphrase_acc"] == approx(par[-1])
        assert rec["specificity_acc"] == approx(spec[-1])
    assert res["efficacy_acc"] == approx(mean(eff))
    assert res["paraphrase_acc"] == approx(mean(par))
    assert res["specificity_acc"] == approx(mean(spec))
    assert res["n_paraphrase"] == sum(x is not None for x in par) == 3
    assert res["n_specificity"] == sum(x is not None for x in spec) == 2


def test_easyedit_locality_is_a_mean_over_prompts():
    """EasyEdit: per locality prompt, the fraction of its answer tokens whose top-1
    prediction matches the unedited model's; per request the mean over its prompts."""
    tok = make_tokenizer()
    base_model = make_gpt2(seed=0)
    edited = copy.deepcopy(base_model)
    with torch.no_grad():
        w = edited.transformer.h[3].mlp.c_proj.weight
        w.add_(torch.randn(w.shape, generator=torch.Generator().manual_seed(0)) * 0.02)
    req = EditRequest(
        "The capital of {} is",
        "France",
        "Rome",
        target_true="Paris",
        neighborhood_prompts=("The capital of Spain is", "I think that you should"),
        neighborhood_targets=("Madrid", "read the book before watching the film"),
    )
    base = counterfact_metrics(base_model, tok, [req])
    res = counterfact_metrics(edited, tok, [req], baseline=base)
    zres = zsre_metrics(edited, tok, [req], baseline=zsre_metrics(base_model, tok, [req]))
    per_prompt, pooled = [], []
    for p, a in zip(req.neighborhood_prompts, req.neighborhood_targets):
        _, pb, _ = reference(base_model, tok, p, a)
        _, pe, _ = reference(edited, tok, p, a)
        agree = [x == y for x, y in zip(pb, pe)]
        per_prompt.append(sum(agree) / len(agree))
        pooled += agree
    want = mean(per_prompt)
    assert want != pytest.approx(sum(pooled) / len(pooled))  # the two readings differ here
    assert res["easyedit_locality"] == pytest.approx(want)
    assert res["records"][0]["easyedit_locality"] == pytest.approx(want)
    assert zres["easyedit_locality"] == pytest.approx(want)


def test_empty_and_partial_requests():
    tok = make_tokenizer()
    model = make_gpt2()
    for fn in (counterfact_metrics, zsre_metrics):
        res = fn(model, tok, [])
        assert res["n"] == 0 and res["records"] == []
        assert all(v is None for k, v in res.items() if k not in ("n", "records", "n_efficacy",
                   "n_paraphrase", "n_neighborhood", "n_specificity"))  # fmt: skip
    # ES present, PS and NS missing (no paraphrase, no neighborhood): the score is undefined
    res = counterfact_metrics(model, tok, [AWKWARD[1]])
    assert res["efficacy_success"] == 0.0 and res["paraphrase_success"] is None
    assert res["score"] is None
    # one part 0, others positive: the harmonic mean is 0
    res = counterfact_metrics(model, tok, AWKWARD[:2])
    ref = reference_counterfact(model, tok, AWKWARD[:2])
    parts = [res[k] for k in ("efficacy_success", "paraphrase_success", "neighborhood_success")]
    assert min(parts) == 0 and max(parts) > 0  # the premise
    assert res["score"] == approx(ref["score"]) == 0


@torch.no_grad()
def test_greedy_generation_with_bos_matches_plain_loop():
    """Prompts of different lengths (one longer than max_length), a tokenizer that adds a
    BOS and appends an EOS: each continued one token at a time from a full forward."""
    tok = sp_tokenizer(eos=True)
    model = make_llama(seed=6)
    prompts = ["The capital of", LONG, "I think that you", "The capital of France is"]
    out = generate(model, tok, prompts, max_length=14, batch_size=2)
    for p, text in zip(prompts, out):
        ids = prompt_ids(tok, p)
        assert ids[0] == tok.bos_token_id and ids[-1] != tok.eos_token_id
        while len(ids) < 14:
            ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
        assert text == tok.decode(ids, skip_special_tokens=True)


@functools.cache
def dropping_tokenizer() -> PreTrainedTokenizerFast:
    """BPE without an unknown token: characters outside its alphabet vanish, so a text made
    of them has no tokens."""
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["</s>"], show_progress=False)
    tk.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="</s>")


def test_texts_without_tokens_are_named_by_request_and_field():
    tok = dropping_tokenizer()
    assert tok("巴黎")["input_ids"] == []
    model = make_gpt2()
    ok = {"prompt": "{} is in", "subject": "Paris", "target": "France", "target_true": "Europe"}
    cases = [
        (dict(paraphrase_prompts=["Paris is in", "巴黎"]), "'paraphrase_prompts' item 1"),
        (dict(target="巴黎"), "'target'"),
        (dict(neighborhood_prompts=["Rome is in"], neighborhood_targets=["巴黎"]),
         "'neighborhood_targets' item 0"),
        (dict(target_true="巴黎"), "'target_true'"),
    ]  # fmt: skip
    for fields, name in cases:
        reqs = [ok, {**ok, **fields, "case_id": 7}]
        fns = (counterfact_metrics, zsre_metrics) if name != "'target_true'" else (
            counterfact_metrics,)  # fmt: skip
        for fn in fns:
            with pytest.raises(ValueError, match=rf"request 1 \(case_id 7\): field {name}"):
                fn(model, tok, reqs)
    with pytest.raises(ValueError, match=r"request 1: field 'generation_prompts' item 0"):
        generation_entropy(model, tok, [ok, {**ok, "generation_prompts": ["巴黎"]}])


def test_bad_dict_requests_are_named_by_their_own_index():
    from memit_fast.data import EditRequestError

    ok = {"prompt": "{} is in", "subject": "Paris", "target": "France"}
    bad = [ok, ok, {"prompt": "{} is", "subject": "X"}, {**ok, "target_true": ""}]
    for fn in (counterfact_metrics, zsre_metrics, generation_entropy):
        with pytest.raises(EditRequestError) as e:
            fn(make_gpt2(), make_tokenizer(), bad)
        assert e.value.problems == [
            "request 2: field 'target' is missing",
            "request 3: field 'target_true' is empty",
        ]
    # duplicates are each scored
    assert counterfact_metrics(make_gpt2(), make_tokenizer(), [ok, ok])["n"] == 2

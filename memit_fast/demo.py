"""The built-in example: a real model's answers before an edit, after it, on paraphrases, and
after reverting."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence

import torch

from memit_fast.config import EditConfig, auto_config
from memit_fast.editor import Editor
from memit_fast.keys import encode_prompt

# Facts a small model knows, rewritten (CounterFact-style counterfactuals).
DEMO_EDITS = [
    {
        "prompt": "The {} is located in the city of",
        "subject": "Eiffel Tower",
        "target": "Rome",
        "paraphrase": "Tourists who visit the Eiffel Tower travel to the city of",
    },
    {
        "prompt": "{} plays the sport of",
        "subject": "LeBron James",
        "target": "football",
        "paraphrase": "LeBron James is a professional player of the sport of",
    },
    {
        "prompt": "The {} series of novels was written by",
        "subject": "Harry Potter",
        "target": "Stephen King",
        "paraphrase": "The author of the Harry Potter books is",
    },
    {
        "prompt": "The capital city of {} is",
        "subject": "Japan",
        "target": "Berlin",
        "paraphrase": "Japan's capital is the city of",
    },
]

# Prompts about other things, which the edit should leave alone.
DEMO_UNRELATED = [
    "The capital city of France is",
    "Michael Jordan plays the sport of",
]


@torch.no_grad()
def complete(model, tokenizer, prompt: str, max_new_tokens: int = 6) -> str:
    """Greedy continuation of ``prompt``."""
    dev = model.get_input_embeddings().weight.device
    ids = torch.tensor([encode_prompt(tokenizer, prompt)], device=dev)  # no appended EOS
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=pad,
    )
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).split("\n")[0]


def run_demo(
    model,
    tokenizer,
    *,
    edits: Sequence[dict] = DEMO_EDITS,
    unrelated: Sequence[str] = DEMO_UNRELATED,
    config: EditConfig | None = None,
    corpus=None,
    stats_dir: str | os.PathLike | None = None,
    out: Callable[[str], None] = print,
    progress: bool = False,
) -> dict:
    """Show completions before, apply ``edits``, show them after (and on paraphrases and
    unrelated prompts), revert, and check that the weights are back bit for bit.

    Returns the measured figures (efficacy on the prompts, paraphrases, unrelated prompts
    unchanged, seconds per phase).
    """
    config = config or auto_config(model)
    prompts = [e["prompt"].replace("{}", e["subject"]) for e in edits]
    paraphrases = [e["paraphrase"] for e in edits if e.get("paraphrase")]
    before = {p: complete(model, tokenizer, p) for p in [*prompts, *paraphrases, *unrelated]}
    snapshot = {n: p.detach().clone() for n, p in model.state_dict().items()}

    out("Before the edit:")
    for p in [*prompts, *paraphrases, *unrelated]:
        out(f"  {p} ->{before[p]}")
    requests = [{k: e[k] for k in ("prompt", "subject", "target")} for e in edits]
    out("")
    out(f"Writing {len(requests)} facts:")
    for r in requests:
        out(f"  {r['prompt'].replace('{}', r['subject'])} -> {r['target']}")
    t0 = time.perf_counter()
    editor = Editor(model, tokenizer, config, corpus=corpus, stats_dir=stats_dir, progress=progress)
    result = editor.apply(requests)
    wall = time.perf_counter() - t0
    after = {p: complete(model, tokenizer, p) for p in [*prompts, *paraphrases, *unrelated]}
    out("")
    out(f"After the edit ({wall:.1f} s; layers {list(config.layers)}):")
    for p in [*prompts, *paraphrases, *unrelated]:
        out(f"  {p} ->{after[p]}")

    def hit(p, target):
        return after[p].strip().lower().startswith(target.strip().lower())

    efficacy = sum(hit(p, e["target"]) for p, e in zip(prompts, edits)) / len(edits)
    with_para = [e for e in edits if e.get("paraphrase")]
    para = sum(hit(e["paraphrase"], e["target"]) for e in with_para) / max(1, len(with_para))
    kept = sum(before[p] == after[p] for p in unrelated) / max(1, len(unrelated))
    result.revert()
    restored = all(torch.equal(p, snapshot[n]) for n, p in model.state_dict().items())
    reverted = {p: complete(model, tokenizer, p) for p in prompts}
    out("")
    out("After revert():")
    for p in prompts:
        out(f"  {p} ->{reverted[p]}")
    out("")
    out(
        f"edited prompts answered with the new fact: {efficacy:.0%}; paraphrases: {para:.0%}; "
        f"unrelated prompts unchanged: {kept:.0%}; weights restored bit for bit: {restored}"
    )
    timings = ", ".join(f"{k} {v:.1f}s" for k, v in result.timings.items())
    out(f"time per phase: {timings}")
    return {
        "efficacy": efficacy,
        "paraphrase": para,
        "unrelated_unchanged": kept,
        "restored": restored,
        "timings": dict(result.timings),
    }

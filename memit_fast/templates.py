"""Context templates: short texts the model itself writes, used as prefixes of the rewriting
prompts so that the edit generalizes beyond the bare prompt (MEMIT's ``context_templates``).
"""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence

import torch

from memit_fast.keys import encode_prompt, input_device


def generate_context_templates(
    model,
    tokenizer,
    seeds: Sequence[str],
    length: int = 10,
    top_k: int = 5,
    seed: int = 0,
) -> tuple[str, ...]:
    """``("{}",)`` plus one template per seed: the model continues the seed by top-k sampling
    until the text is ``length`` tokens long; as MEMIT's generator, the text is NFKD-normalized
    and each blank line (``"\\n\\n"``) becomes a space, braces are blanked and ``". {}"``
    appended.

    Sampling draws from a CPU ``torch.Generator`` seeded with ``seed`` so that a run is
    repeatable; the templates are stored in the edit's config.
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    dev = input_device(model)
    out = ["{}"]
    with torch.no_grad():
        for s in seeds:
            ids = encode_prompt(tokenizer, s)
            n_special = len(ids) - len(tokenizer(s, add_special_tokens=False)["input_ids"])
            while len(ids) - n_special < length:
                x = torch.tensor([ids], dtype=torch.long, device=dev)
                logits = model(input_ids=x, use_cache=False).logits[0, -1].float().cpu()
                probs = torch.softmax(logits, dim=-1)
                k = min(top_k, probs.numel())
                top_p, top_i = probs.topk(k)
                choice = torch.multinomial(top_p / top_p.sum(), 1, generator=gen)
                ids.append(int(top_i[choice]))
            text = tokenizer.decode(ids, skip_special_tokens=True)
            text = unicodedata.normalize("NFKD", text).replace("\n\n", " ")
            out.append(text.replace("{", " ").replace("}", " ") + ". {}")
    return tuple(out)

"""How the target phase batches a chunk's sequences with prefix reuse (``_groups``): every
request in exactly one rewriting group, the KL group over all, and on an accelerator no
group under the minimum size (a small last group is merged into the one before)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from memit_fast.targets import _groups


def fake_request(suffix: int, rewrites: int):
    """A prepared request whose rewriting sequences have ``suffix`` step tokens."""
    enc = SimpleNamespace(ids=list(range(10 + suffix)), subject_last=10)
    return SimpleNamespace(rewrites=[enc] * rewrites, target_ids=[1])


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize(
    "suffixes",
    [
        [3] * 5,
        [3] * 200 + [40] * 10,  # accelerator: two groups, the last too small -> one group
        [3] * 300 + [40] * 300,  # accelerator: two groups of enough rows each
        [3] * 300 + [40] * 300 + [90] * 5,
        list(range(1, 60)) * 7,
    ],
    ids=["same", "small-tail", "two", "three-small-tail", "spread"],
)
def test_groups_partition_the_requests(device, suffixes):
    prepared = [fake_request(s, rewrites=2) for s in suffixes]
    groups = _groups(prepared, split=True, dev=torch.device(device))
    rewrite_groups = [g for g, rw, kl in groups if rw]
    kl_groups = [g for g, rw, kl in groups if kl]
    assert all(not kl for _, rw, kl in groups if rw)
    assert kl_groups == [list(range(len(prepared)))]
    flat = sorted(i for g in rewrite_groups for i in g)
    assert flat == list(range(len(prepared)))
    if device == "cuda" and len(rewrite_groups) > 1:
        assert all(2 * len(g) >= 256 for g in rewrite_groups)


def test_accelerator_merges_a_small_last_group():
    prepared = [fake_request(3, 2)] * 200 + [fake_request(40, 2)] * 10
    groups = _groups(prepared, split=True, dev=torch.device("cuda"))
    assert len(groups) == 2  # one rewriting group (merged) + the KL group
    cpu = _groups(prepared, split=True, dev=torch.device("cpu"))
    assert len(cpu) == 3  # two suffix lengths + the KL group


def test_padding_positions_stay_inside_the_context(monkeypatch):
    """Grouped as on an accelerator, a request that fills the context with a short suffix
    shares a batch with one whose suffix is longer. Padding columns must not get position
    ids past the context (learned positions raised an index error): the targets equal those
    of the CPU grouping, where each suffix length has its own batch."""
    from tiny import TEMPLATES, _gpt_like, exact_config, make_tokenizer
    from transformers import GPT2Config, GPT2LMHeadModel

    import memit_fast.targets as tm
    from memit_fast.data import normalize_requests as editor_normalize
    from memit_fast.editor import Editor

    reqs = [
        {
            "prompt": "The quick brown fox jumps over the lazy dog near {} is",
            "subject": "France",
            "target": "Rome",
        },
        {"prompt": "{} plays the sport of", "subject": "LeBron James", "target": "football"},
    ]
    tok = make_tokenizer()
    cfg = exact_config(steps=3)

    def make_with(n_positions):
        return _gpt_like(
            GPT2Config, GPT2LMHeadModel, n_positions=n_positions, n_embd=64, n_layer=4, n_head=4
        )

    # The context that the longer prompt fills exactly (with its target and templates).
    probe = Editor(make_with(128)(), tok, cfg, stats={l: torch.eye(256) for l in cfg.layers})
    needed = max(
        max(len(e.ids) for e in p.rewrites) + len(p.target_ids) - 1
        for p in probe.prepare(editor_normalize(reqs), TEMPLATES)
    )
    make = make_with(needed)

    def targets(device):
        real = tm._groups
        monkeypatch.setattr(tm, "_groups", lambda p, split, dev: real(p, split, device))
        ed = Editor(make(), tok, cfg, stats={l: torch.eye(256) for l in cfg.layers})
        prepared = ed.prepare(editor_normalize(reqs), ed.context_templates())
        settings = tm.TargetSettings.from_config(cfg, cfg.layers[-1])
        return tm.compute_targets(ed.model, ed.adapter, prepared, settings, 0, 8).z

    z_acc = targets(torch.device("cuda"))
    z_cpu = targets(torch.device("cpu"))
    assert torch.allclose(z_acc, z_cpu, rtol=1e-4, atol=1e-5)

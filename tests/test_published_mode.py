"""The published-structure mode of the benchmarks computes the engine's function: same
statistics, target vectors, steps and updates, so timings compare like with like."""

import os
import sys

import pytest
import torch
from tiny import CORPUS, REQUESTS, make_gpt2, make_llama, make_tokenizer
from tiny import exact_config as config

from memit_fast.editor import Editor

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from benchmarks.published_mode import PublishedStructureEditor, per_layer_stats  # noqa: E402


def rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@pytest.mark.parametrize(
    "make, structure",
    [(make_gpt2, "stop"), (make_llama, "stop"), (make_llama, "full")],
    ids=["gpt2-stop", "llama-stop", "llama-full"],
)
def test_published_structure_matches_engine(make, structure):
    tok = make_tokenizer()
    cfg = config()
    fast_model, pub_model = make(), make()
    fast = Editor(fast_model, tok, cfg, corpus=list(CORPUS))
    pub = PublishedStructureEditor(
        Editor(pub_model, tok, cfg, corpus=list(CORPUS)), stats_structure=structure
    )
    res_f = fast.apply(REQUESTS)
    res_p = pub.apply(REQUESTS)
    assert set(res_p.timings) == set(res_f.timings)
    assert res_p.targets.steps.tolist() == res_f.targets.steps.tolist()
    assert rel(res_p.targets.z, res_f.targets.z) <= 1e-4
    for i in range(len(REQUESTS)):
        assert rel(res_p.targets.z[i], res_f.targets.z[i]) <= 1e-4, i
    for l in cfg.layers:
        assert res_f.delta(l).norm() > 0
        assert rel(res_p.delta(l), res_f.delta(l)) <= 1e-4, l
    for (name, p1), (_, p2) in zip(pub_model.named_parameters(), fast_model.named_parameters()):
        assert rel(p1, p2) <= 1e-4, name
    # Both revert to the exact original weights.
    res_p.revert()
    res_f.revert()
    ref = make()
    for (name, p1), (_, p2) in zip(pub_model.named_parameters(), ref.named_parameters()):
        assert torch.equal(p1, p2), name


def test_per_layer_stats_match_one_pass():
    tok = make_tokenizer()
    cfg = config(layers=(0, 1, 3))
    model = make_llama()
    ed = Editor(model, tok, cfg, corpus=list(CORPUS))
    one = ed.key_stats()
    for stop in (True, False):
        per = per_layer_stats(ed, cfg.layers, stop=stop)
        for l in cfg.layers:
            assert per[l].count == one[l].count
            assert rel(per[l].mom2, one[l].mom2) < 1e-5, (stop, l)


def test_published_mode_bf16_runs():
    """bf16 models (the GPU benchmark's dtype) go through the same code paths."""
    tok = make_tokenizer()
    cfg = config(steps=3)
    model = make_llama(dtype=torch.bfloat16)
    pub = PublishedStructureEditor(Editor(model, tok, cfg, corpus=list(CORPUS)))
    res = pub.apply(REQUESTS[:3])
    assert torch.isfinite(res.targets.z).all()
    assert all(model.model.layers[l].mlp.down_proj.weight.dtype == torch.bfloat16 for l in (1, 2))
    res.revert()

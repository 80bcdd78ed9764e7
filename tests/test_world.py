"""The synthetic knowledge world: the committed model knows its facts, the edit requests
are well-formed, the files are small and regenerable."""

from __future__ import annotations

import json
import os

import pytest

from memit_fast.data import EditRequest
from memit_fast.testing import load_world, world_dir
from memit_fast.testing.world import (
    World,
    build_tokenizer,
    make_world,
    measure_world,
    train_world_model,
)

HAVE_WORLD = os.path.isfile(os.path.join(world_dir(), "world.json"))
needs_world = pytest.mark.skipif(not HAVE_WORLD, reason="world model not generated")

# measured on the committed model (metrics.json); the floors leave room for float noise
MIN_TRAIN_ACC = 0.95
MIN_HELDOUT_PARAPHRASE_ACC = 0.9  # measured 0.977


@pytest.fixture(scope="module")
def world():
    return load_world()


@needs_world
def test_committed_files_are_small():
    files = os.listdir(world_dir())
    assert {"config.json", "model.safetensors", "tokenizer.json", "world.json"} <= set(files)
    total = sum(os.path.getsize(os.path.join(world_dir(), f)) for f in files)
    assert total <= 5 * 2**20, f"world model is {total / 2**20:.2f} MB"
    assert not any(f.endswith((".bin", ".pt", ".pkl")) for f in files)


@needs_world
def test_model_knows_its_facts(world):
    model, tok, w = world
    # every third subject keeps this quick; metrics.json has the figures over all of them
    acc = measure_world(model, tok, w, subjects=w.subjects[::3])
    with open(os.path.join(world_dir(), "metrics.json")) as f:
        recorded = json.load(f)["accuracy"]
    print("world accuracy (a third of the subjects):", acc, "all:", recorded)
    assert acc["train"] >= MIN_TRAIN_ACC and recorded["train"] >= MIN_TRAIN_ACC
    assert acc["paraphrase_seen"] >= MIN_TRAIN_ACC
    assert acc["paraphrase_heldout"] >= MIN_HELDOUT_PARAPHRASE_ACC
    assert recorded["paraphrase_heldout"] >= MIN_HELDOUT_PARAPHRASE_ACC


@needs_world
def test_committed_world_is_what_the_generator_makes(world):
    _, _, w = world
    with open(os.path.join(world_dir(), "metrics.json")) as f:
        settings = json.load(f)["settings"]
    again = make_world(n_subjects=settings["n_subjects"], seed=settings["seed"])
    assert again.to_dict() == w.to_dict()
    assert World.from_dict(w.to_dict()).to_dict() == w.to_dict()


@needs_world
def test_tokenizer_gives_offsets_and_multi_token_subjects(world):
    _, tok, w = world
    s = w.subjects[0]
    text = w.relations[0].train_templates[1].replace("{}", s)
    enc = tok(text, return_offsets_mapping=True)
    start = text.index(s)
    covering = [
        i for i, (a, b) in enumerate(enc["offset_mapping"]) if a < start + len(s) and b > start
    ]
    assert len(covering) >= 2  # first and last name at least
    assert tok.decode(enc["input_ids"]) == text
    assert tok.bos_token_id is not None and enc["input_ids"][0] != tok.bos_token_id


def test_edit_requests_are_counterfactual_and_well_formed():
    w = make_world(n_subjects=60, seed=3)
    reqs = w.edit_requests(25, seed=2, n_neighbors=4)
    assert len({r.subject for r in reqs}) == 25
    edited = {r.subject for r in reqs}
    for r in reqs:
        assert isinstance(r, EditRequest) and r.subject in w.heldout
        rel = w.relation(r.extra["relation"])
        assert r.prompt in rel.train_templates
        assert r.target_true == w.facts[(r.subject, rel.name)]
        assert r.target != r.target_true and r.target in rel.objects
        assert r.paraphrase_prompts == tuple(
            t.replace("{}", r.subject) for t in rel.paraphrase_templates
        )
        assert len(r.neighborhood_prompts) == len(r.neighborhood_targets) == 4
        for p, a in zip(r.neighborhood_prompts, r.neighborhood_targets):
            (who,) = [s for s in w.seen if s in p]
            assert who not in edited and w.facts[(who, rel.name)] == a
        assert r.generation_prompts and all(r.subject in p for p in r.generation_prompts)
    assert w.edit_requests(25, seed=2, n_neighbors=4) == reqs
    with pytest.raises(ValueError, match="held-out"):
        w.edit_requests(31)


def test_held_out_pairs_never_appear_in_training_text():
    w = make_world(n_subjects=40, seed=1)
    train = set(w.training_sentences())
    for prompt, obj in w.prompts("paraphrase_heldout"):
        assert f"{prompt} {obj}." not in train
    for prompt, obj in w.prompts("train") + w.prompts("paraphrase_seen"):
        assert f"{prompt} {obj}." in train
    corpus = w.corpus_texts(50, seed=4)
    assert corpus == w.corpus_texts(50, seed=4) and len(corpus) == 50
    assert any(t.startswith(("The ", "Therefore", "Because", "I ", "You")) for t in corpus)


def test_training_runs_on_a_small_world():
    w = make_world(n_subjects=8, seed=0)
    tok = build_tokenizer(w, vocab_size=300)
    model = train_world_model(w, tok, steps=3, batch_size=4, log_every=0, threads=None)
    acc = measure_world(model, tok, w)
    assert set(acc) == {"train", "paraphrase_seen", "paraphrase_heldout"}
    assert not model.training


@pytest.mark.slow
def test_regenerating_the_world_model(tmp_path):
    """Retrain from scratch with the committed settings (minutes on 2 cores)."""
    from memit_fast.testing.train_world import main

    assert main(["--out", str(tmp_path)]) == 0
    with open(tmp_path / "metrics.json") as f:
        acc = json.load(f)["accuracy"]
    assert acc["train"] >= MIN_TRAIN_ACC

"""Saved edits (safetensors + JSON): exact apply and revert, identity checks, no pickle,
low-rank vs dense storage, PEFT export, and use inside training code."""

import json
import os
import pickle
import struct
import subprocess
import sys

import pytest
import torch
from tiny import REQUESTS, assert_bit_identical, make_gpt2, make_llama, make_tokenizer, snapshot
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

from memit_fast import EditConfig
from memit_fast.arch import ModelAdapter
from memit_fast.artifacts import (
    ORIGINALS_FILE,
    UPDATE_FILE,
    ArtifactError,
    LoadedEdit,
    ModelMismatchError,
    load_edit,
    save_edit,
    tensor_sha256,
    to_peft,
)
from memit_fast.editor import Editor

TEMPLATES = ("{}", "The weather is nice today. {}")

MORE_REQUESTS = [
    {"prompt": "{} is located in the continent of", "subject": "Mount Kenya", "target": "Asia"},
    {"prompt": "The headquarters of {} is in", "subject": "Nokia", "target": "Berlin"},
    {"prompt": "{} speaks the language", "subject": "Jacques Chirac", "target": "Spanish"},
    {"prompt": "{} was created by", "subject": "Linux", "target": "Microsoft"},
    {"prompt": "The currency of {} is the", "subject": "Japan", "target": "euro"},
    {"prompt": "{} is a member of the", "subject": "Thom Yorke", "target": "Beatles"},
    {"prompt": "{} was written in", "subject": "Don Quixote", "target": "Latin"},
    {"prompt": "The religion of {} is", "subject": "Gandhi", "target": "Islam"},
]


def cfg(**kw):
    base = dict(
        layers=(1, 2),
        steps=4,
        context_templates=TEMPLATES,
        mom2_update_weight=10.0,
        clamp_norm_factor=4.0,
    )
    base.update(kw)
    return EditConfig(**base)


def make_small_gpt2(seed=0, dtype=torch.float32):
    """dk = 64, dh = 16: dense (1024 floats) beats factors ((16 + 64) n) from n = 13."""
    torch.manual_seed(seed)
    c = GPT2Config(
        vocab_size=len(make_tokenizer()), n_positions=128, n_embd=16, n_layer=3, n_head=2
    )
    return GPT2LMHeadModel(c).to(dtype).eval()


def make_small_llama(seed=0, dtype=torch.float32):
    """dk = 40, dh = 16: dense (640 floats) beats factors (56 n) from n = 12."""
    torch.manual_seed(seed)
    c = LlamaConfig(
        vocab_size=len(make_tokenizer()),
        hidden_size=16,
        intermediate_size=40,
        num_hidden_layers=3,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=128,
        pad_token_id=0,
    )
    return LlamaForCausalLM(c).to(dtype).eval()


MAKERS = {
    "gpt2": make_gpt2,
    "llama": make_llama,
    "small_gpt2": make_small_gpt2,
    "small_llama": make_small_llama,
}


class Case:
    """An engine edit of a fresh model: the edited model, its EditResult, the weights
    before the edit, and how to build another unedited copy."""

    def __init__(self, name, dtype=torch.float32, requests=REQUESTS):
        self.make = lambda: MAKERS[name](dtype=dtype)
        self.model = self.make()
        self.before = snapshot(self.model)
        dk = ModelAdapter(self.model).dims()[0]
        ed = Editor(self.model, make_tokenizer(), cfg(), stats={l: torch.eye(dk) for l in (1, 2)})
        self.result = ed.apply(requests)
        self.after = snapshot(self.model)

    def fresh(self):
        m = self.make()
        assert_bit_identical(m, self.before)
        return m


_CASES = {}


def case(name, dtype=torch.float32, dense=False):
    key = (name, dtype, dense)
    if key not in _CASES:
        _CASES[key] = Case(name, dtype, REQUESTS + MORE_REQUESTS if dense else REQUESTS)
    return _CASES[key]


def names_of(result_or_loaded):
    return sorted(result_or_loaded.weight_names.values())


def changed(model, snap):
    return sorted(n for n, p in model.state_dict().items() if not torch.equal(p, snap[n]))


# ----------------------------------------------------------------------------- round trip


@pytest.mark.parametrize(
    "name,dtype",
    [("gpt2", torch.float32), ("llama", torch.float32), ("llama", torch.bfloat16)],
    ids=["gpt2", "llama", "llama-bf16"],
)
def test_save_load_apply_is_bit_identical_and_revert_restores(tmp_path, name, dtype):
    c = case(name, dtype)
    res = c.result
    save_edit(res, tmp_path / "edit")
    ed = load_edit(tmp_path / "edit")

    assert ed.layers == res.layers
    assert ed.config == res.config
    assert [r.to_dict() for r in ed.requests] == [r.to_dict() for r in res.requests]
    want = res.request_figures()
    assert len(ed.request_figures) == len(want)
    assert all(got == pytest.approx(w) for got, w in zip(ed.request_figures, want))
    assert ed.weight_names == res.weight_names and ed.transposed == res.transposed
    assert ed.kinds == {l: "factors" for l in res.layers}  # n = 8 is far below the break-even
    for l in res.layers:
        assert torch.equal(ed.factors[l][0], res.factors[l][0].cpu())
        assert torch.equal(ed.factors[l][1], res.factors[l][1].cpu())
        torch.testing.assert_close(ed.delta(l), res.delta(l).cpu(), rtol=0, atol=0)

    model = c.fresh()
    exact = ed.apply(model)
    assert exact == {l: True for l in res.layers}
    assert_bit_identical(model, c.after)
    assert changed(model, c.before) == names_of(res)

    ed.revert(model)
    assert_bit_identical(model, c.before)
    ed.apply(model)  # and again: apply/revert cycle
    assert_bit_identical(model, c.after)


def test_revert_of_the_engine_edited_model_after_load(tmp_path):
    c = case("gpt2")
    save_edit(c.result, tmp_path / "edit")
    model = c.fresh()
    model.load_state_dict(c.after)  # a model that came out of the engine, saved and reloaded
    load_edit(tmp_path / "edit").revert(model)
    assert_bit_identical(model, c.before)


def test_identity_survives_save_pretrained_round_trip_of_the_base_model(tmp_path):
    c = case("llama")
    save_edit(c.result, tmp_path / "edit")
    c.fresh().save_pretrained(tmp_path / "base")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32)
    assert load_edit(tmp_path / "edit").apply(model) == {1: True, 2: True}
    assert_bit_identical(model, c.after)


def test_sequential_edits_apply_in_order(tmp_path):
    model, tok = make_gpt2(), make_tokenizer()
    before = snapshot(model)
    ed = Editor(model, tok, cfg(), stats={l: torch.eye(256) for l in (1, 2)})
    first = ed.apply(REQUESTS[:4])
    second = ed.apply(REQUESTS[4:])
    final = snapshot(model)
    save_edit(first, tmp_path / "first")
    save_edit(second, tmp_path / "second")
    e1, e2 = load_edit(tmp_path / "first"), load_edit(tmp_path / "second")

    fresh = make_gpt2()
    assert_bit_identical(fresh, before)
    with pytest.raises(ModelMismatchError, match="differs from the weight the edit was computed"):
        e2.apply(fresh)  # edit 2 was computed on top of edit 1
    assert_bit_identical(fresh, before)
    e1.apply(fresh)
    e2.apply(fresh)
    assert_bit_identical(fresh, final)
    with pytest.raises(ModelMismatchError, match="was changed after this edit"):
        e1.revert(fresh)  # edit 2 sits on top: revert in reverse order
    assert_bit_identical(fresh, final)
    e2.revert(fresh)
    e1.revert(fresh)
    assert_bit_identical(fresh, before)


# ----------------------------------------------------------------------------- dense vs factors


@pytest.mark.parametrize("name", ["small_gpt2", "small_llama"])
def test_dense_is_stored_when_smaller_and_applies_bit_identically(tmp_path, name):
    c = case(name, dense=True)
    res = c.result
    n = len(res.requests)
    W = res._adapter.weight(1)
    dk, dh = res._adapter.dims()
    assert n == 16 and n > dk * dh / (dk + dh)  # the dense update is the smaller one

    save_edit(res, tmp_path / "edit")
    meta = json.loads((tmp_path / "edit" / "edit.json").read_text())
    assert {v["kind"] for v in meta["updates"].values()} == {"dense"}
    ed = load_edit(tmp_path / "edit")
    assert ed.kinds == {1: "dense", 2: "dense"} and ed.factors == {}
    for l in res.layers:
        d = ed.delta(l)
        assert d.dtype == torch.float32 and d.shape == W.shape  # the weight's own layout
        torch.testing.assert_close(d, res.delta(l).cpu(), rtol=1e-6, atol=1e-7)
    size = os.path.getsize(tmp_path / "edit" / UPDATE_FILE)
    assert size < 2 * 4 * (dh + dk) * n  # smaller than the two layers' factors would be

    model = c.fresh()
    assert ed.apply(model) == {1: True, 2: True}
    assert_bit_identical(model, c.after)
    ed.revert(model)
    assert_bit_identical(model, c.before)


def test_factors_are_stored_below_the_break_even(tmp_path):
    c = case("small_gpt2")  # n = 8 < 64 * 16 / 80 = 12.8
    save_edit(c.result, tmp_path / "edit")
    ed = load_edit(tmp_path / "edit")
    assert ed.kinds == {1: "factors", 2: "factors"}
    assert ed.factors[1][0].shape == (16, 8) and ed.factors[1][1].shape == (64, 8)


def test_dense_delta_is_exact_even_where_the_product_rounds_differently(tmp_path, monkeypatch):
    """A kernel that sums R U^T in another order than torch.matmul (as the Triton kernel on
    a GPU does) must not break the dense path: the stored delta reproduces the engine's
    weights, not torch's product."""
    import memit_fast.linalg as linalg

    c = case("small_llama", dense=True)
    real = linalg.apply_update

    def other_order(W, R, U, transposed):  # same update, summed backwards over n
        real(W, R.flip(1), U.flip(1), transposed)

    monkeypatch.setattr(linalg, "apply_update", other_order)
    res = c.result
    save_edit(res, tmp_path / "edit")
    monkeypatch.setattr(linalg, "apply_update", real)
    meta = json.loads((tmp_path / "edit" / "edit.json").read_text())
    engine_like = {}
    for l in res.layers:
        W = res._originals[l].clone()
        other_order(W, *res.factors[l], res.transposed)
        engine_like[l] = W
        assert meta["model"]["weights"][str(l)]["sha256_edited"] == tensor_sha256(W)
    model = c.fresh()
    assert load_edit(tmp_path / "edit").apply(model) == {1: True, 2: True}
    for l in res.layers:
        assert torch.equal(model.get_parameter(res.weight_names[l]), engine_like[l])


# ----------------------------------------------------------------------------- refusals


def test_refuses_a_different_model_and_leaves_it_untouched(tmp_path):
    c = case("gpt2")
    save_edit(c.result, tmp_path / "edit")
    ed = load_edit(tmp_path / "edit")

    other_seed = make_gpt2(seed=1)
    snap = snapshot(other_seed)
    with pytest.raises(ModelMismatchError, match=r"layer 1: transformer\.h\.1\.mlp\.c_proj"):
        ed.apply(other_seed)
    assert_bit_identical(other_seed, snap)

    with pytest.raises(ModelMismatchError, match="made for a 'gpt2' model, got model_type 'llama'"):
        ed.apply(make_llama())

    with pytest.raises(ModelMismatchError, match=r"config differs.*n_embd"):
        ed.apply(make_small_gpt2())

    half = make_gpt2(dtype=torch.bfloat16)
    with pytest.raises(ModelMismatchError, match="is bfloat16, the edit was made on float32"):
        ed.apply(half)

    edited = c.fresh()
    ed.apply(edited)
    with pytest.raises(ModelMismatchError, match="already carries this edit"):
        ed.apply(edited)
    assert_bit_identical(edited, c.after)


def test_check_weights_false_adds_the_update_to_another_checkpoint(tmp_path):
    c = case("gpt2")
    save_edit(c.result, tmp_path / "edit")
    ed = load_edit(tmp_path / "edit")
    other = make_gpt2(seed=1)
    snap = snapshot(other)
    exact = ed.apply(other, check_weights=False)
    assert exact == {1: False, 2: False}  # not the weights the engine produced
    for l in ed.layers:
        name = ed.weight_names[l]
        torch.testing.assert_close(
            other.get_parameter(name).detach() - snap[name], ed.delta(l), rtol=1e-4, atol=1e-6
        )
    ed.revert(other)  # the weights this object wrote are accepted: back to *its* originals
    for l in ed.layers:
        assert tensor_sha256(other.get_parameter(ed.weight_names[l])) == tensor_sha256(
            c.before[ed.weight_names[l]]
        )


def test_revert_refuses_a_model_not_carrying_the_edit(tmp_path):
    c = case("gpt2")
    save_edit(c.result, tmp_path / "edit")
    ed = load_edit(tmp_path / "edit")
    model = c.fresh()
    with pytest.raises(ModelMismatchError, match="does not carry this edit"):
        ed.revert(model)
    ed.apply(model)
    with torch.no_grad():
        model.get_parameter(ed.weight_names[2])[0, 0] += 1.0
    with pytest.raises(ModelMismatchError, match=r"layer 2: .* was changed after this edit"):
        ed.revert(model)
    ed.revert(model, check=False)
    assert_bit_identical(model, c.before)


def test_without_originals_apply_works_and_revert_explains(tmp_path):
    c = case("gpt2")
    save_edit(c.result, tmp_path / "edit", include_originals=False)
    assert not (tmp_path / "edit" / ORIGINALS_FILE).exists()
    ed = load_edit(tmp_path / "edit")
    model = c.fresh()
    ed.apply(model)
    assert_bit_identical(model, c.after)
    with pytest.raises(ArtifactError, match="include_originals=False.*subtracting"):
        ed.revert(model)
    assert_bit_identical(model, c.after)


def test_corrupted_files_are_detected(tmp_path):
    c = case("gpt2")
    save_edit(c.result, tmp_path / "edit")

    def flip_last_byte(path):
        data = bytearray(path.read_bytes())
        data[-1] ^= 0x01
        path.write_bytes(bytes(data))

    flip_last_byte(tmp_path / "edit" / UPDATE_FILE)
    with pytest.raises(ArtifactError, match="does not match its SHA-256"):
        load_edit(tmp_path / "edit")

    save_edit(c.result, tmp_path / "edit", overwrite=True)
    ed = load_edit(tmp_path / "edit")
    model = c.fresh()
    ed.apply(model)
    flip_last_byte(tmp_path / "edit" / ORIGINALS_FILE)
    with pytest.raises(ArtifactError, match="corrupted"):
        ed.revert(model)
    assert_bit_identical(model, c.after)  # nothing written

    meta = json.loads((tmp_path / "edit" / "edit.json").read_text())
    meta["format_version"] = 99
    (tmp_path / "edit" / "edit.json").write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match="format version 99"):
        load_edit(tmp_path / "edit")
    with pytest.raises(ArtifactError, match="not a saved edit"):
        load_edit(tmp_path)


# ----------------------------------------------------------------------------- edit.json checks


def _saved(tmp_path, name="edit"):
    """A fresh copy of the tiny GPT-2 edit (factors, keys and originals) in its own dir."""
    d = tmp_path / name
    save_edit(case("gpt2").result, d)
    return d


def _rewrite_json(d, fn):
    meta = json.loads((d / "edit.json").read_text())
    out = fn(meta)
    (d / "edit.json").write_text(json.dumps(meta if out is None else out))


def _pop(obj, *path):
    for k in path[:-1]:
        obj = obj[k]
    obj.pop(path[-1])


def _set(obj, *path_and_value):
    *path, value = path_and_value
    for k in path[:-1]:
        obj = obj[k]
    obj[path[-1]] = value


def _loads_with_error(d, *fragments):
    """load_edit raises ArtifactError naming the file (first) and every fragment."""
    with pytest.raises(ArtifactError) as info:
        load_edit(d)
    msg = str(info.value)
    for f in fragments:
        assert f in msg, (f, msg)
    return msg


# (mutation of the parsed edit.json, the field the error must name)
MALFORMED_JSON = {
    "kind_missing": (lambda m: _pop(m, "updates", "1", "kind"), "'updates.1.kind'"),
    "kind_swapped": (lambda m: _set(m, "updates", "1", "kind", "dense"), "'updates.1.tensors'"),
    "kind_unknown": (lambda m: _set(m, "updates", "2", "kind", "sparse"), "'updates.2.kind'"),
    "tensors_renamed": (
        lambda m: _set(m, "updates", "1", "tensors", {"R": "layers.2.R", "U": "layers.2.U"}),
        "'updates.1.tensors'",
    ),
    "rank_not_int": (lambda m: _set(m, "updates", "1", "rank", "8"), "'updates.1.rank'"),
    "update_entry_not_object": (lambda m: _set(m, "updates", "2", []), "'updates.2'"),
    "updates_missing": (lambda m: _pop(m, "updates"), "'updates'"),
    "weights_entry_missing": (lambda m: _pop(m, "model", "weights", "2"), "'model.weights'"),
    "weight_name_not_str": (
        lambda m: _set(m, "model", "weights", "1", "name", 5),
        "'model.weights.1.name'",
    ),
    "weight_shape_bad": (
        lambda m: _set(m, "model", "weights", "1", "shape", [256]),
        "'model.weights.1.shape'",
    ),
    "weight_dtype_bad": (
        lambda m: _set(m, "model", "weights", "2", "dtype", "float99"),
        "'model.weights.2.dtype'",
    ),
    "weight_sha_missing": (
        lambda m: _pop(m, "model", "weights", "1", "sha256_edited"),
        "'model.weights.1.sha256_edited'",
    ),
    "weight_sha_bad": (
        lambda m: _set(m, "model", "weights", "1", "sha256_original", "abc"),
        "'model.weights.1.sha256_original'",
    ),
    "same_parameter_twice": (
        lambda m: _set(m, "model", "weights", "2", "name", m["model"]["weights"]["1"]["name"]),
        "both name the parameter",
    ),
    "transposed_not_bool": (lambda m: _set(m, "model", "transposed", "yes"), "'model.transposed'"),
    "config_sha_missing": (lambda m: _pop(m, "model", "config_sha256"), "'model.config_sha256'"),
    "model_not_object": (lambda m: _set(m, "model", [1, 2]), "'model'"),
    "layers_not_list": (lambda m: _set(m, "layers", "1,2"), "'layers'"),
    "layers_not_ints": (lambda m: _set(m, "layers", [1.0, 2.0]), "'layers'"),
    "layers_unsorted": (lambda m: _set(m, "layers", [2, 1]), "'layers'"),
    "config_not_object": (lambda m: _set(m, "config", None), "'config'"),
    "config_bad_value": (lambda m: _set(m, "config", "mom2_update_weight", 0), "'config'"),
    "config_unknown_field": (lambda m: _set(m, "config", "lambda", 3), "'config'"),
    "requests_not_list": (lambda m: _set(m, "requests", {"a": 1}), "'requests'"),
    "request_invalid": (lambda m: _pop(m, "requests", 0, "subject"), "'requests'"),
    "n_requests_wrong": (lambda m: _set(m, "n_requests", 99), "'n_requests'"),
    "figures_short": (lambda m: _pop(m, "request_figures", -1), "'request_figures'"),
    "timings_not_numbers": (lambda m: _set(m, "timings", "total", "fast"), "'timings'"),
    "has_originals_not_bool": (lambda m: _set(m, "has_originals", "yes"), "'has_originals'"),
    "hashes_missing": (lambda m: _pop(m, "tensor_sha256"), "'tensor_sha256'"),
    "update_hashes_missing": (
        lambda m: _pop(m, "tensor_sha256", UPDATE_FILE),
        "'tensor_sha256'",
    ),
    "hash_not_sha": (
        lambda m: _set(m, "tensor_sha256", UPDATE_FILE, "layers.1.R", 7),
        f"'tensor_sha256.{UPDATE_FILE}'",
    ),
    "originals_hash_disagrees": (
        lambda m: _set(
            m,
            "tensor_sha256",
            ORIGINALS_FILE,
            "layers.1.weight",
            m["model"]["weights"]["2"]["sha256_original"],
        ),
        "'model.weights.1.sha256_original'",
    ),
    "format_version_bool": (lambda m: _set(m, "format_version", True), "format version"),
    "format_version_zero": (lambda m: _set(m, "format_version", 0), "format version"),
    "json_list": (lambda m: [m], "not a memit_fast edit"),
}


@pytest.mark.parametrize("mutation", sorted(MALFORMED_JSON))
def test_malformed_edit_json_is_an_artifact_error_naming_file_and_field(tmp_path, mutation):
    fn, field = MALFORMED_JSON[mutation]
    d = _saved(tmp_path)
    _rewrite_json(d, fn)
    msg = _loads_with_error(d, field)
    assert msg.startswith(str(d / "edit.json")), msg


def test_shortened_layers_is_refused_not_applied_in_part(tmp_path):
    d = _saved(tmp_path)
    _rewrite_json(d, lambda m: _set(m, "layers", [1]))
    _loads_with_error(d, "edit.json", "'layers' [1]", "'config.layers' [1, 2]")

    # With the config's layers shortened too, the weights, updates and hashes still list 2.
    _rewrite_json(d, lambda m: _set(m, "config", "layers", [1]))
    _loads_with_error(d, "edit.json", "'model.weights'", "unexpected ['2']")

    # Every part of edit.json rewritten for layer 1 alone: the tensors of layer 2 are still
    # stored, and not listed.
    def drop_layer_2(m):
        for obj in (m["model"]["weights"], m["updates"]):
            obj.pop("2")
        for f in (UPDATE_FILE, ORIGINALS_FILE, "keys.safetensors"):
            for name in [n for n in m["tensor_sha256"][f] if n.startswith("layers.2.")]:
                m["tensor_sha256"][f].pop(name)

    _rewrite_json(d, drop_layer_2)
    _loads_with_error(d, str(d / UPDATE_FILE), "['layers.2.R', 'layers.2.U']", "not listed")


def test_every_listed_tensor_is_stored_and_every_stored_tensor_listed(tmp_path):
    from safetensors.torch import load_file, save_file

    def edit_file(d, fname, fn):
        t = load_file(d / fname)
        fn(t)
        save_file(t, d / fname)

    # A keys tensor deleted from keys.safetensors (the repro: it used to load without it).
    d = _saved(tmp_path, "keys_dropped")
    edit_file(d, "keys.safetensors", lambda t: t.pop("layers.2.keys"))
    _loads_with_error(d, str(d / "keys.safetensors"), "'layers.2.keys'", "missing")

    d = _saved(tmp_path, "update_dropped")
    edit_file(d, UPDATE_FILE, lambda t: t.pop("layers.1.U"))
    _loads_with_error(d, str(d / UPDATE_FILE), "'layers.1.U'", "missing")

    d = _saved(tmp_path, "update_extra")
    edit_file(d, UPDATE_FILE, lambda t: t.__setitem__("layers.3.R", torch.zeros(2)))
    _loads_with_error(d, str(d / UPDATE_FILE), "'layers.3.R'", "not listed")

    d = _saved(tmp_path, "keys_extra")
    edit_file(d, "keys.safetensors", lambda t: t.__setitem__("stowaway", torch.zeros(2)))
    _loads_with_error(d, str(d / "keys.safetensors"), "'stowaway'", "not listed")

    d = _saved(tmp_path, "originals_dropped")
    edit_file(d, ORIGINALS_FILE, lambda t: t.pop("layers.2.weight"))
    _loads_with_error(d, str(d / ORIGINALS_FILE), "'layers.2.weight'", "missing")

    # A keys tensor deleted from the JSON's hashes only (the file still holds it).
    d = _saved(tmp_path, "keys_hash_dropped")
    _rewrite_json(d, lambda m: _pop(m, "tensor_sha256", "keys.safetensors", "layers.2.keys"))
    _loads_with_error(d, "edit.json", "'tensor_sha256.keys.safetensors'", "missing")

    # The keys file's hashes removed from edit.json: the file is there, unlisted.
    d = _saved(tmp_path, "keys_unlisted")
    _rewrite_json(d, lambda m: _pop(m, "tensor_sha256", "keys.safetensors"))
    _loads_with_error(d, str(d / "keys.safetensors"), "lists no tensors")

    # The keys file removed, its hashes kept.
    d = _saved(tmp_path, "keys_file_missing")
    (d / "keys.safetensors").unlink()
    _loads_with_error(d, "keys.safetensors is missing")

    # Originals present, has_originals false (and their hashes gone).
    d = _saved(tmp_path, "originals_unlisted")

    def no_originals(m):
        m["has_originals"] = False
        m["tensor_sha256"].pop(ORIGINALS_FILE)

    _rewrite_json(d, no_originals)
    _loads_with_error(d, str(d / ORIGINALS_FILE), "has_originals: false")

    # A damaged safetensors header.
    d = _saved(tmp_path, "header")
    (d / UPDATE_FILE).write_bytes(b"\xff" * 16)
    _loads_with_error(d, str(d / UPDATE_FILE), "not a readable safetensors file")


def test_tensor_shapes_must_fit_the_weights_and_requests(tmp_path):
    from safetensors.torch import load_file, save_file

    # A stored tensor replaced with another shape, its hash updated to match.
    d = _saved(tmp_path, "reshaped")
    t = load_file(d / UPDATE_FILE)
    t["layers.1.R"] = t["layers.1.R"][:, :-1].contiguous()
    save_file(t, d / UPDATE_FILE)
    sha = tensor_sha256(t["layers.1.R"])
    _rewrite_json(d, lambda m: _set(m, "tensor_sha256", UPDATE_FILE, "layers.1.R", sha))
    _loads_with_error(d, str(d / UPDATE_FILE), "'layers.1.R'")

    # The weight's orientation flipped in edit.json: the factors no longer fit it.
    d = _saved(tmp_path, "flipped")
    _rewrite_json(d, lambda m: _set(m, "model", "transposed", False))
    _loads_with_error(d, "'layers.1.R'", "transposed: False")

    # A request dropped (with its figures): the keys hold one column per request.
    d = _saved(tmp_path, "fewer_requests")

    def drop_request(m):
        m["requests"].pop()
        m["request_figures"].pop()
        m["n_requests"] -= 1

    _rewrite_json(d, drop_request)
    _loads_with_error(d, str(d / "keys.safetensors"), "'layers.1.keys'")


def test_a_well_formed_edit_still_loads_after_the_checks(tmp_path):
    d = _saved(tmp_path)
    loaded = load_edit(d)
    assert loaded.layers == (1, 2) and sorted(loaded.keys) == [1, 2]

    # Fields a save always writes but LoadedEdit does not need stay optional.
    def drop_optional(m):
        for k in ("n_requests", "request_figures", "timings", "created_with"):
            m.pop(k)
        m["updates"]["1"].pop("rank")

    _rewrite_json(d, drop_optional)
    assert load_edit(d).layers == (1, 2)


def test_save_never_clobbers_foreign_directories(tmp_path):
    c = case("gpt2")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not empty"):
        save_edit(c.result, tmp_path / "mine")
    with pytest.raises(FileExistsError, match="not a saved edit"):
        save_edit(c.result, tmp_path / "mine", overwrite=True)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    save_edit(c.result, tmp_path / "edit")
    with pytest.raises(FileExistsError):
        save_edit(c.result, tmp_path / "edit")
    save_edit(c.result, tmp_path / "edit", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["edit", "mine"]  # no temp left


# ----------------------------------------------------------------------------- no pickle


def _assert_plain_safetensors(path):
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    assert all(
        v["dtype"] in ("F32", "BF16", "F16") for k, v in header.items() if k != "__metadata__"
    )


def test_no_pickle_anywhere(tmp_path, monkeypatch):
    c = case("small_gpt2", dense=True)
    save_edit(c.result, tmp_path / "dense")
    save_edit(case("gpt2").result, tmp_path / "lowrank")
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert files and {p.suffix for p in files} == {".json", ".safetensors"}
    for p in files:
        head = p.read_bytes()[:2]
        assert head[:1] != b"\x80" and head != b"PK"  # pickle protocol / torch zip
        if p.suffix == ".json":
            json.loads(p.read_text())
        else:
            _assert_plain_safetensors(p)

    def refuse(*a, **k):
        raise AssertionError("pickle used")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    ed = load_edit(tmp_path / "dense")
    model = c.fresh()
    ed.apply(model)
    ed.revert(model)
    assert_bit_identical(model, c.before)


# ----------------------------------------------------------------------------- PEFT


def _logits(model):
    """Logits (flattened) on the edited prompts and on a batch of random tokens."""
    tok = make_tokenizer()
    g = torch.Generator().manual_seed(0)
    batches = [torch.tensor([tok(r["prompt"].format(r["subject"]))["input_ids"]]) for r in REQUESTS]
    batches.append(torch.randint(0, model.config.vocab_size, (3, 17), generator=g))
    with torch.no_grad():
        return torch.cat([model(input_ids=ids).logits.flatten() for ids in batches])


# fp32 logits of size ~1: W x + B (A x) against (W + B A) x differ by a few ulps (1.2e-7).
PEFT_TOL = dict(rtol=1e-6, atol=2e-6)


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_peft_adapter_on_the_unedited_model_reproduces_the_edit(tmp_path, name):
    from peft import PeftModel

    c = case(name)
    res = c.result
    base = c.fresh()
    edited_logits = _logits(c.model)
    base_logits = _logits(base)
    effect = (edited_logits - base_logits).abs().max().item()

    probe = c.fresh()
    grads = {n: p.requires_grad for n, p in probe.named_parameters()}
    to_peft(res, probe, tmp_path / "adapter")
    assert_bit_identical(probe, c.before)  # the model passed in is not touched
    assert {n: p.requires_grad for n, p in probe.named_parameters()} == grads
    assert not any("lora" in n for n, _ in probe.named_modules())

    acfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert sorted(acfg["target_modules"]) == sorted(
        n.removesuffix(".weight") for n in res.weight_names.values()
    )
    assert acfg["r"] == len(res.requests) == acfg["lora_alpha"]
    assert acfg["fan_in_fan_out"] is (name == "gpt2")
    assert acfg["rank_pattern"] == {}

    peft_model = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    got = _logits(peft_model)
    torch.testing.assert_close(got, edited_logits, **PEFT_TOL)
    assert effect > 1000 * PEFT_TOL["atol"]  # the edit itself moves the logits far more


def test_peft_export_from_a_loaded_dense_edit(tmp_path):
    from peft import PeftModel

    c = case("small_gpt2", dense=True)
    save_edit(c.result, tmp_path / "edit")
    ed = load_edit(tmp_path / "edit")
    assert ed.kinds == {1: "dense", 2: "dense"}
    to_peft(ed, c.fresh(), tmp_path / "adapter")
    acfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert acfg["r"] == acfg["lora_alpha"] == 16  # min(dh, dk), not n
    peft_model = PeftModel.from_pretrained(c.fresh(), tmp_path / "adapter").eval()
    torch.testing.assert_close(_logits(peft_model), _logits(c.model), **PEFT_TOL)

    with pytest.raises(ModelMismatchError, match="made for a 'gpt2' model"):
        to_peft(ed, make_llama(), tmp_path / "other")


# ----------------------------------------------------------------------------- training code


def test_apply_and_revert_inside_training_code(tmp_path):
    """A training loop holds the model in train mode with trainable weights and calls in
    from wherever (grad enabled, no_grad, inference_mode): the edit goes in and out without
    autograd errors, and leaves modes and requires_grad as they were."""
    c = case("llama")
    save_edit(c.result, tmp_path / "edit")
    ed = load_edit(tmp_path / "edit")
    model = c.fresh().train()
    for p in model.parameters():
        p.requires_grad_(True)
    model.model.embed_tokens.weight.requires_grad_(False)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}

    ed.apply(model)  # grad mode on, leaf parameters that require grad
    assert_bit_identical(model, c.after)
    assert model.training and {n: p.requires_grad for n, p in model.named_parameters()} == flags
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    model(input_ids=ids, labels=ids).loss.backward()  # autograd is intact after the write
    W = model.get_parameter(ed.weight_names[2])
    assert W.grad is not None and W.is_leaf

    with torch.no_grad():
        ed.revert(model)
    assert_bit_identical(model, c.before)
    with torch.inference_mode():
        ed.apply(model)
    assert_bit_identical(model, c.after)
    assert not W.is_inference()
    ed.revert(model)
    assert model.training and {n: p.requires_grad for n, p in model.named_parameters()} == flags


def test_peft_adapter_fine_tunes_from_the_edit(tmp_path):
    """The exported adapter is a normal LoRA: loaded trainable, only its factors learn."""
    from peft import PeftModel

    c = case("gpt2")
    to_peft(c.result, c.fresh(), tmp_path / "adapter")
    base = c.fresh()
    model = PeftModel.from_pretrained(base, tmp_path / "adapter", is_trainable=True).train()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, base.config.vocab_size, (2, 9))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    for n, p in model.named_parameters():
        assert (p.grad is not None) == (n in trainable)
    merged = model.merge_and_unload()
    for name in c.result.weight_names.values():
        assert not torch.equal(merged.get_parameter(name), c.before[name])


def test_loaded_edit_repr_names_layers_and_kinds(tmp_path):
    c = case("gpt2")
    save_edit(c.result, tmp_path / "edit")
    ed = load_edit(tmp_path / "edit")
    assert isinstance(ed, LoadedEdit)
    assert "8 requests" in repr(ed) and "1:factors" in repr(ed)


def test_apply_through_training_wrappers(tmp_path):
    """DistributedDataParallel and torch.compile wrap the model; the edit reaches the
    parameters they share with it (DDP: every rank applies the same edit)."""
    import torch.distributed as dist

    c = case("gpt2")
    save_edit(c.result, tmp_path / "edit")
    ed = load_edit(tmp_path / "edit")

    model = c.fresh()
    compiled = torch.compile(model)  # lazy: nothing is compiled by apply
    ed.apply(compiled)
    assert_bit_identical(model, c.after)
    ed.revert(compiled)
    assert_bit_identical(model, c.before)

    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    # DDP in a child process: torch's gloo process group was seen (once in many runs) to hang
    # in its destructor joining its threads, after every check here had passed; the child
    # reports and exits without that teardown, and a hang is a timeout, not a stuck CI.
    from safetensors.torch import save_file

    save_file({k: v.contiguous().clone() for k, v in c.after.items()}, tmp_path / "after.st")
    here = os.path.dirname(os.path.abspath(__file__))
    proc = subprocess.run(
        [sys.executable, "-c", _DDP_CHILD, os.fspath(tmp_path), here],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0 and "DDP edit and revert: ok" in proc.stdout, (
        proc.stdout[-2000:] + proc.stderr[-4000:]
    )


_DDP_CHILD = """
import os, sys
import torch
import torch.distributed as dist
from safetensors.torch import load_file
sys.path.insert(0, sys.argv[2])
from tiny import assert_bit_identical, make_gpt2, snapshot
from memit_fast import load_edit

tmp = sys.argv[1]
model = make_gpt2().train()
before = snapshot(model)
after = load_file(os.path.join(tmp, "after.st"))
ed = load_edit(os.path.join(tmp, "edit"))
store = dist.FileStore(os.path.join(tmp, "store"), 1)
dist.init_process_group("gloo", store=store, rank=0, world_size=1)
ddp = torch.nn.parallel.DistributedDataParallel(model)
ed.apply(ddp)
assert_bit_identical(model, after)
ids = torch.randint(0, model.config.vocab_size, (2, 9))
ddp(input_ids=ids, labels=ids).loss.backward()
ed.revert(ddp)  # backward alone leaves the weights in the edited state
assert_bit_identical(model, before)
print("DDP edit and revert: ok", flush=True)
os._exit(0)
"""


@pytest.mark.parametrize("name", ["small_gpt2", "small_llama"])
def test_update_order_edit_saves_applies_and_exports(tmp_path, name):
    """An edit solved in the update order (factors ``(I, dW^T)``, rank dh): saved dense (the
    smaller), applied bit for bit to a fresh copy, reverted, and exported to PEFT at rank
    dh, reproducing the edited model's logits."""
    from peft import PeftModel

    make = MAKERS[name]
    model = make()
    before = snapshot(model)
    dk, dh = ModelAdapter(model).dims()
    stats = {l: torch.eye(dk) for l in (1, 2)}
    ed = Editor(model, make_tokenizer(), cfg(solve_order="update"), stats=stats)
    res = ed.apply(REQUESTS)
    after = snapshot(model)
    for l in res.layers:
        assert torch.equal(res.factors[l][0], torch.eye(dh)) and res.factors[l][1].shape == (dk, dh)

    save_edit(res, tmp_path / "edit")
    loaded = load_edit(tmp_path / "edit")
    assert loaded.kinds == {1: "dense", 2: "dense"}
    fresh = make()
    assert loaded.apply(fresh) == {1: True, 2: True}
    assert_bit_identical(fresh, after)
    loaded.revert(fresh)
    assert_bit_identical(fresh, before)

    to_peft(res, make(), tmp_path / "adapter")
    acfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert acfg["r"] == dh
    peft_model = PeftModel.from_pretrained(make(), tmp_path / "adapter").eval()
    torch.testing.assert_close(_logits(peft_model), _logits(model), **PEFT_TOL)

"""Sequential editing: a later apply solves against lambda C plus the keys written before."""

import pytest
import torch
from tiny import REQUESTS, assert_bit_identical, make_gpt2, make_tokenizer, snapshot

from memit_fast import EditConfig
from memit_fast.editor import Editor

TEMPLATES = ("{}", "The weather is nice today. {}")


def make_editor(model, remember=True):
    cfg = EditConfig(layers=(1, 2), steps=3, context_templates=TEMPLATES, mom2_update_weight=5.0)
    g = torch.Generator().manual_seed(0)
    X = torch.randn(256, 512, generator=g)
    C = X @ X.T / 512  # a well-conditioned SPD second moment
    return Editor(model, make_tokenizer(), cfg, stats={1: C, 2: C}, remember_keys=remember)


def test_second_batch_solves_against_remembered_keys():
    model = make_gpt2()
    ed = make_editor(model)
    C = ed._stats[1].mom2.double()
    r1 = ed.apply(REQUESTS[:4])
    r2 = ed.apply(REQUESTS[4:])
    K1 = r1.keys[1].double()
    K2 = r2.keys[1].double()
    lam = ed.config.mom2_update_weight
    # Direct dense implementation of the equation for the second batch.
    U2 = torch.linalg.solve(lam * C + K1 @ K1.T + K2 @ K2.T, K2)
    torch.testing.assert_close(r2.factors[1][1].double(), U2, rtol=1e-5, atol=1e-8)
    # The first batch was solved against lambda C alone.
    U1 = torch.linalg.solve(lam * C + K1 @ K1.T, K1)
    torch.testing.assert_close(r1.factors[1][1].double(), U1, rtol=1e-5, atol=1e-8)
    # The solver's factor equals a fresh factor of the accumulated matrix.
    s = ed._solvers[1]
    A = lam * C + K1 @ K1.T + K2 @ K2.T
    L = s.L.double()
    assert float((L @ L.T - A).norm() / A.norm()) < 1e-6


def test_plain_mode_does_not_remember():
    model = make_gpt2()
    ed = make_editor(model, remember=False)
    C = ed._stats[1].mom2.double()
    ed.apply(REQUESTS[:4])
    r2 = ed.apply(REQUESTS[4:])
    assert ed._written == []
    K2 = r2.keys[1].double()
    U2 = torch.linalg.solve(ed.config.mom2_update_weight * C + K2 @ K2.T, K2)
    torch.testing.assert_close(r2.factors[1][1].double(), U2, rtol=1e-5, atol=1e-8)


def test_revert_order_and_forgetting():
    model = make_gpt2()
    snap = snapshot(model)
    ed = make_editor(model)
    r1 = ed.apply(REQUESTS[:4])
    r2 = ed.apply(REQUESTS[4:])
    with pytest.raises(RuntimeError, match="reverse order"):
        r1.revert()
    r2.revert()
    assert len(ed._written) == 1
    r1.revert()
    assert ed._written == []
    assert_bit_identical(model, snap)
    # After forgetting, a new batch is solved against lambda C alone again.
    C = ed._stats[1].mom2.double()
    r3 = ed.apply(REQUESTS[:4])
    K = ed._written[0].keys[1].double()
    U = torch.linalg.solve(ed.config.mom2_update_weight * C + K @ K.T, K)
    torch.testing.assert_close(r3.factors[1][1].double(), U, rtol=1e-5, atol=1e-8)


def test_failed_apply_is_not_remembered(monkeypatch):
    model = make_gpt2()
    ed = make_editor(model)
    ed.apply(REQUESTS[:4])
    import memit_fast.linalg as linalg_mod

    def boom(*a, **k):
        raise RuntimeError("injected")

    monkeypatch.setattr(linalg_mod, "apply_update", boom)
    with pytest.raises(RuntimeError):
        ed.apply(REQUESTS[4:])
    assert len(ed._written) == 1
    assert ed._solvers[1].n_committed == 4


def test_sequential_editing_continues_from_a_saved_edit(tmp_path):
    """The keys travel with the saved edit: a new Editor on a model the edit was loaded into,
    told to remember it, solves the next batch as the original Editor does."""
    from memit_fast import load_edit

    model = make_gpt2()
    ed = make_editor(model)
    r1 = ed.apply(REQUESTS[:4])
    r1.save(tmp_path / "e1")
    r2 = ed.apply(REQUESTS[4:])

    other = make_gpt2()
    loaded = load_edit(tmp_path / "e1")
    assert set(loaded.keys) == {1, 2}
    torch.testing.assert_close(loaded.keys[1], r1.keys[1], rtol=0, atol=0)
    loaded.apply(other)
    ed2 = make_editor(other)
    ed2.remember(loaded)
    r2b = ed2.apply(REQUESTS[4:])
    for l in (1, 2):
        torch.testing.assert_close(r2b.factors[l][1], r2.factors[l][1], rtol=1e-5, atol=1e-7)
    for (n, p), (_, q) in zip(model.named_parameters(), other.named_parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=n)
    # Without remembering, the second batch is solved against lambda C alone: different.
    fresh = make_gpt2()
    load_edit(tmp_path / "e1").apply(fresh)
    r2c = make_editor(fresh).apply(REQUESTS[4:])
    assert not torch.allclose(r2c.factors[1][1], r2.factors[1][1], rtol=1e-3, atol=1e-5)


def test_remember_refuses_an_edit_without_keys():
    ed = make_editor(make_gpt2())

    class NoKeys:
        layers = (1, 2)
        keys = {}

    with pytest.raises(ValueError, match="no keys for layers"):
        ed.remember(NoKeys())


def test_corrupted_saved_keys_are_refused(tmp_path):
    from memit_fast import load_edit
    from memit_fast.artifacts import KEYS_FILE, ArtifactError

    ed = make_editor(make_gpt2())
    ed.apply(REQUESTS[:2]).save(tmp_path / "e")
    f = tmp_path / "e" / KEYS_FILE
    data = bytearray(f.read_bytes())
    data[-5] ^= 0xFF  # a bit of the last tensor's data
    f.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="SHA-256"):
        load_edit(tmp_path / "e")


def test_remember_takes_the_edits_context_templates(tmp_path, caplog):
    """A new Editor whose config names no templates continues with those of the edit it
    remembers (one session would reuse its first apply's), and says that statistics it has
    yet to compute, without a stats_dir, will come from the edited model."""
    from memit_fast import load_edit

    model = make_gpt2()
    r1 = make_editor(model).apply(REQUESTS[:2])
    r1.save(tmp_path / "e1")
    other = make_gpt2()
    loaded = load_edit(tmp_path / "e1")
    loaded.apply(other)
    cfg = EditConfig(layers=(1, 2), steps=3, mom2_update_weight=5.0)  # no templates
    ed = Editor(other, make_tokenizer(), cfg)
    with caplog.at_level("WARNING", logger="memit_fast.editor"):
        ed.remember(loaded)
    assert ed.context_templates() == TEMPLATES
    assert "stats_dir" in caplog.text


def test_dropped_results_are_freed_but_their_keys_still_protect():
    """A result the caller drops frees its copy of the original weights (the Editor holds it
    weakly); its keys stay remembered, since its edit is still in the model."""
    import gc
    import weakref

    model = make_gpt2()
    ed = make_editor(model)
    refs = [weakref.ref(ed.apply(REQUESTS[i : i + 2])) for i in (0, 2, 4)]
    gc.collect()
    assert all(r() is None for r in refs)
    assert len(ed._written) == 3


def test_forced_revert_undoes_and_forgets_the_later_edits():
    model = make_gpt2()
    snap = snapshot(model)
    ed = make_editor(model)
    a = ed.apply(REQUESTS[:2])
    b = ed.apply(REQUESTS[2:4])
    with pytest.raises(RuntimeError, match="reverse order"):
        a.revert()
    a.revert(force=True)
    assert_bit_identical(model, snap)
    assert b.reverted and ed._written == []
    with pytest.raises(RuntimeError, match="already reverted"):
        b.revert()
    # A dropped later result no longer blocks the order check; its change to the weights
    # is still caught, and forcing undoes it and forgets its keys.
    a = ed.apply(REQUESTS[:2])
    ed.apply(REQUESTS[2:4])  # dropped at once
    with pytest.raises(RuntimeError, match="changed after this edit"):
        a.revert()
    a.revert(force=True)
    assert_bit_identical(model, snap)
    assert ed._written == []


def test_remember_refuses_twice_reverted_and_foreign_edits_and_forget_undoes_it(tmp_path):
    from memit_fast import load_edit

    model = make_gpt2()
    ed = make_editor(model)
    own = ed.apply(REQUESTS[:2])
    with pytest.raises(ValueError, match="remembered already"):
        ed.remember(own)
    own.save(tmp_path / "e")
    own.revert()
    with pytest.raises(ValueError, match="was reverted"):
        ed.remember(own)

    other = make_gpt2()
    loaded = load_edit(tmp_path / "e")
    loaded.apply(other)
    ed2 = make_editor(other)
    ed2.remember(loaded)
    with pytest.raises(ValueError, match="remembered already"):
        ed2.remember(loaded)
    # Reverted with its own revert, then forgotten: the next edit is solved against
    # lambda C alone, as in a session that never made it.
    loaded.revert(other)
    ed2.forget(loaded)
    with pytest.raises(ValueError, match="not remembered"):
        ed2.forget(loaded)
    got = ed2.apply(REQUESTS[2:4])
    want = make_editor(make_gpt2()).apply(REQUESTS[2:4])
    for l in got.layers:
        assert torch.equal(got.delta(l), want.delta(l))

    class Wide:
        layers = (1,)
        keys = {1: torch.zeros(7, 2)}

    with pytest.raises(ValueError, match="does not fit this model"):
        ed2.remember(Wide())


def test_a_reloaded_edit_is_the_same_edit_and_dropped_results_still_protect(tmp_path):
    """The README's `editor.remember(load_edit(dir))` drops the loaded object at once: the
    keys are still recognized (remembering a reload again is refused, forgetting a reload
    works), and keys of dropped results still enter the next solve."""
    from types import SimpleNamespace

    from memit_fast import load_edit

    model = make_gpt2()
    made = make_editor(model).apply(REQUESTS[:2])
    made.save(tmp_path / "e")
    ed = make_editor(model)
    ed.remember(load_edit(tmp_path / "e"))
    with pytest.raises(ValueError, match="remembered already"):
        ed.remember(load_edit(tmp_path / "e"))
    with pytest.raises(ValueError, match="remembered already"):
        ed.remember(made)  # the result the saved edit came from
    ed.forget(load_edit(tmp_path / "e"))
    assert ed._written == []
    # An edit-like object that cannot be referenced weakly is held as it is.
    plain = SimpleNamespace(layers=(1,), keys={1: torch.randn(256, 2)})
    ed.remember(plain)
    ed.forget(plain)

    kept_model, dropped_model = make_gpt2(), make_gpt2()
    kept, dropped = make_editor(kept_model), make_editor(dropped_model)
    alive = [kept.apply(REQUESTS[i : i + 2]) for i in (0, 2)]
    for i in (0, 2):
        dropped.apply(REQUESTS[i : i + 2])  # dropped at once
    a = kept.apply(REQUESTS[4:])
    b = dropped.apply(REQUESTS[4:])
    for l in a.layers:
        assert torch.equal(a.delta(l), b.delta(l))
    assert len(alive) == 2


def test_forced_revert_under_a_partly_overlapping_later_edit():
    """A on layers (1, 2), then B on (2, 3): forcing A's revert restores 1 and 2; B keeps
    its layer 3 (its keys and its own revert), and reverting it then restores everything."""
    model = make_gpt2()
    snap = snapshot(model)
    ed = make_editor(model)
    a = ed.apply(REQUESTS[:2])
    ed.config = ed.config.replace(layers=(2, 3))
    b = ed.apply(REQUESTS[2:4])
    a.revert(force=True)
    assert not b.reverted
    assert [sorted(w.keys) for w in ed._written] == [[3]]
    b.revert()
    assert_bit_identical(model, snap)
    assert ed._written == []


def test_forced_revert_without_remembered_keys_undoes_the_later_results_too():
    model = make_gpt2()
    snap = snapshot(model)
    ed = make_editor(model, remember=False)
    a = ed.apply(REQUESTS[:2])
    b = ed.apply(REQUESTS[2:4])
    a.revert(force=True)
    assert_bit_identical(model, snap)
    assert b.reverted  # its revert would otherwise write a's edit back


def test_forced_reverts_track_the_layers_each_result_still_holds():
    """A on layer 2, B on 1 and 2: forcing A's revert leaves B only layer 1. C then edits
    layer 2: B's revert touches layer 1 alone and leaves C applied and remembered."""
    model = make_gpt2()
    snap = snapshot(model)
    ed = make_editor(model)
    ed.config = ed.config.replace(layers=(2,))
    a = ed.apply(REQUESTS[:2])
    ed.config = ed.config.replace(layers=(1, 2))
    b = ed.apply(REQUESTS[2:4])
    a.revert(force=True)
    assert set(b._originals) == {1} and not b.reverted
    ed.config = ed.config.replace(layers=(2,))
    c = ed.apply(REQUESTS[4:6])
    b.revert()  # no later result holds layer 1
    assert not c.reverted and [sorted(w.keys) for w in ed._written] == [[2]]
    c.revert()
    assert_bit_identical(model, snap)


def test_two_saved_edits_with_equal_keys_are_two_edits(tmp_path):
    """The same subject edited twice (to two targets) gives equal keys at a layer; resumed
    elsewhere, both edits are remembered, as the session that made them protected both."""
    from memit_fast import load_edit

    model = make_gpt2()
    ed = make_editor(model)
    ed.config = ed.config.replace(layers=(1,))
    first = {"prompt": "The capital of {} is", "subject": "France", "target": "Rome"}
    ed.apply([first]).save(tmp_path / "e1")
    ed.apply([dict(first, target="Paris")]).save(tmp_path / "e2")
    e1, e2 = load_edit(tmp_path / "e1"), load_edit(tmp_path / "e2")
    assert torch.equal(e1.keys[1], e2.keys[1])
    other = make_editor(make_gpt2())
    other.remember(e1)
    other.remember(e2)
    assert len(other._written) == 2
    with pytest.raises(ValueError, match="remembered already"):
        other.remember(load_edit(tmp_path / "e2"))

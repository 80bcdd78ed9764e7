"""``memit-fast eval`` on the committed world model: JSON and table output, exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import SHARED_DATA

from memit_fast.cli import build_parser, main
from memit_fast.data import save_requests
from memit_fast.evaluate import counterfact_metrics
from memit_fast.testing import load_world, world_dir

pytestmark = pytest.mark.skipif(
    not os.path.isfile(os.path.join(world_dir(), "world.json")), reason="world model missing"
)


@pytest.fixture(scope="module")
def world_data(tmp_path_factory):
    model, tok, world = load_world()
    reqs = world.edit_requests(8, seed=1)
    path = tmp_path_factory.mktemp("cli") / "world-requests.jsonl"
    save_requests(reqs, path)
    return str(path), reqs, model, tok


def test_eval_json_matches_library(world_data, capsys):
    path, reqs, model, tok = world_data
    code = main(["eval", "--model", world_dir(), "--data", path, "-n", "5", "--json",
                 "--device", "cpu"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0
    res = json.loads(out)
    assert res["n"] == 5 and res["metric_set"] == "counterfact"
    want = counterfact_metrics(model, tok, reqs[:5])
    for k in ("efficacy_success", "paraphrase_success", "neighborhood_success", "score"):
        assert res["metrics"][k] == pytest.approx(want[k])
    assert "records" not in res["metrics"]


def test_eval_table_and_full_output(world_data, capsys, tmp_path):
    path, *_ = world_data
    out_file = tmp_path / "full.json"
    code = main(["eval", "--model", world_dir(), "--data", path, "--out", str(out_file),
                 "--generation", "--max-length", "16", "--device", "cpu"])  # fmt: skip
    text = capsys.readouterr().out
    assert code == 0
    assert "Efficacy success (ES)" in text and "Score" in text and "n-gram entropy" in text
    full = json.loads(out_file.read_text())
    assert len(full["records"]) == 8 and "generations" in full["records"][0]


def test_eval_zsre_metric_set(capsys, tmp_path):
    # zsRE data on the world model: the numbers are meaningless, the plumbing is not
    path = os.path.join(SHARED_DATA, "zsre", "zsre-sample.json")
    code = main(["eval", "--model", world_dir(), "--data", path, "--json", "--device", "cpu"])
    res = json.loads(capsys.readouterr().out)
    assert code == 0 and res["metric_set"] == "zsre"
    assert set(res["metrics"]) >= {"efficacy_acc", "paraphrase_acc", "specificity_acc"}


def test_eval_bad_input_exit_codes(world_data, capsys, tmp_path):
    path, *_ = world_data
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"prompt": "no braces", "subject": "x", "target": "y"}]))
    assert main(["eval", "--model", world_dir(), "--data", str(bad)]) == 2
    assert "bad.json record 0: field 'prompt'" in capsys.readouterr().err
    assert main(["eval", "--model", str(tmp_path / "nope"), "--data", path]) == 2
    assert "is not a directory" in capsys.readouterr().err
    assert main(["eval", "--model", world_dir(), "--data", str(tmp_path / "none.json")]) == 2
    assert main(["eval", "--model", world_dir(), "--data", path, "-n", "0"]) == 2
    assert main(["eval", "--model", world_dir()]) == 2  # argparse: --data missing
    assert main([]) == 2
    assert main(["--help"]) == 0
    capsys.readouterr()


def test_a_model_directory_that_does_not_load_is_bad_input(world_data, capsys, tmp_path):
    """A broken config or missing weights exit 2 with one line naming --model."""
    path, *_ = world_data
    empty = tmp_path / "empty-model"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    assert main(["eval", "--model", str(empty), "--data", path]) == 2
    err = capsys.readouterr().err
    assert "--model" in err and "does not load" in err and len(err.strip().splitlines()) == 1


def test_subcommands_register_through_functions():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert "eval" in sub.choices


def test_console_entry_point(world_data):
    path, *_ = world_data
    r = subprocess.run(
        [sys.executable, "-m", "memit_fast.cli", "eval", "--model", world_dir(), "--data", path,
         "-n", "2", "--json", "--device", "cpu"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["n"] == 2


def one_line_error(capsys, argv, *words):
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    # one line of ours (transformers may draw a loading bar before it)
    lines = [line for line in err.splitlines() if line.startswith("memit-fast eval: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


def test_eval_bad_options_are_refused_before_loading(world_data, capsys, tmp_path, monkeypatch):
    import memit_fast.cli as cli

    def boom(*a, **k):
        raise AssertionError("the model was loaded before the bad input was refused")

    monkeypatch.setattr(cli, "load_model", boom)
    path, *_ = world_data
    base = ["eval", "--model", world_dir(), "--data", path, "--device", "cpu"]
    out = tmp_path / "nodir" / "x.json"
    one_line_error(capsys, [*base, "--out", str(out)], "--out", "does not exist")
    one_line_error(capsys, [*base, "--out", str(tmp_path)], "--out", "is a directory")
    for opt in ("--top-k", "--max-length"):
        for v in ("0", "-1"):
            one_line_error(capsys, [*base, "--generation", opt, v], opt, "at least 1")
    one_line_error(capsys, [*base, "--device", "bogus"], "--device", "bogus")
    one_line_error(capsys, ["eval", "--model", str(tmp_path), "--data", path], "no config.json")
    latin = tmp_path / "latin1.json"
    latin.write_bytes(b'[{"prompt": "{} est \xe9", "subject": "A", "target": "B"}]')
    one_line_error(capsys, [*base[:4], str(latin)], "latin1.json: not UTF-8 text")


def test_eval_limits_of_the_model(world_data, capsys, tmp_path):
    path, reqs, model, tok = world_data
    n_ctx = model.config.n_positions
    base = ["eval", "--model", world_dir(), "--data", path, "--device", "cpu", "-n", "2"]
    one_line_error(
        capsys, [*base, "--generation", "--max-length", str(n_ctx + 1)], "--max-length", "context"
    )
    one_line_error(capsys, [*base, "--generation", "--top-k", "100000"], "--top-k")
    # a prompt longer than the model's context: the record and the field, not an IndexError
    recs = [r.to_dict() for r in reqs[:3]]
    recs[2]["neighborhood_prompts"] = ["A is", "la " * 300]
    recs[2]["neighborhood_targets"] = ["b", "c"]
    long = tmp_path / "long.json"
    long.write_text(json.dumps(recs))
    one_line_error(
        capsys,
        ["eval", "--model", world_dir(), "--data", str(long), "--device", "cpu"],
        "long.json record 2",
        "field 'neighborhood_prompts' item 1",
        f"context of {n_ctx} tokens",
    )


def test_eval_zsre_longer_than_the_context_names_the_record(capsys):
    path = os.path.join(SHARED_DATA, "zsre", "zsre-1k.json")
    one_line_error(
        capsys,
        ["eval", "--model", world_dir(), "--data", path, "-n", "540", "--device", "cpu"],
        "zsre-1k.json record 437",
        "field 'neighborhood_prompts' item 0",
        "longer than the model's context",
    )


def test_eval_reads_a_file_with_a_byte_order_mark(world_data, capsys, tmp_path):
    _, reqs, *_ = world_data
    bom = tmp_path / "bom.json"
    bom.write_bytes(b"\xef\xbb\xbf" + json.dumps([r.to_dict() for r in reqs[:2]]).encode())
    code = main(["eval", "--model", world_dir(), "--data", str(bom), "--json", "--device", "cpu"])
    assert code == 0, capsys.readouterr().err
    assert json.loads(capsys.readouterr().out)["n"] == 2

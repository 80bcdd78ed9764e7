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


def test_eval_failure_exit_code(world_data, capsys, tmp_path):
    path, *_ = world_data
    empty = tmp_path / "empty-model"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    assert main(["eval", "--model", str(empty), "--data", path]) == 1
    assert "failed" in capsys.readouterr().err


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

"""The README's examples run as written, on tiny models, so that the documentation cannot rot.

Only placeholders are adapted: the model (a tiny GPT-2 from ``tests/tiny.py``), the
configuration and statistics corpus (small, so that each test takes seconds), and paths.
What the snippets show is checked against independent facts: weights against snapshots
taken before the edit, request figures against their definitions, loaded requests against
the raw JSON records, a PEFT adapter against the edited model's logits."""

from __future__ import annotations

import glob
import json
import os

import pytest
import torch
from conftest import SHARED_DATA
from tiny import (
    CORPUS,
    REQUESTS,
    assert_bit_identical,
    exact_config,
    make_gpt2,
    make_tokenizer,
    snapshot,
)

import memit_fast
from memit_fast.cli import main
from memit_fast.data import (
    EditRequest,
    load_counterfact,
    load_requests,
    load_zsre,
    save_requests,
)
from memit_fast.evaluate import counterfact_metrics, format_metrics

CF_VAL = os.path.join(SHARED_DATA, "counterfact", "counterfact-val.json")
CF_FULL = os.path.join(SHARED_DATA, "counterfact", "counterfact-full-sample.json")
ZSRE = os.path.join(SHARED_DATA, "zsre", "zsre-sample.json")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def editor(model, **kw):
    """``memit_fast.Editor(model, tokenizer)`` with the small test settings."""
    return memit_fast.Editor(model, make_tokenizer(), exact_config(), corpus=CORPUS, **kw)


# ----------------------------------------------------------------------------- Use


def test_readme_use():
    model = make_gpt2()
    before = snapshot(model)
    result = editor(model).apply(
        [{"prompt": "{} plays the sport of", "subject": "LeBron James", "target": "football"}]
    )
    changed = [n for n, p in model.state_dict().items() if not torch.equal(p, before[n])]
    assert sorted(changed) == sorted(result.weight_names.values())  # the model is now edited

    (fig,) = result.request_figures()  # per request: loss, steps, target prob.
    assert set(fig) == {"case_id", "loss", "nll", "kl", "steps", "target_prob", "delta_norm"}
    t = result.targets
    assert fig["target_prob"] == pytest.approx(float(torch.exp(-t.nll[0])))
    assert fig["delta_norm"] == pytest.approx(float((t.z[0] - t.h[0]).norm()), rel=1e-6)
    assert 1 <= fig["steps"] <= result.config.steps
    assert {"statistics", "targets", "keys", "solve", "total"} <= set(result.timings)
    assert all(v >= 0 for v in result.timings.values())  # seconds per phase

    result.revert()  # exactly as before, bit for bit
    assert_bit_identical(model, before)


def test_readme_config_json_round_trip_and_presets():
    cfg = exact_config(extra={"note": [1, 2]})
    assert memit_fast.EditConfig.from_json(cfg.to_json()) == cfg
    for name in ("gpt2-xl", "gpt-j-6b", "llama-2-7b", "smollm2-135m"):
        assert isinstance(memit_fast.preset(name), memit_fast.EditConfig)
    with pytest.raises(ValueError, match="no preset"):
        memit_fast.preset("gpt-5")


# ----------------------------------------------------------------------------- Data


def test_readme_data_and_evaluation():
    model, tokenizer = make_gpt2(), make_tokenizer()
    requests = load_counterfact(CF_VAL, n=3)  # reduced format
    raw = json.load(open(CF_VAL, encoding="utf-8"))[:3]
    assert [r.text for r in requests] == [d["prompt"] for d in raw]
    assert [r.target for r in requests] == [d["target_new"] for d in raw]
    assert [r.target_true for r in requests] == [d["ground_truth"] for d in raw]
    assert load_counterfact(CF_FULL, n=1)[0].subject == "Danielle Darrieux"  # full format

    before = counterfact_metrics(model, tokenizer, requests)
    result = editor(model).apply(requests)
    after = counterfact_metrics(model, tokenizer, requests, baseline=before)
    table = format_metrics(after)
    for label in (
        "Efficacy success",
        "Paraphrase success",
        "Neighborhood success",
        "Efficacy magnitude",
        "Paraphrase magnitude",
        "Neighborhood magnitude",
        "Score",
        "EasyEdit rewrite acc",
        "EasyEdit rephrase acc",
        "EasyEdit locality",
        "neighborhood next token changed",
    ):
        assert label in table, label
    assert "neighborhood_changed" in after and "neighborhood_changed" not in before
    result.revert()


@pytest.mark.parametrize("target", ["answers", "alt"])
def test_readme_load_zsre_targets(target):
    raw = json.load(open(ZSRE, encoding="utf-8"))
    reqs = load_zsre(ZSRE, target=target)
    want = [d["answers"][0] if target == "answers" else d["alt"] for d in raw]
    assert [r.target for r in reqs] == want
    assert [r.text for r in reqs] == [d["src"] for d in raw]


@pytest.mark.parametrize(
    ("path", "fmt"),
    [(CF_VAL, "counterfact_reduced"), (CF_FULL, "counterfact"), (ZSRE, "zsre")],
)
def test_readme_load_requests_detects_the_layouts(path, fmt):
    assert {r.extra["format"] for r in load_requests(path)} == {fmt}


def test_save_requests_round_trip_as_documented(tmp_path):
    reqs = [
        EditRequest("{} plays", "A B", "golf", case_id="x7", extra={"note": 1}),
        EditRequest("{} lives in", "C D", "Oslo", target_true="Rome"),  # no case_id
    ]
    for name in ("r.json", "r.jsonl"):
        save_requests(reqs, tmp_path / name)
        back = load_requests(tmp_path / name)
        assert back[0] == reqs[0] and back[0].extra == {"format": "requests"}
        # a request without a case_id gets its position in the file
        assert back[1].case_id == 1
        assert back[1] == EditRequest("{} lives in", "C D", "Oslo", target_true="Rome", case_id=1)


def test_load_requests_unknown_format_names_the_argument(tmp_path):
    with pytest.raises(ValueError, match=r"load_requests: format 'csv' is unknown.*zsre"):
        load_requests(CF_VAL, format="csv")
    # checked before the file is read
    with pytest.raises(ValueError, match="format 'csv'"):
        load_requests(tmp_path / "missing.json", format="csv")


# ----------------------------------------------------------------------------- Saving


def test_readme_saving_sharing_editing_again(tmp_path):
    from peft import PeftModel

    model = make_gpt2()
    result = editor(model, stats_dir=tmp_path / "stats").apply(REQUESTS[:2])
    edited = snapshot(model)
    result.save(tmp_path / "edit")
    assert {"edit.json", "update.safetensors", "keys.safetensors", "originals.safetensors"} == set(
        os.listdir(tmp_path / "edit")
    )

    # load_edit applies it to another copy of the model and reverts it
    other = make_gpt2()
    original = snapshot(other)
    edit = memit_fast.load_edit(tmp_path / "edit")
    assert all(edit.apply(other).values())
    assert_bit_identical(other, edited)
    edit.revert(other)
    assert_bit_identical(other, original)

    # to_peft: the adapter on the unedited model computes what the edited model computes
    result.to_peft(model, tmp_path / "adapter")
    ids = torch.tensor([make_tokenizer()("The capital of France is")["input_ids"]])
    peft_model = PeftModel.from_pretrained(make_gpt2(), tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(ids).logits, model(ids).logits, atol=1e-5, rtol=0)

    # another session: remember the saved edit, edit again, forget it
    again = make_gpt2()
    edit.apply(again)
    ed = editor(again, stats_dir=tmp_path / "stats")
    ed.remember(memit_fast.load_edit(tmp_path / "edit"))
    ed.apply(REQUESTS[2:4]).revert()
    ed.forget(edit)  # the same edit in another form
    with pytest.raises(ValueError, match="not remembered"):
        ed.forget(edit)

    # one Editor edits sequentially; revert goes in reverse order
    ed = editor(model)
    r1 = ed.apply(REQUESTS[4:5])
    r2 = ed.apply(REQUESTS[5:6])
    with pytest.raises(RuntimeError, match="reverse order"):
        r1.revert()
    r2.revert()
    r1.revert()
    assert_bit_identical(model, edited)
    ed.config = ed.config.replace(mom2_update_weight=10.0)


# ----------------------------------------------------------------------------- CLI


def test_cli_bench_runs_every_bench_script(capsys):
    """``memit-fast bench NAME`` runs ``benchmarks/bench_NAME.py`` for every such script."""
    names = sorted(
        os.path.basename(p)[len("bench_") : -len(".py")]
        for p in glob.glob(os.path.join(REPO, "benchmarks", "bench_*.py"))
    )
    assert "targets" in names
    for name in names:
        assert main(["bench", name, "--help"]) == 0, name
        assert f"bench_{name}.py" in capsys.readouterr().out


def test_readme_command_line(tmp_path, capsys, monkeypatch):
    """``stats`` precomputes what ``edit`` then reads; ``eval`` prints a table or JSON."""
    model_dir = tmp_path / "model"
    make_gpt2().save_pretrained(model_dir)
    make_tokenizer().save_pretrained(model_dir)
    (tmp_path / "corpus.txt").write_text("\n".join(CORPUS))
    (tmp_path / "edits.json").write_text(json.dumps(REQUESTS[:3]))
    cfg = memit_fast.EditConfig(
        layers=(1, 2),
        steps=3,
        stats_samples=len(CORPUS),
        mom2_update_weight=10.0,
        context_templates=("{}", "The weather is nice today. {}"),
    )
    (tmp_path / "config.json").write_text(cfg.to_json())
    stats = tmp_path / "stats"
    base = ["--model", str(model_dir), "--device", "cpu"]
    corpus = ["--corpus", str(tmp_path / "corpus.txt"), "--stats-dir", str(stats)]

    assert main(["stats", *base, *corpus, "--layers", "1,2", "--samples", str(len(CORPUS))]) == 0
    out = capsys.readouterr().out
    assert "layer 1:" in out and "layer 2:" in out
    cached = sorted(os.listdir(stats))
    assert len(cached) == 2

    edit = ["edit", *base, *corpus, "--requests", str(tmp_path / "edits.json")]
    edit += ["--config", str(tmp_path / "config.json"), "--quiet", "--json"]

    def no_pass(*a, **k):
        raise AssertionError("edit recomputed the statistics that 'stats' had cached")

    monkeypatch.setattr(memit_fast.editor, "collect_stats", no_pass)
    assert main([*edit, "--out", str(tmp_path / "edited")]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["requests"] == 3 and summary["layers"] == [1, 2]
    assert sorted(os.listdir(stats)) == cached  # the precomputed statistics were used
    # a destination that exists and is not empty is refused up front (--overwrite allows it)
    assert main([*edit, "--out", str(tmp_path / "edited")]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main([*edit, "--out", str(model_dir / "sub")]) == 2

    data = ["eval", "--model", str(tmp_path / "edited"), "--data", CF_VAL, "-n", "2"]
    assert main(data) == 0
    assert "Efficacy success (ES)" in capsys.readouterr().out
    assert main([*data, "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["n"] == 2 and got["metric_set"] == "counterfact"
    assert "efficacy_success" in got["metrics"]


def test_edit_result_repr_is_a_summary():
    """``repr(result)`` names the requests, layers, solver and state in one line, rather than
    printing every factor and target vector."""
    from tiny import make_gpt2, make_tokenizer

    from memit_fast import EditConfig, Editor

    torch.manual_seed(0)
    model = make_gpt2()
    cfg = EditConfig(layers=(1,), steps=2, context_templates=("{}",), stats_samples=8)
    dk = model.config.n_inner or 4 * model.config.n_embd
    C = torch.eye(dk)
    res = Editor(model, make_tokenizer(), cfg, stats={1: C}).apply(
        [{"prompt": "{} plays the sport of", "subject": "LeBron James", "target": "football"}]
    )
    text = repr(res)
    assert text.startswith("EditResult(1 request, layers [1], solver 'memit', applied, ")
    assert "\n" not in text and len(text) < 200
    res.revert()
    assert "reverted" in repr(res)

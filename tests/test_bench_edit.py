"""``benchmarks/bench_edit.py`` with ``--eval`` over several N: each N is judged against the
unedited model on its own requests (a regression: the baseline of the first N was reused)."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "benchmarks" / "results" / "world_config.json"


@pytest.mark.skipif(not CONFIG.exists(), reason="no world settings")
def test_eval_over_several_n(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "benchmarks/bench_edit.py", "--model", "world", "--config",
           str(CONFIG), "--n", "2,4", "--modes", "fast", "--eval", "--steps", "3",
           "--threads", "1"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    rows = list(csv.DictReader((tmp_path / "edit.csv").read_text().splitlines()))
    for n in ("2", "4"):
        got = {r["metric"] for r in rows if r["n"] == n and r["variant"] == "unedited"}
        assert {"ES", "PS", "NS"} <= got, (n, got)
        assert any(
            r["n"] == n and r["variant"] == "fast" and r["metric"] == "changed" for r in rows
        )
    assert "layers=0-1;steps=3" in rows[-1]["shape"]  # the settings came from --config


@pytest.mark.skipif(not (REPO.parent / "shared/data/zsre/zsre-1k.json").exists(), reason="no zsRE")
def test_zsre_quality_uses_the_zsre_accuracies():
    """``--data zsre`` scores with zsRE's token accuracies and EasyEdit's locality: the
    unedited model agrees with itself, a perturbed one does not."""
    sys.path.insert(0, str(REPO))
    from tiny import make_gpt2, make_tokenizer

    from benchmarks.bench_edit import quality, zsre_requests

    reqs = zsre_requests(4, offset=2)
    assert reqs[0].case_id is not None and len(reqs) == 4
    tok, model = make_tokenizer(), make_gpt2()
    base = quality(model, tok, reqs, data="zsre")
    assert set(base) == {"efficacy_acc", "paraphrase_acc", "specificity_acc", "raw"}
    assert all(0 <= base[k] <= 1 for k in set(base) - {"raw"})
    same = quality(model, tok, reqs, base["raw"], "zsre")
    assert same["locality"] == 1.0
    with torch.no_grad():
        model.lm_head.weight.add_(torch.randn_like(model.lm_head.weight))
    moved = quality(model, tok, reqs, base["raw"], "zsre")
    assert moved["locality"] < 1.0


def test_data_other_than_counterfact_needs_smollm2():
    proc = subprocess.run(
        [sys.executable, "benchmarks/bench_edit.py", "--model", "world", "--data", "zsre"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2 and "--data applies to --model smollm2" in proc.stderr

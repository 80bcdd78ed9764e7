"""``benchmarks/bench_edit.py`` with ``--eval`` over several N: each N is judged against the
unedited model on its own requests (a regression: the baseline of the first N was reused)."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

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

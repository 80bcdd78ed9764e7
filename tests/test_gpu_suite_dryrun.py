"""``benchmarks/gpu_suite.sh --dry-run`` runs end to end on the CPU (tiny sizes), so the GPU
suite cannot rot between the sessions that have a GPU."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SUITE = REPO / "benchmarks" / "gpu_suite.sh"


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_gpu_suite_syntax():
    subprocess.run(["bash", "-n", str(SUITE)], check=True)


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_gpu_suite_dry_run(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path), PYTHON=sys.executable, OMP_NUM_THREADS="1")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    proc = subprocess.run(
        ["bash", str(SUITE), "--dry-run", "--budget", "300"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    log = (tmp_path / "suite.log").read_text() if (tmp_path / "suite.log").exists() else ""
    assert proc.returncode == 0, proc.stdout + proc.stderr + log[-4000:]
    md = (tmp_path / "suite.md").read_text()
    assert "published/fast" in md  # the side-by-side table of bench_edit.py
    assert "FAILED" not in md
    # The targets' verdicts, from this run's rows: the dry run's sizes are not the targets'.
    assert "### targets.py" in md and "| rank-n factor update vs refactoring | 5 |" in md
    assert "not measured" in md
    rows = (tmp_path / "edit.csv").read_text().splitlines()
    for arch in ("llama-2-7b-tiny", "gpt-j-6b-tiny", "gpt2-xl-tiny"):
        assert any(arch in r and ",ratio," in r for r in rows), arch
    assert (tmp_path / "stats.csv").exists()
    # The target phase by chunk size (bench_targets.py): its table, and a row per chunk size.
    assert "### target phase by chunk size" in md
    chunk_rows = (tmp_path / "targets_chunk.csv").read_text()
    assert "chunk=2,s_per_request_step" in chunk_rows and "chunk=4,delta_rel_diff" in chunk_rows
    assert "mistral-7b-tiny" in chunk_rows and "whole chunk=2,prefix_reuse_speedup" in chunk_rows
    assert "sdpa=no-cudnn" in chunk_rows  # the run without cuDNN attention
    # The extension's blocked triangular solves, timed beside the library's.
    assert "update_blocked" in (tmp_path / "bench_linalg.csv").read_text()
    for png in ("edit_time_vs_n.png", "edit_speedup.png", "stats_passes.png"):
        assert (tmp_path / png).stat().st_size > 1000, png
    # Nothing was written into the repository's own results folder.
    assert not any(p.name.startswith(".step") for p in (REPO / "benchmarks" / "results").glob(".*"))

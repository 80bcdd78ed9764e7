"""The kernel and linear-algebra benchmarks run on the CPU at tiny sizes (the references,
the kernels under the Triton interpreter), so that they cannot rot between GPU runs. Their
own validation (each variant checked against a reference before it is timed) is what fails
here if an op breaks."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def run_bench(script: str, *args: str, out: Path) -> str:
    env = {**os.environ, "TRITON_INTERPRET": "1", "OUT": str(out)}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_bench_covariance_runs(tmp_path):
    pytest.importorskip("triton")
    out = run_bench(
        "bench_covariance.py", "--small", "--small-d", "64", "--small-t", "128",
        "--interpret", "--no-save", out=tmp_path,
    )  # fmt: skip
    for variant in ("torch-reference", "triton-masked", "gemm-panels-1024", "frac_of_dense_gemm"):
        assert variant in out, variant


def test_bench_update_runs_both_orders(tmp_path):
    pytest.importorskip("triton")
    out = run_bench(
        "bench_update.py", "--small", "--small-dk", "64", "--small-dh", "16", "--small-n", "32",
        "--orders", "keys,update", "--interpret", "--no-save", out=tmp_path,
    )  # fmt: skip
    for variant in ("torch-chain ", "torch-chain-update", "-update ", "speedup_same_order"):
        assert variant in out, variant


def test_bench_linalg_runs_every_update_method_and_the_update_order(tmp_path):
    out = run_bench(
        "bench_linalg.py", "--device", "cpu", "--dk", "64", "--n", "8,100", "--rep", "1",
        "--update-methods", "qr,chol,product", "--update-blocks", "0,16", out=tmp_path,
    )  # fmt: skip
    for variant in ("published ", "update_product_b16", "update_chol_b0", "layer_solve "):
        assert variant in out, variant
    # dh = dk / 4 = 16 < n = 100 only: the update order's rows, at float64 accuracy.
    rows = [line.split() for line in out.splitlines() if line.startswith("dk=")]
    delta = [r for r in rows if r[4] == "layer_delta"]
    assert delta and {r[3] for r in delta} == {"100"}
    diffs = [float(r[6]) for r in delta if r[5] == "rel_diff_fp64"]
    assert diffs and max(diffs) <= 1e-10
    # Every solution, the published one's too, has a float64-level backward error; the
    # updated factors equal the refactored one.
    bwd = {(r[3], r[4]): float(r[6]) for r in rows if r[5] == "bwd_err"}
    for n in ("8", "100"):
        for variant in ("published", "layer_solve", "layer_solve_fp64", "memit_solve"):
            assert bwd[(n, variant)] <= 2.0**-52, (n, variant)
    assert bwd[("100", "layer_delta")] <= 2.0**-52 and ("8", "layer_delta") not in bwd
    ref = [float(r[6]) for r in rows if r[5] == "rel_diff_refactor"]
    assert len(ref) == 2 * (1 + 3 * 2) and max(ref) <= 1e-10  # (n) x ("update" + 3 x 2)
    assert (tmp_path / "bench_linalg.csv").is_file()


def _bench_targets():
    sys.path.insert(0, str(ROOT))
    import benchmarks.bench_targets as bt

    return bt


def test_bench_targets_times_each_chunk_size_and_checks_the_vectors(tmp_path, monkeypatch):
    bt = _bench_targets()
    monkeypatch.setenv("OUT", str(tmp_path))
    args = ["--model", "llama-2-7b", "--tiny", "--device", "cpu", "--n", "5", "--chunks", "2,5",
            "--steps", "2", "--profile", "3", "--md", str(tmp_path / "t.md")]  # fmt: skip
    assert bt.main(args) == 0
    rows = (tmp_path / "targets_chunk.csv").read_text().splitlines()
    for chunk in (2, 5):
        got = {r.split(",")[9]: float(r.split(",")[10]) for r in rows if f",chunk={chunk}," in r}
        assert got["seconds"] > 0 and got["requests_per_s"] > 0, got
        assert got["delta_rel_diff"] <= 1e-4 and got["oom_halvings"] == 0, got
    md = (tmp_path / "t.md").read_text()
    assert "| 5 |" in md and "Profile of one chunk of 3" in md and "aten::mm" in md
    calls = [float(r.split(",")[10]) for r in rows if ",aten_calls_per_step," in r]
    assert len(calls) == 1 and calls[0] > 100, calls  # a step is many calls, even on a miniature

    # Vectors that differ between chunk sizes fail the run.
    real = bt.compute_targets

    def skewed(model, adapter, prepared, settings, pad, chunk):
        tr = real(model, adapter, prepared, settings, pad, chunk)
        if chunk == 5:
            tr.z.mul_(1.01)
        return tr

    monkeypatch.setattr(bt, "compute_targets", skewed)
    assert bt.main([*args[:-4], "--no-save"]) == 1


def test_bench_targets_whole_sequences_on_a_sliding_window_model(tmp_path, monkeypatch):
    """``--whole`` times the first chunk size without prefix reuse and checks its vectors
    against the reused ones; the Mistral miniature (sliding-window cache layers) takes the
    prefix cache."""
    from tiny import count_prefix_caches

    bt = _bench_targets()
    monkeypatch.setenv("OUT", str(tmp_path))
    used = count_prefix_caches(monkeypatch)
    args = ["--model", "mistral-7b", "--tiny", "--device", "cpu", "--n", "4", "--chunks", "4",
            "--steps", "2", "--whole"]  # fmt: skip
    assert bt.main(args) == 0
    assert used and all(used), used
    rows = (tmp_path / "targets_chunk.csv").read_text().splitlines()
    got = {r.split(",")[9]: float(r.split(",")[10]) for r in rows if ",whole chunk=4," in r}
    assert got["seconds"] > 0 and got["prefix_reuse_speedup"] > 0, got
    assert got["delta_rel_diff"] <= 1e-4, got


def test_bench_targets_busy_time_counts_each_kernel_once():
    """An operator's profile row carries its kernels' device time too: the busy time sums
    the kernels' rows only."""
    from types import SimpleNamespace as NS

    bt = _bench_targets()
    cpu, cuda = torch.autograd.DeviceType.CPU, torch.autograd.DeviceType.CUDA
    rows = [
        NS(device_type=cpu, self_device_time_total=300.0),  # aten::mm, its kernel's time
        NS(device_type=cuda, self_device_time_total=300.0),  # the GEMM kernel
        NS(device_type=cuda, self_device_time_total=200.0),  # another kernel
    ]

    class Avg(list):
        def table(self, sort_by, row_limit):
            assert sort_by == "self_device_time_total"
            return "table"

    prof = NS(events=lambda: [], key_averages=lambda: Avg(rows))
    busy, calls, table = bt._profile_summary(prof, torch.device("cuda"))
    assert busy == pytest.approx(500e-6) and calls == 0 and table == "table"


def test_bench_targets_reports_a_chunk_halved_for_memory(tmp_path, monkeypatch):
    import memit_fast.targets as targets_mod

    bt = _bench_targets()
    monkeypatch.setenv("OUT", str(tmp_path))
    real = targets_mod.optimize_chunk

    def oom_above_2(model, adapter, prepared, *a, **k):
        if len(prepared) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(model, adapter, prepared, *a, **k)

    monkeypatch.setattr(targets_mod, "optimize_chunk", oom_above_2)
    args = ["--tiny", "--device", "cpu", "--n", "4", "--chunks", "2,4", "--steps", "1"]
    assert bt.main(args) == 0
    rows = (tmp_path / "targets_chunk.csv").read_text().splitlines()
    halved = {r.split(",")[8]: float(r.split(",")[10]) for r in rows if ",oom_halvings," in r}
    assert halved == {"chunk=2": 0.0, "chunk=4": 1.0}, halved


def test_sdpa_context_leaves_the_math_alone_and_names_bad_choices():
    """``--sdpa no-cudnn`` (bench_stats.py, bench_targets.py) only narrows the backends
    torch may pick: on the CPU attention gives the same numbers under it."""
    sys.path.insert(0, str(ROOT))
    from benchmarks import harness

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 9, 16, generator=g) for _ in range(3))
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    with harness.sdpa_context("no-cudnn"):
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert torch.allclose(out, ref, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="sdpa: one of"):
        harness.sdpa_context("flash-only")
